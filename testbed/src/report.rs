//! The run report: a summary for the terminal, and `report.json`, `report.md` and a
//! self-contained `report.html` (inline CSS and SVG charts, no network fetches) in the run
//! folder.

mod svg;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::checker::{Finding, Tally};
use crate::scenario::{RunOutcome, RunPlan};
use crate::stats::{Mark, Sample};

/// Upper bounds (ms) of the reconnect histogram's buckets; the last bucket is open.
const BUCKETS_MS: [f64; 11] = [
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What ran, e.g. `demo` or `scenario kill-node`.
    pub command: String,
    /// No client and no acked message lost, nothing duplicated, every fault step done, no
    /// process died unexpectedly.
    pub passed: bool,
    /// The plan.
    pub plan: RunPlan,
    /// Nodes at the start.
    pub nodes: usize,
    /// Length of the run in seconds.
    pub duration_s: f64,
    /// Per phase.
    pub phases: Vec<PhaseReport>,
    /// The whole run.
    pub total: Tally,
    /// Examples of lost deliveries.
    pub lost_examples: Vec<Finding>,
    /// Examples of duplicated deliveries.
    pub duplicate_examples: Vec<Finding>,
    /// Fault steps that failed.
    pub fault_errors: Vec<String>,
    /// Processes that died without being asked.
    pub unexpected_deaths: Vec<String>,
    /// Reconnect time histogram: (upper bound in ms, count); the last bound is infinite.
    pub reconnect_histogram: Vec<(f64, u64)>,
    /// One sample per second.
    pub series: Vec<Sample>,
    /// Faults and phase boundaries on the time axis.
    pub marks: Vec<Mark>,
}

/// One phase's counts.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// Phase name.
    pub name: String,
    /// Start, seconds since the start of the run.
    pub start_s: f64,
    /// Counts.
    pub tally: Tally,
}

impl Report {
    /// Assembles the report of a finished run.
    pub fn new(
        command: &str,
        plan: &RunPlan,
        nodes: usize,
        outcome: RunOutcome,
        series: Vec<Sample>,
        marks: Vec<Mark>,
    ) -> Self {
        let verdict = outcome.verdict;
        let passed = verdict.passed()
            && outcome.fault_errors.is_empty()
            && outcome.unexpected_deaths.is_empty();
        let phases = outcome
            .phases
            .iter()
            .zip(verdict.phases)
            .map(|(phase, (_, tally))| PhaseReport {
                name: phase.name.clone(),
                start_s: phase.start.as_secs_f64(),
                tally,
            })
            .collect();
        Self {
            command: command.to_owned(),
            passed,
            plan: plan.clone(),
            nodes,
            duration_s: outcome.duration.as_secs_f64(),
            phases,
            total: verdict.total,
            lost_examples: verdict.lost_examples,
            duplicate_examples: verdict.duplicate_examples,
            fault_errors: outcome.fault_errors,
            unexpected_deaths: outcome.unexpected_deaths,
            reconnect_histogram: histogram(&verdict.reconnect_ms),
            series,
            marks,
        }
    }

    /// Writes `report.json`, `report.md` and `report.html` into `dir`.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json).context("report.json")?;
        std::fs::write(dir.join("report.md"), self.markdown()).context("report.md")?;
        std::fs::write(dir.join("report.html"), self.html()).context("report.html")?;
        Ok(())
    }

    /// The verdict lines and the per-phase table, as Markdown (also the terminal summary).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(out, "# Ringcast testbed: {} — {verdict}\n", self.command);
        let _ = writeln!(
            out,
            "{} clients over {} rooms, {} msg/s, {} nodes at start, {:.0} s.\n",
            self.plan.clients, self.plan.rooms, self.plan.rate, self.nodes, self.duration_s
        );
        out.push_str(&self.verdict_lines());
        out.push('\n');
        out.push_str(&self.table());
        out.push_str(&self.problems());
        out
    }

    fn verdict_lines(&self) -> String {
        let t = &self.total;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "- clients lost: **{}** (still away at the end: **{}**)",
            t.clients_lost, t.clients_unfinished
        );
        let _ = writeln!(
            out,
            "- acked messages lost: **{}** (of {} required deliveries)",
            t.lost_messages, t.expected
        );
        let _ = writeln!(
            out,
            "- duplicates delivered: **{}** (dropped by the client's offset check: {}; \
             gaps re-synchronised: {})",
            t.duplicates, t.redelivered, t.resyncs
        );
        let _ = writeln!(out, "- rooms reported not recovered: {}", t.not_recovered);
        let _ = writeln!(out, "- failed handshakes: {}", t.failed_handshakes);
        let _ = writeln!(
            out,
            "- reconnects: {} — p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; busiest second {:.0} %",
            t.reconnects,
            t.reconnect.p50_ms,
            t.reconnect.p99_ms,
            t.reconnect.max_ms,
            t.busiest_second_share * 100.0
        );
        let _ = writeln!(
            out,
            "- delivery after ack: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; later than 1 s: {}",
            t.delivery.p50_ms, t.delivery.p99_ms, t.delivery.max_ms, t.late_deliveries
        );
        let _ = writeln!(
            out,
            "- publishes acked: {}, without ack: {}; deliveries: {}; out of order: {}",
            t.acked, t.unacked, t.delivered, t.out_of_order
        );
        out
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| phase | start s | acked | delivered | lost msgs | dups | not recovered | \
             clients lost | failed handshakes | reconnects | p50 ms | p99 ms | max ms | \
             busiest s | late |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let rows = self
            .phases
            .iter()
            .map(|p| (p.name.as_str(), p.start_s, &p.tally))
            .chain(std::iter::once(("**total**", 0.0, &self.total)));
        for (name, start, t) in rows {
            let _ = writeln!(
                out,
                "| {name} | {start:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | \
                 {:.0} | {:.0} % | {} |",
                t.acked,
                t.delivered,
                t.lost_messages,
                t.duplicates,
                t.not_recovered,
                t.clients_lost,
                t.failed_handshakes,
                t.reconnects,
                t.reconnect.p50_ms,
                t.reconnect.p99_ms,
                t.reconnect.max_ms,
                t.busiest_second_share * 100.0,
                t.late_deliveries
            );
        }
        out
    }

    fn problems(&self) -> String {
        let mut out = String::new();
        let lists: [(&str, Vec<String>); 4] = [
            ("Fault steps that failed", self.fault_errors.clone()),
            (
                "Processes that died unexpectedly",
                self.unexpected_deaths.clone(),
            ),
            ("Lost deliveries (examples)", findings(&self.lost_examples)),
            (
                "Duplicated deliveries (examples)",
                findings(&self.duplicate_examples),
            ),
        ];
        for (title, items) in lists {
            if items.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n## {title}\n");
            for item in items {
                let _ = writeln!(out, "- {item}");
            }
        }
        out
    }

    /// The self-contained HTML page.
    pub fn html(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = write!(
            out,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Ringcast {} report\
             </title><style>{}</style></head><body><h1>Ringcast testbed: {} — \
             <span class=\"{}\">{verdict}</span></h1>",
            svg::escape(&self.command),
            CSS,
            svg::escape(&self.command),
            verdict.to_lowercase()
        );
        let _ = write!(out, "<pre>{}</pre>", svg::escape(&self.verdict_lines()));
        out.push_str(&svg::connections_chart(&self.series, &self.marks));
        out.push_str(&svg::deliveries_chart(&self.series, &self.marks));
        out.push_str(&svg::histogram_chart(&self.reconnect_histogram));
        let _ = write!(out, "<pre>{}</pre>", svg::escape(&self.table()));
        let _ = write!(
            out,
            "<pre>{}</pre></body></html>",
            svg::escape(&self.problems())
        );
        out
    }
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;max-width:1100px}\
    .passed{color:#080}.failed{color:#c00}pre{background:#f6f6f6;padding:1em;overflow:auto}\
    svg{display:block;margin:1em 0;background:#fff;border:1px solid #ddd}";

fn findings(list: &[Finding]) -> Vec<String> {
    list.iter()
        .map(|f| {
            format!(
                "client {} room-{}: message {}#{} ({})",
                f.client, f.room, f.msg.publisher, f.msg.seq, f.phase
            )
        })
        .collect()
}

/// Counts `samples` into [`BUCKETS_MS`] plus an open last bucket.
fn histogram(samples: &[f64]) -> Vec<(f64, u64)> {
    let mut counts = vec![0u64; BUCKETS_MS.len() + 1];
    for sample in samples {
        let index = BUCKETS_MS
            .iter()
            .position(|bound| sample <= bound)
            .unwrap_or(BUCKETS_MS.len());
        counts[index] += 1;
    }
    BUCKETS_MS
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::{Phase, Verdict};
    use std::time::Duration;

    fn sample_report() -> Report {
        let plan = RunPlan {
            clients: 10,
            rooms: 2,
            rate: 5.0,
            connect_rate: 100.0,
            warmup: Duration::from_secs(1),
            settle: Duration::from_secs(1),
            resume_window: Duration::from_secs(30),
            faults: vec![crate::scenario::Fault::KillNode],
        };
        let phases = vec![Phase {
            name: "kill-node".into(),
            start: Duration::from_secs(2),
        }];
        let tally = Tally {
            lost_messages: 1,
            ..Tally::default()
        };
        let verdict = Verdict {
            phases: vec![("kill-node".into(), tally.clone())],
            total: tally,
            lost_examples: Vec::new(),
            duplicate_examples: Vec::new(),
            reconnect_ms: vec![5.0, 30.0, 99999.0],
        };
        let outcome = RunOutcome {
            verdict,
            phases,
            fault_errors: vec!["kill-node: <boom>".into()],
            unexpected_deaths: Vec::new(),
            duration: Duration::from_secs(9),
        };
        let mark = Mark {
            t: 2.0,
            label: "kill -9 node-1".into(),
        };
        Report::new("demo", &plan, 3, outcome, Vec::new(), vec![mark])
    }

    #[test]
    fn a_loss_fails_the_report_and_shows_in_every_format() {
        let report = sample_report();
        assert!(!report.passed);
        assert!(report.markdown().contains("acked messages lost: **1**"));
        let html = report.html();
        assert!(html.contains("FAILED"));
        assert!(html.contains("&lt;boom&gt;"), "text is escaped");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no fetches"
        );
        assert!(html.contains("<svg"));
    }

    #[test]
    fn reconnect_times_fall_into_their_buckets() {
        let report = sample_report();
        let counts: Vec<u64> = report.reconnect_histogram.iter().map(|b| b.1).collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[2], 1);
        assert_eq!(*counts.last().unwrap(), 1);
    }
}
