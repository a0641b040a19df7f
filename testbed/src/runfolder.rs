//! The run folder and the configuration files written into it.
//!
//! Each run gets a folder (default `runs/<UTC timestamp>` under the current directory) that
//! holds every process's config and log, and the reports. Configs are generated from the
//! `conf/node.toml` and `conf/edge.toml` templates: the template is read as a TOML table, the
//! keys the testbed must control (ids, listen addresses, Redis seeds, secret, backends,
//! socket paths, drain timings) are overridden, and the result is checked with the same
//! loader the binaries use before it is written, so a bad template fails here with the
//! file and key named.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use ringcast_shared::config::{self, EdgeConfig, NodeConfig};
use toml::{Table, Value};

/// A run's folder.
#[derive(Debug, Clone)]
pub struct RunFolder {
    path: PathBuf,
}

impl RunFolder {
    /// Creates `path`, or `runs/<timestamp>` under the current directory when `None`.
    ///
    /// # Errors
    /// The folder cannot be created.
    pub fn create(path: Option<PathBuf>) -> Result<Self> {
        let path = path.unwrap_or_else(|| PathBuf::from("runs").join(timestamp(SystemTime::now())));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create run folder {}", path.display()))?;
        let path = path.canonicalize()?;
        Ok(Self { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn timestamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    format!("{year:04}{month:02}{day:02}-{h:02}{m:02}{s:02}")
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A free loopback address (bind port 0, read the port, release it).
///
/// # Errors
/// No port could be bound.
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a free port")?;
    Ok(listener.local_addr()?)
}

/// What the testbed controls in a node's config.
#[derive(Debug, Clone)]
pub struct NodeParams {
    /// Node id.
    pub id: String,
    /// Listener.
    pub listen: SocketAddr,
    /// Redis Cluster seed URLs.
    pub redis: Vec<String>,
    /// Key prefix, unique per run.
    pub key_prefix: String,
    /// JWT secret.
    pub secret: String,
}

/// What the testbed controls in the edge's config.
#[derive(Debug, Clone)]
pub struct EdgeParams {
    /// Client listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Backends: id and address.
    pub backends: Vec<(String, SocketAddr)>,
    /// Folder for the upgrade socket and the pid file.
    pub dir: PathBuf,
    /// How long an old edge keeps its tunnels after an upgrade.
    pub grace_period: Duration,
}

/// The node config for `params`, from the template at `template` (or defaults if absent).
///
/// # Errors
/// The template cannot be read or parsed, or the result fails validation.
pub fn node_config(template: &Path, params: &NodeParams) -> Result<String> {
    let mut table = read_template(template)?;
    set(&mut table, "node.id", params.id.as_str().into());
    set(&mut table, "node.listen", params.listen.to_string().into());
    set(&mut table, "auth.mode", "jwt".into());
    set(&mut table, "auth.secret", params.secret.as_str().into());
    let seeds = params.redis.iter().map(|url| Value::from(url.as_str()));
    set(&mut table, "cluster.nodes", Value::Array(seeds.collect()));
    set(
        &mut table,
        "cluster.key_prefix",
        params.key_prefix.as_str().into(),
    );
    // Acked messages must survive a Redis master kill: ack after a replica has the write.
    set(&mut table, "cluster.ack", "replicated".into());
    set(&mut table, "drain.delay", "1s".into());
    set(&mut table, "drain.window", "2s".into());
    set(&mut table, "drain.deadline", "15s".into());
    set(&mut table, "log.level", "info".into());
    let text = toml::to_string(&table)?;
    config::parse::<NodeConfig>(Path::new(&format!("{}.toml", params.id)), &text)?;
    Ok(text)
}

/// The edge config for `params`, from the template at `template` (or defaults if absent).
///
/// # Errors
/// As [`node_config`].
pub fn edge_config(template: &Path, params: &EdgeParams) -> Result<String> {
    let mut table = read_template(template)?;
    set(
        &mut table,
        "server.listen",
        params.listen.to_string().into(),
    );
    let socket = params.dir.join("edge-upgrade.sock");
    set(
        &mut table,
        "server.upgrade_socket",
        socket.display().to_string().into(),
    );
    let pid = params.dir.join("edge.pid");
    set(
        &mut table,
        "server.pid_file",
        pid.display().to_string().into(),
    );
    let grace = format!("{}ms", params.grace_period.as_millis());
    set(&mut table, "server.grace_period", grace.into());
    set(&mut table, "admin.listen", params.admin.to_string().into());
    table.insert("backends".into(), backends(&params.backends));
    // Simulated clients all come from 127.0.0.1: hash on their user id, no per-IP caps.
    let sources = vec![Value::from("query:user"), Value::from("ip")];
    set(&mut table, "hash.sources", Value::Array(sources));
    set(&mut table, "limits.client_concurrent", 0.into());
    set(&mut table, "limits.client_requests_per_second", 0.into());
    set(&mut table, "health.interval", "500ms".into());
    set(&mut table, "log.level", "info".into());
    let text = toml::to_string(&table)?;
    config::parse::<EdgeConfig>(Path::new("edge.toml"), &text)?;
    Ok(text)
}

/// The `[[backends]]` array for `list`.
pub fn backends(list: &[(String, SocketAddr)]) -> Value {
    let entries = list.iter().map(|(id, address)| {
        let mut entry = Table::new();
        entry.insert("id".into(), id.as_str().into());
        entry.insert("address".into(), address.to_string().into());
        Value::Table(entry)
    });
    Value::Array(entries.collect())
}

fn read_template(path: &Path) -> Result<Table> {
    if !path.exists() {
        tracing::warn!(template = %path.display(), "template missing, using defaults");
        return Ok(Table::new());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read template {}", path.display()))?;
    text.parse::<Table>()
        .with_context(|| format!("{}: not valid TOML", path.display()))
}

/// Sets a dotted key, creating the tables on the way.
fn set(table: &mut Table, key: &str, value: Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else { return };
        current = next;
    }
    current.insert(last.to_owned(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        assert_eq!(timestamp(at), "20260528-202640");
        assert_eq!(timestamp(UNIX_EPOCH), "19700101-000000");
    }

    #[test]
    fn a_node_config_overrides_the_template_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("node.toml");
        std::fs::write(&template, "[node]\nid = \"x\"\nhello_timeout = \"3s\"\n").unwrap();
        let params = NodeParams {
            id: "node-7".into(),
            listen: "127.0.0.1:4000".parse().unwrap(),
            redis: vec!["redis://127.0.0.1:7000".into()],
            key_prefix: "run1".into(),
            secret: "0123456789abcdef0123".into(),
        };
        let text = node_config(&template, &params).unwrap();
        let parsed: NodeConfig = config::parse(Path::new("n"), &text).unwrap();
        assert_eq!(parsed.node.id, "node-7");
        assert_eq!(parsed.node.hello_timeout, Duration::from_secs(3));
        assert_eq!(parsed.cluster.nodes, params.redis);
        assert_eq!(parsed.auth.secret, params.secret);
    }

    #[test]
    fn an_edge_config_lists_the_backends() {
        let params = EdgeParams {
            listen: "127.0.0.1:5000".parse().unwrap(),
            admin: "127.0.0.1:5001".parse().unwrap(),
            backends: vec![("node-1".into(), "127.0.0.1:4000".parse().unwrap())],
            dir: PathBuf::from("/tmp/run"),
            grace_period: Duration::from_secs(4),
        };
        let text = edge_config(Path::new("/nonexistent/edge.toml"), &params).unwrap();
        let parsed: EdgeConfig = config::parse(Path::new("e"), &text).unwrap();
        assert_eq!(parsed.backends.len(), 1);
        assert_eq!(parsed.backends[0].id, "node-1");
        assert_eq!(parsed.server.grace_period, Duration::from_secs(4));
        assert_eq!(
            parsed.server.upgrade_socket,
            PathBuf::from("/tmp/run/edge-upgrade.sock")
        );
    }
}
