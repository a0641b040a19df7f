//! The edge configuration (`conf/edge.toml`): listeners, backends, hashing, health checks,
//! admission limits and tunnel policy of `ringcast-edge`.

use serde::Deserialize;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::{FieldError, TelemetryConfig, Validate};

/// The whole `ringcast-edge` configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Downstream listener and process settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The upstream WebSocket servers. At least one is required.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Where the consistent-hash key comes from.
    #[serde(default)]
    pub hash: HashConfig,
    /// Active and passive health checking.
    #[serde(default)]
    pub health: HealthConfig,
    /// Admission control.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Policy for upgraded (WebSocket) connections.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Logging.
    #[serde(default)]
    pub log: TelemetryConfig,
}

/// `[server]`: the downstream listener and process lifecycle.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address clients connect to. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Worker threads. Default 2.
    pub threads: usize,
    /// After a graceful upgrade (`-u`) or SIGTERM, how long the old process keeps the
    /// tunnels it still holds; the rest are closed spread over this window. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Extra time after the grace period before the old process exits. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Unix socket the listeners are handed over on during a graceful upgrade.
    /// Default `/tmp/ringcast-edge-upgrade.sock`.
    pub upgrade_socket: PathBuf,
    /// Where the process id is written. Default `/tmp/ringcast-edge.pid`.
    pub pid_file: PathBuf,
    /// Read timeout of plain HTTP requests and responses (both directions). It never applies
    /// to upgraded tunnels, which use `tunnel.idle_timeout`. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub http_read_timeout: Duration,
    /// Peers whose `X-Forwarded-For` / `X-Forwarded-Proto` are believed (exact addresses or
    /// `addr/prefix` networks). Everybody else's are replaced. Default none.
    pub trusted_proxies: Vec<String>,
    /// PEM certificate chain for TLS termination; with `tls_key`. Default none (plain TCP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS termination. Default none.
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            threads: 2,
            grace_period: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
            upgrade_socket: PathBuf::from("/tmp/ringcast-edge-upgrade.sock"),
            pid_file: PathBuf::from("/tmp/ringcast-edge.pid"),
            http_read_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[admin]`: the operator API (`/backends`, `/reload`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener. Default `127.0.0.1:9080` (loopback only: the API has
    /// no authentication).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9080)),
        }
    }
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name used by the admin API, logs and metrics.
    pub id: String,
    /// `ip:port` of the backend.
    pub address: SocketAddr,
    /// Relative share of keys. Default 1. Weight 0 means "drained": the backend stays in
    /// the ring (so no other key moves) but gets no new connections.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `[hash]`: the consistent-hash key and cookie stickiness.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashConfig {
    /// Ordered key sources; the first one present in a request is the key:
    /// `query:NAME`, `header:NAME`, `cookie:NAME` or `ip` (the full client address).
    /// Default `["ip"]`.
    pub sources: Vec<String>,
    /// When set, the first answer carries a cookie of this name naming the backend, and
    /// requests presenting it go to that backend while it takes new connections
    /// (socket.io long-polling affinity). Default none.
    pub sticky_cookie: Option<String>,
}

impl Default for HashConfig {
    fn default() -> Self {
        Self {
            sources: vec!["ip".to_owned()],
            sticky_cookie: None,
        }
    }
}

/// One parsed entry of `hash.sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// A query-string parameter.
    Query(String),
    /// A request header (case-insensitive).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The full client IP address (after trusted-proxy resolution).
    ClientIp,
}

impl HashSource {
    /// Parses `query:NAME`, `header:NAME`, `cookie:NAME` or `ip`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let named = |name: &str, make: fn(String) -> Self| {
            if name.is_empty() {
                Err(format!("{text:?} needs a name after the colon"))
            } else {
                Ok(make(name.to_owned()))
            }
        };
        match text.split_once(':') {
            None if text == "ip" => Ok(Self::ClientIp),
            Some(("query", name)) => named(name, Self::Query),
            Some(("header", name)) => named(name, Self::Header),
            Some(("cookie", name)) => named(name, Self::Cookie),
            _ => Err(format!(
                "{text:?} is not a key source (use query:NAME, header:NAME, cookie:NAME or ip)"
            )),
        }
    }
}

/// `[health]`: active `/readyz` checks and passive connect-failure ejection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Path probed with `GET`; 2xx = ready, any other answer = draining, no answer = down.
    /// Default `/readyz`.
    pub path: String,
    /// Time between probes of one backend. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Probe timeout (connect + answer). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes before a backend takes new connections again. Default 2.
    pub rise: u32,
    /// Consecutive failures before a backend stops taking new connections. Default 2.
    pub fall: u32,
    /// Upstream connect timeout; a failure retries on the next ring node. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a connect failure keeps a backend out of selection. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub passive_eject_for: Duration,
    /// At most this many backends are ejected by passive signals at the same time
    /// (active checks are not capped). Default 1.
    pub max_passive_ejected: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: "/readyz".to_owned(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            connect_timeout: Duration::from_secs(1),
            passive_eject_for: Duration::from_secs(10),
            max_passive_ejected: 1,
        }
    }
}

/// `[limits]`: admission control. Zero disables a limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// New upgrades per second accepted for one backend; above it → 503. Default 0 (off).
    pub backend_upgrades_per_second: u32,
    /// Concurrent connections (tunnels and requests in flight) of one client IP; above
    /// it → 429. Default 0 (off).
    pub client_concurrent: u32,
    /// New requests per second of one client IP; above it → 429. Default 0 (off).
    pub client_requests_per_second: u32,
    /// The `Retry-After` value sent with a rejection. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            backend_upgrades_per_second: 0,
            client_concurrent: 0,
            client_requests_per_second: 0,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// `[tunnel]`: upgraded connections. The relay is transparent: frames are not parsed and
/// there is no size limit in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// A tunnel whose client sends nothing (not even a ping) for this long is closed, logged
    /// and counted. `0s` disables it. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Parses `addr` or `addr/prefix` into a network.
pub fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?} is not an address or network"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
    };
    Ok((addr, prefix))
}

impl Validate for EdgeConfig {
    fn validate(&self) -> Result<(), FieldError> {
        self.server.validate().map_err(|e| e.within("server"))?;
        validate_backends(&self.backends)?;
        self.hash.validate().map_err(|e| e.within("hash"))?;
        self.health.validate().map_err(|e| e.within("health"))?;
        self.log.validate().map_err(|e| e.within("log"))
    }
}

impl Validate for ServerConfig {
    fn validate(&self) -> Result<(), FieldError> {
        if self.threads == 0 {
            return Err(FieldError::new("threads", "must be at least 1"));
        }
        if self.http_read_timeout.is_zero() {
            return Err(FieldError::new(
                "http_read_timeout",
                "must be longer than zero",
            ));
        }
        for (index, net) in self.trusted_proxies.iter().enumerate() {
            parse_network(net)
                .map_err(|p| FieldError::new(format!("trusted_proxies[{index}]"), p))?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Err(FieldError::new("tls_key", "is required with tls_cert")),
            (None, Some(_)) => Err(FieldError::new("tls_cert", "is required with tls_key")),
            (Some(cert), Some(key)) => {
                for (name, path) in [("tls_cert", cert), ("tls_key", key)] {
                    if !path.is_file() {
                        let problem = format!("{} is not a readable file", path.display());
                        return Err(FieldError::new(name, problem));
                    }
                }
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }
}

/// Checks ids and addresses; public so the edge can validate a runtime addition too.
pub fn validate_backends(backends: &[BackendConfig]) -> Result<(), FieldError> {
    if backends.is_empty() {
        return Err(FieldError::new(
            "backends",
            "at least one backend is required",
        ));
    }
    let mut ids = HashSet::new();
    let mut addresses = HashSet::new();
    for (index, backend) in backends.iter().enumerate() {
        let key = |field: &str| format!("backends[{index}].{field}");
        if !valid_id(&backend.id) {
            return Err(FieldError::new(key("id"), BAD_ID));
        }
        if !ids.insert(backend.id.as_str()) {
            return Err(FieldError::new(
                key("id"),
                format!("{:?} is used twice", backend.id),
            ));
        }
        if !addresses.insert(backend.address) {
            let problem = format!("{} is used twice", backend.address);
            return Err(FieldError::new(key("address"), problem));
        }
        if backend.weight > MAX_WEIGHT {
            return Err(FieldError::new(
                key("weight"),
                format!("must be at most {MAX_WEIGHT}"),
            ));
        }
    }
    Ok(())
}

/// Largest accepted backend weight (points on the ring grow with it).
pub const MAX_WEIGHT: u32 = 100;

const BAD_ID: &str = "must be 1 to 64 characters of letters, digits, '-', '_' or '.'";

/// Whether `id` is a valid backend id (letters, digits, `-`, `_`, `.`; 1–64 long).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Validate for HashConfig {
    fn validate(&self) -> Result<(), FieldError> {
        if self.sources.is_empty() {
            return Err(FieldError::new("sources", "needs at least one source"));
        }
        for (index, source) in self.sources.iter().enumerate() {
            HashSource::parse(source)
                .map_err(|p| FieldError::new(format!("sources[{index}]"), p))?;
        }
        match &self.sticky_cookie {
            Some(name) if !valid_id(name) => Err(FieldError::new("sticky_cookie", BAD_ID)),
            _ => Ok(()),
        }
    }
}

impl Validate for HealthConfig {
    fn validate(&self) -> Result<(), FieldError> {
        if !self.path.starts_with('/') {
            return Err(FieldError::new("path", "must start with '/'"));
        }
        for (key, value) in [
            ("interval", self.interval),
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(FieldError::new(key, "must be longer than zero"));
            }
        }
        if self.rise == 0 {
            return Err(FieldError::new("rise", "must be at least 1"));
        }
        if self.fall == 0 {
            return Err(FieldError::new("fall", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MINIMAL: &str = "[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n";

    fn parse(text: &str) -> Result<EdgeConfig, String> {
        super::super::parse(Path::new("conf/edge.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.backends[0].weight, 1);
        assert_eq!(config.hash.sources, vec!["ip".to_owned()]);
        assert_eq!(config.server.http_read_timeout, Duration::from_secs(60));
    }

    #[test]
    fn no_backend_is_an_error() {
        let err = parse("").unwrap_err();
        assert_eq!(
            err,
            "conf/edge.toml: backends: at least one backend is required"
        );
    }

    #[test]
    fn duplicate_id_names_the_entry() {
        let text = format!("{MINIMAL}[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9002\"\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err, "conf/edge.toml: backends[1].id: \"a\" is used twice");
    }

    #[test]
    fn bad_hash_source_names_the_index() {
        let text = format!("{MINIMAL}[hash]\nsources = [\"ip\", \"body:x\"]\n");
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with("conf/edge.toml: hash.sources[1]: \"body:x\""),
            "{err}"
        );
    }

    #[test]
    fn hash_sources_parse() {
        assert_eq!(HashSource::parse("ip"), Ok(HashSource::ClientIp));
        assert_eq!(
            HashSource::parse("cookie:io"),
            Ok(HashSource::Cookie("io".to_owned()))
        );
        assert!(HashSource::parse("query:").is_err());
    }

    #[test]
    fn networks_parse() {
        assert_eq!(parse_network("10.0.0.0/8").unwrap().1, 8);
        assert_eq!(parse_network("::1").unwrap().1, 128);
        assert!(parse_network("10.0.0.0/33").is_err());
    }
}
