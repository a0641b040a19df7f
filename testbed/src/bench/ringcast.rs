//! Starting `ringcast-node` processes for the benches, from `bench-assets/node.toml.tmpl`.

use super::procs::{self, Proc};
use super::report::Ctx;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const NODE_TEMPLATE: &str = include_str!("../../bench-assets/node.toml.tmpl");

/// The node configuration for `id` listening on `listen`.
pub fn render_node(id: &str, listen: &str, redis_urls: &[String]) -> String {
    let urls: Vec<String> = redis_urls.iter().map(|u| format!("\"{u}\"")).collect();
    NODE_TEMPLATE
        .replace("{{ID}}", id)
        .replace("{{LISTEN}}", listen)
        .replace("{{REDIS}}", &urls.join(", "))
}

/// A running node and where it listens.
pub struct Node {
    /// The process.
    pub proc: Proc,
    /// Its listen address (`/ws`, `/healthz`).
    pub addr: SocketAddr,
    /// Its node id.
    pub id: String,
}

/// Starts node `id` on a free port against the Redis Cluster at `redis_urls`.
pub async fn start_node(ctx: &Ctx, id: &str, redis_urls: &[String]) -> anyhow::Result<Node> {
    let addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    start_node_at(ctx, id, addr, redis_urls).await
}

/// Starts node `id` listening on `addr` (to replace a killed node at the same address).
pub async fn start_node_at(
    ctx: &Ctx,
    id: &str,
    addr: SocketAddr,
    redis_urls: &[String],
) -> anyhow::Result<Node> {
    let conf = render_node(id, &addr.to_string(), redis_urls);
    let file = ctx.dir.path().join(format!("node-{id}.toml"));
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new(ctx.bin("ringcast-node")?);
    cmd.arg("-c").arg(&file);
    let log = ctx.dir.path().join(format!("node-{id}.log"));
    let mut proc = Proc::spawn(&format!("node-{id}"), cmd, &log)?;
    if let Err(err) = procs::wait_http_ok(addr, "/readyz", Duration::from_secs(20)).await {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let alive = proc.alive();
        anyhow::bail!("ringcast-node {id} not ready (alive: {alive}): {err}; log: {text}");
    }
    Ok(Node {
        proc,
        addr,
        id: id.to_owned(),
    })
}
