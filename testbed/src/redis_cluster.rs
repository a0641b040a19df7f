//! A real Redis Cluster on loopback for tests, and the behavioural scenarios every
//! implementation of the cluster state must pass ([`scenarios`]).
//!
//! [`RedisCluster::start`] runs six `redis-server` processes (three masters, three
//! replicas) on free loopback ports in a temporary folder, joins them into a cluster and
//! waits until every node reports `cluster_state:ok` with all 16384 slots served and every
//! replica in sync. Nodes use a 1 s `cluster-node-timeout`, so a killed master is replaced
//! by its replica within a few seconds. Dropping the fixture kills every process it
//! started (also when the test panics). Several clusters can run at once.

pub mod scenarios;

use anyhow::{Context, Result, anyhow, bail, ensure};
use redis::aio::MultiplexedConnection;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Cluster node timeout given to every server, in milliseconds.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// How long [`RedisCluster::start`] waits for the cluster to become healthy.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

const INSTALL_HINT: &str = "redis-server was not found on PATH; install Redis 7 or newer \
     (Debian/Ubuntu: `apt-get install redis-server`)";

/// A key prefix no other test uses, so tests can share one cluster.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// One `redis-server` process of the fixture.
struct Server {
    port: u16,
    child: Option<Child>,
}

/// How one node sees one member of the cluster (a line of `CLUSTER NODES`).
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Client port.
    pub port: u16,
    /// Whether it is a master.
    pub master: bool,
    /// Whether it is flagged as failed (`fail` or `fail?`).
    pub failed: bool,
    /// The slot ranges it serves (inclusive).
    pub slots: Vec<(u16, u16)>,
}

/// Six `redis-server` processes forming a cluster; see the module docs.
pub struct RedisCluster {
    dir: tempfile::TempDir,
    servers: Vec<Server>,
    watchdog: Option<Child>,
}

impl RedisCluster {
    /// Starts the servers, forms the cluster and waits until it is healthy.
    ///
    /// # Errors
    /// When `redis-server` is missing (the message names the install command), a server
    /// cannot start, or the cluster is not healthy within [`START_DEADLINE`].
    pub async fn start() -> Result<Self> {
        check_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("ringcast-redis-")
            .tempdir()?;
        let watchdog = Some(spawn_watchdog(dir.path())?);
        let mut cluster = Self {
            dir,
            servers: Vec::new(),
            watchdog,
        };
        for _ in 0..6 {
            let server = spawn_on_free_port(cluster.dir.path()).await?;
            cluster.servers.push(server);
        }
        cluster.form().await?;
        cluster.wait_healthy(START_DEADLINE).await?;
        Ok(cluster)
    }

    /// `redis://` URLs of every running node.
    pub fn seed_urls(&self) -> Vec<String> {
        self.live_ports().map(url).collect()
    }

    /// Ports of the running nodes.
    pub fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.port)
    }

    /// Every port of the fixture, running or killed.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// A plain connection to the node on `port`.
    ///
    /// # Errors
    /// When the node does not answer.
    pub async fn connection(&self, port: u16) -> Result<MultiplexedConnection> {
        connect_node(port).await
    }

    /// Where the running nodes stand, as seen by the first node that answers.
    ///
    /// # Errors
    /// When no running node answers.
    pub async fn topology(&self) -> Result<Vec<NodeView>> {
        for port in self.live_ports() {
            if let Ok(text) = cluster_text(port, "NODES").await {
                return Ok(parse_nodes(&text));
            }
        }
        bail!("no node of the cluster answers")
    }

    /// The slot of `key`, asked from the cluster (`CLUSTER KEYSLOT`).
    ///
    /// # Errors
    /// When no running node answers.
    pub async fn keyslot(&self, key: &str) -> Result<u16> {
        let port = self.live_ports().next().context("no running node")?;
        let mut conn = connect_node(port).await?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await?;
        Ok(slot)
    }

    /// The port of the healthy master serving `slot`.
    ///
    /// # Errors
    /// When no healthy master serves it now.
    pub async fn master_of_slot(&self, slot: u16) -> Result<u16> {
        let topology = self.topology().await?;
        topology
            .iter()
            .find(|n| n.master && !n.failed && serves(n, slot))
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("no healthy master serves slot {slot}"))
    }

    /// The port of the healthy master serving `key`.
    ///
    /// # Errors
    /// As [`Self::master_of_slot`].
    pub async fn master_of_key(&self, key: &str) -> Result<u16> {
        let slot = self.keyslot(key).await?;
        self.master_of_slot(slot).await
    }

    /// Ports of the healthy masters that serve slots.
    ///
    /// # Errors
    /// When no running node answers.
    pub async fn masters(&self) -> Result<Vec<u16>> {
        let topology = self.topology().await?;
        let masters = topology
            .iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty());
        Ok(masters.map(|n| n.port).collect())
    }

    /// Kills the node on `port` with SIGKILL (no shutdown, no save).
    ///
    /// # Errors
    /// When the port is not one of the fixture's running nodes.
    pub fn kill(&mut self, port: u16) -> Result<()> {
        let server = self.server_mut(port)?;
        let mut child = server.child.take().context("node already killed")?;
        child.kill()?;
        child.wait()?;
        // The watchdog must not find a stale pid file that may name another process later.
        let _ = std::fs::remove_file(self.dir.path().join(pid_file(port)));
        Ok(())
    }

    /// Kills the master serving `key` and waits until a replica took over its slots.
    /// Returns the killed port.
    ///
    /// # Errors
    /// When no failover happens within `deadline`.
    pub async fn fail_over_key(&mut self, key: &str, deadline: Duration) -> Result<u16> {
        let slot = self.keyslot(key).await?;
        let old = self.master_of_slot(slot).await?;
        self.kill(old)?;
        self.wait_promotion(slot, old, deadline).await?;
        Ok(old)
    }

    /// Waits until a master other than `old` serves `slot` and the running nodes agree
    /// that the cluster is healthy.
    ///
    /// # Errors
    /// When that does not happen within `deadline`.
    pub async fn wait_promotion(&self, slot: u16, old: u16, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        loop {
            let promoted = matches!(self.master_of_slot(slot).await, Ok(p) if p != old);
            if promoted && self.all_report_ok().await {
                return Ok(());
            }
            ensure!(Instant::now() < until, "slot {slot} has no new master");
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restarts a killed node on its port with its saved cluster config; it rejoins as a
    /// replica. Waits until the cluster is healthy again.
    ///
    /// # Errors
    /// When the node cannot start or the cluster does not become healthy in time.
    pub async fn restart(&mut self, port: u16) -> Result<()> {
        let dir = self.dir.path().to_owned();
        let server = self.server_mut(port)?;
        ensure!(server.child.is_none(), "node {port} is running");
        server.child = Some(spawn_server(&dir, port)?);
        wait_ping(port, Duration::from_secs(5)).await?;
        self.wait_healthy(START_DEADLINE).await
    }

    /// Starts every killed node again and waits until the cluster is healthy.
    ///
    /// # Errors
    /// When a node cannot start or the cluster does not become healthy in time.
    pub async fn restart_all(&mut self) -> Result<()> {
        let dir = self.dir.path().to_owned();
        for server in self.servers.iter_mut().filter(|s| s.child.is_none()) {
            server.child = Some(spawn_server(&dir, server.port)?);
        }
        for port in self.ports() {
            wait_ping(port, Duration::from_secs(5)).await?;
        }
        self.wait_healthy(START_DEADLINE).await
    }

    /// `FLUSHALL` on every healthy master: every key of the cluster is gone.
    ///
    /// # Errors
    /// When a master does not answer.
    pub async fn flush_all(&self) -> Result<()> {
        for port in self.masters().await? {
            let mut conn = connect_node(port).await?;
            redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    fn server_mut(&mut self, port: u16) -> Result<&mut Server> {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .ok_or_else(|| anyhow!("port {port} is not a node of this cluster"))
    }

    /// Assigns slots to the first three nodes, introduces everyone, and makes the other
    /// three their replicas.
    async fn form(&self) -> Result<()> {
        let ports = self.ports();
        let first = ports[0];
        let per_master = SLOTS / 3 + 1;
        for (index, port) in ports[..3].iter().enumerate() {
            let index = u16::try_from(index)?;
            let low = index * per_master;
            let high = (low + per_master - 1).min(SLOTS - 1);
            let mut conn = connect_node(*port).await?;
            cluster_cmd(
                &mut conn,
                &["ADDSLOTSRANGE", &low.to_string(), &high.to_string()],
            )
            .await?;
            cluster_cmd(&mut conn, &["SET-CONFIG-EPOCH", &(index + 1).to_string()]).await?;
        }
        for port in &ports[1..] {
            let mut conn = connect_node(*port).await?;
            cluster_cmd(&mut conn, &["MEET", "127.0.0.1", &first.to_string()]).await?;
        }
        self.wait_all_known(Duration::from_secs(20)).await?;
        for (replica, master) in ports[3..].iter().zip(&ports[..3]) {
            let master_id = cluster_text(*master, "MYID").await?;
            let mut conn = connect_node(*replica).await?;
            cluster_cmd(&mut conn, &["REPLICATE", master_id.trim()]).await?;
        }
        Ok(())
    }

    /// Waits until every node knows all six nodes.
    async fn wait_all_known(&self, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        loop {
            let mut known = true;
            for port in self.live_ports() {
                let text = cluster_text(port, "NODES").await?;
                let nodes = parse_nodes(&text);
                known &= nodes.len() == self.servers.len()
                    && !text.contains("handshake")
                    && !text.contains("noaddr");
            }
            if known {
                return Ok(());
            }
            ensure!(Instant::now() < until, "nodes did not discover each other");
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node reports a healthy cluster and every running replica
    /// is in sync with its master.
    ///
    /// # Errors
    /// When that does not happen within `deadline`.
    pub async fn wait_healthy(&self, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if self.all_report_ok().await && self.replicas_in_sync().await {
                return Ok(());
            }
            if Instant::now() >= until {
                let logs = self.dir.path().display();
                bail!("cluster not healthy after {deadline:?} (server logs in {logs})");
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn all_report_ok(&self) -> bool {
        for port in self.live_ports() {
            let Ok(info) = cluster_text(port, "INFO").await else {
                return false;
            };
            let ok = info.contains("cluster_state:ok")
                && info.contains(&format!("cluster_slots_ok:{SLOTS}"));
            if !ok {
                return false;
            }
        }
        true
    }

    async fn replicas_in_sync(&self) -> bool {
        for port in self.live_ports() {
            let Ok(mut conn) = connect_node(port).await else {
                return false;
            };
            let info: String = match redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
            {
                Ok(info) => info,
                Err(_) => return false,
            };
            if info.contains("role:slave") && !info.contains("master_link_status:up") {
                return false;
            }
        }
        true
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

fn pid_file(port: u16) -> String {
    format!("redis-{port}.pid")
}

/// A shell that outlives this process only long enough to kill the servers and remove
/// the folder if the process dies without dropping the fixture (SIGKILL, abort, CI
/// timeout); `Drop` kills it first in the normal case.
fn spawn_watchdog(dir: &Path) -> Result<Child> {
    let dir = dir.to_str().context("temp dir path is not UTF-8")?;
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         for f in '{dir}'/*.pid; do [ -f \"$f\" ] && kill -9 \"$(cat \"$f\")\"; done; \
         rm -rf '{dir}'",
        pid = std::process::id(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the fixture watchdog shell")
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

fn serves(node: &NodeView, slot: u16) -> bool {
    node.slots
        .iter()
        .any(|(low, high)| (*low..=*high).contains(&slot))
}

fn check_installed() -> Result<()> {
    let status = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => Ok(()),
        _ => bail!(INSTALL_HINT),
    }
}

/// A port whose cluster bus port (+10000) looked free too.
fn free_port_pair() -> Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no free port pair on 127.0.0.1")
}

/// Starts a server on a free port, retrying when another process takes the port first.
async fn spawn_on_free_port(dir: &Path) -> Result<Server> {
    let mut last_error = None;
    for _ in 0..5 {
        let port = free_port_pair()?;
        let mut child = spawn_server(dir, port)?;
        match wait_ping(port, Duration::from_secs(5)).await {
            Ok(()) if matches!(child.try_wait(), Ok(None)) => {
                return Ok(Server {
                    port,
                    child: Some(child),
                });
            }
            Ok(()) => last_error = Some(anyhow!("redis-server on {port} exited")),
            Err(err) => last_error = Some(err),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(last_error.unwrap_or_else(|| anyhow!("redis-server did not start")))
}

fn spawn_server(dir: &Path, port: u16) -> Result<Child> {
    let port_text = port.to_string();
    let timeout = NODE_TIMEOUT_MS.to_string();
    let pid_path = dir.join(pid_file(port)).to_string_lossy().into_owned();
    let args = [
        "--port",
        &port_text,
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("nodes-{port}.conf"),
        "--cluster-node-timeout",
        &timeout,
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-require-full-coverage",
        "no",
        "--appendonly",
        "no",
        "--save",
        "",
        "--repl-diskless-sync-delay",
        "0",
        "--logfile",
        &format!("redis-{port}.log"),
        "--pidfile",
        &pid_path,
        "--dir",
        dir.to_str().context("temp dir path is not UTF-8")?,
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
    ];
    Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(INSTALL_HINT)
}

async fn connect_node(port: u16) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(url(port))?;
    let connect = client.get_multiplexed_async_connection();
    let conn = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| anyhow!("node {port} did not answer in time"))??;
    Ok(conn)
}

async fn wait_ping(port: u16, deadline: Duration) -> Result<()> {
    let until = Instant::now() + deadline;
    loop {
        if let Ok(mut conn) = connect_node(port).await {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if pong.is_ok() {
                return Ok(());
            }
        }
        ensure!(
            Instant::now() < until,
            "redis-server on {port} did not start"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster_cmd(conn: &mut MultiplexedConnection, args: &[&str]) -> Result<()> {
    redis::cmd("CLUSTER")
        .arg(args)
        .query_async::<()>(conn)
        .await
        .with_context(|| format!("CLUSTER {}", args.join(" ")))
}

/// The text answer of `CLUSTER <sub>` (NODES, INFO, MYID) from the node on `port`.
async fn cluster_text(port: u16, sub: &str) -> Result<String> {
    let mut conn = connect_node(port).await?;
    let text = redis::cmd("CLUSTER")
        .arg(sub)
        .query_async(&mut conn)
        .await?;
    Ok(text)
}

/// Parses `CLUSTER NODES` output.
pub fn parse_nodes(text: &str) -> Vec<NodeView> {
    text.lines().filter_map(parse_node_line).collect()
}

fn parse_node_line(line: &str) -> Option<NodeView> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = fields.get(1)?;
    let port = address
        .split(['@', ','])
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|s| !s.starts_with('['))
        .filter_map(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            Some((low.parse().ok()?, high.parse().ok()?))
        })
        .collect();
    Some(NodeView {
        id: (*fields.first()?).to_owned(),
        port,
        master: flags.contains("master"),
        failed: flags.contains("fail"),
        slots,
    })
}
