//! WebSocket upgrades: the handshake and the two-way tunnel, driven by the edge itself.
//!
//! Why not pingora's own upgrade path: in pingora 0.9.1 the upstream half of the proxy
//! loop can read a fast backend's `101` before it has consumed the (empty) request-body
//! end of the handshake; it then treats that end as "the client finished" and closes the
//! fresh tunnel. Under load, and always after a retry, a few upgraded connections die
//! right after their handshake. So upgrade requests are handled here, from
//! `request_filter`:
//!
//! 1. pick a backend on the ring and connect; a refused or timed-out connect, or a backend
//!    that closes before answering, marks it (passive ejection) and the same handshake
//!    goes to the next ring node — nothing has reached the client yet;
//! 2. send the handshake over HTTP/1.1 with `Upgrade`/`Connection: Upgrade`, the client's
//!    other headers (all `Sec-WebSocket-*` unchanged) and the forwarding headers;
//! 3. a non-101 answer is passed to the client unchanged (status, headers, body);
//! 4. after a `101`, bytes are relayed both ways as they are (no frame parsing, no size
//!    limit) until either side closes or the tunnel idle timeout fires (logged, counted).
//!
//! A backend that dies mid-tunnel ends the client's TCP connection without a close frame,
//! so the edge never invents a close code (and never a reserved one: 1005, 1006, 1015).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics;
use crate::pool::{BackendState, lock};

/// Largest accepted response head from a backend.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Largest chunk read from either side at once.
const RELAY_BYTES: usize = 16 * 1024;

/// Hop-by-hop request headers the edge sets itself (or drops) on the upstream handshake.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
];

/// Why one backend could not take the handshake (the next ring node is tried).
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// TCP connect failed or timed out.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The backend closed or broke before a complete answer head.
    #[error("no answer: {0}")]
    NoAnswer(String),
}

/// A backend's answer head plus any bytes read after it.
pub struct Answer {
    /// The parsed head.
    pub head: ResponseHeader,
    /// Bytes that followed the head in the same reads.
    pub rest: Vec<u8>,
    /// The upstream connection.
    pub stream: TcpStream,
}

/// Serialises the upstream handshake request.
pub fn request_head(session: &Session, forwarding: &[(&str, String)]) -> Vec<u8> {
    let request = session.req_header();
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {target} HTTP/1.1\r\n", request.method);
    let skip = |name: &str| {
        HOP_BY_HOP.contains(&name) || forwarding.iter().any(|(f, _)| f.eq_ignore_ascii_case(name))
    };
    for (name, value) in &request.headers {
        if skip(name.as_str()) {
            continue;
        }
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    let upgrade = request
        .headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("websocket");
    head.push_str(&format!("Connection: Upgrade\r\nUpgrade: {upgrade}\r\n"));
    for (name, value) in forwarding {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Connects to `address`, sends `head` and reads the answer head.
pub async fn attempt(
    address: SocketAddr,
    head: &[u8],
    connect_timeout: Duration,
    answer_timeout: Duration,
) -> Result<Answer, AttemptError> {
    let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(address)).await;
    let mut stream = match connect {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(AttemptError::Connect(err.to_string())),
        Err(_) => return Err(AttemptError::Connect("timed out".to_owned())),
    };
    let _ = stream.set_nodelay(true);
    let exchange = async {
        stream.write_all(head).await?;
        read_head(&mut stream).await
    };
    match tokio::time::timeout(answer_timeout, exchange).await {
        Ok(Ok((head, rest))) => Ok(Answer { head, rest, stream }),
        Ok(Err(err)) => Err(AttemptError::NoAnswer(err.to_string())),
        Err(_) => Err(AttemptError::NoAnswer("timed out".to_owned())),
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<(ResponseHeader, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_head_end(&buf) {
            let head = parse_head(&buf[..end]).map_err(std::io::Error::other)?;
            return Ok((head, buf[end..].to_vec()));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(std::io::Error::other("answer head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_head(raw: &[u8]) -> Result<ResponseHeader, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "answer head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut head = ResponseHeader::build(status, None).map_err(|e| e.to_string())?;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header {line:?}"))?;
        head.append_header(name.trim().to_owned(), value.trim())
            .map_err(|e| e.to_string())?;
    }
    Ok(head)
}

/// Passes a non-101 answer to the client: the head unchanged, the body by its
/// `Content-Length`, or until the backend closes.
pub async fn relay_refusal(session: &mut Session, answer: Answer) -> pingora::Result<()> {
    let Answer {
        mut head,
        rest,
        mut stream,
    } = answer;
    let length = head
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.headers.get("transfer-encoding").is_some();
    let mut body = rest;
    let read = async {
        match length {
            Some(length) => {
                while body.len() < length && stream.read_buf(&mut body).await? > 0 {}
                body.truncate(length);
            }
            None if chunked => {
                while !body.ends_with(b"0\r\n\r\n") && stream.read_buf(&mut body).await? > 0 {}
                body = dechunk(&body);
            }
            None => while stream.read_buf(&mut body).await? > 0 {},
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let _ = head.remove_header("transfer-encoding");
    head.insert_header("content-length", body.len().to_string())?;
    head.insert_header("connection", "close")?;
    session.set_keepalive(None);
    let downstream = session.as_downstream_mut();
    downstream.write_response_header(Box::new(head)).await?;
    downstream
        .write_response_body(Bytes::from(body), true)
        .await
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        let start = line_end + 2;
        if size == 0 || raw.len() < start + size {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or_default();
    }
    out
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The client closed.
    Downstream,
    /// The backend closed (or died).
    Upstream,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed.
    Error,
    /// Closed by the edge while it shuts down (spread over the grace period).
    Shutdown,
}

/// Every open tunnel of this process, so a shutdown can close them gradually.
#[derive(Default)]
pub struct Tunnels {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// A tunnel's registration; dropping it unregisters the tunnel.
pub struct TunnelHandle {
    id: u64,
    close: Arc<Notify>,
    tunnels: Arc<Tunnels>,
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        lock(&self.tunnels.open).remove(&self.id);
    }
}

impl Tunnels {
    /// Registers a new tunnel.
    pub fn register(self: &Arc<Self>) -> TunnelHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        lock(&self.open).insert(id, close.clone());
        TunnelHandle {
            id,
            close,
            tunnels: self.clone(),
        }
    }

    /// Open tunnels.
    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every open tunnel, evenly spread over `window`, so their clients reconnect
    /// (through the new process after a graceful upgrade) without a thundering herd.
    pub async fn close_spread(&self, window: Duration) {
        let open: Vec<Arc<Notify>> = lock(&self.open).values().cloned().collect();
        if open.is_empty() {
            return;
        }
        let gap = window / u32::try_from(open.len()).unwrap_or(u32::MAX);
        tracing::info!(
            tunnels = open.len(),
            window_ms = window.as_millis() as u64,
            "shutting down: closing tunnels spread over the grace period"
        );
        for close in open {
            close.notify_one();
            tokio::time::sleep(gap).await;
        }
    }
}

/// Takes the client's connection out of pingora's session once the `101` is written, so
/// the tunnel can own it for its whole life while pingora finishes the request at once.
///
/// pingora keeps per-request state (its proxy future, the session's body reader with a
/// 64 KiB buffer reserved under every pending read) for as long as a request runs; a
/// tunnel relayed through that API pays for it on every idle connection and on every
/// relayed chunk. pingora only hands a connection's stream out by value, so the session is
/// swapped for a stand-in that carries the same request head (for pingora's logging and
/// clean-up after `request_filter`). The stand-in reads from memory and discards what is
/// written to it (pingora implements its stream trait for an in-memory cursor), so the
/// swap costs no system call.
///
/// A WebSocket client sends nothing after its handshake request until it has the answer
/// (RFC 6455, section 4.1), so pingora holds no unread client bytes at this point.
pub async fn take_client(session: &mut Session) -> pingora::Result<Stream> {
    let raw_head = session.as_downstream().to_h1_raw();
    let mut stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(raw_head.to_vec())));
    stand_in.read_request().await?;
    stand_in.set_keepalive(None);
    let original = std::mem::replace(session.as_downstream_mut(), stand_in);
    match original {
        ServerSession::H1(client) => {
            let mut stream = client.into_inner();
            // pingora buffers small writes; the `101` may still sit in its buffer.
            stream
                .flush()
                .await
                .map_err(|err| Error::because(ErrorType::WriteError, "flushing the 101", err))?;
            Ok(stream)
        }
        _ => Error::e_explain(
            ErrorType::InternalError,
            "only HTTP/1.1 connections carry WebSocket upgrades",
        ),
    }
}

/// Relays bytes both ways until one side closes or nothing moves for `idle` (if set).
///
/// `early` holds bytes the backend sent right after its `101`; they reach the client first.
pub async fn relay(
    mut client: Stream,
    mut upstream: TcpStream,
    early: Vec<u8>,
    idle: Option<Duration>,
    handle: &TunnelHandle,
) -> TunnelEnd {
    if !early.is_empty() && write_flushed(&mut client, &early).await.is_err() {
        return TunnelEnd::Error;
    }
    let idle_for = idle.unwrap_or(NO_IDLE_LIMIT);
    // One timer for the tunnel's life, pushed back after each transfer: arming a new one
    // per relayed chunk showed up in the edge's per-message CPU profile.
    let idle_timer = tokio::time::sleep(idle_for);
    tokio::pin!(idle_timer);
    // Registered once as well: a fresh `notified()` per chunk takes the `Notify`'s lock to
    // enlist and again to leave. A close sent meanwhile is kept as a permit either way.
    let closed = handle.close.notified();
    tokio::pin!(closed);
    loop {
        let end = tokio::select! {
            from_client = read_available(&mut client) => match from_client {
                Ok(Some(chunk)) => upstream.write_all(&chunk).await.err().map(|_| TunnelEnd::Error),
                Ok(None) => {
                    let _ = upstream.shutdown().await;
                    Some(TunnelEnd::Downstream)
                }
                Err(_) => Some(TunnelEnd::Error),
            },
            from_backend = read_available(&mut upstream) => match from_backend {
                Ok(Some(chunk)) => write_flushed(&mut client, &chunk).await.err().map(|_| TunnelEnd::Error),
                Ok(None) | Err(_) => {
                    let _ = client.shutdown().await;
                    Some(TunnelEnd::Upstream)
                }
            },
            () = &mut idle_timer => Some(TunnelEnd::Idle),
            () = &mut closed => {
                let _ = upstream.shutdown().await;
                Some(TunnelEnd::Shutdown)
            }
        };
        if let Some(end) = end {
            return end;
        }
        idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + idle_for);
    }
}

/// An idle limit long enough to mean "none".
const NO_IDLE_LIMIT: Duration = Duration::from_secs(86_400 * 365);

/// Waits for bytes from `io` and returns them; `None` at end of stream.
///
/// The read buffer lives on the stack only while the read is polled, so a tunnel waiting
/// for its next message holds no buffer at all; what arrived is copied out exactly sized.
async fn read_available(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Bytes>> {
    std::future::poll_fn(|cx| {
        let mut scratch = [MaybeUninit::<u8>::uninit(); RELAY_BYTES];
        let mut buf = ReadBuf::uninit(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(Bytes::copy_from_slice(buf.filled())))),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Writes `data` to the client and pushes it out of pingora's small write buffer.
async fn write_flushed(client: &mut Stream, data: &[u8]) -> std::io::Result<()> {
    client.write_all(data).await?;
    client.flush().await
}

/// Logs and counts the end of a tunnel on `backend`.
pub fn record_end(backend: &Arc<BackendState>, end: TunnelEnd, opened: Instant, request_id: &str) {
    let lived_ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
    if end == TunnelEnd::Idle {
        metrics::idle_timeout();
        tracing::info!(backend = %backend.id, lived_ms, request_id, "tunnel closed: idle timeout");
    } else {
        tracing::debug!(backend = %backend.id, lived_ms, request_id, end = ?end, "tunnel closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_heads_parse() {
        let head =
            parse_head(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nA: b\r\n\r\n").unwrap();
        assert_eq!(head.status.as_u16(), 101);
        assert_eq!(head.headers.get("a").unwrap(), "b");
        assert!(parse_head(b"nonsense\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
