//! Connection holders: helper processes that open many WebSockets, keep them idle (answering
//! heartbeats), and on request check that every one of them still answers a ping.
//!
//! One process may hold at most about 19,900 sockets (open-files limit 20,000), so the idle
//! and scale benches start several holders. The parent talks to each over its stdin/stdout:
//! the holder prints `ready <ok> <failed>` once connected; the line `ping` makes every
//! connection send a WebSocket ping and the holder prints `pong <answered> <ms>`; closing
//! stdin ends the holder.

use super::loadgen::{self, Target};
use super::procs::Proc;
use super::report::Ctx;
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, broadcast};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How long a holder waits for all pongs.
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one connection may take to open (and finish its protocol hello).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection says after the WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// Nothing (echo backends).
    Raw,
    /// Ringcast: `hello`, wait for `welcome`, answer `ping` with `pong`.
    Ringcast,
    /// socket.io v4 (engine.io 4): wait for the open packet, join namespace `/`, answer `2`.
    Socketio,
}

/// Arguments of the internal `bench hold` process.
#[derive(Debug, Clone, clap::Args)]
pub struct HoldArgs {
    /// Address to connect to.
    #[arg(long)]
    pub addr: std::net::SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/ws")]
    pub path: String,
    /// Connections to open.
    #[arg(long)]
    pub count: usize,
    /// Source /24 networks to spread over.
    #[arg(long, default_value_t = 16)]
    pub spread: usize,
    /// First connection index (shifts the source networks used).
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Protocol spoken after the upgrade.
    #[arg(long, value_enum, default_value_t = Proto::Raw)]
    pub proto: Proto,
    /// Connections opened at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
}

/// Runs a holder: connect, report, serve `ping` requests until stdin closes.
pub async fn run(args: HoldArgs) -> anyhow::Result<()> {
    let (ping_tx, _) = broadcast::channel::<()>(4);
    let pongs = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let target = Target::new(args.addr, &args.path);
    let mut tasks = Vec::new();
    for i in args.first..args.first + args.count {
        let (gate, target, pongs) = (gate.clone(), target.clone(), pongs.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let pings = ping_tx.subscribe();
        let source = loadgen::source_ip(i, args.spread);
        let proto = args.proto;
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, open(&target, source, proto)).await;
            drop(permit);
            let ws = match opened {
                Ok(Ok(ws)) => ws,
                Ok(Err(err)) => return drop(ready_tx.send(Err(format!("{err:#}")))),
                Err(_) => return drop(ready_tx.send(Err("timed out".to_owned()))),
            };
            let _ = ready_tx.send(Ok(()));
            let _ = idle(ws, proto, pings, &pongs).await;
        });
        tasks.push(ready_rx);
    }
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    for rx in tasks {
        match rx.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(err)) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            Err(_) => failed += 1,
        }
    }
    if let Some(err) = first_error {
        eprintln!("first connect error: {err}");
    }
    println!("ready {ok} {failed}");
    serve_commands(ping_tx, pongs, ok).await
}

async fn serve_commands(
    ping_tx: broadcast::Sender<()>,
    pongs: Arc<AtomicU64>,
    expected: u64,
) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() != "ping" {
            continue;
        }
        pongs.store(0, Ordering::SeqCst);
        let start = Instant::now();
        let _ = ping_tx.send(());
        while pongs.load(Ordering::SeqCst) < expected && start.elapsed() < PING_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ms = start.elapsed().as_millis();
        println!("pong {} {ms}", pongs.load(Ordering::SeqCst));
    }
    Ok(())
}

/// Small buffers: a holder keeps thousands of connections.
fn holder_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn open(
    target: &Target,
    source: std::net::Ipv4Addr,
    proto: Proto,
) -> anyhow::Result<loadgen::Ws> {
    let mut ws = loadgen::connect_with(target, source, holder_config()).await?;
    match proto {
        Proto::Raw => {}
        Proto::Ringcast => {
            ws.send(Message::text(r#"{"type":"hello"}"#)).await?;
            wait_text(&mut ws, |t| t.contains("\"welcome\"")).await?;
        }
        Proto::Socketio => {
            wait_text(&mut ws, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            wait_text(&mut ws, |t| t.starts_with("40")).await?;
        }
    }
    Ok(ws)
}

async fn wait_text(ws: &mut loadgen::Ws, want: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    while let Some(msg) = ws.next().await {
        if let Message::Text(text) = msg? {
            anyhow::ensure!(!text.contains("\"error\""), "refused: {text}");
            if want(&text) {
                return Ok(());
            }
        }
    }
    anyhow::bail!("closed during the protocol hello")
}

async fn idle(
    mut ws: loadgen::Ws,
    proto: Proto,
    mut pings: broadcast::Receiver<()>,
    pongs: &AtomicU64,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else { return Ok(()) };
                match msg? {
                    Message::Pong(_) => { pongs.fetch_add(1, Ordering::SeqCst); }
                    Message::Text(text) => heartbeat(&mut ws, proto, &text).await?,
                    Message::Close(_) => return Ok(()),
                    _ => {}
                }
            }
            cmd = pings.recv() => {
                if cmd.is_err() { return Ok(()) }
                ws.send(Message::Ping(Vec::new().into())).await?;
            }
        }
    }
}

async fn heartbeat(ws: &mut loadgen::Ws, proto: Proto, text: &str) -> anyhow::Result<()> {
    match proto {
        Proto::Ringcast if text.contains(r#""type":"ping""#) => {
            ws.send(Message::text(r#"{"type":"pong"}"#)).await?;
        }
        Proto::Socketio if text == "2" => ws.send(Message::text("3")).await?,
        _ => {}
    }
    Ok(())
}

/// A running holder process, seen from the benchmark.
pub struct Holder {
    proc: Proc,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Connections it opened.
    pub ok: u64,
    /// Connections that failed to open.
    pub failed: u64,
}

impl Holder {
    /// Starts a holder with `args` and waits (blocking) for its `ready` line.
    pub fn start(ctx: &Ctx, args: &HoldArgs) -> anyhow::Result<Self> {
        let mut cmd = ctx.bench_command(&["hold"]);
        cmd.args(["--addr", &args.addr.to_string(), "--path", &args.path]);
        cmd.args([
            "--count",
            &args.count.to_string(),
            "--spread",
            &args.spread.to_string(),
        ]);
        cmd.args([
            "--first",
            &args.first.to_string(),
            "--concurrency",
            &args.concurrency.to_string(),
        ]);
        let proto = match args.proto {
            Proto::Raw => "raw",
            Proto::Ringcast => "ringcast",
            Proto::Socketio => "socketio",
        };
        cmd.args(["--proto", proto]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("start a connection holder")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("holder stdout")?);
        let mut holder = Self {
            proc: Proc::adopt("holder", child),
            stdin,
            stdout,
            ok: 0,
            failed: 0,
        };
        let line = holder.read_line()?;
        let mut words = line.split_whitespace().skip(1);
        holder.ok = words
            .next()
            .and_then(|w| w.parse().ok())
            .context("bad ready line")?;
        holder.failed = words
            .next()
            .and_then(|w| w.parse().ok())
            .context("bad ready line")?;
        Ok(holder)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        anyhow::ensure!(!line.is_empty(), "holder exited early");
        Ok(line)
    }

    /// Asks the holder to ping every connection; returns how many answered.
    pub fn ping(&mut self) -> anyhow::Result<u64> {
        let stdin = self.stdin.as_mut().context("holder stdin closed")?;
        writeln!(stdin, "ping")?;
        stdin.flush()?;
        let line = self.read_line()?;
        line.split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .context("bad pong line")
    }

    /// The holder's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
