//! Room clients for both stacks, speaking just enough of each protocol for the fan-out and
//! failover benches: Ringcast (JSON frames: hello, join, publish) and socket.io v4 over
//! engine.io 4 (`40` namespace connect, `42["join",…]`, `42["say",…]`, `42["msg",…]`).
//!
//! A published message carries its scheduled send time (nanoseconds since the run's origin)
//! so a member can time publish → deliver from the schedule.

use super::loadgen::{self, Target, Ws};
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use ringcast_shared::protocol::{ClientFrame, ServerFrame};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Request path of engine.io WebSocket connections.
pub const SOCKETIO_PATH: &str = "/socket.io/?EIO=4&transport=websocket";

/// How long a join may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Which stack a room client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// Ringcast edge + nodes.
    Ringcast,
    /// nginx + socket.io servers.
    Socketio,
}

impl Stack {
    /// Label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Stack::Ringcast => "ringcast",
            Stack::Socketio => "socket.io",
        }
    }

    /// The WebSocket target at `addr` for this stack.
    pub fn target(self, addr: SocketAddr) -> Target {
        match self {
            Stack::Ringcast => Target::new(addr, "/ws"),
            Stack::Socketio => Target::new(addr, SOCKETIO_PATH),
        }
    }
}

/// A connected client and the server (node id or socket.io port) that serves it.
pub struct Client {
    /// The WebSocket.
    pub ws: Ws,
    /// Which backend answered the hello.
    pub server: String,
}

/// Connects and completes the stack's hello; does not join anything.
pub async fn connect(stack: Stack, target: &Target, source: Ipv4Addr) -> anyhow::Result<Client> {
    let mut ws = loadgen::connect(target, source).await?;
    let server = match stack {
        Stack::Ringcast => {
            let hello = ClientFrame::Hello {
                version: 1,
                token: None,
                session: None,
            };
            ws.send(Message::text(serde_json::to_string(&hello)?))
                .await?;
            let welcome = next_text(&mut ws, |t| t.contains("\"welcome\"")).await?;
            match serde_json::from_str::<ServerFrame>(&welcome)? {
                ServerFrame::Welcome { node, .. } => node,
                other => anyhow::bail!("expected welcome, got {other:?}"),
            }
        }
        Stack::Socketio => {
            next_text(&mut ws, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            let welcome = next_text(&mut ws, |t| t.starts_with("42[\"welcome\"")).await?;
            field_after(&welcome, "\"server\":").unwrap_or_default()
        }
    };
    Ok(Client { ws, server })
}

/// Joins `room` and waits for the confirmation.
pub async fn join(stack: Stack, client: &mut Client, room: &str) -> anyhow::Result<()> {
    let ws = &mut client.ws;
    match stack {
        Stack::Ringcast => {
            let frame = ClientFrame::Join {
                id: Some(1),
                room: room.to_owned(),
                offset: None,
                epoch: None,
            };
            ws.send(Message::text(serde_json::to_string(&frame)?))
                .await?;
            next_text(ws, |t| t.contains("\"joined\"")).await?;
        }
        Stack::Socketio => {
            ws.send(Message::text(format!("421[\"join\",\"{room}\"]")))
                .await?;
            next_text(ws, |t| t.starts_with("431[")).await?;
        }
    }
    Ok(())
}

/// Connects and joins in one step.
pub async fn member(
    stack: Stack,
    target: &Target,
    source: Ipv4Addr,
    room: &str,
) -> anyhow::Result<Client> {
    let run = async {
        let mut client = connect(stack, target, source).await?;
        join(stack, &mut client, room).await?;
        anyhow::Ok(client)
    };
    tokio::time::timeout(JOIN_TIMEOUT, run)
        .await
        .context("join timed out")?
}

/// The frame that publishes `stamp_ns` to `room`.
pub fn publish(stack: Stack, room: &str, seq: u64, stamp_ns: u64) -> Message {
    match stack {
        Stack::Ringcast => {
            let data = serde_json::json!({ "t": stamp_ns });
            let frame = ClientFrame::Publish {
                id: Some(seq),
                room: room.to_owned(),
                data,
            };
            Message::text(serde_json::to_string(&frame).expect("a frame serialises"))
        }
        Stack::Socketio => Message::text(format!("42[\"say\",\"{room}\",\"{stamp_ns}\"]")),
    }
}

/// What a received text frame means to a member.
pub enum Event {
    /// A room message carrying this stamp.
    Delivery(u64),
    /// A heartbeat that must be answered with this frame.
    Heartbeat(Message),
    /// Anything else.
    Other,
}

/// Classifies a text frame received by a member.
pub fn classify(stack: Stack, text: &str) -> Event {
    match stack {
        Stack::Ringcast if text.contains("\"type\":\"message\"") => field_after(text, "\"t\":")
            .and_then(|v| v.parse().ok())
            .map_or(Event::Other, Event::Delivery),
        Stack::Ringcast if text.contains("\"type\":\"ping\"") => {
            Event::Heartbeat(Message::text(r#"{"type":"pong"}"#))
        }
        Stack::Socketio if text.starts_with("42[\"msg\"") => field_after(text, "\"text\":\"")
            .and_then(|v| v.parse().ok())
            .map_or(Event::Other, Event::Delivery),
        Stack::Socketio if text == "2" => Event::Heartbeat(Message::text("3")),
        _ => Event::Other,
    }
}

/// The digits (or quoted value) right after `key` in `text`.
fn field_after(text: &str, key: &str) -> Option<String> {
    let start = text.find(key)? + key.len();
    let rest = text[start..].trim_start_matches('"');
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

async fn next_text(ws: &mut Ws, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    while let Some(msg) = ws.next().await {
        if let Message::Text(text) = msg? {
            anyhow::ensure!(!text.contains("\"type\":\"error\""), "refused: {text}");
            if want(&text) {
                return Ok(text.to_string());
            }
        }
    }
    anyhow::bail!("closed before the expected frame")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_from_both_protocols() {
        let rc = r#"{"type":"message","room":"r","offset":3,"epoch":"e","from":{"user":"u","conn":"c"},"data":{"t":12345}}"#;
        assert!(matches!(
            classify(Stack::Ringcast, rc),
            Event::Delivery(12345)
        ));
        let sio = r#"42["msg",{"room":"r","text":"777","from":"x","server":3001}]"#;
        assert!(matches!(
            classify(Stack::Socketio, sio),
            Event::Delivery(777)
        ));
        assert!(matches!(
            classify(Stack::Socketio, "2"),
            Event::Heartbeat(_)
        ));
    }

    #[test]
    fn server_is_read_from_the_socketio_welcome() {
        let w = r#"42["welcome",{"server":3002,"pid":1,"sid":"a"}]"#;
        assert_eq!(field_after(w, "\"server\":").as_deref(), Some("3002"));
    }
}
