//! Live counters of a run (for the terminal view) and the per-second time series sampled
//! from them (for the report's charts), plus the timeline of faults.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Counters the simulated clients update as they go.
#[derive(Debug)]
pub struct Stats {
    start: Instant,
    /// Messages delivered (every copy).
    pub delivered: AtomicU64,
    /// Publishes acked.
    pub acked: AtomicU64,
    /// Completed reconnects.
    pub reconnects: AtomicU64,
    /// Failed connection attempts.
    pub failed_handshakes: AtomicU64,
    /// Clients that gave up.
    pub lost: AtomicU64,
    per_node: Mutex<BTreeMap<String, i64>>,
    series: Mutex<Vec<Sample>>,
    marks: Mutex<Vec<Mark>>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Open connections by node id.
    pub per_node: BTreeMap<String, i64>,
    /// Deliveries per second since the previous sample.
    pub delivered_per_s: f64,
    /// Acks per second since the previous sample.
    pub acked_per_s: f64,
    /// Reconnects per second since the previous sample.
    pub reconnects_per_s: f64,
}

/// A fault (or phase boundary) on the time axis.
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    /// Seconds since the start of the run.
    pub t: f64,
    /// What happened, e.g. `SIGTERM node-2`.
    pub label: String,
}

impl Stats {
    /// Counters starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            failed_handshakes: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            per_node: Mutex::new(BTreeMap::new()),
            series: Mutex::new(Vec::new()),
            marks: Mutex::new(Vec::new()),
        }
    }

    /// Time since the start of the run.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Adds `delta` to the open connections of `node`.
    pub fn node_connections(&self, node: &str, delta: i64) {
        let mut per_node = lock(&self.per_node);
        *per_node.entry(node.to_owned()).or_default() += delta;
    }

    /// Open connections by node id.
    pub fn per_node(&self) -> BTreeMap<String, i64> {
        lock(&self.per_node).clone()
    }

    /// Records a fault or phase boundary now.
    pub fn mark(&self, label: impl Into<String>) {
        let label = label.into();
        tracing::info!(fault = %label, "mark");
        let t = self.elapsed().as_secs_f64();
        lock(&self.marks).push(Mark { t, label });
    }

    /// Every mark so far.
    pub fn marks(&self) -> Vec<Mark> {
        lock(&self.marks).clone()
    }

    /// Every sample so far.
    pub fn series(&self) -> Vec<Sample> {
        lock(&self.series).clone()
    }

    /// Samples once a second until the task is dropped.
    pub async fn sample_forever(&self) {
        let mut last = (0, 0, 0, self.elapsed());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = self.elapsed();
            let counts = (
                self.delivered.load(Ordering::Relaxed),
                self.acked.load(Ordering::Relaxed),
                self.reconnects.load(Ordering::Relaxed),
            );
            let secs = (now - last.3).as_secs_f64().max(0.001);
            let rate = |now: u64, before: u64| (now - before) as f64 / secs;
            let sample = Sample {
                t: now.as_secs_f64(),
                per_node: self.per_node(),
                delivered_per_s: rate(counts.0, last.0),
                acked_per_s: rate(counts.1, last.1),
                reconnects_per_s: rate(counts.2, last.2),
            };
            lock(&self.series).push(sample);
            last = (counts.0, counts.1, counts.2, now);
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
