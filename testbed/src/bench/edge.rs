//! The edge bench: WebSocket echo through each proxy to the same two echo backends.
//!
//! Per round and target: saturation throughput at `--conns` connections (each keeps a small
//! window of messages in flight), open-loop latency at a fixed `--rate`, and new handshakes
//! per second. "direct" (the generator straight to the backends) runs in every round too:
//! its throughput is the generator's ceiling, and a proxy within 10 % of it is flagged as
//! limited by the generator rather than by itself.

use super::loadgen::{self, Load};
use super::procs;
use super::profile::{self, Profile, SyscallCount};
use super::proxies::{self, Kind, Running, Setup};
use super::report::Ctx;
use super::stats::{self, Samples};
use std::collections::BTreeMap;
use std::time::Duration;

/// Messages each connection keeps in flight in the saturation run.
const WINDOW: usize = 4;
/// Bytes per echo message.
const PAYLOAD: usize = 64;
/// Concurrent open/close loops of the handshake run.
const HANDSHAKE_LOOPS: usize = 32;
/// Source /24 networks the clients come from.
const SPREAD: usize = 16;
/// Echo backend processes behind every proxy.
const BACKENDS: usize = 2;
/// A proxy within this fraction of the direct ceiling is limited by the generator.
const CEILING_FRACTION: f64 = 0.9;

/// Runs the edge bench and returns its report section.
pub async fn run(ctx: &Ctx) -> anyhow::Result<String> {
    let echo = ctx.start_echo(BACKENDS).await?;
    let backends: Vec<_> = echo.iter().map(|(_, a)| *a).collect();
    let echo_pids: Vec<u32> = echo.iter().map(|(p, _)| p.pid()).collect();
    let setup = Setup {
        backends: &backends,
        workers: ctx.common.workers,
        dir: ctx.dir.path(),
        bin_dir: &ctx.bin_dir,
        path: "/ws",
    };
    let mut samples = Samples::default();
    let mut skipped = BTreeMap::new();
    let mut profiles = Vec::new();
    let mut slow_notes = Vec::new();
    let order = [Kind::Direct, Kind::Ringcast, Kind::Nginx, Kind::Haproxy];
    for round in 0..ctx.common.rounds {
        for k in 0..order.len() {
            let kind = order[(k + round) % order.len()];
            if skipped.contains_key(kind.label()) {
                continue;
            }
            eprintln!("edge round {round} {}", kind.label());
            match proxies::start(kind, &setup).await {
                Ok(running) => {
                    let profile = ctx.common.profile && round == 0 && kind != Kind::Direct;
                    let profiles = profile.then_some(&mut profiles);
                    let slow = measure(ctx, &running, &echo_pids, &mut samples, profiles).await?;
                    let label = format!("round {round}, {}", kind.label());
                    slow_notes.extend(slow_note(&label, &slow, ctx.common.conns));
                }
                Err(err) => {
                    skipped.insert(kind.label(), format!("{err:#}"));
                }
            }
        }
    }
    Ok(render(ctx, &samples, &skipped, &slow_notes) + &profile::render(&profiles))
}

/// One line on the slow round trips of a latency run, or none when there were none.
fn slow_note(label: &str, slow: &loadgen::SlowTrips, conns: usize) -> Option<String> {
    let (first, last) = slow.due?;
    let (first, last) = (first.as_secs_f64(), last.as_secs_f64());
    let when = if format!("{first:.2}") == format!("{last:.2}") {
        format!("at {first:.2} s")
    } else {
        format!("between {first:.2} s and {last:.2} s")
    };
    Some(format!(
        "{label}: {} round trips over {} ms, on {} of {conns} connections, sent {when} into the measured window",
        slow.messages,
        loadgen::SLOW_US / 1000,
        slow.connections,
    ))
}

fn load(ctx: &Ctx) -> Load {
    Load {
        conns: ctx.common.conns,
        spread: SPREAD,
        payload: PAYLOAD,
        duration: Duration::from_secs_f64(ctx.common.duration_s),
        warmup: Duration::from_secs(1),
    }
}

async fn measure(
    ctx: &Ctx,
    running: &Running,
    echo_pids: &[u32],
    samples: &mut Samples,
    profiles: Option<&mut Vec<(String, String)>>,
) -> anyhow::Result<loadgen::SlowTrips> {
    let label = running.kind.label();
    let load = load(ctx);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cpu = CpuMark::new(running, echo_pids);
    let tp = loadgen::throughput(&running.targets, load, WINDOW).await?;
    let msgs = tp.msgs_per_s * (load.duration + load.warmup).as_secs_f64();
    samples.push(label, "msgs", tp.msgs_per_s);
    samples.push(label, "errors", tp.errors as f64);
    cpu.record(samples, label, msgs, "msg");

    let cpu = CpuMark::new(running, echo_pids);
    let waited = procs::run_queue_wait_total(&running.pids());
    let lat = loadgen::latency(&running.targets, load, ctx.common.rate).await?;
    let sent = ctx.common.rate * (load.duration + load.warmup).as_secs_f64();
    let waited = procs::run_queue_wait_total(&running.pids()) - waited;
    samples.push(label, "wait_proxy_lat", waited * 1e6 / sent);
    cpu.record(samples, label, sent, "lat");
    samples.push(label, "p50", lat.hist.value_at_quantile(0.5) as f64);
    samples.push(label, "p99", lat.hist.value_at_quantile(0.99) as f64);
    samples.push(label, "lost", lat.lost as f64);

    let cpu = CpuMark::new(running, echo_pids);
    let hs = loadgen::handshakes(&running.targets, HANDSHAKE_LOOPS, SPREAD, load.duration).await?;
    samples.push(label, "hs", hs.per_s);
    samples.push(label, "hs_errors", hs.errors as f64);
    cpu.record(samples, label, hs.per_s * load.duration.as_secs_f64(), "hs");
    if let Some(profiles) = profiles {
        let saturation = profiled(ctx, running, Run::Saturation(load)).await;
        profiles.push((format!("{label}, echo saturation"), saturation));
        let handshakes = profiled(ctx, running, Run::Handshakes(load.duration)).await;
        profiles.push((format!("{label}, handshakes"), handshakes));
    }
    eprintln!(
        "  {label}: {:.0} msg/s, p50 {} µs p99 {} µs (lost {}, slow {:?}), {:.0} handshakes/s ({} errors)",
        tp.msgs_per_s,
        lat.hist.value_at_quantile(0.5),
        lat.hist.value_at_quantile(0.99),
        lat.lost,
        lat.slow,
        hs.per_s,
        hs.errors
    );
    Ok(lat.slow)
}

/// What an extra, uncounted profiling run does.
enum Run {
    Saturation(Load),
    Handshakes(Duration),
}

/// An extra run (not counted) with `perf` attached to the proxy.
async fn profiled(ctx: &Ctx, running: &Running, run: Run) -> String {
    let dir = ctx.dir.path();
    let label = running.kind.label();
    let profiled_run = async {
        let perf = Profile::start(label, &running.pids(), dir)?;
        let calls = SyscallCount::start(label, &running.pids(), dir)?;
        let (units, unit) = match run {
            Run::Saturation(load) => {
                let tp = loadgen::throughput(&running.targets, load, WINDOW).await?;
                let msgs = tp.msgs_per_s * (load.duration + load.warmup).as_secs_f64();
                (msgs, "echoed message")
            }
            Run::Handshakes(duration) => {
                let hs = loadgen::handshakes(&running.targets, HANDSHAKE_LOOPS, SPREAD, duration)
                    .await?;
                (hs.per_s * duration.as_secs_f64(), "handshake")
            }
        };
        let calls = tokio::task::spawn_blocking(move || calls.finish(units)).await?;
        let calls = calls.unwrap_or_else(|err| format!("not counted: {err:#}"));
        let profile = tokio::task::spawn_blocking(move || perf.finish()).await??;
        anyhow::Ok(format!("system calls per {unit}: {calls}\n\n{profile}"))
    };
    profiled_run
        .await
        .unwrap_or_else(|err| format!("no profile: {err:#}"))
}

/// CPU seconds of the proxy, the backends and the generator at the start of a run.
struct CpuMark {
    proxy_pids: Vec<u32>,
    echo_pids: Vec<u32>,
    proxy: f64,
    echo: f64,
    gen_cpu: f64,
}

impl CpuMark {
    fn new(running: &Running, echo_pids: &[u32]) -> Self {
        let proxy_pids = running.pids();
        Self {
            proxy: procs::cpu_total(&proxy_pids),
            echo: procs::cpu_total(echo_pids),
            gen_cpu: procs::own_cpu_seconds(),
            proxy_pids,
            echo_pids: echo_pids.to_vec(),
        }
    }

    /// Records CPU microseconds per unit of work (`units` done since the mark).
    fn record(&self, samples: &mut Samples, label: &str, units: f64, what: &str) {
        let per = |seconds: f64| seconds * 1e6 / units.max(1.0);
        let proxy = procs::cpu_total(&self.proxy_pids) - self.proxy;
        let echo = procs::cpu_total(&self.echo_pids) - self.echo;
        let generator = procs::own_cpu_seconds() - self.gen_cpu;
        samples.push(label, &format!("cpu_proxy_{what}"), per(proxy));
        samples.push(label, &format!("cpu_echo_{what}"), per(echo));
        samples.push(label, &format!("cpu_gen_{what}"), per(generator));
    }
}

fn render(
    ctx: &Ctx,
    s: &Samples,
    skipped: &BTreeMap<&str, String>,
    slow_notes: &[String],
) -> String {
    let c = &ctx.common;
    let mut out = format!(
        "## Edge: WebSocket echo through the proxy\n\n\
         {BACKENDS} echo backends (`ringcast-testbed bench echo-server`, one thread each, \
         8 KiB buffers); every proxy runs {workers} worker(s). Clients come from {SPREAD} \
         source networks (127.0.1.1 … 127.0.{SPREAD}.1) so that `ip_hash` / `balance source` \
         spread them. Throughput: {conns} connections, {WINDOW} messages of {PAYLOAD} bytes \
         in flight each, {dur} s measured after 1 s warm-up. Latency: open-loop, {rate} \
         messages/s in total over {conns} connections, timed from the scheduled send. \
         Handshakes: {HANDSHAKE_LOOPS} loops of connect + upgrade + one echo + close.\n\n",
        workers = c.workers,
        conns = c.conns,
        dur = c.duration_s,
        rate = stats::fmt(c.rate, 0),
    );
    out += &throughput_table(s);
    out += "\n";
    out += &latency_table(s);
    out += &format!(
        "\nRound trips over {} ms in the latency run, by round (a high p99 from one slow \
         connection or from a moment when all were slow):\n\n",
        loadgen::SLOW_US / 1000
    );
    if slow_notes.is_empty() {
        out += "- none\n";
    }
    for note in slow_notes {
        out += &format!("- {note}\n");
    }
    out += "\n";
    out += &cpu_table(s);
    out += &flags(s, skipped);
    out
}

const ALL: [Kind; 4] = [Kind::Direct, Kind::Ringcast, Kind::Nginx, Kind::Haproxy];

fn best_incumbent(s: &Samples, metric: &str, higher_is_better: bool) -> Option<f64> {
    let values = [Kind::Nginx, Kind::Haproxy].map(|k| s.median(k.label(), metric));
    let present = values.into_iter().flatten();
    if higher_is_better {
        present.reduce(f64::max)
    } else {
        present.reduce(f64::min)
    }
}

fn throughput_table(s: &Samples) -> String {
    let best_msgs = best_incumbent(s, "msgs", true);
    let best_hs = best_incumbent(s, "hs", true);
    let rows: Vec<Vec<String>> = ALL
        .iter()
        .map(|k| {
            let l = k.label();
            vec![
                l.to_owned(),
                s.cell(l, "msgs", 0),
                stats::ratio(s.median(l, "msgs"), best_msgs),
                s.cell(l, "hs", 0),
                stats::ratio(s.median(l, "hs"), best_hs),
                s.cell(l, "hs_errors", 0),
            ]
        })
        .collect();
    stats::table(
        &[
            "target",
            "echo msgs/s",
            "vs best incumbent",
            "handshakes/s",
            "vs best incumbent",
            "failed handshakes",
        ],
        &rows,
    )
}

fn latency_table(s: &Samples) -> String {
    let direct = |m: &str| s.median(Kind::Direct.label(), m);
    let added = |l: &str, m: &str| match (s.median(l, m), direct(m)) {
        (Some(a), Some(d)) => stats::fmt(a - d, 0),
        _ => "–".to_owned(),
    };
    let best_p99 = best_incumbent(s, "p99", false);
    let rows: Vec<Vec<String>> = ALL
        .iter()
        .map(|k| {
            let l = k.label();
            vec![
                l.to_owned(),
                s.cell(l, "p50", 0),
                s.cell(l, "p99", 0),
                added(l, "p50"),
                added(l, "p99"),
                stats::ratio(s.median(l, "p99"), best_p99),
                s.cell(l, "lost", 0),
            ]
        })
        .collect();
    stats::table(
        &[
            "target",
            "RTT p50 µs",
            "RTT p99 µs",
            "added p50 µs",
            "added p99 µs",
            "p99 vs best incumbent",
            "lost",
        ],
        &rows,
    )
}

fn cpu_table(s: &Samples) -> String {
    let rows: Vec<Vec<String>> = ALL
        .iter()
        .map(|k| {
            let l = k.label();
            vec![
                l.to_owned(),
                s.cell(l, "cpu_proxy_msg", 2),
                s.cell(l, "cpu_echo_msg", 2),
                s.cell(l, "cpu_gen_msg", 2),
                s.cell(l, "cpu_proxy_hs", 1),
                s.cell(l, "cpu_proxy_lat", 2),
                s.cell(l, "wait_proxy_lat", 2),
            ]
        })
        .collect();
    let mut out = String::from(
        "CPU time per echoed message and per handshake (µs), by process. The last column is \
         the time the proxy's threads spent runnable but waiting for a CPU during the latency \
         run, per message: how much of the proxy's share of the latency is the box's CPU \
         contention rather than the proxy's own work.\n\n",
    );
    out += &stats::table(
        &[
            "target",
            "proxy µs/msg",
            "backends µs/msg",
            "generator µs/msg",
            "proxy µs/handshake",
            "proxy µs/msg, latency run",
            "proxy run-queue wait µs/msg, latency run",
        ],
        &rows,
    );
    out
}

fn flags(s: &Samples, skipped: &BTreeMap<&str, String>) -> String {
    let mut out = String::from("\n");
    let ceiling = s.median(Kind::Direct.label(), "msgs");
    for kind in Kind::PROXIES {
        let l = kind.label();
        if let (Some(v), Some(c)) = (s.median(l, "msgs"), ceiling)
            && v >= CEILING_FRACTION * c
        {
            out += &format!(
                "- **{l}: limited by the load generator** ({} msg/s is within 10 % of the \
                 direct ceiling of {} msg/s).\n",
                stats::fmt(v, 0),
                stats::fmt(c, 0)
            );
        }
    }
    for (label, why) in skipped {
        out += &format!("- **{label} skipped**: {why}\n");
    }
    out + "\n"
}
