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
use super::profile::{self, Profile, SyscallCount};
use super::proxies::{self, Kind, Setup};
use super::report::Ctx;
use super::ringcast::{self, Node};
use super::rooms::{self, Event, Stack};
use super::seed::SeedStack;
use super::stats::{self, Samples};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Room members.
const MEMBERS: usize = 1_000;
/// Source /24 networks of the members: one per member, the same for both stacks. Both
/// proxies hash the client address, and with few distinct addresses the placement over
/// three servers is lumpy (30 networks put 17 % of the members on one server and 43 % on
/// another), which measures the hash's luck rather than the servers.
const MEMBER_NETWORKS: usize = MEMBERS;
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
/// The room's name; each session gets a room of its own (this plus the round), so that
/// nothing a previous session published can reach the next session's members.
const ROOM: &str = "bench-fanout";
/// The stack counts as idle once its processes use less than this share of one core.
const QUIET_SHARE: f64 = 0.05;
/// How long a session waits for the stack to go idle before it starts anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Runs the fan-out bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let seed = SeedStack::up(&ctx.common.seed_dir)?;
    let ringcast = RingcastSide::start(ctx, &seed).await;
    let mut samples = Samples::default();
    let mut notes = Vec::new();
    let mut profiles = Vec::new();
    if let Err(err) = &ringcast {
        notes.push(format!("ringcast skipped: {err:#}"));
    }
    for round in 0..ctx.common.rounds {
        for k in 0..2 {
            let stack = [Stack::Ringcast, Stack::Socketio][(k + round) % 2];
            let (addr, roles) = match (stack, &ringcast) {
                (Stack::Ringcast, Ok(side)) => (side.edge.targets[0].addr, side.roles()),
                (Stack::Ringcast, Err(_)) => continue,
                (Stack::Socketio, _) => (seed.nginx_addr(), socketio_roles(&seed)?),
            };
            eprintln!("fanout round {round} {}", stack.label());
            let roles = Roles {
                redis: seed.redis_pids(),
                redis_ports: seed.master_ports(),
                ..roles
            };
            let profiles = (ctx.common.profile && round == 0).then_some(&mut profiles);
            let room = format!("{ROOM}-{round}");
            match session(ctx, stack, addr, &room, &roles, &mut samples, profiles).await {
                Ok((spread, redis)) if round == 0 => {
                    notes.push(format!("{} members per server: {spread:?}", stack.label()));
                    notes.push(format!("{}: {redis}", stack.label()));
                }
                Ok(_) => {}
                Err(err) => notes.push(format!("{} round {round} failed: {err:#}", stack.label())),
            }
        }
    }
    Ok(render(ctx, &samples, &notes) + &profile::render(&profiles))
}

/// The processes of one stack by role, so that CPU per delivery can be split.
#[derive(Default)]
pub struct Roles {
    /// The three servers (nodes or socket.io processes).
    pub servers: Vec<u32>,
    /// The proxy in front of them.
    pub proxy: Vec<u32>,
    /// The Redis Cluster's processes.
    pub redis: Vec<u32>,
    /// The ports of the Redis Cluster's masters, whose command counters are read.
    pub redis_ports: Vec<u16>,
}

impl Roles {
    /// Each role's name and processes, in table order.
    fn each(&self) -> [(&'static str, &[u32]); 3] {
        [
            ("servers", &self.servers),
            ("proxy", &self.proxy),
            ("redis", &self.redis),
        ]
    }
}

fn socketio_roles(seed: &SeedStack) -> anyhow::Result<Roles> {
    let servers = (0..3)
        .map(|i| seed.node_pid(i))
        .collect::<anyhow::Result<_>>()?;
    Ok(Roles {
        servers,
        proxy: seed.nginx_pids(),
        ..Roles::default()
    })
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
        Self::start_with(ctx, seed, 3).await
    }

    /// Starts `node_count` nodes on the seed stack's Redis Cluster and an edge before them.
    pub async fn start_with(
        ctx: &Ctx,
        seed: &SeedStack,
        node_count: usize,
    ) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..node_count {
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

    /// The nodes and the edge by role (Redis is the seed stack's).
    pub fn roles(&self) -> Roles {
        Roles {
            servers: self.nodes.iter().map(|n| n.proc.pid()).collect(),
            proxy: self.edge.pids(),
            ..Roles::default()
        }
    }
}

/// What members record during one step.
#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    in_window: u64,
    /// Every delivery of the step, warm-up and drain included: what the CPU measured over
    /// the whole step was spent on.
    all: u64,
    /// (publish stamp, latency µs) of every delivery of a measured publish, so that the
    /// first and the last delivery of each publish can be told apart.
    deliveries: Vec<(u64, u64)>,
}

impl Tally {
    /// Nothing recorded yet.
    fn fresh() -> Self {
        Self {
            hist: Some(new_hist()),
            ..Self::default()
        }
    }
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
    room: &str,
    roles: &Roles,
    samples: &mut Samples,
    profiles: Option<&mut Vec<(String, String)>>,
) -> anyhow::Result<(Spread, String)> {
    let target = stack.target(addr);
    let window = Arc::new(Window {
        origin: Instant::now(),
        from_ns: u64::MAX.into(),
        to_ns: 0.into(),
    });
    // A saturating step leaves the servers writing backlogs to sockets that are gone;
    // the next session must not start on a stack that is still busy with the last one.
    settle(stack, roles).await;
    let (tallies, spread, members) = start_members(stack, &target, room, &window).await?;
    // Closes every member's socket when the session ends, however it ends.
    let _members = AbortOnDrop(members);
    eprintln!("  {} members by server: {spread:?}", tallies.len());
    let mut best: f64 = 0.0;
    let mut redis = String::from("Redis commands not read");
    for rate in RATES {
        let cpu0 = roles.each().map(|(_, pids)| procs::cpu_total(pids));
        let gen0 = procs::own_cpu_seconds();
        let commands0 = (rate == RATES[0]).then(|| redis_commands(&roles.redis_ports));
        let step_started = Instant::now();
        let step = run_step(ctx, stack, &target, room, &window, &tallies, rate).await?;
        let step_seconds = step_started.elapsed().as_secs_f64();
        // CPU is measured over the whole step, so it is divided by the step's deliveries,
        // warm-up and drain included, not by those of the measured window alone.
        let delivered = step.delivered as f64;
        let per_delivery = |seconds: f64| seconds * 1e6 / delivered.max(1.0);
        if let Some(before) = commands0 {
            let after = redis_commands(&roles.redis_ports);
            redis = per_second(&before, &after, step_seconds);
        }
        let by_role: Vec<(&str, f64)> = roles
            .each()
            .iter()
            .zip(cpu0)
            .map(|((role, pids), before)| (*role, per_delivery(procs::cpu_total(pids) - before)))
            .collect();
        let cpu: f64 = by_role.iter().map(|(_, us)| us).sum();
        let gen_cpu = per_delivery(procs::own_cpu_seconds() - gen0);
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
            for (name, hist) in [("first", &step.first), ("last", &step.last)] {
                samples.push(
                    stack.label(),
                    &format!("{name}_p50"),
                    hist.value_at_quantile(0.5) as f64,
                );
                samples.push(
                    stack.label(),
                    &format!("{name}_p99"),
                    hist.value_at_quantile(0.99) as f64,
                );
            }
            samples.push(stack.label(), "lost10k", step.lost as f64);
            samples.push(stack.label(), "cpu10k", cpu);
            samples.push(stack.label(), "gen10k", gen_cpu);
            for (role, us) in &by_role {
                samples.push(stack.label(), &format!("cpu10k_{role}"), *us);
            }
        }
        if rate == RATES[RATES.len() - 1] || step.arrivals_per_s < KEEP_UP * offered {
            samples.push(stack.label(), "cpu_sat", cpu);
        }
        best = best.max(step.arrivals_per_s);
        if step.arrivals_per_s < KEEP_UP * offered {
            samples.push(stack.label(), "sat_rate", rate);
            break;
        }
    }
    samples.push(stack.label(), "saturation", best);
    if let Some(profiles) = profiles {
        let label = format!("{}, fan-out at {PROFILED_RATE} publishes/s", stack.label());
        let profiled = async {
            let pids = [roles.servers.as_slice(), &roles.proxy].concat();
            settle(stack, roles).await;
            let perf = Profile::start(stack.label(), &pids, ctx.dir.path())?;
            let calls = SyscallCount::start(stack.label(), &pids, ctx.dir.path())?;
            let step =
                run_step(ctx, stack, &target, room, &window, &tallies, PROFILED_RATE).await?;
            let delivered = step.delivered as f64;
            let calls = tokio::task::spawn_blocking(move || calls.finish(delivered)).await?;
            let calls = calls.unwrap_or_else(|err| format!("not counted: {err:#}"));
            let profile = tokio::task::spawn_blocking(move || perf.finish()).await??;
            anyhow::Ok(format!(
                "system calls of the servers and the proxy per delivery: {calls}\n\n{profile}"
            ))
        };
        let text = profiled
            .await
            .unwrap_or_else(|err| format!("no profile: {err:#}"));
        profiles.push((label, text));
    }
    Ok((spread, redis))
}

/// Publishes per second of the extra, uncounted step profiled with `--profile` (the
/// servers and the proxy are sampled; Redis is left out): the highest step both stacks
/// keep up with, so the profile shows the work near saturation.
const PROFILED_RATE: f64 = 100.0;

type Tallies = Vec<Arc<Mutex<Tally>>>;
type Spread = BTreeMap<String, usize>;

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
    room: &str,
    window: &Arc<Window>,
) -> anyhow::Result<(Tallies, Spread, Vec<tokio::task::JoinHandle<()>>)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut joins = Vec::new();
    for i in 0..MEMBERS {
        let (gate, target, room) = (gate.clone(), target.clone(), room.to_owned());
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let source = loadgen::source_ip(i, MEMBER_NETWORKS);
            let mut attempt = 0;
            loop {
                // Setup only: a member that could not join is retried (the failures of
                // interest are measured in the failover bench).
                match rooms::member(stack, &target, source, &room).await {
                    Ok(client) => return Ok(client),
                    Err(err) if attempt >= JOIN_ATTEMPTS => return Err(err),
                    Err(_) => attempt += 1,
                }
            }
        }));
    }
    let mut tallies = Vec::new();
    let mut handles = Vec::new();
    let mut spread = BTreeMap::new();
    for join in joins {
        let client = join.await??;
        *spread.entry(client.server.clone()).or_insert(0) += 1;
        let tally = Arc::new(Mutex::new(Tally::fresh()));
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
                t.all += 1;
                if now_ns >= from && now_ns < to {
                    t.in_window += 1;
                }
                if stamp >= from && stamp < to {
                    let latency_us = (now_ns.saturating_sub(stamp) / 1000).max(1);
                    if let Some(hist) = t.hist.as_mut() {
                        let _ = hist.record(latency_us);
                    }
                    t.deliveries.push((stamp, latency_us));
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
    /// Deliveries over the whole step (warm-up, window and drain).
    delivered: u64,
    /// Latency of the first delivery of each publish, and of the last.
    first: Histogram<u64>,
    last: Histogram<u64>,
}

async fn run_step(
    ctx: &Ctx,
    stack: Stack,
    target: &loadgen::Target,
    room: &str,
    window: &Arc<Window>,
    tallies: &Tallies,
    rate: f64,
) -> anyhow::Result<Step> {
    // What arrived before this step (history sent on join, the previous step's drain)
    // is not this step's work.
    for tally in tallies {
        *tally.lock().expect("tally lock") = Tally::fresh();
    }
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
        sink.send(rooms::publish(stack, room, seq, ns(due))).await?;
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

/// Waits until the stack's processes are idle (below [`QUIET_SHARE`] of a core over half a
/// second), at most [`SETTLE_LIMIT`], and says on stderr how long that took.
async fn settle(stack: Stack, roles: &Roles) {
    const PROBE: Duration = Duration::from_millis(500);
    let pids: Vec<u32> = roles
        .each()
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    let started = Instant::now();
    loop {
        let before = procs::cpu_total(&pids);
        tokio::time::sleep(PROBE).await;
        let share = (procs::cpu_total(&pids) - before) / PROBE.as_secs_f64();
        if share < QUIET_SHARE {
            break;
        }
        if started.elapsed() >= SETTLE_LIMIT {
            eprintln!(
                "  {}: still busy ({:.0} % of a core) after {SETTLE_LIMIT:?}, starting anyway",
                stack.label(),
                share * 100.0
            );
            return;
        }
    }
    let waited = started.elapsed();
    if waited > 2 * PROBE {
        eprintln!(
            "  {}: waited {waited:.1?} for the stack to go idle",
            stack.label()
        );
    }
}

/// Takes what the members recorded since the last call (the tallies start afresh).
fn collect(tallies: &Tallies, published: u64, duration: Duration) -> anyhow::Result<Step> {
    let mut hist = new_hist();
    let (mut arrivals, mut delivered) = (0, 0);
    // Per publish stamp: the quickest and the slowest of its deliveries.
    let mut bursts: std::collections::HashMap<u64, (u64, u64)> = Default::default();
    for tally in tallies {
        let mut t = tally.lock().expect("tally lock");
        hist.add(t.hist.replace(new_hist()).expect("histogram present"))?;
        arrivals += std::mem::take(&mut t.in_window);
        delivered += std::mem::take(&mut t.all);
        for (stamp, latency_us) in std::mem::take(&mut t.deliveries) {
            let burst = bursts.entry(stamp).or_insert((latency_us, latency_us));
            burst.0 = burst.0.min(latency_us);
            burst.1 = burst.1.max(latency_us);
        }
    }
    let (mut first, mut last) = (new_hist(), new_hist());
    for (quickest, slowest) in bursts.into_values() {
        first.saturating_record(quickest);
        last.saturating_record(slowest);
    }
    let expected = published * tallies.len() as u64;
    Ok(Step {
        arrivals_per_s: arrivals as f64 / duration.as_secs_f64(),
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
        lost: expected.saturating_sub(hist.len()),
        delivered,
        first,
        last,
    })
}

/// Calls and microseconds of each Redis command, summed over the servers on `ports`
/// (`INFO commandstats`; a server that does not answer counts nothing).
fn redis_commands(ports: &[u16]) -> BTreeMap<String, (u64, u64)> {
    let mut total = BTreeMap::new();
    for port in ports {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "INFO", "commandstats"])
            .output();
        let Ok(out) = out else { continue };
        for (name, calls, usec) in parse_commandstats(&String::from_utf8_lossy(&out.stdout)) {
            let entry = total.entry(name).or_insert((0, 0));
            entry.0 += calls;
            entry.1 += usec;
        }
    }
    total
}

/// `(command, calls, usec)` from `INFO commandstats` lines such as
/// `cmdstat_xadd:calls=10,usec=52,usec_per_call=5.20,rejected_calls=0,failed_calls=0`.
fn parse_commandstats(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            Some((name.to_owned(), field("calls")?, field("usec")?))
        })
        .collect()
}

/// "Redis commands per second" line: each command's calls and time inside Redis per
/// second between two counter readings `seconds` apart, busiest first. A script's time
/// (`evalsha`) includes the commands it runs, which are counted under their own names too.
fn per_second(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    seconds: f64,
) -> String {
    let mut rows: Vec<(String, f64, f64)> = after
        .iter()
        .map(|(name, (calls, usec))| {
            let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
            let per = |n: u64| n as f64 / seconds.max(1e-3);
            (
                name.clone(),
                per(calls - c0.min(*calls)),
                per(usec - u0.min(*usec)),
            )
        })
        .filter(|(_, calls, _)| *calls > 0.0)
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    let listed: Vec<String> = rows
        .iter()
        .take(6)
        .map(|(name, calls, usec)| format!("{name} {calls:.0} calls/s, {usec:.0} µs/s"))
        .collect();
    format!(
        "Redis commands during the 10 publishes/s step (masters' `INFO commandstats`; a \
         script's time includes the commands it runs, listed under their own names too): {}",
        listed.join("; ")
    )
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
         (10 publishes/s = 10,000 deliveries/s). Stack CPU = nodes + proxy + Redis. Each \
         session has a room of its own and starts once the stack is idle (below \
         {quiet:.0}% of a core), so the backlog a saturating step leaves behind does not \
         reach the next one.\n\n",
        workers = ctx.common.workers,
        rates = RATES.map(|r| r.to_string()).join(", "),
        dur = ctx.common.duration_s,
        keep = KEEP_UP * 100.0,
        quiet = QUIET_SHARE * 100.0,
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
    out += &format!(
        "\nThe same latency per publish, at 10,000 deliveries/s: each publish reaches its \
         {MEMBERS} members as a burst, and the first delivery of a burst shows the path \
         publish → Redis → node → proxy → member, while the last one also waits for every \
         other delivery of the burst to be written, relayed and read on this box's cores:\n\n"
    );
    let bursts: Vec<Vec<String>> = ["ringcast", "socket.io"]
        .iter()
        .map(|l| {
            vec![
                (*l).to_owned(),
                s.cell(l, "first_p50", 0),
                s.cell(l, "first_p99", 0),
                s.cell(l, "last_p50", 0),
                s.cell(l, "last_p99", 0),
            ]
        })
        .collect();
    out += &stats::table(
        &[
            "stack",
            "first delivery p50 µs",
            "first delivery p99 µs",
            "last delivery p50 µs",
            "last delivery p99 µs",
        ],
        &bursts,
    );
    out += "\nStack CPU per delivery by role (µs), at 10,000 deliveries/s and at the saturating \
            step; the ratio column is socket.io's stack CPU over Ringcast's, the deliveries one \
            core-second of stack CPU buys relative to socket.io:\n\n";
    let split: Vec<Vec<String>> = ["ringcast", "socket.io"]
        .iter()
        .map(|l| {
            vec![
                (*l).to_owned(),
                s.cell(l, "cpu10k_servers", 1),
                s.cell(l, "cpu10k_proxy", 1),
                s.cell(l, "cpu10k_redis", 1),
                s.cell(l, "cpu10k", 1),
                stats::ratio(sio("cpu10k"), s.median(l, "cpu10k")),
                s.cell(l, "cpu_sat", 1),
                stats::ratio(sio("cpu_sat"), s.median(l, "cpu_sat")),
            ]
        })
        .collect();
    out += &stats::table(
        &[
            "stack",
            "servers @10k/s",
            "proxy @10k/s",
            "redis @10k/s",
            "total @10k/s",
            "deliveries per CPU-s vs socket.io @10k/s",
            "total at saturation",
            "deliveries per CPU-s vs socket.io at saturation",
        ],
        &split,
    );
    out += "\n";
    for note in notes {
        out += &format!("- {note}\n");
    }
    out + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_lines_are_parsed() {
        let text = "# Commandstats\r\n\
            cmdstat_xadd:calls=10,usec=52,usec_per_call=5.20,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_spublish:calls=4,usec=8,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
            not a stat line\r\n";
        assert_eq!(
            parse_commandstats(text),
            vec![("xadd".to_owned(), 10, 52), ("spublish".to_owned(), 4, 8)]
        );
    }

    #[test]
    fn commands_per_second_are_the_difference_busiest_first() {
        let before = BTreeMap::from([("xadd".to_owned(), (10, 100)), ("get".to_owned(), (5, 5))]);
        let after = BTreeMap::from([
            ("xadd".to_owned(), (30, 300)),
            ("get".to_owned(), (5, 5)),
            ("spublish".to_owned(), (20, 40)),
        ]);
        let line = per_second(&before, &after, 2.0);
        assert!(
            line.ends_with("xadd 10 calls/s, 100 µs/s; spublish 10 calls/s, 20 µs/s"),
            "{line}"
        );
    }
}
