//! The `[cluster]` section: where the shared state lives and how long it is kept.

use serde::Deserialize;
use std::time::Duration;

use super::{FieldError, Validate, validate_redis_urls};

/// When a publish is acknowledged to the publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// As soon as the room's master has appended the message to history (the default).
    /// A message acked this way can be lost if that master dies before replicating it.
    #[default]
    Leader,
    /// Only after at least one replica confirmed the write (Redis `WAIT`), so an acked
    /// message survives the crash of its master.
    Replicated,
}

/// Shared-state settings. With no `nodes` the node runs standalone on the in-process memory
/// implementation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Seed URLs of the Redis Cluster (`redis://127.0.0.1:7000`); the rest of the topology is
    /// discovered. Empty (the default) selects the memory implementation.
    pub nodes: Vec<String>,
    /// Prefix of every key and channel Ringcast owns, so several deployments (or tests) can
    /// share one cluster. Default `rc`.
    pub key_prefix: String,
    /// When publishes are acknowledged. Default `leader`.
    pub ack: AckMode,
    /// How long a `replicated` publish waits for a replica before failing. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub replica_ack_timeout: Duration,
    /// Most recent messages kept per room for resume. Default 1000.
    pub stream_length: u64,
    /// A room's history and offsets are dropped after this long without a publish; the next
    /// publish then starts a new epoch. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Upper bound on how long presence entries and registry entries of a node that died
    /// without cleaning up stay visible. Owners refresh at a third of it. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// How long a disconnected client's session can be resumed. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Timeout of one Redis request, and of connecting. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            key_prefix: "rc".to_owned(),
            ack: AckMode::Leader,
            replica_ack_timeout: Duration::from_secs(1),
            stream_length: 1000,
            history_ttl: Duration::from_secs(3600),
            presence_ttl: Duration::from_secs(10),
            session_ttl: Duration::from_secs(120),
            request_timeout: Duration::from_secs(2),
        }
    }
}

impl Validate for ClusterConfig {
    fn validate(&self) -> Result<(), FieldError> {
        validate_redis_urls("nodes", &self.nodes)?;
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 32
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':');
        if !prefix_ok {
            return Err(FieldError::new(
                "key_prefix",
                "must be 1 to 32 characters of letters, digits, '-', '_' or ':'",
            ));
        }
        if self.stream_length == 0 {
            return Err(FieldError::new("stream_length", "must be at least 1"));
        }
        for (key, value) in [
            ("replica_ack_timeout", self.replica_ack_timeout),
            ("history_ttl", self.history_ttl),
            ("session_ttl", self.session_ttl),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(FieldError::new(key, "must be longer than zero"));
            }
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err(FieldError::new("presence_ttl", "must be at least 1s"));
        }
        Ok(())
    }
}
