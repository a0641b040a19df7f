//! The node's configuration file (`conf/node.toml`): `[node]`, `[auth]`, `[limits]`,
//! `[drain]`, `[cluster]` and `[log]`.
//!
//! Every field has a default except `auth.secret`, which `auth.mode = "jwt"` (the default)
//! requires; a file with only `[auth] mode = "none"` runs a standalone node on
//! `127.0.0.1:9001`.

use serde::Deserialize;
use std::time::Duration;

use super::{ClusterConfig, FieldError, TelemetryConfig, Validate};

/// Shortest accepted `auth.secret`, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The whole node configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Identity, listener and heartbeat.
    pub node: NodeSection,
    /// How clients authenticate.
    pub auth: AuthConfig,
    /// Per-connection limits.
    pub limits: NodeLimitsConfig,
    /// Graceful shutdown on SIGTERM.
    pub drain: DrainConfig,
    /// Shared state; no `nodes` means standalone on the memory implementation.
    pub cluster: ClusterConfig,
    /// Logging.
    pub log: TelemetryConfig,
}

impl Validate for NodeConfig {
    fn validate(&self) -> Result<(), FieldError> {
        self.node.validate().map_err(|e| e.within("node"))?;
        self.auth.validate().map_err(|e| e.within("auth"))?;
        self.limits.validate().map_err(|e| e.within("limits"))?;
        self.drain.validate().map_err(|e| e.within("drain"))?;
        self.cluster.validate().map_err(|e| e.within("cluster"))?;
        self.log.validate().map_err(|e| e.within("log"))
    }
}

/// The `[node]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Node id, unique in the cluster (letters, digits, `-_.`). Default `node-1`.
    pub id: String,
    /// `host:port` of the HTTP/WebSocket listener. Default `127.0.0.1:9001`.
    pub listen: String,
    /// How often the node sends a `ping` frame. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A connection that sends nothing (no `pong`, no request) for this long is closed with
    /// 4001. Default 45 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// A connection must send `hello` within this time. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// How often a connection whose rooms or offsets changed saves its session, so that a
    /// client of a node killed without warning can still resume. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub session_save_interval: Duration,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            id: "node-1".to_owned(),
            listen: "127.0.0.1:9001".to_owned(),
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_timeout: Duration::from_secs(45),
            hello_timeout: Duration::from_secs(10),
            session_save_interval: Duration::from_secs(2),
        }
    }
}

impl Validate for NodeSection {
    fn validate(&self) -> Result<(), FieldError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return Err(FieldError::new(
                "id",
                "must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(FieldError::new(
                "listen",
                format!("{:?} is not an ip:port address", self.listen),
            ));
        }
        non_zero("heartbeat_interval", self.heartbeat_interval)?;
        non_zero("hello_timeout", self.hello_timeout)?;
        non_zero("session_save_interval", self.session_save_interval)?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(FieldError::new(
                "heartbeat_timeout",
                "must be longer than heartbeat_interval",
            ));
        }
        Ok(())
    }
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// HS256 JWT in `hello.token` (the default).
    #[default]
    Jwt,
    /// No authentication: every client may join and publish anywhere; the user id is the
    /// `sub` of an unverified token if one is given, else `anonymous-<conn>`. Local use only.
    None,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `jwt` (default) or `none`.
    pub mode: AuthMode,
    /// HMAC secret of the tokens, at least 16 bytes; required with `jwt`.
    pub secret: String,
}

impl Validate for AuthConfig {
    fn validate(&self) -> Result<(), FieldError> {
        if self.mode == AuthMode::Jwt && self.secret.len() < MIN_SECRET_LEN {
            return Err(FieldError::new(
                "secret",
                "must be at least 16 bytes when mode is \"jwt\"",
            ));
        }
        Ok(())
    }
}

/// The `[limits]` section: what one connection may do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLimitsConfig {
    /// Largest frame (message) a client may send; larger ones close the connection with
    /// 1009. Default 65536.
    pub max_message_bytes: usize,
    /// WebSocket read buffer per connection, and the most read from the socket at once.
    /// It stays allocated (and resident) for the connection's life, so it is most of an
    /// idle connection's memory; client frames are mostly small requests, and a larger
    /// frame is still accepted, read in several pieces. Default 2048.
    pub read_buffer_bytes: usize,
    /// WebSocket write buffer per connection. Default 4096.
    pub write_buffer_bytes: usize,
    /// Rooms one connection may be in. Default 64.
    pub max_rooms_per_connection: usize,
    /// Sustained publishes per second per connection. Default 50.
    pub publish_rate_per_sec: f64,
    /// Publishes allowed in a burst above the rate. Default 100.
    pub publish_burst: u32,
    /// Malformed frames or unknown operations tolerated (each answered with an error) before
    /// the connection is closed with 1007 (malformed JSON) or 1008 (protocol misuse).
    /// Default 5.
    pub max_bad_frames: u32,
    /// Frames waiting to be written to one connection; more closes it with 4000
    /// (slow consumer). Default 1024.
    pub send_queue_messages: usize,
    /// Bytes waiting to be written to one connection; more closes it with 4000.
    /// Default 1048576.
    pub send_queue_bytes: usize,
    /// Kernel send buffer (`SO_SNDBUF`) of each client socket; 0 (the default) keeps the
    /// kernel's auto-tuning, which may hold up to `net.ipv4.tcp_wmem` (often 4 MiB) for a
    /// client that stops reading. A small value bounds that memory and makes a stalled
    /// client overflow its send queue sooner.
    pub socket_send_buffer_bytes: usize,
    /// Connections this node accepts; further upgrades get HTTP 503 with `Retry-After`.
    /// Default 19000.
    pub max_connections: usize,
}

impl Default for NodeLimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            read_buffer_bytes: 2048,
            write_buffer_bytes: 4096,
            max_rooms_per_connection: 64,
            publish_rate_per_sec: 50.0,
            publish_burst: 100,
            max_bad_frames: 5,
            send_queue_messages: 1024,
            send_queue_bytes: 1024 * 1024,
            socket_send_buffer_bytes: 0,
            max_connections: 19_000,
        }
    }
}

impl Validate for NodeLimitsConfig {
    fn validate(&self) -> Result<(), FieldError> {
        for (key, value) in [
            ("max_message_bytes", self.max_message_bytes),
            ("read_buffer_bytes", self.read_buffer_bytes),
            ("max_rooms_per_connection", self.max_rooms_per_connection),
            ("publish_burst", self.publish_burst as usize),
            ("max_bad_frames", self.max_bad_frames as usize),
            ("send_queue_messages", self.send_queue_messages),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                return Err(FieldError::new(key, "must be at least 1"));
            }
        }
        if self.max_message_bytes < 1024 {
            return Err(FieldError::new(
                "max_message_bytes",
                "must be at least 1024",
            ));
        }
        if self.send_queue_bytes < self.max_message_bytes {
            return Err(FieldError::new(
                "send_queue_bytes",
                "must be at least max_message_bytes",
            ));
        }
        if !(self.publish_rate_per_sec.is_finite() && self.publish_rate_per_sec > 0.0) {
            return Err(FieldError::new("publish_rate_per_sec", "must be above 0"));
        }
        Ok(())
    }
}

/// The `[drain]` section: what SIGTERM does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Time between `/readyz` turning 503 and the first connection being closed, so edges
    /// stop routing new clients here. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Connections are closed with 1012 spread evenly over this window. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The process exits by this time after SIGTERM, whatever is left. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(2),
            window: Duration::from_secs(5),
            deadline: Duration::from_secs(20),
        }
    }
}

impl Validate for DrainConfig {
    fn validate(&self) -> Result<(), FieldError> {
        non_zero("deadline", self.deadline)?;
        if self.delay + self.window >= self.deadline {
            return Err(FieldError::new(
                "deadline",
                "must be longer than delay + window",
            ));
        }
        Ok(())
    }
}

fn non_zero(key: &str, value: Duration) -> Result<(), FieldError> {
    if value.is_zero() {
        return Err(FieldError::new(key, "must be longer than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    fn parse_node(text: &str) -> Result<NodeConfig, String> {
        parse::<NodeConfig>(Path::new("node.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_file_runs_standalone_without_auth() {
        let config = parse_node("[auth]\nmode = \"none\"\n").unwrap();
        assert_eq!(config.node.listen, "127.0.0.1:9001");
        assert!(config.cluster.nodes.is_empty());
        assert_eq!(config.limits.max_message_bytes, 65536);
    }

    #[test]
    fn jwt_needs_a_secret() {
        let err = parse_node("").unwrap_err();
        assert_eq!(
            err,
            "node.toml: auth.secret: must be at least 16 bytes when mode is \"jwt\""
        );
    }

    #[test]
    fn bad_listen_names_the_key() {
        let err = parse_node("[auth]\nmode=\"none\"\n[node]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.starts_with("node.toml: node.listen: "), "{err}");
    }

    #[test]
    fn drain_deadline_must_cover_delay_and_window() {
        let text =
            "[auth]\nmode=\"none\"\n[drain]\ndelay=\"5s\"\nwindow=\"10s\"\ndeadline=\"12s\"\n";
        let err = parse_node(text).unwrap_err();
        assert!(err.starts_with("node.toml: drain.deadline: "), "{err}");
    }

    #[test]
    fn unknown_limit_is_rejected() {
        let err = parse_node("[auth]\nmode=\"none\"\n[limits]\nmax_rooms = 3\n").unwrap_err();
        assert!(
            err.starts_with("node.toml: limits.max_rooms: unknown field"),
            "{err}"
        );
    }
}
