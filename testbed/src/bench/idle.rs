//! The idle bench: resident memory per idle WebSocket.
//!
//! Proxies (edge, nginx, HAProxy; one worker each) hold idle tunnels to the echo backends;
//! `ringcast-node` and one socket.io server of the seed stack hold idle client connections
//! directly. Per-connection cost = (RSS with the connections − RSS before) / connections,
//! RSS summed over all of a target's processes (nginx: master and workers).

use super::hold::{HoldArgs, Holder, Proto};
use super::procs;
use super::proxies::{self, Kind, Setup};
use super::report::Ctx;
use super::ringcast;
use super::seed::SeedStack;
use super::stats::{self, Samples};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Most tunnels one proxy process can hold: two descriptors each under a 20,000 limit,
/// with room for listeners, logs and backends' health checks.
const PROXY_MAX_TUNNELS: usize = 9_000;
/// Connections per holder process.
const PER_HOLDER: usize = 5_000;
/// Connections opened and closed before the baseline is taken.
const WARMUP_CONNS: usize = 200;
/// Time for memory to settle after the last connection opened.
const SETTLE: Duration = Duration::from_secs(2);

/// Runs the idle bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let mut samples = Samples::default();
    let mut notes = BTreeMap::new();
    proxies_idle(ctx, &mut samples, &mut notes).await?;
    if let Err(err) = nodes_idle(ctx, &mut samples, &mut notes).await {
        notes.insert("nodes".to_owned(), format!("{err:#}"));
    }
    Ok(render(ctx, &samples, &notes))
}

fn proxy_count(ctx: &Ctx) -> usize {
    ctx.common.idle_conns.min(PROXY_MAX_TUNNELS)
}

async fn proxies_idle(
    ctx: &Ctx,
    samples: &mut Samples,
    notes: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let echo = ctx.start_echo(2).await?;
    let backends: Vec<_> = echo.iter().map(|(_, a)| *a).collect();
    let setup = Setup {
        backends: &backends,
        workers: ctx.common.workers,
        dir: ctx.dir.path(),
        bin_dir: &ctx.bin_dir,
        path: "/ws",
    };
    for round in 0..ctx.common.rounds {
        for k in 0..Kind::PROXIES.len() {
            let kind = Kind::PROXIES[(k + round) % Kind::PROXIES.len()];
            if notes.contains_key(kind.label()) {
                continue;
            }
            eprintln!("idle round {round} {}", kind.label());
            let running = match proxies::start(kind, &setup).await {
                Ok(r) => r,
                Err(err) => {
                    notes.insert(kind.label().to_owned(), format!("skipped: {err:#}"));
                    continue;
                }
            };
            let addr = running.targets[0].addr;
            let pids = running.pids();
            let per = measure(
                ctx,
                kind.label(),
                addr,
                "/ws",
                Proto::Raw,
                proxy_count(ctx),
                || procs::rss_total(&pids),
            )
            .await?;
            per.record(samples, kind.label());
        }
    }
    Ok(())
}

async fn nodes_idle(
    ctx: &Ctx,
    samples: &mut Samples,
    notes: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let seed = SeedStack::up(&ctx.common.seed_dir)?;
    let count = ctx.common.idle_conns;
    for round in 0..ctx.common.rounds {
        for k in 0..2 {
            if (k + round) % 2 == 0 {
                eprintln!("idle round {round} ringcast-node");
                match ringcast::start_node(ctx, &format!("idle{round}"), &seed.redis_urls()).await {
                    Ok(node) => {
                        let pid = node.proc.pid();
                        let per = measure(
                            ctx,
                            "ringcast-node",
                            node.addr,
                            "/ws",
                            Proto::Ringcast,
                            count,
                            || procs::rss_bytes(pid),
                        )
                        .await?;
                        per.record(samples, "ringcast-node");
                    }
                    Err(err) => {
                        notes.insert("ringcast-node".to_owned(), format!("skipped: {err:#}"));
                    }
                }
            } else {
                eprintln!("idle round {round} socket.io");
                let i = round % 3;
                let pid = seed.node_pid(i)?;
                let path = "/socket.io/?EIO=4&transport=websocket";
                let per = measure(
                    ctx,
                    "socket.io",
                    seed.node_addr(i),
                    path,
                    Proto::Socketio,
                    count,
                    || procs::rss_bytes(pid),
                )
                .await?;
                per.record(samples, "socket.io");
            }
        }
    }
    Ok(())
}

/// One idle measurement.
struct Idle {
    before: u64,
    after: u64,
    held: u64,
    failed: u64,
    answered: u64,
}

impl Idle {
    fn record(&self, samples: &mut Samples, label: &str) {
        let per_conn = (self.after.saturating_sub(self.before)) as f64 / self.held.max(1) as f64;
        samples.push(label, "per_conn_kib", per_conn / 1024.0);
        samples.push(label, "before_mib", self.before as f64 / 1048576.0);
        samples.push(label, "after_mib", self.after as f64 / 1048576.0);
        samples.push(label, "held", self.held as f64);
        samples.push(label, "failed", self.failed as f64);
        samples.push(label, "answered", self.answered as f64);
    }
}

async fn measure(
    ctx: &Ctx,
    label: &str,
    addr: SocketAddr,
    path: &str,
    proto: Proto,
    count: usize,
    rss: impl Fn() -> u64,
) -> anyhow::Result<Idle> {
    // A short warm-up batch, opened and closed, so that lazily initialised state (thread
    // pools, allocator arenas, JIT) is in "before" rather than counted per connection.
    let warm = HoldArgs {
        addr,
        path: path.to_owned(),
        count: WARMUP_CONNS,
        spread: 64,
        first: 0,
        proto,
        concurrency: 100,
    };
    drop(tokio::task::block_in_place(|| Holder::start(ctx, &warm))?);
    tokio::time::sleep(SETTLE).await;
    let before = rss();
    let mut holders = Vec::new();
    let mut first = 0;
    while first < count {
        let n = PER_HOLDER.min(count - first);
        let args = HoldArgs {
            addr,
            path: path.to_owned(),
            count: n,
            spread: 64,
            first,
            proto,
            concurrency: 100,
        };
        holders.push(tokio::task::block_in_place(|| Holder::start(ctx, &args))?);
        first += n;
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss();
    let held: u64 = holders.iter().map(|h| h.ok).sum();
    let failed: u64 = holders.iter().map(|h| h.failed).sum();
    let mut answered = 0;
    for h in &mut holders {
        answered += tokio::task::block_in_place(|| h.ping())?;
    }
    eprintln!(
        "  {label}: {held} held ({failed} failed), {answered} answered a ping, RSS {:.1} → {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    Ok(Idle {
        before,
        after,
        held,
        failed,
        answered,
    })
}

fn render(ctx: &Ctx, s: &Samples, notes: &BTreeMap<String, String>) -> String {
    let mut out = format!(
        "## Idle: resident memory per idle WebSocket\n\n\
         Proxies: {} idle tunnels each (the goal is 10,000, but a proxy process holds \
         two descriptors per tunnel and the open-files limit here is 20,000, so one process \
         tops out near 9,900; all three get the same count), one worker, to the same two \
         echo backends. Nodes: {} idle client connections straight to `ringcast-node` \
         (hello/welcome done) and to one socket.io server of the seed stack (engine.io \
         open + namespace connect done), both on the same Redis Cluster. RSS delta / \
         connections; every connection answered a WebSocket ping after the measurement \
         (column \"answered\").\n\n",
        stats::fmt(proxy_count(ctx) as f64, 0),
        stats::fmt(ctx.common.idle_conns as f64, 0),
    );
    let nginx = s.median("nginx", "per_conn_kib");
    let sio = s.median("socket.io", "per_conn_kib");
    let rows: Vec<Vec<String>> = [
        "ringcast-edge",
        "nginx",
        "haproxy",
        "ringcast-node",
        "socket.io",
    ]
    .iter()
    .map(|l| {
        let base = if l.ends_with("node") || *l == "socket.io" {
            sio
        } else {
            nginx
        };
        vec![
            (*l).to_owned(),
            s.cell(l, "per_conn_kib", 2),
            stats::ratio(s.median(l, "per_conn_kib"), base),
            s.cell(l, "before_mib", 1),
            s.cell(l, "after_mib", 1),
            s.cell(l, "held", 0),
            s.cell(l, "answered", 0),
        ]
    })
    .collect();
    out += &stats::table(
        &[
            "target",
            "KiB per idle conn",
            "vs nginx / socket.io",
            "RSS before MiB",
            "RSS with conns MiB",
            "held",
            "answered",
        ],
        &rows,
    );
    out += "\n";
    for (what, note) in notes {
        out += &format!("- **{what}**: {note}\n");
    }
    out + "\n"
}
