//! The handshake: the first frame must be `hello`; it is authenticated, the session is
//! restored or created, `welcome` is sent, then the restored rooms are joined again.

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use ringcast_shared::cluster::SessionRecord;
use ringcast_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame, close};
use std::sync::Arc;
use tokio::time::Instant;

use super::{Connection, close_raw};
use crate::auth::Identity;
use crate::fanout::ConnHandle;
use crate::limits::{BadFrameCounter, TokenBucket};
use crate::node::Node;

/// What a valid `hello` carried.
struct Hello {
    token: Option<String>,
    session: Option<String>,
}

/// Runs the handshake; `None` when the socket was closed instead.
pub(super) async fn accept(
    node: Arc<Node>,
    mut socket: WebSocket,
    conn: String,
) -> Option<Connection> {
    let hello = read_hello(&node, &mut socket).await?;
    let identity = match node.auth.authenticate(hello.token.as_deref(), &conn) {
        Ok(identity) => identity,
        Err(refusal) => {
            node.metrics
                .auth_failures
                .with_label_values(&[refusal.label])
                .inc();
            tracing::info!(conn_id = %conn, reason = refusal.label, "handshake refused");
            close_raw(&node, &mut socket, refusal.code, &refusal.reason).await;
            return None;
        }
    };
    let restored = load_session(&node, hello.session.as_deref(), &identity.user).await;
    let mut connection = open(node, socket, conn, identity, restored.as_ref());
    connection.welcome(restored).await.ok()?;
    Some(connection)
}

async fn read_hello(node: &Node, socket: &mut WebSocket) -> Option<Hello> {
    let timeout = node.config.node.hello_timeout;
    let first = match tokio::time::timeout(timeout, socket.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(_) => return None,
        Err(_) => {
            close_raw(node, socket, close::POLICY, "hello expected").await;
            return None;
        }
    };
    node.metrics.frames_in.inc();
    let frame = match &first {
        Message::Text(text) => serde_json::from_str::<ClientFrame>(text.as_str()).ok(),
        _ => None,
    };
    match frame {
        Some(ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token,
            session,
        }) => Some(Hello { token, session }),
        Some(ClientFrame::Hello { .. }) => {
            let reason = "unsupported protocol version";
            close_raw(node, socket, close::UNSUPPORTED_VERSION, reason).await;
            None
        }
        _ => {
            close_raw(node, socket, close::POLICY, "first frame must be hello").await;
            None
        }
    }
}

/// Loads the session the client asks to resume, if it exists and belongs to the same user.
async fn load_session(node: &Node, id: Option<&str>, user: &str) -> Option<SessionRecord> {
    let id = id?;
    let outcome = match node.cluster.load_session(id).await {
        Ok(Some(record)) if record.user == user => Some(record),
        Ok(_) => None,
        Err(err) => {
            node.metrics.cluster_errors.inc();
            tracing::warn!(session = id, error = %err, "session load failed");
            None
        }
    };
    let label = if outcome.is_some() {
        "session_restored"
    } else {
        "session_missing"
    };
    node.metrics.resumes.with_label_values(&[label]).inc();
    outcome
}

fn open(
    node: Arc<Node>,
    socket: WebSocket,
    conn: String,
    identity: Identity,
    restored: Option<&SessionRecord>,
) -> Connection {
    let limits = &node.config.limits;
    let handle = ConnHandle::new(
        conn.clone(),
        limits.send_queue_messages,
        limits.send_queue_bytes,
    );
    node.registry.add_conn(&handle);
    let session = restored
        .map(|record| record.id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    Connection {
        bucket: TokenBucket::new(limits.publish_rate_per_sec, limits.publish_burst),
        bad_frames: BadFrameCounter::new(limits.max_bad_frames),
        node,
        conn,
        identity,
        session,
        handle,
        socket,
        cursors: Default::default(),
        last_seen: Instant::now(),
        pending_save: None,
        unflushed: false,
    }
}

impl Connection {
    /// Sends `welcome`, registers the connection for direct messages and rejoins the rooms
    /// of a restored session, each answered by a `joined` frame.
    async fn welcome(&mut self, restored: Option<SessionRecord>) -> super::Step {
        let rooms: Vec<String> = restored
            .iter()
            .flat_map(|record| record.rooms.iter().map(|r| r.room.clone()))
            .collect();
        let frame = ServerFrame::Welcome {
            session: self.session.clone(),
            node: self.node.id.clone(),
            conn: self.conn.clone(),
            user: self.identity.user.clone(),
            heartbeat_ms: millis(self.node.config.node.heartbeat_interval),
            resumed: restored.is_some(),
            rooms,
        };
        self.send(&frame).await?;
        self.register().await;
        tracing::debug!(conn_id = %self.conn, user = %self.identity.user, "connection open");

        for room in restored.map(|record| record.rooms).unwrap_or_default() {
            self.join(None, room.room, Some(room.offset), Some(room.epoch))
                .await?;
        }
        Ok(())
    }

    async fn register(&mut self) {
        let result = self
            .node
            .cluster
            .register_connection(&self.identity.user, &self.conn)
            .await;
        if let Err(err) = result {
            self.node.metrics.cluster_errors.inc();
            tracing::warn!(conn_id = %self.conn, error = %err, "register failed");
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
