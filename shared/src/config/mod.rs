//! Configuration files: loading, validation and the sections shared by several binaries.
//!
//! Every binary's configuration is a serde struct read from TOML. Optional fields have a
//! default, unknown keys are rejected (a typo is an error, not a silently ignored line), and
//! after parsing one [`Validate`] pass checks the values. Whatever goes wrong, the error
//! names the file, the key and the problem, for example
//! `conf/node.toml: cluster.nodes[1]: "redis//x" is not a redis:// URL`.
//!
//! Durations are written the way people write them (`"250ms"`, `"10s"`, `"2m"`).

mod cluster;
mod edge;
mod error;
mod node;
mod telemetry;

pub use cluster::{AckMode, ClusterConfig};
pub use edge::{
    AdminConfig, BackendConfig, EdgeConfig, EdgeLimitsConfig, HashConfig, HashSource, HealthConfig,
    MAX_WEIGHT, ServerConfig, TunnelConfig, parse_network, valid_id, validate_backends,
};
pub use error::{ConfigError, FieldError};
pub use node::{
    AuthConfig, AuthMode, DrainConfig, MIN_SECRET_LEN, NodeConfig, NodeLimitsConfig, NodeSection,
};
pub use telemetry::{LogFormat, TelemetryConfig};

use serde::de::DeserializeOwned;
use std::path::Path;

/// A configuration section that can check its own values after parsing.
pub trait Validate {
    /// Checks every value; the error's key is relative to this section.
    fn validate(&self) -> Result<(), FieldError>;
}

/// Reads, parses and validates the configuration file at `path`.
///
/// # Errors
/// A [`ConfigError`] naming the file, the key and the problem when the file cannot be read,
/// is not valid TOML, has an unknown key or a value of the wrong type, or fails validation.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::new(path, "", format!("cannot read the file: {err}")))?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is only used in error messages.
///
/// # Errors
/// As [`load`], apart from reading the file.
pub fn parse<T: DeserializeOwned + Validate>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|err| ConfigError::new(path, "", format!("not valid TOML: {}", err.message())))?;
    let config: T = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let key = if key == "." { String::new() } else { key };
        ConfigError::new(path, key, err.into_inner().message().to_owned())
    })?;
    config
        .validate()
        .map_err(|field| ConfigError::new(path, field.key, field.problem))?;
    Ok(config)
}

/// Checks a list of `redis://` URLs, naming `key[index]` in the error.
pub(crate) fn validate_redis_urls(key: &str, urls: &[String]) -> Result<(), FieldError> {
    for (index, raw) in urls.iter().enumerate() {
        let ok = url::Url::parse(raw)
            .map(|url| matches!(url.scheme(), "redis" | "rediss") && url.host().is_some())
            .unwrap_or(false);
        if !ok {
            return Err(FieldError::new(
                format!("{key}[{index}]"),
                format!("{raw:?} is not a redis:// URL"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        cluster: ClusterConfig,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), FieldError> {
            self.cluster.validate().map_err(|e| e.within("cluster"))
        }
    }

    fn parse_sample(text: &str) -> Result<Sample, String> {
        parse::<Sample>(Path::new("conf/node.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_takes_every_default() {
        let sample = parse_sample("").expect("an empty file is valid");
        assert!(sample.cluster.nodes.is_empty());
        assert_eq!(sample.cluster.ack, AckMode::Leader);
    }

    #[test]
    fn bad_url_names_file_key_and_problem() {
        let err = parse_sample("[cluster]\nnodes = [\"redis://127.0.0.1:7000\", \"redis//x\"]\n")
            .unwrap_err();
        assert_eq!(
            err,
            "conf/node.toml: cluster.nodes[1]: \"redis//x\" is not a redis:// URL"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let err = parse_sample("[cluster]\nnodez = []\n").unwrap_err();
        assert!(
            err.starts_with("conf/node.toml: cluster.nodez: unknown field `nodez`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse_sample("[cluster]\nstream_length = \"many\"\n").unwrap_err();
        assert!(
            err.starts_with("conf/node.toml: cluster.stream_length: "),
            "{err}"
        );
    }

    #[test]
    fn broken_toml_names_the_file() {
        let err = parse_sample("[cluster\n").unwrap_err();
        assert!(err.starts_with("conf/node.toml: not valid TOML"), "{err}");
    }
}
