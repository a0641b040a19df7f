//! The reference echo backend every proxy in the edge bench forwards to: a WebSocket server
//! that sends each data frame back unchanged, with 8 KiB buffers per connection. A plain
//! HTTP request (a proxy's health check) is answered `200 ok` and closed.
//!
//! It runs as its own process (`ringcast-testbed bench echo-server`), on one thread, so that
//! its CPU time can be read apart from the proxy's and the load generator's.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read and write buffer size of every WebSocket connection the bench opens or serves.
pub const WS_BUFFER_BYTES: usize = 8 * 1024;

/// Longest request head the echo server peeks at to tell a health check from an upgrade.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The WebSocket settings used on both sides of every bench connection.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(0)
}

/// Serves echo on `listen` until the process is killed.
pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(err) = handle(stream).await {
                    tracing::trace!(%err, "echo connection ended");
                }
            });
        }
    })
}

async fn handle(mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    if !is_upgrade(&stream).await? {
        let reply = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
        stream.write_all(reply.as_bytes()).await?;
        return Ok(());
    }
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await?;
    let (mut sink, mut source) = ws.split();
    while let Some(msg) = source.next().await {
        match msg? {
            msg @ (Message::Binary(_) | Message::Text(_)) => sink.send(msg).await?,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// Peeks at the request head: true when it asks for a WebSocket upgrade.
async fn is_upgrade(stream: &TcpStream) -> anyhow::Result<bool> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("closed before a request");
        }
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        if head.contains("\r\n\r\n") || n == buf.len() {
            return Ok(head.contains("upgrade: websocket"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
