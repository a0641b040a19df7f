//! `ringcast-echo`: a small reference WebSocket backend for tests and benchmarks.
//!
//! - WebSocket upgrade on any path: echoes every data frame. Text `__headers__` answers
//!   the request headers of the upgrade as JSON; text `__id__` answers the backend id.
//!   The 101 carries `x-echo-id` and the first offered `Sec-WebSocket-Protocol`.
//! - `GET /readyz`: 200 while ready, 503 after SIGUSR1, `POST /drain` or `--drain-after`
//!   (SIGUSR2 or `POST /undrain` makes it ready again). While draining, upgrades are
//!   refused with 503 too.
//! - `POST /close-all`: closes every open WebSocket with close code 1001 (going away), as
//!   a draining server does.
//! - `GET /headers`: the request headers as JSON (`{"id":..,"version":..,"headers":{..}}`).
//! - Any other request: `200` with the backend id as body and in `x-echo-id`. A request
//!   header `x-echo-status: NNN` makes it answer NNN instead (also for upgrades).
//!
//! Prints `listening on ADDR` on standard output once bound (use `--listen 127.0.0.1:0`).
//! Buffers are 8 KiB; messages have no size limit.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

const BUFFER_BYTES: usize = 8 * 1024;
const MAX_HEAD_BYTES: usize = 32 * 1024;

#[derive(Debug, Parser)]
#[command(name = "ringcast-echo", about = "WebSocket echo backend for tests")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Name reported in answers.
    #[arg(long, default_value = "echo")]
    id: String,
    /// Start answering 503 on /readyz after this many milliseconds.
    #[arg(long)]
    drain_after_ms: Option<u64>,
}

struct Echo {
    id: String,
    ready: AtomicBool,
    close_all: tokio::sync::watch::Sender<u64>,
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_upgrade(&self) -> bool {
        let has_token = |name: &str, token: &str| {
            self.header(name)
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        has_token("upgrade", "websocket") && has_token("connection", "upgrade")
    }

    fn headers_json(&self, id: &str) -> String {
        let mut headers: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (k, v) in &self.headers {
            headers.entry(k.to_ascii_lowercase()).or_default().push(v);
        }
        serde_json::json!({ "id": id, "version": self.version, "headers": headers }).to_string()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    let echo = Arc::new(Echo {
        id: args.id,
        ready: AtomicBool::new(true),
        close_all: tokio::sync::watch::channel(0).0,
    });
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;

    spawn_drain_controls(echo.clone(), args.drain_after_ms);
    loop {
        let (stream, _) = listener.accept().await?;
        let echo = echo.clone();
        tokio::spawn(async move {
            let _ = serve(stream, echo).await;
        });
    }
}

fn spawn_drain_controls(echo: Arc<Echo>, drain_after_ms: Option<u64>) {
    use tokio::signal::unix::{SignalKind, signal};
    if let Some(ms) = drain_after_ms {
        let echo = echo.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo.ready.store(false, Ordering::Relaxed);
        });
    }
    for (kind, ready) in [
        (SignalKind::user_defined1(), false),
        (SignalKind::user_defined2(), true),
    ] {
        let echo = echo.clone();
        tokio::spawn(async move {
            let Ok(mut signals) = signal(kind) else {
                return;
            };
            while signals.recv().await.is_some() {
                echo.ready.store(ready, Ordering::Relaxed);
            }
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path, version) = (first.next(), first.next(), first.next());
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Some(Head {
        method: method.unwrap_or_default().to_owned(),
        path: path.unwrap_or_default().to_owned(),
        version: version.unwrap_or_default().to_owned(),
        headers,
    }))
}

async fn serve(mut stream: TcpStream, echo: Arc<Echo>) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let forced = head
        .header("x-echo-status")
        .and_then(|s| s.parse::<u16>().ok());
    // A draining server refuses new WebSocket clients with 503, as a draining node does.
    let forced = forced.or_else(|| {
        let draining = head.is_upgrade() && !echo.ready.load(Ordering::Relaxed);
        draining.then_some(503)
    });
    if head.is_upgrade() && forced.is_none() {
        return upgrade(stream, head, echo).await;
    }
    let (status, body) = route(&head, &echo, forced);
    let response = format!(
        "HTTP/1.1 {status} X\r\nx-echo-id: {}\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        echo.id,
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(head: &Head, echo: &Echo, forced: Option<u16>) -> (u16, String) {
    if let Some(status) = forced {
        return (status, format!("{}\n", echo.id));
    }
    let path = head.path.split('?').next().unwrap_or_default();
    match (head.method.as_str(), path) {
        ("GET", "/readyz") if echo.ready.load(Ordering::Relaxed) => (200, "ready\n".into()),
        ("GET", "/readyz") => (503, "draining\n".into()),
        ("POST", "/drain") => {
            echo.ready.store(false, Ordering::Relaxed);
            (200, "draining\n".into())
        }
        ("POST", "/close-all") => {
            echo.close_all.send_modify(|generation| *generation += 1);
            (200, "closing\n".into())
        }
        ("POST", "/undrain") => {
            echo.ready.store(true, Ordering::Relaxed);
            (200, "ready\n".into())
        }
        (_, "/headers") => (200, head.headers_json(&echo.id)),
        _ => (200, format!("{}\n", echo.id)),
    }
}

async fn upgrade(mut stream: TcpStream, head: Head, echo: Arc<Echo>) -> std::io::Result<()> {
    let key = head.header("sec-websocket-key").unwrap_or_default();
    let accept = derive_accept_key(key.as_bytes());
    let protocol = head
        .header("sec-websocket-protocol")
        .and_then(|p| p.split(',').next())
        .map(|p| format!("Sec-WebSocket-Protocol: {}\r\n", p.trim()))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}x-echo-id: {}\r\n\r\n",
        echo.id
    );
    stream.write_all(response.as_bytes()).await?;

    let config = WebSocketConfig::default()
        .read_buffer_size(BUFFER_BYTES)
        .write_buffer_size(BUFFER_BYTES)
        .max_message_size(None)
        .max_frame_size(None);
    let mut socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    let mut close_all = echo.close_all.subscribe();
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = close_all.changed() => {
                let frame = CloseFrame { code: CloseCode::Away, reason: "going away".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                continue;
            }
        };
        let Some(Ok(message)) = message else { break };
        let reply = match message {
            Message::Text(text) if text.as_str() == "__headers__" => {
                Message::text(head.headers_json(&echo.id))
            }
            Message::Text(text) if text.as_str() == "__id__" => Message::text(echo.id.clone()),
            Message::Text(_) | Message::Binary(_) => message,
            // The library answers a close with the same code and then ends the stream.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}
