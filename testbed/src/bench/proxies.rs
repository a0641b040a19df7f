//! The proxies compared in the edge and idle benches: the Ringcast edge, nginx (the seed
//! stack's configuration) and HAProxy, each rendered from a template in `bench-assets/` with
//! the same worker count and the same backends, plus "direct" (no proxy) as the baseline.

use super::loadgen::Target;
use super::procs::{self, Proc};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NGINX_TEMPLATE: &str = include_str!("../../bench-assets/nginx.conf.tmpl");
const HAPROXY_TEMPLATE: &str = include_str!("../../bench-assets/haproxy.cfg.tmpl");
const EDGE_TEMPLATE: &str = include_str!("../../bench-assets/edge.toml.tmpl");

/// How long a proxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the compared ways to reach the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No proxy: the load generator talks to the backends itself.
    Direct,
    /// `ringcast-edge`.
    Ringcast,
    /// nginx with `ip_hash`.
    Nginx,
    /// HAProxy with `balance source`.
    Haproxy,
}

impl Kind {
    /// Label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ringcast => "ringcast-edge",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }

    /// The three proxies, in the order they are compared.
    pub const PROXIES: [Kind; 3] = [Kind::Ringcast, Kind::Nginx, Kind::Haproxy];
}

/// A started proxy (or the direct baseline) and the address clients should use.
pub struct Running {
    /// Which proxy this is.
    pub kind: Kind,
    /// Where clients connect: one target for a proxy, every backend for direct.
    pub targets: Vec<Target>,
    proc: Option<Proc>,
}

impl Running {
    /// PIDs of the proxy's processes (master and workers), empty for direct.
    pub fn pids(&self) -> Vec<u32> {
        self.proc.as_ref().map(Proc::tree).unwrap_or_default()
    }

    /// The main process, when there is one.
    pub fn proc_mut(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }
}

/// What every proxy start needs.
pub struct Setup<'a> {
    /// Backends to forward to.
    pub backends: &'a [SocketAddr],
    /// Worker processes or threads.
    pub workers: usize,
    /// Scratch directory for configs and logs.
    pub dir: &'a Path,
    /// Where `ringcast-edge` is.
    pub bin_dir: &'a Path,
    /// Request path of WebSocket upgrades.
    pub path: &'a str,
}

/// Starts `kind` in front of the backends and waits until it accepts connections.
pub async fn start(kind: Kind, setup: &Setup<'_>) -> anyhow::Result<Running> {
    if kind == Kind::Direct {
        let targets = setup
            .backends
            .iter()
            .map(|a| Target::new(*a, setup.path))
            .collect();
        return Ok(Running {
            kind,
            targets,
            proc: None,
        });
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    let dir = setup.dir.join(kind.label());
    std::fs::create_dir_all(&dir)?;
    let cmd = match kind {
        Kind::Ringcast => edge_command(setup, &dir, listen)?,
        Kind::Nginx => nginx_command(setup, &dir, listen)?,
        Kind::Haproxy => haproxy_command(setup, &dir, listen)?,
        Kind::Direct => unreachable!("handled above"),
    };
    let mut proc = Proc::spawn(kind.label(), cmd, &dir.join("out.log"))?;
    if let Err(err) = procs::wait_listening(listen, START_TIMEOUT).await {
        let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
        let alive = proc.alive();
        anyhow::bail!(
            "{} did not start (alive: {alive}): {err}; log: {}",
            kind.label(),
            tail(&log)
        );
    }
    let targets = vec![Target::new(listen, setup.path)];
    wait_upgrade(&targets[0])
        .await
        .with_context(|| format!("{} never upgraded", kind.label()))?;
    Ok(Running {
        kind,
        targets,
        proc: Some(proc),
    })
}

/// Waits until a WebSocket upgrade through the proxy succeeds (its health checks may need
/// a moment to mark the backends up).
async fn wait_upgrade(target: &Target) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        let source = std::net::Ipv4Addr::LOCALHOST;
        match super::loadgen::connect(target, source).await {
            Ok(mut ws) => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            Err(err) if std::time::Instant::now() > deadline => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn render(template: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(template.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{{{key}}}}}"), value)
    })
}

fn nginx_command(setup: &Setup<'_>, dir: &Path, listen: SocketAddr) -> anyhow::Result<Command> {
    let servers: Vec<String> = setup
        .backends
        .iter()
        .map(|b| format!("        server {b};"))
        .collect();
    let conf = render(
        NGINX_TEMPLATE,
        &[
            ("WORKERS", setup.workers.to_string()),
            ("DIR", dir.display().to_string()),
            ("LISTEN", listen.to_string()),
            ("SERVERS", servers.join("\n")),
        ],
    );
    let file = write(dir, "nginx.conf", &conf)?;
    let mut cmd = Command::new(locate(NGINX.0, &[NGINX.1])?);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(file)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

fn haproxy_command(setup: &Setup<'_>, dir: &Path, listen: SocketAddr) -> anyhow::Result<Command> {
    let servers: Vec<String> = (setup.backends.iter().enumerate())
        .map(|(i, b)| format!("    server b{i} {b}"))
        .collect();
    let conf = render(
        HAPROXY_TEMPLATE,
        &[
            ("WORKERS", setup.workers.to_string()),
            ("LISTEN", listen.to_string()),
            ("SERVERS", servers.join("\n")),
        ],
    );
    let file = write(dir, "haproxy.cfg", &conf)?;
    let mut cmd = Command::new(locate(HAPROXY.0, &[HAPROXY.1])?);
    cmd.arg("-db").arg("-f").arg(file);
    Ok(cmd)
}

fn edge_command(setup: &Setup<'_>, dir: &Path, listen: SocketAddr) -> anyhow::Result<Command> {
    let backends: Vec<String> = (setup.backends.iter().enumerate())
        .map(|(i, b)| format!("[[backends]]\nid = \"b{i}\"\naddress = \"{b}\"\n"))
        .collect();
    let conf = render(
        EDGE_TEMPLATE,
        &[
            ("WORKERS", setup.workers.to_string()),
            ("LISTEN", listen.to_string()),
            ("ADMIN", format!("127.0.0.1:{}", procs::free_port()?)),
            ("DIR", dir.display().to_string()),
            ("BACKENDS", backends.join("\n")),
        ],
    );
    let file = write(dir, "edge.toml", &conf)?;
    let bin = setup.bin_dir.join("ringcast-edge");
    anyhow::ensure!(bin.exists(), "{} is not built", bin.display());
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(file);
    Ok(cmd)
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let file = dir.join(name);
    std::fs::write(&file, text).with_context(|| format!("write {file:?}"))?;
    Ok(file)
}

/// nginx's program name and its usual place when not on PATH.
pub const NGINX: (&str, &str) = ("nginx", "/usr/sbin/nginx");
/// HAProxy's program name and its usual place when not on PATH.
pub const HAPROXY: (&str, &str) = ("haproxy", "/usr/sbin/haproxy");

/// Finds a program on PATH or at one of the usual places.
pub fn locate(program: &str, fallbacks: &[&str]) -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists());
    found
        .or_else(|| fallbacks.iter().map(PathBuf::from).find(|p| p.exists()))
        .with_context(|| format!("{program} is not installed (apt-get install {program})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_every_placeholder() {
        let vars = [
            ("WORKERS", "1".to_owned()),
            ("DIR", "/tmp/x".to_owned()),
            ("LISTEN", "127.0.0.1:1".to_owned()),
            ("ADMIN", "127.0.0.1:2".to_owned()),
            ("SERVERS", "server a;".to_owned()),
            ("BACKENDS", "[[backends]]".to_owned()),
        ];
        for template in [NGINX_TEMPLATE, HAPROXY_TEMPLATE, EDGE_TEMPLATE] {
            let text = render(template, &vars);
            assert!(!text.contains("{{"), "unrendered placeholder in:\n{text}");
        }
    }

    #[test]
    fn rendered_edge_config_is_valid() {
        let vars = [
            ("WORKERS", "1".to_owned()),
            ("DIR", "/tmp/x".to_owned()),
            ("LISTEN", "127.0.0.1:1".to_owned()),
            ("ADMIN", "127.0.0.1:2".to_owned()),
            (
                "BACKENDS",
                "[[backends]]\nid = \"b0\"\naddress = \"127.0.0.1:3\"\n".to_owned(),
            ),
        ];
        let text = render(EDGE_TEMPLATE, &vars);
        let path = Path::new("edge.toml");
        let parsed =
            ringcast_shared::config::parse::<ringcast_shared::config::EdgeConfig>(path, &text);
        assert!(parsed.is_ok(), "{parsed:?}\n{text}");
    }

    #[test]
    fn rendered_node_config_is_valid() {
        let text = super::super::ringcast::render_node(
            "n0",
            "127.0.0.1:1",
            &["redis://127.0.0.1:2".to_owned()],
        );
        let path = Path::new("node.toml");
        let parsed =
            ringcast_shared::config::parse::<ringcast_shared::config::NodeConfig>(path, &text);
        assert!(parsed.is_ok(), "{parsed:?}\n{text}");
    }
}
