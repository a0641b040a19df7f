//! One WebSocket connection: a single task that reads client frames, writes queued room
//! messages in order, sends heartbeats, saves the session and cleans up.
//!
//! Phases: [`handshake`] (hello, auth, session restore), then the loop in
//! [`Connection::run`] selecting over the socket, the send queue, the heartbeat and the
//! session-save timer; [`requests`] answers client frames and [`delivery`] writes room
//! messages, filling gaps from history. Every socket write races the close signal, so a
//! client that stops reading cannot hold its task once its queue overflows.

mod cursor;
mod delivery;
mod handshake;
mod requests;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use ringcast_shared::cluster::SessionRecord;
use ringcast_shared::protocol::{ErrorCode, ServerFrame, close};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use crate::auth::Identity;
use crate::fanout::{ConnHandle, Outbound, encode};
use crate::limits::{BadFrameCounter, TokenBucket};
use crate::node::Node;
use cursor::Cursors;

/// How long the node tries to write a close frame before dropping the socket.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a slow consumer has to read what is buffered and find its close frame. Its
/// queue is already freed; only the socket's buffers stay allocated meanwhile.
const SLOW_CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the connection loop ended.
#[derive(Debug)]
enum Stop {
    /// The client closed the socket or it failed.
    Gone,
    /// The node closes the connection with this code and reason.
    Close(u16, String),
}

type Step = Result<(), Stop>;

/// A live, authenticated connection.
struct Connection {
    node: Arc<Node>,
    conn: String,
    identity: Identity,
    session: String,
    handle: Arc<ConnHandle>,
    queue: mpsc::Receiver<Outbound>,
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    cursors: Cursors,
    bucket: TokenBucket,
    bad_frames: BadFrameCounter,
    last_seen: Instant,
    pending_save: Option<JoinHandle<()>>,
}

/// Serves one upgraded socket until it closes.
pub async fn serve(node: Arc<Node>, socket: WebSocket) {
    node.metrics.connections.inc();
    let conn_id = uuid::Uuid::new_v4().simple().to_string();
    match handshake::accept(Arc::clone(&node), socket, conn_id.clone()).await {
        Some(mut connection) => {
            let stop = connection.run().await;
            connection.finish(stop).await;
        }
        None => tracing::debug!(conn_id, "handshake did not complete"),
    }
    node.metrics.connections.dec();
}

impl Connection {
    async fn run(&mut self) -> Stop {
        let config = &self.node.config.node;
        let first_ping = Instant::now() + config.heartbeat_interval;
        let mut heartbeat = interval_at(first_ping, config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let first_save = Instant::now() + config.session_save_interval;
        let mut save = interval_at(first_save, config.session_save_interval);
        save.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handle = Arc::clone(&self.handle);
        loop {
            let step = tokio::select! {
                biased;
                (code, reason) = handle.close_requested() => Err(Stop::Close(code, reason.into())),
                frame = self.stream.next() => self.on_socket(frame).await,
                Some(item) = self.queue.recv() => self.on_outbound(item).await,
                _ = heartbeat.tick() => self.on_heartbeat().await,
                _ = save.tick() => {
                    self.save_session_in_background();
                    Ok(())
                }
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    async fn on_heartbeat(&mut self) -> Step {
        if self.last_seen.elapsed() > self.node.config.node.heartbeat_timeout {
            return Err(Stop::Close(
                close::HEARTBEAT_TIMEOUT,
                "no heartbeat answer".into(),
            ));
        }
        self.write(Utf8Bytes::from_static(r#"{"type":"ping"}"#))
            .await
    }

    /// Writes a text frame, giving up when a close is requested meanwhile.
    async fn write(&mut self, text: Utf8Bytes) -> Step {
        let handle = Arc::clone(&self.handle);
        tokio::select! {
            biased;
            (code, reason) = handle.close_requested() => Err(Stop::Close(code, reason.into())),
            result = self.sink.send(Message::Text(text)) => {
                self.node.metrics.frames_out.inc();
                result.map_err(|_| Stop::Gone)
            }
        }
    }

    async fn send(&mut self, frame: &ServerFrame) -> Step {
        self.write(encode(frame)).await
    }

    async fn send_error(&mut self, id: Option<u64>, code: ErrorCode, reason: &str) -> Step {
        let label = code.as_u16().to_string();
        self.node
            .metrics
            .request_errors
            .with_label_values(&[label.as_str()])
            .inc();
        let frame = ServerFrame::Error {
            id,
            code,
            reason: reason.to_owned(),
        };
        self.send(&frame).await
    }

    fn session_record(&mut self) -> SessionRecord {
        SessionRecord {
            id: self.session.clone(),
            user: self.identity.user.clone(),
            rooms: self.cursors.snapshot(),
        }
    }

    /// Saves the session if rooms or offsets changed, without holding up the loop. Saves
    /// run one at a time so an older record never overwrites a newer one.
    fn save_session_in_background(&mut self) {
        if !self.cursors.is_dirty() {
            return;
        }
        let record = self.session_record();
        let node = Arc::clone(&self.node);
        let previous = self.pending_save.take();
        self.pending_save = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            save_session(&node, &record).await;
        }));
    }

    /// Closes the socket (when the node ends it), then saves the session and removes the
    /// connection's presence, registrations and room memberships.
    async fn finish(mut self, stop: Stop) {
        if let Stop::Close(code, reason) = &stop {
            if *code == close::SERVICE_RESTART {
                self.flush_queue().await;
            }
            self.close_socket(*code, reason).await;
        }
        tracing::debug!(conn_id = %self.conn, reason = ?stop, "connection ended");

        if let Some(previous) = self.pending_save.take() {
            let _ = previous.await;
        }
        let record = self.session_record();
        save_session(&self.node, &record).await;
        self.leave_all().await;
        self.node.registry.remove_conn(&self.conn);
        let cluster = &self.node.cluster;
        if let Err(err) = cluster
            .unregister_connection(&self.identity.user, &self.conn)
            .await
        {
            self.node.metrics.cluster_errors.inc();
            tracing::warn!(conn_id = %self.conn, error = %err, "unregister failed");
        }
    }

    /// Writes what is already queued (a drain closes after delivering it, so the saved
    /// offsets are what the client received).
    async fn flush_queue(&mut self) {
        while let Ok(item) = self.queue.try_recv() {
            self.handle.taken(&item);
            let write = self.deliver_item(item);
            match tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    async fn close_socket(&mut self, code: u16, reason: &str) {
        self.node
            .metrics
            .closes
            .with_label_values(&[code.to_string().as_str()])
            .inc();
        let mut patience = CLOSE_WRITE_TIMEOUT;
        if code == close::SLOW_CONSUMER {
            self.node.metrics.slow_consumers.inc();
            tracing::info!(conn_id = %self.conn, "closing slow consumer");
            patience = SLOW_CLOSE_WRITE_TIMEOUT;
            // Free the queued messages now rather than after the close is written.
            while let Ok(item) = self.queue.try_recv() {
                self.handle.taken(&item);
            }
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_owned()),
        }));
        let closing = async {
            if self.sink.send(frame).await.is_err() {
                return;
            }
            // Finish the closing handshake: read (and drop) what the client still sends
            // until its close frame. Dropping a socket with unread input would reset it and
            // destroy the frames still on their way to the client.
            while let Some(Ok(message)) = self.stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(patience, closing).await;
    }

    async fn leave_all(&mut self) {
        for room in self.cursors.rooms() {
            self.cursors.remove(&room);
            self.leave_room(&room).await;
        }
    }
}

async fn save_session(node: &Node, record: &SessionRecord) {
    if let Err(err) = node.cluster.save_session(record).await {
        node.metrics.cluster_errors.inc();
        tracing::warn!(session = %record.id, error = %err, "session save failed");
    }
}

/// Sends a close frame on a socket that never became a [`Connection`].
async fn close_raw(node: &Node, socket: &mut WebSocket, code: u16, reason: &str) {
    node.metrics
        .closes
        .with_label_values(&[code.to_string().as_str()])
        .inc();
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }));
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(frame)).await;
}
