//! The live terminal view (indicatif): the current phase, connections per node,
//! messages per second and reconnects, redrawn a few times a second while a run goes on.
//! When stderr is not a terminal indicatif draws nothing; a plain line is logged every 5 s
//! instead.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::Stats;

/// Draws until the returned task is aborted.
pub fn spawn(stats: Arc<Stats>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let terminal = std::io::stderr().is_terminal();
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last = (0u64, stats.elapsed());
        let mut rate = 0.0;
        let mut beats = 0u64;
        loop {
            tick.tick().await;
            let delivered = stats.delivered.load(Ordering::Relaxed);
            let now = stats.elapsed();
            if now - last.1 >= Duration::from_secs(1) {
                rate = (delivered - last.0) as f64 / (now - last.1).as_secs_f64();
                last = (delivered, now);
            }
            let line = status_line(&stats, rate);
            beats += 1;
            if terminal {
                bar.set_message(line);
                bar.tick();
            } else if beats.is_multiple_of(20) {
                eprintln!("[{:>6.1}s] {line}", now.as_secs_f64());
            }
        }
    })
}

fn status_line(stats: &Stats, rate: f64) -> String {
    let phase = stats
        .marks()
        .iter()
        .rev()
        .find_map(|m| m.label.strip_prefix("phase ").map(str::to_owned))
        .unwrap_or_default();
    let fault = stats
        .marks()
        .last()
        .map(|m| m.label.clone())
        .unwrap_or_default();
    let nodes: Vec<String> = stats
        .per_node()
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(node, count)| format!("{node}:{count}"))
        .collect();
    format!(
        "{phase} ({fault}) | conns {} | {rate:.0} deliveries/s | acks {} | reconnects {} | \
         failed handshakes {} | lost {}",
        nodes.join(" "),
        stats.acked.load(Ordering::Relaxed),
        stats.reconnects.load(Ordering::Relaxed),
        stats.failed_handshakes.load(Ordering::Relaxed),
        stats.lost.load(Ordering::Relaxed),
    )
}
