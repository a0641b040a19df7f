//! The load generator: WebSocket clients that measure echo throughput, open-loop echo latency
//! and handshake rate against any `ws://` URL.
//!
//! Latency is open-loop: every connection sends on a fixed schedule (send `i` is due at
//! `start + phase + i * interval`), the payload carries the *scheduled* time, and latency is
//! taken from that time, not from when the send actually happened. A stalled proxy therefore
//! shows up as latency for every message that should have been sent meanwhile, instead of
//! silently slowing the sender (no coordinated omission). Timer wake-up lateness on this
//! machine (30–40 µs) is inside every figure, direct ones included.

use super::echo::ws_config;
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Highest latency a histogram records (60 s, in microseconds).
const MAX_LATENCY_US: u64 = 60_000_000;

/// How long the latency run waits for the last echoes after the final send.
const DRAIN: Duration = Duration::from_secs(2);

/// A `ws://` target: the socket address to dial and the URL to request.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Path and query of the upgrade request, for example `/ws`.
    pub path: String,
}

impl Target {
    /// A target at `addr` with request path `path`.
    pub fn new(addr: SocketAddr, path: &str) -> Self {
        Self {
            addr,
            path: path.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("ws://{}{}", self.addr, self.path)
    }
}

/// The source address of client `i` when clients are spread over `spread` /24 networks
/// (127.0.1.1, 127.0.2.1, …). nginx `ip_hash` uses the first three octets and HAProxy
/// `balance source` the whole address, so this is what lets them spread load at all.
pub fn source_ip(i: usize, spread: usize) -> Ipv4Addr {
    let k = (i % spread.max(1)) as u32;
    Ipv4Addr::new(127, (k / 250) as u8, (k % 250 + 1) as u8, 1)
}

/// Opens a WebSocket to `target` from `source`, with the bench's buffer sizes.
pub async fn connect(target: &Target, source: Ipv4Addr) -> anyhow::Result<Ws> {
    connect_with(target, source, ws_config()).await
}

/// As [`connect`], with explicit WebSocket settings.
pub async fn connect_with(
    target: &Target,
    source: Ipv4Addr,
    config: WebSocketConfig,
) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket
        .connect(target.addr)
        .await
        .with_context(|| format!("connect {} from {source}", target.addr))?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(target.url(), stream, Some(config))
        .await
        .with_context(|| format!("handshake with {}", target.url()))?;
    Ok(ws)
}

/// Shape of an echo load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent connections.
    pub conns: usize,
    /// Source /24 networks the connections are spread over.
    pub spread: usize,
    /// Bytes per message (at least 16).
    pub payload: usize,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
}

/// Opens `load.conns` connections, spread over `targets` and source networks.
async fn open_all(targets: &[Target], load: &Load) -> anyhow::Result<Vec<Ws>> {
    let mut tasks = Vec::with_capacity(load.conns);
    for i in 0..load.conns {
        let target = targets[i % targets.len()].clone();
        let source = source_ip(i, load.spread);
        tasks.push(tokio::spawn(async move { connect(&target, source).await }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

fn payload(len: usize, stamp_ns: u64) -> Message {
    let mut data = vec![b'x'; len.max(16)];
    data[..8].copy_from_slice(&stamp_ns.to_le_bytes());
    Message::Binary(data.into())
}

fn stamp_of(msg: &Message) -> Option<u64> {
    match msg {
        Message::Binary(data) if data.len() >= 8 => {
            Some(u64::from_le_bytes(data[..8].try_into().ok()?))
        }
        _ => None,
    }
}

/// Result of a saturation (closed-loop, pipelined) run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Echoed messages per second during the measured window.
    pub msgs_per_s: f64,
    /// Connections that failed during the run.
    pub errors: u64,
}

/// Saturates `targets`: each connection keeps `window` messages in flight.
pub async fn throughput(
    targets: &[Target],
    load: Load,
    window: usize,
) -> anyhow::Result<Throughput> {
    let conns = open_all(targets, &load).await?;
    let counted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = Vec::new();
    for ws in conns {
        let (counted, errors) = (counted.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            if pump(ws, load.payload, window, measure_from, end, &counted)
                .await
                .is_err()
            {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let msgs = counted.load(Ordering::Relaxed) as f64;
    Ok(Throughput {
        msgs_per_s: msgs / load.duration.as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    })
}

async fn pump(
    mut ws: Ws,
    size: usize,
    window: usize,
    measure_from: Instant,
    end: Instant,
    counted: &AtomicU64,
) -> anyhow::Result<()> {
    for _ in 0..window {
        ws.feed(payload(size, 0)).await?;
    }
    ws.flush().await?;
    loop {
        let msg = tokio::time::timeout_at(end, ws.next()).await;
        let Ok(msg) = msg else { break };
        msg.context("closed")??;
        let now = Instant::now();
        if now >= measure_from {
            counted.fetch_add(1, Ordering::Relaxed);
        }
        ws.send(payload(size, 0)).await?;
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Result of an open-loop latency run.
pub struct Latency {
    /// Round-trip times from the scheduled send, in microseconds.
    pub hist: Histogram<u64>,
    /// Messages due in the measured window.
    pub sent: u64,
    /// Of those, echoes that never came back within the drain time.
    pub lost: u64,
    /// Where the slow round trips fell, so that a high percentile can be told apart as
    /// one slow connection or a moment when every connection was slow.
    pub slow: SlowTrips,
}

/// A measured round trip longer than this counts as slow in [`SlowTrips`].
pub const SLOW_US: u64 = 5_000;

/// The measured round trips longer than [`SLOW_US`]: how many, on how many connections,
/// and when their sends were due.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlowTrips {
    /// Slow round trips.
    pub messages: u64,
    /// Connections with at least one (0 or 1 for a single connection's trips).
    pub connections: usize,
    /// Earliest and latest due time of a slow send, from the start of the measured window.
    pub due: Option<(Duration, Duration)>,
}

impl SlowTrips {
    /// Counts one slow trip of a single connection, sent `due` into the measured window.
    fn record(&mut self, due: Duration) {
        self.messages += 1;
        self.connections = 1;
        self.due = Some(match self.due {
            Some((first, last)) => (first.min(due), last.max(due)),
            None => (due, due),
        });
    }

    /// Adds the trips of other connections (one, or an already merged total).
    fn merge(&mut self, other: SlowTrips) {
        self.messages += other.messages;
        self.connections += other.connections;
        self.due = match (self.due, other.due) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
    }
}

/// Sends `rate` messages/s in total, open-loop, and records round trips from the schedule.
pub async fn latency(targets: &[Target], load: Load, rate: f64) -> anyhow::Result<Latency> {
    let conns = open_all(targets, &load).await?;
    let interval = Duration::from_secs_f64(load.conns as f64 / rate);
    let origin = Instant::now() + Duration::from_millis(50);
    let measure_from = origin + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let phase = interval.mul_f64(i as f64 / load.conns as f64);
        let schedule = Schedule {
            origin,
            first: origin + phase,
            interval,
            measure_from,
            end,
        };
        tasks.push(tokio::spawn(open_loop(ws, load.payload, schedule)));
    }
    let mut total = Latency {
        hist: new_hist(),
        sent: 0,
        lost: 0,
        slow: SlowTrips::default(),
    };
    for task in tasks {
        let one = task.await??;
        total.hist.add(&one.hist)?;
        total.sent += one.sent;
        total.lost += one.lost;
        total.slow.merge(one.slow);
    }
    Ok(total)
}

/// A histogram of microseconds up to a minute, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

#[derive(Clone, Copy)]
struct Schedule {
    origin: Instant,
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
}

impl Schedule {
    /// How many sends the schedule holds.
    fn sends(&self) -> u64 {
        let (mut due, mut n) = (self.first, 0);
        while due < self.end {
            n += 1;
            due += self.interval;
        }
        n
    }
}

async fn open_loop(ws: Ws, size: usize, s: Schedule) -> anyhow::Result<Latency> {
    let (mut sink, mut source) = ws.split();
    let sender = tokio::spawn(async move {
        let mut due = s.first;
        let mut measured = 0u64;
        while due < s.end {
            tokio::time::sleep_until(due).await;
            let stamp = (due - s.origin).as_nanos() as u64;
            sink.send(payload(size, stamp)).await?;
            if due >= s.measure_from {
                measured += 1;
            }
            due += s.interval;
        }
        anyhow::Ok((sink, measured))
    });
    let mut hist = new_hist();
    let mut slow = SlowTrips::default();
    let (total, mut received) = (s.sends(), 0u64);
    while received < total {
        let next = tokio::time::timeout_at(s.end + DRAIN, source.next()).await;
        let Ok(Some(msg)) = next else { break };
        let now = Instant::now();
        let Some(stamp) = stamp_of(&msg?) else {
            continue;
        };
        received += 1;
        let due = s.origin + Duration::from_nanos(stamp);
        if due >= s.measure_from {
            let round_trip = ((now - due).as_micros() as u64).clamp(1, MAX_LATENCY_US);
            hist.record(round_trip)?;
            if round_trip > SLOW_US {
                slow.record(due - s.measure_from);
            }
        }
    }
    let (mut sink, sent) = sender.await??;
    let _ = sink.close().await;
    let lost = sent.saturating_sub(hist.len());
    Ok(Latency {
        hist,
        sent,
        lost,
        slow,
    })
}

/// Result of a handshake-rate run.
pub struct Handshakes {
    /// Completed open + upgrade + close cycles per second.
    pub per_s: f64,
    /// Failed attempts.
    pub errors: u64,
    /// Time of one whole cycle (connect, upgrade, one echo, close), in microseconds.
    pub hist: Histogram<u64>,
}

/// Opens and closes WebSockets as fast as `concurrency` loops can, for `duration`.
pub async fn handshakes(
    targets: &[Target],
    concurrency: usize,
    spread: usize,
    duration: Duration,
) -> anyhow::Result<Handshakes> {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let targets = targets.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let (mut done, mut errors, mut k) = (0u64, 0u64, i);
            while Instant::now() < end {
                let target = &targets[k % targets.len()];
                let t0 = Instant::now();
                match cycle(target, source_ip(k, spread)).await {
                    Ok(()) => {
                        done += 1;
                        hist.record((t0.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US))?;
                    }
                    Err(_) => errors += 1,
                }
                k += concurrency;
            }
            anyhow::Ok((done, errors, hist))
        }));
    }
    let mut total = Handshakes {
        per_s: 0.0,
        errors: 0,
        hist: new_hist(),
    };
    for task in tasks {
        let (done, errors, hist) = task.await??;
        total.per_s += done as f64 / duration.as_secs_f64();
        total.errors += errors;
        total.hist.add(&hist)?;
    }
    Ok(total)
}

/// One handshake: connect, upgrade, one echo to prove the tunnel works, close.
async fn cycle(target: &Target, source: Ipv4Addr) -> anyhow::Result<()> {
    let run = async {
        let mut ws = connect(target, source).await?;
        ws.send(payload(16, 0)).await?;
        ws.next().await.context("closed before the echo")??;
        ws.close(None).await?;
        while let Some(Ok(_)) = ws.next().await {}
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), run).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_cycle_through_distinct_networks() {
        assert_eq!(source_ip(0, 16), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_ip(15, 16), Ipv4Addr::new(127, 0, 16, 1));
        assert_eq!(source_ip(16, 16), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_ip(250, 300), Ipv4Addr::new(127, 1, 1, 1));
    }

    #[test]
    fn slow_trips_merge_counts_connections_and_widens_the_span() {
        let ms = Duration::from_millis;
        let mut one = SlowTrips::default();
        one.record(ms(900));
        one.record(ms(300));
        let mut other = SlowTrips::default();
        other.record(ms(1_500));
        let mut total = SlowTrips::default();
        total.merge(SlowTrips::default());
        total.merge(one);
        total.merge(other);
        assert_eq!(total.messages, 3);
        assert_eq!(total.connections, 2);
        assert_eq!(total.due, Some((ms(300), ms(1_500))));
    }

    #[test]
    fn schedule_counts_every_due_send() {
        let origin = Instant::now();
        let s = Schedule {
            origin,
            first: origin,
            interval: Duration::from_millis(10),
            measure_from: origin,
            end: origin + Duration::from_millis(100),
        };
        assert_eq!(s.sends(), 10);
    }

    #[test]
    fn payload_carries_its_stamp() {
        let msg = payload(64, 123_456_789);
        assert_eq!(stamp_of(&msg), Some(123_456_789));
        assert_eq!(msg.len(), 64);
    }
}
