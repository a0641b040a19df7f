//! A whole Ringcast cluster on loopback: a Redis Cluster (the fixture), `N` nodes and one
//! edge, each process with its config and log in the run folder, and the operations the
//! fault scenarios perform on them (restart, kill, Redis failover, edge upgrade, scale out).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use ringcast_shared::auth::{Claims, mint_token};
use tokio::sync::mpsc;

use crate::binaries::Binaries;
use crate::http;
use crate::process::{Child, Ready, Spec, Supervisor, log_path};
use crate::redis_cluster::RedisCluster;
use crate::runfolder::{EdgeParams, NodeParams, RunFolder, edge_config, free_addr, node_config};

/// How long a process may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a node may take to drain and exit after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(25);
/// How long a Redis replica promotion may take.
const PROMOTION_DEADLINE: Duration = Duration::from_secs(20);

/// How to build a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Number of nodes at the start.
    pub nodes: usize,
    /// Folder with `node.toml` and `edge.toml` templates.
    pub conf_dir: PathBuf,
    /// The executables.
    pub binaries: Binaries,
    /// The old edge's grace period after an upgrade.
    pub edge_grace: Duration,
}

/// One running node.
struct Node {
    child: Child,
    listen: SocketAddr,
}

/// A running cluster; every process stops when it is dropped.
pub struct Stack {
    options: StackOptions,
    folder: RunFolder,
    supervisor: Supervisor,
    redis: RedisCluster,
    nodes: BTreeMap<String, Node>,
    next_node: usize,
    edge: Child,
    edge_generation: usize,
    /// Client listener of the edge.
    pub edge_listen: SocketAddr,
    /// Admin listener of the edge.
    pub edge_admin: SocketAddr,
    secret: String,
    key_prefix: String,
}

impl Stack {
    /// Starts Redis, the nodes and the edge, each ready before the next step. Also returns
    /// the receiver of unexpected deaths.
    ///
    /// # Errors
    /// Any process fails to start or become ready.
    pub async fn start(
        options: StackOptions,
        folder: RunFolder,
    ) -> Result<(Self, mpsc::UnboundedReceiver<String>)> {
        let (supervisor, deaths) = Supervisor::new();
        let redis = RedisCluster::start().await.context("Redis Cluster")?;
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let key_prefix = format!("rc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut nodes = BTreeMap::new();
        let mut stack_nodes = Vec::new();
        for index in 1..=options.nodes {
            let id = format!("node-{index}");
            let listen = free_addr()?;
            stack_nodes.push((id.clone(), listen));
            let params = node_params(&id, listen, &redis, &key_prefix, &secret);
            let child = start_node(&supervisor, &options, &folder, &params).await?;
            nodes.insert(id, Node { child, listen });
        }
        let (edge_listen, edge_admin) = (free_addr()?, free_addr()?);
        let params = EdgeParams {
            listen: edge_listen,
            admin: edge_admin,
            backends: stack_nodes,
            dir: folder.path().to_path_buf(),
            grace_period: options.edge_grace,
        };
        let edge = start_edge(&supervisor, &options, &folder, &params, 0).await?;
        let stack = Self {
            next_node: options.nodes + 1,
            options,
            folder,
            supervisor,
            redis,
            nodes,
            edge,
            edge_generation: 0,
            edge_listen,
            edge_admin,
            secret,
            key_prefix,
        };
        Ok((stack, deaths))
    }

    /// `ws://…/ws` of the edge.
    pub fn client_url(&self) -> String {
        format!("ws://{}/ws", self.edge_listen)
    }

    /// The JWT secret of the nodes.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A token for user `demo` that may join and publish everywhere, valid for a day.
    ///
    /// # Errors
    /// Signing fails.
    pub fn sample_token(&self) -> Result<String> {
        let claims = Claims::new("demo", Duration::from_secs(24 * 3600))
            .with_rooms(["*"])
            .with_publish(["*"]);
        Ok(mint_token(self.secret.as_bytes(), &claims)?)
    }

    /// Node ids and their listen addresses.
    pub fn nodes(&self) -> Vec<(String, SocketAddr)> {
        self.nodes
            .iter()
            .map(|(id, node)| (id.clone(), node.listen))
            .collect()
    }

    /// The Redis seed URLs.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis.seed_urls()
    }

    /// The run folder.
    pub fn folder(&self) -> &RunFolder {
        &self.folder
    }

    /// SIGTERM `id`, wait for it to drain and exit, start it again, wait until ready.
    ///
    /// # Errors
    /// The node does not exit in time or does not come back.
    pub async fn restart_node(&mut self, id: &str) -> Result<()> {
        let node = self.nodes.get(id).context("no such node")?;
        node.child.signal(Signal::SIGTERM)?;
        let status = node.child.wait_exit(DRAIN_DEADLINE).await?;
        tracing::info!(node = id, ?status, "node exited after SIGTERM");
        if status.is_some_and(|s| !s.success()) {
            bail!("{id} exited with {status:?} after SIGTERM (expected 0)");
        }
        self.respawn(id).await
    }

    /// SIGKILL `id`, wait `down`, then start it again.
    ///
    /// # Errors
    /// The node does not come back.
    pub async fn kill_node(&mut self, id: &str, down: Duration) -> Result<()> {
        let node = self.nodes.get(id).context("no such node")?;
        node.child.signal(Signal::SIGKILL)?;
        node.child.wait_exit(Duration::from_secs(5)).await?;
        tokio::time::sleep(down).await;
        self.respawn(id).await
    }

    async fn respawn(&mut self, id: &str) -> Result<()> {
        let listen = self.nodes.get(id).context("no such node")?.listen;
        let params = node_params(id, listen, &self.redis, &self.key_prefix, &self.secret);
        let child = start_node(&self.supervisor, &self.options, &self.folder, &params).await?;
        self.nodes.insert(id.to_owned(), Node { child, listen });
        Ok(())
    }

    /// Kills the Redis master that serves `key`, waits for its replica's promotion, then
    /// restarts the killed server (it rejoins as a replica). Returns the killed port.
    ///
    /// # Errors
    /// No promotion, or the server does not come back.
    pub async fn redis_failover(&mut self, key: &str) -> Result<u16> {
        let port = self.redis.fail_over_key(key, PROMOTION_DEADLINE).await?;
        tracing::info!(port, "redis master killed and replaced");
        self.redis.restart(port).await?;
        Ok(port)
    }

    /// A graceful edge upgrade: start a new edge with `-u`, send SIGQUIT to the old one (it
    /// hands over its listeners), wait until the new one answers.
    ///
    /// # Errors
    /// The new edge does not become ready.
    pub async fn upgrade_edge(&mut self) -> Result<()> {
        self.edge_generation += 1;
        let name = format!("edge-{}", self.edge_generation);
        let config = self.folder.file("edge.toml");
        let spec = edge_spec(&self.options, &self.folder, &name, config, true);
        let new = self.supervisor.spawn(&spec)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.edge.signal(Signal::SIGQUIT)?;
        new.wait_ready(&Ready::Tcp(self.edge_listen), READY_DEADLINE)
            .await?;
        let old = std::mem::replace(&mut self.edge, new);
        let grace = self.options.edge_grace + Duration::from_secs(10);
        if old.wait_exit(grace).await.is_err() {
            tracing::warn!("old edge still running after its grace period; killing it");
            old.stop(Duration::from_secs(1)).await;
        }
        Ok(())
    }

    /// Starts one more node and adds it to the edge through the admin API.
    ///
    /// # Errors
    /// The node does not start or the edge refuses it.
    pub async fn scale_out(&mut self) -> Result<String> {
        let id = format!("node-{}", self.next_node);
        self.next_node += 1;
        let listen = free_addr()?;
        let params = node_params(&id, listen, &self.redis, &self.key_prefix, &self.secret);
        let child = start_node(&self.supervisor, &self.options, &self.folder, &params).await?;
        self.nodes.insert(id.clone(), Node { child, listen });
        let body =
            serde_json::json!({"id": id, "address": listen.to_string(), "weight": 1}).to_string();
        let response = http::post(self.edge_admin, "/backends", Some(&body)).await?;
        if !(200..300).contains(&response.status) {
            bail!(
                "edge refused backend {id}: {} {}",
                response.status,
                response.body
            );
        }
        self.wait_backend_healthy(&id, READY_DEADLINE).await?;
        Ok(id)
    }

    /// Polls the edge's `GET /backends` until `id` is listed as healthy.
    async fn wait_backend_healthy(&self, id: &str, deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let listing = http::get(self.edge_admin, "/backends").await?;
            let backends: Vec<serde_json::Value> =
                serde_json::from_str(&listing.body).unwrap_or_default();
            let healthy = backends
                .iter()
                .any(|backend| backend["id"] == id && backend["state"].as_str() == Some("healthy"));
            if healthy {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "edge does not list {id} as healthy after {deadline:?}: {}",
                    listing.body
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the edge and every node at once (SIGTERM, then SIGKILL after a deadline); Redis
    /// stops when the stack is dropped.
    pub async fn shutdown(self) {
        let nodes = self
            .nodes
            .values()
            .map(|node| node.child.stop(Duration::from_secs(10)));
        let edge = self.edge.stop(Duration::from_secs(5));
        tokio::join!(edge, futures_util::future::join_all(nodes));
    }
}

fn node_params(
    id: &str,
    listen: SocketAddr,
    redis: &RedisCluster,
    key_prefix: &str,
    secret: &str,
) -> NodeParams {
    NodeParams {
        id: id.to_owned(),
        listen,
        redis: redis.seed_urls(),
        key_prefix: key_prefix.to_owned(),
        secret: secret.to_owned(),
    }
}

async fn start_node(
    supervisor: &Supervisor,
    options: &StackOptions,
    folder: &RunFolder,
    params: &NodeParams,
) -> Result<Child> {
    let text = node_config(&options.conf_dir.join("node.toml"), params)?;
    let config = folder.file(&format!("{}.toml", params.id));
    std::fs::write(&config, text)?;
    let spec = Spec {
        name: params.id.clone(),
        program: options.binaries.node.clone(),
        args: vec!["-c".into(), config.display().to_string()],
        envs: Vec::new(),
        log: log_path(folder.path(), &params.id),
    };
    let child = supervisor.spawn(&spec)?;
    child
        .wait_ready(&Ready::Http(params.listen, "/readyz"), READY_DEADLINE)
        .await?;
    tracing::info!(node = %params.id, listen = %params.listen, "node ready");
    Ok(child)
}

async fn start_edge(
    supervisor: &Supervisor,
    options: &StackOptions,
    folder: &RunFolder,
    params: &EdgeParams,
    generation: usize,
) -> Result<Child> {
    let text = edge_config(&options.conf_dir.join("edge.toml"), params)?;
    let config = folder.file("edge.toml");
    std::fs::write(&config, text)?;
    let name = format!("edge-{generation}");
    let spec = edge_spec(options, folder, &name, config, false);
    let child = supervisor.spawn(&spec)?;
    child
        .wait_ready(&Ready::Tcp(params.listen), READY_DEADLINE)
        .await?;
    child
        .wait_ready(&Ready::Http(params.admin, "/backends"), READY_DEADLINE)
        .await?;
    tracing::info!(edge = %name, listen = %params.listen, "edge ready");
    Ok(child)
}

fn edge_spec(
    options: &StackOptions,
    folder: &RunFolder,
    name: &str,
    config: PathBuf,
    upgrade: bool,
) -> Spec {
    let mut args = vec!["-c".to_owned(), config.display().to_string()];
    if upgrade {
        args.push("-u".to_owned());
    }
    Spec {
        name: name.to_owned(),
        program: options.binaries.edge.clone(),
        args,
        envs: Vec::new(),
        log: log_path(folder.path(), name),
    }
}
