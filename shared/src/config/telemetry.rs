//! The `[log]` section: log level and output format, shared by every binary.

use serde::Deserialize;

use super::{FieldError, Validate};

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging settings. `RUST_LOG`, when set, overrides `level`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// A tracing filter directive such as `info` or `ringcast=debug,pingora=warn`.
    /// Default `info`.
    pub level: String,
    /// Output format. Default `text`.
    pub format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self) -> Result<(), FieldError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|err| {
                FieldError::new(
                    "level",
                    format!("{:?} is not a log filter: {err}", self.level),
                )
            })
    }
}
