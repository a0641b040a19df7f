//! Logging setup shared by every binary: a tracing subscriber writing text or JSON lines to
//! standard error, with the level from config unless `RUST_LOG` is set, and a bridge that
//! turns `log` records (pingora logs through the `log` crate) into tracing events.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::config::{LogFormat, TelemetryConfig};

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The level directive could not be parsed.
    #[error("invalid log filter {directive:?}: {reason}")]
    BadFilter {
        /// The directive as given.
        directive: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A global subscriber or `log` logger was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Installs the global subscriber and the `log` bridge. Call once, early in `main`.
///
/// # Errors
/// A bad filter directive, or a second call in the same process.
pub fn init(config: &TelemetryConfig) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => parse_filter(&directive)?,
        _ => parse_filter(&config.level)?,
    };
    // `try_init` below also installs the `log` bridge (tracing-subscriber's default
    // `tracing-log` feature); installing it here as well made every start fail.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BoxMakeWriter::new(std::io::stderr));
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|err| TelemetryError::AlreadyInitialised(err.to_string()))
}

fn parse_filter(directive: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(directive).map_err(|err| TelemetryError::BadFilter {
        directive: directive.to_owned(),
        reason: err.to_string(),
    })
}
