//! Loading `conf/node.toml` and applying the environment overrides
//! `RINGCAST_NODE_ID`, `RINGCAST_LISTEN` and `RINGCAST_REDIS_NODES` (comma-separated
//! `redis://` URLs), so one file can serve several nodes.

use ringcast_shared::config::{self, ConfigError, NodeConfig, Validate};
use std::path::Path;

/// Pseudo file name used in errors about environment overrides.
const ENV_SOURCE: &str = "environment";

/// Reads and validates the file, applies the overrides and validates again.
///
/// # Errors
/// A [`ConfigError`] naming the file (or `environment`), the key and the problem.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let mut config: NodeConfig = config::load(path)?;
    apply_env(&mut config, |name| std::env::var(name).ok());
    config
        .validate()
        .map_err(|field| ConfigError::new(Path::new(ENV_SOURCE), field.key, field.problem))?;
    Ok(config)
}

fn apply_env(config: &mut NodeConfig, var: impl Fn(&str) -> Option<String>) {
    if let Some(id) = var("RINGCAST_NODE_ID") {
        config.node.id = id;
    }
    if let Some(listen) = var("RINGCAST_LISTEN") {
        config.node.listen = listen;
    }
    if let Some(nodes) = var("RINGCAST_REDIS_NODES") {
        config.cluster.nodes = nodes
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_replace_file_values() {
        let mut config = NodeConfig::default();
        apply_env(&mut config, |name| match name {
            "RINGCAST_NODE_ID" => Some("n7".into()),
            "RINGCAST_LISTEN" => Some("127.0.0.1:0".into()),
            "RINGCAST_REDIS_NODES" => Some("redis://127.0.0.1:1, redis://127.0.0.1:2".into()),
            _ => None,
        });
        assert_eq!(config.node.id, "n7");
        assert_eq!(config.node.listen, "127.0.0.1:0");
        assert_eq!(config.cluster.nodes.len(), 2);
    }

    #[test]
    fn bad_override_names_the_key() {
        let mut config = NodeConfig::default();
        config.auth.mode = ringcast_shared::config::AuthMode::None;
        apply_env(&mut config, |name| {
            (name == "RINGCAST_LISTEN").then(|| "x".into())
        });
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "node.listen");
    }
}
