//! The scale bench: how many concurrent WebSockets this box holds through edges to
//! `ringcast-node`s, with every one of them answering a ping end to end (client → edge →
//! node → back), and the total resident memory.
//!
//! One edge process holds two descriptors per tunnel under a 20,000 open-files limit, so it
//! tops out near 9,900 tunnels; that is a limit of this machine's configuration, not of the
//! edge's design. The bench therefore measures one edge first, then as many edges (each
//! with up to [`PER_EDGE`] tunnels, all in front of the same nodes) as the target needs.
//! The same limit caps a node near 19,000 connections, so the nodes are scaled out too
//! (see [`PER_NODE`]). Holders are separate processes for the same reason.

use super::fanout::RingcastSide;
use super::hold::{HoldArgs, Holder, Proto};
use super::procs;
use super::proxies::{self, Kind, Setup};
use super::report::Ctx;
use super::seed::SeedStack;
use super::stats;
use std::time::{Duration, Instant};

/// Tunnels asked of one edge (under its ~9,900 ceiling).
const PER_EDGE: usize = 9_500;
/// Connections per holder process.
const PER_HOLDER: usize = 9_500;
/// Connections planned per node on average. A node admits up to 19,000 (its default
/// `max_connections`, under the open-files limit), and hashing the client address spreads
/// connections unevenly, so the average leaves room for a node taking half again its share.
const PER_NODE: usize = 12_500;

/// One configuration's result.
struct Held {
    label: String,
    asked: usize,
    held: u64,
    answered: u64,
    connect_s: f64,
    rss_edges: u64,
    rss_nodes: u64,
    rss_redis: u64,
}

/// Runs the scale bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let seed = SeedStack::up(&ctx.common.seed_dir)?;
    let mut results = Vec::new();
    let target = ctx.common.scale_conns;
    let edges_needed = target.div_ceil(PER_EDGE);
    for edges in [1, edges_needed] {
        eprintln!("scale: {edges} edge(s)");
        let asked = (edges * PER_EDGE).min(target);
        let node_count = asked.div_ceil(PER_NODE).max(3);
        let side = RingcastSide::start_with(ctx, &seed, node_count).await?;
        results.push(hold_through(ctx, &seed, &side, edges, asked).await?);
        if edges_needed == 1 {
            break;
        }
    }
    Ok(render(ctx, &results))
}

async fn hold_through(
    ctx: &Ctx,
    seed: &SeedStack,
    side: &RingcastSide,
    edges: usize,
    asked: usize,
) -> anyhow::Result<Held> {
    let backends: Vec<_> = side.nodes.iter().map(|n| n.addr).collect();
    let setup = Setup {
        backends: &backends,
        workers: ctx.common.workers,
        dir: ctx.dir.path(),
        bin_dir: &ctx.bin_dir,
        path: "/ws",
    };
    let mut extra = Vec::new();
    for _ in 1..edges {
        extra.push(proxies::start(Kind::Ringcast, &setup).await?);
    }
    let all_edges: Vec<&proxies::Running> =
        std::iter::once(&side.edge).chain(extra.iter()).collect();
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut first = 0;
    for edge in &all_edges {
        let n = PER_HOLDER.min(asked - first);
        if n == 0 {
            break;
        }
        let args = HoldArgs {
            addr: edge.targets[0].addr,
            path: "/ws".into(),
            count: n,
            spread: 200,
            first,
            proto: Proto::Ringcast,
            concurrency: 200,
        };
        holders.push(tokio::task::block_in_place(|| Holder::start(ctx, &args))?);
        first += n;
    }
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answered = 0;
    for h in &mut holders {
        answered += tokio::task::block_in_place(|| h.ping())?;
    }
    let edge_pids: Vec<u32> = all_edges.iter().flat_map(|e| e.pids()).collect();
    let node_pids: Vec<u32> = side.nodes.iter().map(|n| n.proc.pid()).collect();
    let held = Held {
        label: format!("{edges} edge(s) + {} nodes", side.nodes.len()),
        asked,
        held: holders.iter().map(|h| h.ok).sum(),
        answered,
        connect_s,
        rss_edges: procs::rss_total(&edge_pids),
        rss_nodes: procs::rss_total(&node_pids),
        rss_redis: procs::rss_total(&seed.redis_pids()),
    };
    eprintln!(
        "  {}: {} held, {} answered",
        held.label, held.held, held.answered
    );
    Ok(held)
}

fn render(ctx: &Ctx, results: &[Held]) -> String {
    let mib = |b: u64| stats::fmt(b as f64 / 1048576.0, 0);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.label.clone(),
                stats::fmt(r.asked as f64, 0),
                stats::fmt(r.held as f64, 0),
                stats::fmt(r.answered as f64, 0),
                format!("{:.1}", r.connect_s),
                mib(r.rss_edges),
                mib(r.rss_nodes),
                mib(r.rss_redis),
                mib(r.rss_edges + r.rss_nodes + r.rss_redis),
            ]
        })
        .collect();
    let mut out = format!(
        "## Scale: concurrent connections held through the edge\n\n\
         Target {target}. Clients (separate holder processes, {PER_HOLDER} connections each, \
         from 200 source networks) connect through `ringcast-edge` ({workers} worker) to \
         `ringcast-node`s on the Redis Cluster (three, or one per {per_node} connections \
         asked, whichever is more: a node holds one descriptor per connection), complete hello/welcome, and then each \
         sends a WebSocket ping that must come back through the edge from the node. One \
         edge process holds two descriptors per tunnel and the open-files limit is 20,000, \
         so one edge tops out near 9,900 tunnels; beyond that the bench runs several edge \
         processes in front of the same nodes (one run, single measurement).\n\n",
        target = stats::fmt(ctx.common.scale_conns as f64, 0),
        workers = ctx.common.workers,
        per_node = stats::fmt(PER_NODE as f64, 0),
    );
    out += &stats::table(
        &[
            "setup",
            "asked",
            "held",
            "answered ping",
            "connect s",
            "edges RSS MiB",
            "nodes RSS MiB",
            "Redis RSS MiB",
            "total RSS MiB",
        ],
        &rows,
    );
    out + "\n"
}
