//! The fan-out bench: one room with 1,000 members spread over three servers, one publisher
//! at increasing rates. Ringcast: three `ringcast-node`s on the Redis Cluster behind one
//! `ringcast-edge`. Incumbent: the seed stack's three socket.io servers (sharded Redis
//! adapter, same kind of cluster) behind its nginx.
//!
//! Each rate step runs open-loop: publish `i` is due at `origin + i / rate` and carries that
//! time; members record publish → deliver from it. Reported: deliveries/s at saturation
//! (arrivals counted during the measured window at the highest step) and p50/p99 at the
//! first step (10 publishes/s × 1,000 members = 10,000 deliveries/s).

use super::loadgen::{self, new_hist};
use super::procs::{self};
use super::proxies::{self, Kind, Setup};
use super::report::Ctx;
use super::ringcast::{self, Node};
use super::rooms::{self, Event, Stack};
use super::seed::SeedStack;
use super::stats::{self, Samples};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Room members.
const MEMBERS: usize = 1_000;
/// Source /24 networks of the members (the same for both stacks; both proxies hash the
/// client address).
const MEMBER_NETWORKS: usize = 30;
/// Attempts to connect and join per member before the session fails.
const JOIN_ATTEMPTS: usize = 3;
/// Publishes per second of each step.
const RATES: [f64; 6] = [10.0, 30.0, 100.0, 300.0, 1_000.0, 3_000.0];
/// A step whose arrivals fall below this share of the offered deliveries is saturated.
const KEEP_UP: f64 = 0.9;
/// Time allowed for the last deliveries of a step.
const DRAIN: Duration = Duration::from_secs(2);
/// Warm-up of each step.
const WARMUP: Duration = Duration::from_secs(1);
/// The room.
const ROOM: &str = "bench-fanout";

/// Runs the fan-out bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let seed = SeedStack::up(&ctx.common.seed_dir)?;
    let ringcast = RingcastSide::start(ctx, &seed).await;
    let mut samples = Samples::default();
    let mut notes = Vec::new();
    if let Err(err) = &ringcast {
        notes.push(format!("ringcast skipped: {err:#}"));
    }
    for round in 0..ctx.common.rounds {
        for k in 0..2 {
            let stack = [Stack::Ringcast, Stack::Socketio][(k + round) % 2];
            let (addr, pids) = match (stack, &ringcast) {
                (Stack::Ringcast, Ok(side)) => (side.edge.targets[0].addr, side.pids()),
                (Stack::Ringcast, Err(_)) => continue,
                (Stack::Socketio, _) => (seed.nginx_addr(), socketio_pids(&seed)?),
            };
            eprintln!("fanout round {round} {}", stack.label());
            let pids = [pids, seed.redis_pids()].concat();
            match session(ctx, stack, addr, &pids, &mut samples).await {
                Ok(spread) if round == 0 => {
                    notes.push(format!("{} members per server: {spread:?}", stack.label()));
                }
                Ok(_) => {}
                Err(err) => notes.push(format!("{} round {round} failed: {err:#}", stack.label())),
            }
        }
    }
    Ok(render(ctx, &samples, &notes))
}

fn socketio_pids(seed: &SeedStack) -> anyhow::Result<Vec<u32>> {
    let mut pids = seed.nginx_pids();
    for i in 0..3 {
        pids.push(seed.node_pid(i)?);
    }
    Ok(pids)
}

/// Three nodes and an edge in front of them.
pub struct RingcastSide {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The edge.
    pub edge: proxies::Running,
}

impl RingcastSide {
    /// Starts three nodes on the seed stack's Redis Cluster and an edge before them.
    pub async fn start(ctx: &Ctx, seed: &SeedStack) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(ringcast::start_node(ctx, &format!("n{i}"), &seed.redis_urls()).await?);
        }
        let backends: Vec<_> = nodes.iter().map(|n| n.addr).collect();
        let setup = Setup {
            backends: &backends,
            workers: ctx.common.workers,
            dir: ctx.dir.path(),
            bin_dir: &ctx.bin_dir,
            path: "/ws",
        };
        let edge = proxies::start(Kind::Ringcast, &setup).await?;
        Ok(Self { nodes, edge })
    }

    /// PIDs of the nodes and the edge.
    pub fn pids(&self) -> Vec<u32> {
        let nodes = self.nodes.iter().map(|n| n.proc.pid());
        nodes.chain(self.edge.pids()).collect()
    }
}

/// What members record during one step.
#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    in_window: u64,
}

/// Shared step bounds, in nanoseconds since the origin.
struct Window {
    origin: Instant,
    from_ns: AtomicU64,
    to_ns: AtomicU64,
}

async fn session(
    ctx: &Ctx,
    stack: Stack,
    addr: std::net::SocketAddr,
    pids: &[u32],
    samples: &mut Samples,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let target = stack.target(addr);
    let window = Arc::new(Window {
        origin: Instant::now(),
        from_ns: u64::MAX.into(),
        to_ns: 0.into(),
    });
    let (tallies, spread, members) = start_members(stack, &target, &window).await?;
    // Closes every member's socket when the session ends, however it ends.
    let _members = AbortOnDrop(members);
    eprintln!("  {} members by server: {spread:?}", tallies.len());
    let mut best: f64 = 0.0;
    for rate in RATES {
        let cpu0 = procs::cpu_total(pids);
        let gen0 = procs::own_cpu_seconds();
        let step = run_step(ctx, stack, &target, &window, &tallies, rate).await?;
        let delivered = step.arrivals_per_s * ctx.common.duration_s;
        let cpu = (procs::cpu_total(pids) - cpu0) * 1e6 / delivered.max(1.0);
        let gen_cpu = (procs::own_cpu_seconds() - gen0) * 1e6 / delivered.max(1.0);
        let offered = rate * MEMBERS as f64;
        eprintln!(
            "  {} rate {rate}/s: offered {offered:.0}/s arrived {:.0}/s p50 {} µs p99 {} µs lost {} ({cpu:.1} µs stack CPU/delivery)",
            stack.label(),
            step.arrivals_per_s,
            step.p50,
            step.p99,
            step.lost
        );
        if rate == RATES[0] {
            samples.push(stack.label(), "p50", step.p50 as f64);
            samples.push(stack.label(), "p99", step.p99 as f64);
            samples.push(stack.label(), "lost10k", step.lost as f64);
            samples.push(stack.label(), "cpu10k", cpu);
            samples.push(stack.label(), "gen10k", gen_cpu);
        }
        best = best.max(step.arrivals_per_s);
        if step.arrivals_per_s < KEEP_UP * offered {
            samples.push(stack.label(), "sat_rate", rate);
            break;
        }
    }
    samples.push(stack.label(), "saturation", best);
    Ok(spread)
}

type Tallies = Vec<Arc<Mutex<Tally>>>;
type Spread = std::collections::BTreeMap<String, usize>;

/// Aborts tasks (and so drops their sockets) when dropped.
pub struct AbortOnDrop(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

async fn start_members(
    stack: Stack,
    target: &loadgen::Target,
    window: &Arc<Window>,
) -> anyhow::Result<(Tallies, Spread, Vec<tokio::task::JoinHandle<()>>)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut joins = Vec::new();
    for i in 0..MEMBERS {
        let (gate, target) = (gate.clone(), target.clone());
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let source = loadgen::source_ip(i, MEMBER_NETWORKS);
            let mut attempt = 0;
            loop {
                // Setup only: a member that could not join is retried (the failures of
                // interest are measured in the failover bench).
                match rooms::member(stack, &target, source, ROOM).await {
                    Ok(client) => return Ok(client),
                    Err(err) if attempt >= JOIN_ATTEMPTS => return Err(err),
                    Err(_) => attempt += 1,
                }
            }
        }));
    }
    let mut tallies = Vec::new();
    let mut handles = Vec::new();
    let mut spread = std::collections::BTreeMap::new();
    for join in joins {
        let client = join.await??;
        *spread.entry(client.server.clone()).or_insert(0) += 1;
        let tally = Arc::new(Mutex::new(Tally {
            hist: Some(new_hist()),
            in_window: 0,
        }));
        tallies.push(tally.clone());
        handles.push(tokio::spawn(listen(
            stack,
            client.ws,
            tally,
            window.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((tallies, spread, handles))
}

async fn listen(stack: Stack, mut ws: loadgen::Ws, tally: Arc<Mutex<Tally>>, window: Arc<Window>) {
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        match rooms::classify(stack, &text) {
            Event::Delivery(stamp) => {
                let now_ns = window.origin.elapsed().as_nanos() as u64;
                let from = window.from_ns.load(Ordering::Relaxed);
                let to = window.to_ns.load(Ordering::Relaxed);
                let mut t = tally.lock().expect("tally lock");
                if now_ns >= from && now_ns < to {
                    t.in_window += 1;
                }
                if stamp >= from
                    && stamp < to
                    && let Some(hist) = t.hist.as_mut()
                {
                    let _ = hist.record(((now_ns.saturating_sub(stamp)) / 1000).max(1));
                }
            }
            Event::Heartbeat(reply) => {
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
            Event::Other => {}
        }
    }
}

struct Step {
    arrivals_per_s: f64,
    p50: u64,
    p99: u64,
    lost: u64,
}

async fn run_step(
    ctx: &Ctx,
    stack: Stack,
    target: &loadgen::Target,
    window: &Arc<Window>,
    tallies: &Tallies,
    rate: f64,
) -> anyhow::Result<Step> {
    let client = rooms::connect(stack, target, loadgen::source_ip(7, 16)).await?;
    let (mut sink, mut source) = client.ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
    let duration = Duration::from_secs_f64(ctx.common.duration_s);
    let start = Instant::now() + Duration::from_millis(20);
    let from = start + WARMUP;
    let end = from + duration;
    let ns = |t: Instant| (t - window.origin).as_nanos() as u64;
    window.from_ns.store(ns(from), Ordering::SeqCst);
    window.to_ns.store(ns(end), Ordering::SeqCst);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (mut due, mut seq, mut published) = (start, 0u64, 0u64);
    while due < end {
        tokio::time::sleep_until(due).await;
        sink.send(rooms::publish(stack, ROOM, seq, ns(due))).await?;
        if due >= from {
            published += 1;
        }
        seq += 1;
        due += interval;
    }
    tokio::time::sleep(DRAIN).await;
    let _ = sink.close().await;
    collect(tallies, published, duration)
}

fn collect(tallies: &Tallies, published: u64, duration: Duration) -> anyhow::Result<Step> {
    let mut hist = new_hist();
    let mut arrivals = 0;
    for tally in tallies {
        let mut t = tally.lock().expect("tally lock");
        hist.add(t.hist.replace(new_hist()).expect("histogram present"))?;
        arrivals += std::mem::take(&mut t.in_window);
    }
    let expected = published * tallies.len() as u64;
    Ok(Step {
        arrivals_per_s: arrivals as f64 / duration.as_secs_f64(),
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
        lost: expected.saturating_sub(hist.len()),
    })
}

fn render(ctx: &Ctx, s: &Samples, notes: &[String]) -> String {
    let mut out = format!(
        "## Fan-out: one room, {MEMBERS} members over three servers\n\n\
         Ringcast: three `ringcast-node`s on the Redis Cluster behind one `ringcast-edge` \
         ({workers} worker). Incumbent: the seed stack (three socket.io 4.8 servers with \
         `@socket.io/redis-adapter`'s sharded adapter on the same kind of 3-master Redis \
         Cluster, behind nginx `ip_hash`). Members come from {MEMBER_NETWORKS} /24 source networks (both proxies hash the client address). One \
         publisher (not a member) publishes open-loop at {rates} publishes/s, {dur} s per step \
         after 1 s warm-up, until arrivals fall below {keep}% of the offered deliveries. \
         Latency is publish → deliver, timed from the scheduled publish, at the first step \
         (10 publishes/s = 10,000 deliveries/s). Stack CPU = nodes + proxy + Redis.\n\n",
        workers = ctx.common.workers,
        rates = RATES.map(|r| r.to_string()).join(", "),
        dur = ctx.common.duration_s,
        keep = KEEP_UP * 100.0,
    );
    let sio = |m: &str| s.median("socket.io", m);
    let rows: Vec<Vec<String>> = ["ringcast", "socket.io"]
        .iter()
        .map(|l| {
            vec![
                (*l).to_owned(),
                s.cell(l, "saturation", 0),
                stats::ratio(s.median(l, "saturation"), sio("saturation")),
                s.cell(l, "p50", 0),
                s.cell(l, "p99", 0),
                s.cell(l, "lost10k", 0),
                s.cell(l, "cpu10k", 1),
                s.cell(l, "gen10k", 1),
            ]
        })
        .collect();
    out += &stats::table(
        &[
            "stack",
            "deliveries/s at saturation",
            "vs socket.io",
            "p50 µs @10k/s",
            "p99 µs @10k/s",
            "lost @10k/s",
            "stack CPU µs/delivery @10k/s",
            "generator CPU µs/delivery",
        ],
        &rows,
    );
    out += "\n";
    for note in notes {
        out += &format!("- {note}\n");
    }
    out + "\n"
}
