//! The failover bench: `kill -9` of one of three servers behind the proxy, with clients in a
//! room on every server and handshake probes from the victims' source addresses.
//!
//! Measured per stack (Ringcast edge + nodes; nginx + socket.io):
//! - time from the kill until the proxy routes around the dead server: the last failed probe
//!   handshake after the kill (probes run every 20 ms from the source networks whose clients
//!   were on the killed server); 0 when no probe ever failed;
//! - failed probe handshakes;
//! - when the killed server's clients got back in (connected and re-joined), all clients
//!   using the same policy: first retry after a random 0–1 s, then doubling up to 8 s
//!   (full jitter; socket.io-client's default first delay is about 1 s).

use super::fanout::{AbortOnDrop, RingcastSide};
use super::loadgen;
use super::report::Ctx;
use super::ringcast;
use super::rooms::{self, Stack};
use super::seed::SeedStack;
use super::stats::{self, Samples};
use futures_util::StreamExt;
use rand::Rng;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Clients in the room, spread over all servers.
const CLIENTS: usize = 300;
/// Source /24 networks of the clients.
const SPREAD: usize = 48;
/// How long after the kill the bench watches.
const WATCH: Duration = Duration::from_secs(12);
/// Probe period per probe loop.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Concurrent probe loops.
const PROBES: usize = 4;
/// Reconnect time buckets (upper bounds, seconds) of the distribution table.
const BUCKETS: [f64; 6] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0];
const ROOM: &str = "bench-failover";
/// Marks the duration of a successful reconnect in the attempts log.
const JOIN_TOOK: &str = "ok after ";

/// Runs the failover bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let seed = SeedStack::up(&ctx.common.seed_dir)?;
    let mut ringcast = RingcastSide::start(ctx, &seed).await;
    let mut samples = Samples::default();
    let mut notes = Vec::new();
    let mut spread_of_reconnects: Vec<(String, Vec<f64>)> = Vec::new();
    if let Err(err) = &ringcast {
        notes.push(format!("ringcast skipped: {err:#}"));
    }
    for round in 0..ctx.common.rounds {
        for k in 0..2 {
            let stack = [Stack::Ringcast, Stack::Socketio][(k + round) % 2];
            if stack == Stack::Ringcast && ringcast.is_err() {
                continue;
            }
            eprintln!("failover round {round} {}", stack.label());
            let victim = round % 3;
            let outcome = match stack {
                Stack::Ringcast => {
                    let side = ringcast.as_mut().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                    ringcast_round(ctx, &seed, side, victim).await
                }
                Stack::Socketio => socketio_round(&seed, victim).await,
            };
            match outcome {
                Ok(o) => {
                    o.record(&mut samples, stack.label());
                    if let Some(first) = o.refused.first() {
                        let n = o.refused.len();
                        notes.push(format!(
                            "{} round {round}: {n} failed reconnect attempts, first: {first}",
                            stack.label()
                        ));
                    }
                    spread_of_reconnects.push((stack.label().to_owned(), o.reconnects));
                }
                Err(err) => notes.push(format!("{} round {round}: {err:#}", stack.label())),
            }
        }
    }
    Ok(render(&samples, &spread_of_reconnects, &notes))
}

async fn ringcast_round(
    ctx: &Ctx,
    seed: &SeedStack,
    side: &mut RingcastSide,
    victim: usize,
) -> anyhow::Result<Outcome> {
    let edge = side.edge.targets[0].addr;
    let victim_id = side.nodes[victim].id.clone();
    let victim_addr = side.nodes[victim].addr;
    let outcome = {
        let node = &mut side.nodes[victim];
        measure(Stack::Ringcast, edge, &victim_id, || node.proc.kill9()).await
    };
    let restarted =
        ringcast::start_node_at(ctx, &victim_id, victim_addr, &seed.redis_urls()).await?;
    side.nodes[victim] = restarted;
    tokio::time::sleep(Duration::from_secs(3)).await;
    outcome
}

async fn socketio_round(seed: &SeedStack, victim: usize) -> anyhow::Result<Outcome> {
    let pid = seed.node_pid(victim)?;
    let port = seed.node_ports[victim].to_string();
    let outcome = measure(Stack::Socketio, seed.nginx_addr(), &port, || {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    })
    .await;
    seed.restart_node(victim)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome
}

/// What one kill showed.
struct Outcome {
    victims: usize,
    route_ms: f64,
    failed_probes: u64,
    reconnects: Vec<f64>,
    refused: Vec<String>,
    /// Seconds from the kill until each victim saw its connection end.
    noticed: Vec<f64>,
    /// Seconds the successful reconnect (connect, hello, join) took.
    join_s: Vec<f64>,
}

impl Outcome {
    fn record(&self, samples: &mut Samples, label: &str) {
        samples.push(label, "victims", self.victims as f64);
        samples.push(label, "route_ms", self.route_ms);
        samples.push(label, "failed", self.failed_probes as f64);
        samples.push(label, "refused", self.refused.len() as f64);
        if let Some(p50) = stats::median(&self.join_s) {
            samples.push(label, "join_p50", p50);
        }
        if let Some(p50) = stats::median(&self.noticed) {
            samples.push(label, "noticed_p50", p50);
        }
        let back = self.reconnects.len() as f64;
        samples.push(
            label,
            "back_share",
            100.0 * back / self.victims.max(1) as f64,
        );
        let mut sorted = self.reconnects.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| {
            sorted
                .get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
        };
        if let (Some(p50), Some(p90), Some(max)) = (q(0.5), q(0.9), sorted.last()) {
            samples.push(label, "rc_p50", p50);
            samples.push(label, "rc_p90", p90);
            samples.push(label, "rc_max", *max);
        }
    }
}

async fn measure(
    stack: Stack,
    addr: SocketAddr,
    victim: &str,
    kill: impl FnOnce(),
) -> anyhow::Result<Outcome> {
    let target = stack.target(addr);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let source = loadgen::source_ip(i, SPREAD);
        clients.push((source, rooms::member(stack, &target, source, ROOM).await?));
    }
    let victim_sources: Vec<Ipv4Addr> = clients
        .iter()
        .filter(|(_, c)| c.server == victim)
        .map(|(s, _)| *s)
        .collect();
    anyhow::ensure!(!victim_sources.is_empty(), "no client landed on {victim}");
    let kill_at = Arc::new(Mutex::new(None::<Instant>));
    let back = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let noticed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (source, client) in clients {
        let on_victim = client.server == victim;
        let (target, back, kill_at) = (target.clone(), back.clone(), kill_at.clone());
        let (refused, noticed) = (refused.clone(), noticed.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = client.ws;
            while let Some(Ok(_)) = ws.next().await {}
            if !on_victim {
                return;
            }
            if let Some(kill) = *kill_at.lock().expect("lock") {
                noticed
                    .lock()
                    .expect("lock")
                    .push(kill.elapsed().as_secs_f64());
            }
            let Some((at, client)) = rejoin(stack, &target, source, &refused).await else {
                return;
            };
            let kill = *kill_at.lock().expect("lock");
            if let Some(kill) = kill {
                back.lock().expect("lock").push((at - kill).as_secs_f64());
            }
            let mut ws = client.ws;
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    // Every client's socket closes when this measurement ends.
    let _clients = AbortOnDrop(tasks);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probes = start_probes(stack, &target, &victim_sources);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill_time = Instant::now();
    *kill_at.lock().expect("lock") = Some(kill_time);
    kill();
    tokio::time::sleep(WATCH).await;
    let failures = probes.lock().expect("lock").clone();
    let after: Vec<Instant> = failures.into_iter().filter(|t| *t >= kill_time).collect();
    let route_ms = after
        .iter()
        .max()
        .map_or(0.0, |t| (*t - kill_time).as_secs_f64() * 1000.0);
    let reconnects = back.lock().expect("lock").clone();
    let attempts = refused.lock().expect("lock").clone();
    let (ok, refused): (Vec<String>, Vec<String>) =
        attempts.into_iter().partition(|a| a.starts_with(JOIN_TOOK));
    let join_s = ok
        .iter()
        .filter_map(|a| a[JOIN_TOOK.len()..].parse().ok())
        .collect();
    let noticed = noticed.lock().expect("lock").clone();
    eprintln!(
        "  {} victims, route-around {route_ms:.0} ms, {} failed probes, {} back",
        victim_sources.len(),
        after.len(),
        reconnects.len()
    );
    Ok(Outcome {
        victims: victim_sources.len(),
        route_ms,
        failed_probes: after.len() as u64,
        reconnects,
        refused,
        noticed,
        join_s,
    })
}

/// Reconnects with full jitter (first delay 0–1 s, doubling to 8 s) until joined again;
/// returns when and the new connection.
async fn rejoin(
    stack: Stack,
    target: &loadgen::Target,
    source: Ipv4Addr,
    refused: &Mutex<Vec<String>>,
) -> Option<(Instant, rooms::Client)> {
    let deadline = Instant::now() + WATCH;
    let mut cap = 1.0f64;
    while Instant::now() < deadline {
        let wait = rand::rng().random_range(0.0..cap);
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        let attempt = Instant::now();
        match rooms::member(stack, target, source, ROOM).await {
            Ok(client) => {
                let took = attempt.elapsed().as_secs_f64();
                refused
                    .lock()
                    .expect("lock")
                    .push(format!("{JOIN_TOOK}{took}"));
                return Some((Instant::now(), client));
            }
            Err(err) => refused.lock().expect("lock").push(format!("{err:#}")),
        }
        cap = (cap * 2.0).min(8.0);
    }
    None
}

/// Probe loops that handshake every 20 ms for the watch time; returns the failure times.
fn start_probes(
    stack: Stack,
    target: &loadgen::Target,
    sources: &[Ipv4Addr],
) -> Arc<Mutex<Vec<Instant>>> {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let end = Instant::now() + WATCH + Duration::from_millis(500);
    for p in 0..PROBES {
        let (target, failures) = (target.clone(), failures.clone());
        let sources = sources.to_vec();
        tokio::spawn(async move {
            let mut k = p;
            while Instant::now() < end {
                let source = sources[k % sources.len()];
                let started = Instant::now();
                let probe = tokio::time::timeout(
                    Duration::from_secs(2),
                    rooms::connect(stack, &target, source),
                )
                .await;
                if !matches!(probe, Ok(Ok(_))) {
                    failures.lock().expect("lock").push(started);
                }
                k += PROBES;
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
    }
    failures
}

fn render(s: &Samples, reconnects: &[(String, Vec<f64>)], notes: &[String]) -> String {
    let mut out = format!(
        "## Failover: kill -9 of one of three servers\n\n\
         {CLIENTS} clients in one room from {SPREAD} source networks, through the proxy \
         (Ringcast: `ringcast-edge` + three nodes; incumbent: nginx `ip_hash` + three socket.io \
         servers). One server is killed with SIGKILL per round (a different one each round) \
         and restarted afterwards. Probes: {PROBES} loops handshaking every {probe} ms from \
         the source addresses whose clients were on the killed server; \"route-around\" is the \
         time from the kill to the start of the last failed probe (0 = no probe failed). \
         The killed server's clients all reconnect with the same policy (first retry after a \
         random 0–1 s, doubling to 8 s) and count as back once connected and re-joined.\n\n",
        probe = PROBE_EVERY.as_millis(),
    );
    let rows: Vec<Vec<String>> = ["ringcast", "socket.io"]
        .iter()
        .map(|l| {
            vec![
                (*l).to_owned(),
                s.cell(l, "route_ms", 0),
                s.cell(l, "failed", 0),
                s.cell(l, "victims", 0),
                s.cell(l, "noticed_p50", 3),
                s.cell(l, "refused", 0),
                s.cell(l, "join_p50", 3),
                s.cell(l, "back_share", 0),
                s.cell(l, "rc_p50", 2),
                s.cell(l, "rc_p90", 2),
                s.cell(l, "rc_max", 2),
            ]
        })
        .collect();
    out += &stats::table(
        &[
            "stack",
            "route-around ms",
            "failed probe handshakes",
            "clients on killed server",
            "disconnect seen after (p50 s)",
            "failed reconnect attempts",
            "successful reconnect took (p50 s)",
            "% back within 12 s",
            "reconnect p50 s",
            "p90 s",
            "max s",
        ],
        &rows,
    );
    out += "\nReconnects of the killed server's clients over time after the kill (all rounds):\n\n";
    let mut header = vec!["stack".to_owned()];
    let mut lo = 0.0;
    for hi in BUCKETS {
        header.push(format!("{lo}–{hi} s"));
        lo = hi;
    }
    header.push(format!("> {lo} s"));
    let rows: Vec<Vec<String>> = ["ringcast", "socket.io"]
        .iter()
        .map(|l| {
            let all: Vec<f64> = reconnects
                .iter()
                .filter(|(k, _)| k == l)
                .flat_map(|(_, v)| v.clone())
                .collect();
            let mut row = vec![(*l).to_owned()];
            let mut lo = 0.0;
            for hi in BUCKETS {
                row.push(
                    all.iter()
                        .filter(|t| **t >= lo && **t < hi)
                        .count()
                        .to_string(),
                );
                lo = hi;
            }
            row.push(all.iter().filter(|t| **t >= lo).count().to_string());
            row
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    out += &stats::table(&header, &rows);
    out += "\n";
    for note in notes {
        out += &format!("- {note}\n");
    }
    out + "\n"
}
