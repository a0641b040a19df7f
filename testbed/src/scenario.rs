//! Fault scenarios and the run that drives the fleet through them.
//!
//! A run connects the fleet (phase `connect`), lets it publish steadily (`steady`), then
//! performs each fault in order, each one its own phase that lasts until the fault's steps
//! are done plus a settle time, and ends with `cooldown`: publishing stops, disconnected
//! clients get back, in-flight messages arrive. The loss checker then judges the event log.

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;
use tokio::time::{Instant, sleep};

use crate::checker::{self, Phase, Verdict};
use crate::fleet::{Fleet, FleetConfig};
use crate::stack::Stack;
use crate::stats::Stats;

/// A fault the testbed can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGTERM every node in turn; wait for exit, start it, wait ready, next.
    RollingRestart,
    /// `kill -9` one node, then start it again.
    KillNode,
    /// Kill a Redis master; its replica is promoted; the old master rejoins as replica.
    RedisFailover,
    /// Graceful edge upgrade: new edge with `-u`, SIGQUIT to the old one.
    EdgeUpgrade,
    /// Start one more node and add it to the edge through the admin API.
    ScaleOut,
}

impl Fault {
    /// Every fault, in demo order.
    pub const ALL: [Fault; 5] = [
        Fault::RollingRestart,
        Fault::KillNode,
        Fault::RedisFailover,
        Fault::EdgeUpgrade,
        Fault::ScaleOut,
    ];

    /// Kebab-case name used for phases.
    pub fn name(self) -> &'static str {
        match self {
            Fault::RollingRestart => "rolling-restart",
            Fault::KillNode => "kill-node",
            Fault::RedisFailover => "redis-failover",
            Fault::EdgeUpgrade => "edge-upgrade",
            Fault::ScaleOut => "scale-out",
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Serialize)]
pub struct RunPlan {
    /// Simulated clients.
    pub clients: u32,
    /// Rooms.
    pub rooms: u32,
    /// Publishes per second over the fleet.
    pub rate: f64,
    /// Clients connecting per second at the start.
    pub connect_rate: f64,
    /// Steady publishing before the first fault.
    #[serde(serialize_with = "crate::checker::as_secs")]
    pub warmup: Duration,
    /// Time each fault phase lasts after its steps are done.
    #[serde(serialize_with = "crate::checker::as_secs")]
    pub settle: Duration,
    /// A client that cannot get back within this long is lost.
    #[serde(serialize_with = "crate::checker::as_secs")]
    pub resume_window: Duration,
    /// The faults, in order.
    pub faults: Vec<Fault>,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// The checker's verdict.
    pub verdict: Verdict,
    /// The phases.
    pub phases: Vec<Phase>,
    /// Fault steps that failed, with their error.
    pub fault_errors: Vec<String>,
    /// Processes that died without being asked.
    pub unexpected_deaths: Vec<String>,
    /// Length of the run.
    pub duration: Duration,
}

/// Runs `plan` against `stack`, recording into `stats`.
pub async fn run(
    stack: &mut Stack,
    plan: &RunPlan,
    stats: Arc<Stats>,
    deaths: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> RunOutcome {
    let mut phases = Vec::new();
    let mut fault_errors = Vec::new();
    begin(&mut phases, &stats, "connect");
    let fleet = Fleet::start(fleet_config(stack, plan), stats.clone()).await;
    wait_connected(&stats, plan.clients, Duration::from_secs(30)).await;

    begin(&mut phases, &stats, "steady");
    sleep(plan.warmup).await;
    for fault in &plan.faults {
        begin(&mut phases, &stats, fault.name());
        if let Err(err) = perform(stack, *fault, &stats).await {
            tracing::error!(fault = fault.name(), error = %err, "fault step failed");
            fault_errors.push(format!("{}: {err:#}", fault.name()));
        }
        sleep(plan.settle).await;
    }

    begin(&mut phases, &stats, "cooldown");
    fleet.stop_publishing();
    wait_connected(&stats, plan.clients, plan.resume_window).await;
    wait_quiet(&stats, Duration::from_secs(5), Duration::from_secs(30)).await;
    let events = fleet.finish().await;
    save_events(stack, &events);
    let mut unexpected_deaths = Vec::new();
    while let Ok(name) = deaths.try_recv() {
        unexpected_deaths.push(name);
    }
    RunOutcome {
        verdict: checker::check(&events, &phases),
        phases,
        fault_errors,
        unexpected_deaths,
        duration: stats.elapsed(),
    }
}

/// With `RINGCAST_TESTBED_EVENTS=1`, writes the raw event log to `events.txt` in the run
/// folder (one event per line; large for big runs) for debugging a verdict.
fn save_events(stack: &Stack, events: &[checker::Event]) {
    if std::env::var_os("RINGCAST_TESTBED_EVENTS").is_none() {
        return;
    }
    let lines: Vec<String> = events.iter().map(|event| format!("{event:?}")).collect();
    let path = stack.folder().file("events.txt");
    if let Err(err) = std::fs::write(&path, lines.join("\n")) {
        tracing::warn!(path = %path.display(), error = %err, "cannot write the event log");
    }
}

fn fleet_config(stack: &Stack, plan: &RunPlan) -> FleetConfig {
    FleetConfig {
        url: stack.client_url(),
        clients: plan.clients,
        rooms: plan.rooms,
        rate: plan.rate,
        secret: stack.secret().to_owned(),
        resume_window: plan.resume_window,
        connect_rate: plan.connect_rate,
    }
}

fn begin(phases: &mut Vec<Phase>, stats: &Stats, name: &str) {
    stats.mark(format!("phase {name}"));
    phases.push(Phase {
        name: name.to_owned(),
        start: stats.elapsed(),
    });
}

/// Waits until every client that is not lost is connected, up to `limit`.
async fn wait_connected(stats: &Stats, clients: u32, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let connected: i64 = stats.per_node().values().sum();
        let lost = stats.lost.load(std::sync::atomic::Ordering::Relaxed);
        if connected + i64::try_from(lost).unwrap_or(0) >= i64::from(clients) {
            return;
        }
        sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!("not every client is connected after {limit:?}");
}

/// Waits until no delivery happened for `quiet` (in-flight messages have arrived), up to
/// `limit`.
async fn wait_quiet(stats: &Stats, quiet: Duration, limit: Duration) {
    let until = Instant::now() + limit;
    let delivered = || stats.delivered.load(std::sync::atomic::Ordering::Relaxed);
    let (mut last, mut since) = (delivered(), Instant::now());
    while Instant::now() < until {
        sleep(Duration::from_millis(200)).await;
        let now = delivered();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return;
        }
    }
    tracing::warn!("deliveries still going on after {limit:?}");
}

/// Performs one fault's steps, marking each on the time axis.
async fn perform(stack: &mut Stack, fault: Fault, stats: &Stats) -> anyhow::Result<()> {
    match fault {
        Fault::RollingRestart => {
            for (id, _) in stack.nodes() {
                stats.mark(format!("SIGTERM {id}"));
                stack.restart_node(&id).await?;
                stats.mark(format!("{id} ready"));
            }
        }
        Fault::KillNode => {
            let id = busiest_node(stack, stats);
            stats.mark(format!("kill -9 {id}"));
            stack.kill_node(&id, Duration::from_secs(2)).await?;
            stats.mark(format!("{id} ready"));
        }
        Fault::RedisFailover => {
            stats.mark("kill redis master");
            let port = stack.redis_failover("{room-0}").await?;
            stats.mark(format!("redis {port} back as replica"));
        }
        Fault::EdgeUpgrade => {
            stats.mark("edge upgrade (-u, SIGQUIT)");
            stack.upgrade_edge().await?;
            stats.mark("old edge exited");
        }
        Fault::ScaleOut => {
            stats.mark("scale out");
            let id = stack.scale_out().await?;
            stats.mark(format!("{id} added"));
        }
    }
    Ok(())
}

/// The node with the most clients (so the kill hurts).
fn busiest_node(stack: &Stack, stats: &Stats) -> String {
    let per_node = stats.per_node();
    stack
        .nodes()
        .into_iter()
        .map(|(id, _)| id)
        .max_by_key(|id| per_node.get(id).copied().unwrap_or(0))
        .unwrap_or_else(|| "node-1".to_owned())
}
