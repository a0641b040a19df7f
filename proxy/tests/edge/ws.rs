//! WebSocket client helpers: a raw handshake (exact header bytes under the test's control)
//! and a tungstenite client.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type RawClient = WebSocketStream<TcpStream>;

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends `head` (request line + headers, no blank line) and reads the answer head.
/// Returns the stream (positioned after the head) and the head text.
pub async fn raw_handshake(to: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream
        .write_all(format!("{head}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer head: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.push(byte[0]);
    }
    (stream, String::from_utf8(answer).unwrap())
}

/// Wraps a stream whose 101 was read.
pub async fn client_over(stream: TcpStream) -> RawClient {
    WebSocketStream::from_raw_socket(stream, Role::Client, None).await
}

/// A standard handshake on `path`; returns the client and the backend id from `x-echo-id`.
pub async fn connect(url: &str) -> Result<(Client, String), tokio_tungstenite::tungstenite::Error> {
    let (client, response) = tokio_tungstenite::connect_async(url).await?;
    let id = response
        .headers()
        .get("x-echo-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((client, id))
}

/// Sends `text` and waits for the echo.
pub async fn roundtrip<S>(client: &mut WebSocketStream<S>, text: &str) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    client
        .send(Message::text(text))
        .await
        .map_err(|e| e.to_string())?;
    let next = tokio::time::timeout(Duration::from_secs(10), client.next()).await;
    match next {
        Ok(Some(Ok(Message::Text(reply)))) => Ok(reply.as_str().to_owned()),
        other => Err(format!("{other:?}")),
    }
}

/// Tries an upgrade; returns the status and the `Retry-After` header.
pub async fn connect_status(edge: &crate::common::Edge) -> (u16, Option<String>) {
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13"
    );
    let (_stream, answer) = raw_handshake(edge.listen, &head).await;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry = answer
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.trim().to_owned());
    (status, retry)
}
