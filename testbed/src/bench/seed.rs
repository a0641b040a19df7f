//! The incumbent stack (nginx `ip_hash` + three socket.io servers with the sharded Redis
//! adapter + a 3-master Redis Cluster), run from the seed-stack folder with its own `up.sh`
//! and `down.sh` on free ports. Its Redis Cluster also serves the Ringcast nodes of the same
//! run, so both sides use the same kind of cluster on the same machine.

use super::procs;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Starts of the stack tried before giving up.
const START_ATTEMPTS: usize = 3;

/// A running seed stack; `down.sh` stops it on drop.
pub struct SeedStack {
    dir: PathBuf,
    /// Redis Cluster ports (3 masters first, then 3 replicas).
    pub redis_ports: Vec<u16>,
    /// socket.io server ports.
    pub node_ports: Vec<u16>,
    /// nginx port.
    pub nginx_port: u16,
}

impl SeedStack {
    /// Starts the stack from `dir` (a copy of the seed-stack folder, set up). Ports are
    /// picked free just before `up.sh` binds them, so another process can take one in
    /// between (a client's ephemeral port on a busy box): a start that fails is stopped
    /// and tried again on new ports, [`START_ATTEMPTS`] times in all.
    pub fn up(dir: &str) -> anyhow::Result<Self> {
        let dir = expand_home(dir);
        anyhow::ensure!(
            is_set_up(&dir),
            "the seed stack is not set up in {} (see the incumbents in the report's header)",
            dir.display()
        );
        let mut attempt = 1;
        loop {
            match Self::start_once(dir.clone()) {
                Ok(stack) => return Ok(stack),
                Err(err) if attempt >= START_ATTEMPTS => return Err(err),
                Err(err) => {
                    eprintln!("bench: seed stack start {attempt} failed, retrying: {err:#}")
                }
            }
            attempt += 1;
        }
    }

    fn start_once(dir: PathBuf) -> anyhow::Result<Self> {
        let redis_ports = free_ports_with_bus(6)?;
        let node_ports = (0..3)
            .map(|_| procs::free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let nginx_port = procs::free_port()?;
        // From here on, dropping the stack (on an error too) runs `down.sh`.
        let stack = Self {
            dir,
            redis_ports,
            node_ports,
            nginx_port,
        };
        let join = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
        let out = Command::new("bash")
            .arg(stack.dir.join("up.sh"))
            .env("REDIS_PORTS", join(&stack.redis_ports))
            .env("NODE_PORTS", join(&stack.node_ports))
            .env("NGINX_PORT", stack.nginx_port.to_string())
            .output()
            .context("run the seed stack's up.sh")?;
        anyhow::ensure!(
            out.status.success(),
            "seed stack up.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stack)
    }

    /// `redis://` URLs of the cluster's masters.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_ports[..3]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Ports of the cluster's masters.
    pub fn master_ports(&self) -> Vec<u16> {
        self.redis_ports[..3].to_vec()
    }

    /// Address of socket.io server `i`.
    pub fn node_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.node_ports[i]))
    }

    /// Address of the stack's nginx.
    pub fn nginx_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nginx_port))
    }

    /// PID of socket.io server `i`.
    pub fn node_pid(&self, i: usize) -> anyhow::Result<u32> {
        let file = self
            .dir
            .join(format!(".cache/pids/node-{}.pid", self.node_ports[i]));
        let text = std::fs::read_to_string(&file).with_context(|| format!("read {file:?}"))?;
        Ok(text.trim().parse()?)
    }

    /// PIDs of the Redis Cluster's servers.
    pub fn redis_pids(&self) -> Vec<u32> {
        (self.redis_ports.iter())
            .filter_map(|p| {
                let file = self.dir.join(format!(".cache/pids/redis-{p}.pid"));
                std::fs::read_to_string(file).ok()?.trim().parse().ok()
            })
            .collect()
    }

    /// PIDs of nginx's master and workers.
    pub fn nginx_pids(&self) -> Vec<u32> {
        let file = self.dir.join(".cache/nginx/nginx.pid");
        let master: Option<u32> = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        master.map_or_else(Vec::new, |m| {
            std::iter::once(m).chain(procs::children_of(m)).collect()
        })
    }

    /// Restarts socket.io server `i` with the seed's own script.
    pub fn restart_node(&self, i: usize) -> anyhow::Result<()> {
        let status = Command::new("bash")
            .arg(self.dir.join("start-node.sh"))
            .arg(self.node_ports[i].to_string())
            .output()?;
        anyhow::ensure!(status.status.success(), "start-node.sh failed");
        Ok(())
    }
}

impl Drop for SeedStack {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(self.dir.join("down.sh")).output();
    }
}

/// Whether `dir` holds the seed stack with its npm packages installed.
pub fn is_set_up(dir: &Path) -> bool {
    dir.join("up.sh").exists() && dir.join(".cache/node_modules/socket.io").exists()
}

/// `dir` with a leading `~/` replaced by the home folder.
pub fn expand_home(dir: &str) -> PathBuf {
    match dir.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest),
        None => PathBuf::from(dir),
    }
}

/// `n` free ports whose cluster bus port (+10000) is free too.
fn free_ports_with_bus(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut out = Vec::new();
    while out.len() < n {
        let port = procs::free_port()?;
        let bus_free =
            port < 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if bus_free && !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
}
