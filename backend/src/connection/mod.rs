//! One WebSocket connection: a single task that reads client frames, writes queued room
//! messages in order, sends heartbeats, saves the session and cleans up.
//!
//! Phases: [`handshake`] (hello, auth, session restore), then the loop in
//! [`Connection::run`] selecting over the socket, the send queue (and close requests) and
//! one timer for the heartbeat and session saves; [`requests`] answers client frames and [`delivery`] writes room
//! messages, filling gaps from history. Every socket write races the close signal, so a
//! client that stops reading cannot hold its task once its queue overflows.
//!
//! Writes are coalesced: while more items wait in the send queue, a frame is left in the
//! WebSocket write buffer (which goes out by itself once `write_buffer_bytes` fill up),
//! and the buffer is flushed as soon as the queue is empty. A busy room's burst then
//! reaches the client in a few system calls instead of one per message, and a lone
//! message is written at once.

mod cursor;
mod delivery;
mod handshake;
mod requests;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use ringcast_shared::cluster::SessionRecord;
use ringcast_shared::config::NodeSection;
use ringcast_shared::protocol::{ErrorCode, ServerFrame, close};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::fanout::{ConnHandle, Wakeup, encode};
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
    socket: WebSocket,
    cursors: Cursors,
    bucket: TokenBucket,
    bad_frames: BadFrameCounter,
    last_seen: Instant,
    pending_save: Option<JoinHandle<()>>,
    /// Frames sit in the WebSocket write buffer, not yet flushed to the socket.
    unflushed: bool,
}

/// Serves one upgraded socket until it closes.
pub async fn serve(node: Arc<Node>, socket: WebSocket) {
    node.metrics.connections.inc();
    let conn_id = uuid::Uuid::new_v4().simple().to_string();
    // The handshake and the clean-up run once and await cluster calls; boxed, their
    // state is not part of every idle connection's task.
    match Box::pin(handshake::accept(
        Arc::clone(&node),
        socket,
        conn_id.clone(),
    ))
    .await
    {
        Some(mut connection) => {
            let stop = connection.run().await;
            Box::pin(connection.finish(stop)).await;
        }
        None => tracing::debug!(conn_id, "handshake did not complete"),
    }
    node.metrics.connections.dec();
}

impl Connection {
    async fn run(&mut self) -> Stop {
        let mut timers = Timers::new(&self.node.config.node);
        let first = timers.deadline(self.cursors.is_dirty(), Instant::now());
        let timer = tokio::time::sleep_until(first);
        tokio::pin!(timer);
        let handle = Arc::clone(&self.handle);
        loop {
            if let Some((code, reason)) = handle.close_reason() {
                return Stop::Close(code, reason.into());
            }
            let step = tokio::select! {
                biased;
                frame = self.socket.next() => Box::pin(self.on_socket(frame)).await,
                wakeup = handle.next_wakeup() => match wakeup {
                    Wakeup::Item(item) => self.deliver_item(item).await,
                    Wakeup::Close(code, reason) => Err(Stop::Close(code, reason.into())),
                },
                () = &mut timer => self.on_timer(&mut timers).await,
            };
            if let Err(stop) = step {
                return stop;
            }
            if self.unflushed
                && !handle.has_queued()
                && let Err(stop) = self.flush().await
            {
                return stop;
            }
            // Re-arm only when the deadline moved: resetting a timer costs a trip through
            // the timer wheel, and most steps (deliveries) leave it where it was.
            let deadline = timers.deadline(self.cursors.is_dirty(), Instant::now());
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
        }
    }

    /// Sends the heartbeat and saves the session when their times have come.
    async fn on_timer(&mut self, timers: &mut Timers) -> Step {
        let now = Instant::now();
        if now >= timers.next_save {
            timers.next_save = next_tick(timers.next_save, timers.save_every, now);
            self.save_session_in_background();
        }
        if now >= timers.next_ping {
            timers.next_ping = next_tick(timers.next_ping, timers.ping_every, now);
            self.on_heartbeat().await?;
        }
        Ok(())
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

    /// Writes a text frame, giving up when a close is requested meanwhile. While more
    /// items are queued the frame is only buffered; the loop flushes once the queue is
    /// empty.
    async fn write(&mut self, text: Utf8Bytes) -> Step {
        let handle = Arc::clone(&self.handle);
        let more = handle.has_queued();
        let socket = &mut self.socket;
        let written = async move {
            if more {
                socket.feed(Message::Text(text)).await
            } else {
                socket.send(Message::Text(text)).await
            }
        };
        tokio::select! {
            biased;
            (code, reason) = handle.close_requested() => Err(Stop::Close(code, reason.into())),
            result = written => {
                self.node.metrics.frames_out.inc();
                self.unflushed = more;
                result.map_err(|_| Stop::Gone)
            }
        }
    }

    /// Flushes buffered frames, giving up when a close is requested meanwhile.
    async fn flush(&mut self) -> Step {
        let handle = Arc::clone(&self.handle);
        tokio::select! {
            biased;
            (code, reason) = handle.close_requested() => Err(Stop::Close(code, reason.into())),
            result = SinkExt::flush(&mut self.socket) => {
                self.unflushed = false;
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
        while let Some(item) = self.handle.take() {
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
            self.handle.discard_queued();
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_owned()),
        }));
        let closing = async {
            if self.socket.send(frame).await.is_err() {
                return;
            }
            // Finish the closing handshake: read (and drop) what the client still sends
            // until its close frame. Dropping a socket with unread input would reset it and
            // destroy the frames still on their way to the client.
            while let Some(Ok(message)) = self.socket.next().await {
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

/// The connection's two periodic duties, served by one timer: the heartbeat, and saving
/// the session when rooms or offsets changed since the last save.
struct Timers {
    ping_every: Duration,
    next_ping: Instant,
    save_every: Duration,
    next_save: Instant,
    /// The session was already dirty when the deadline was last computed, so the save at
    /// `next_save` is owed even once that time has passed.
    save_owed: bool,
}

impl Timers {
    fn new(config: &NodeSection) -> Self {
        let now = Instant::now();
        Self {
            ping_every: config.heartbeat_interval,
            next_ping: now + config.heartbeat_interval,
            save_every: config.session_save_interval,
            next_save: now + config.session_save_interval,
            save_owed: false,
        }
    }

    /// When the connection next has something to do; a clean session needs no save, so
    /// an idle connection wakes only for its heartbeat. Saves keep the connection's own
    /// phase, so a room's members do not all save at the same instant: a session that
    /// turns dirty after its save time passed waits for its next tick, while a save that
    /// was already due stays due (a busy connection whose steps keep beating the timer
    /// still saves).
    fn deadline(&mut self, session_dirty: bool, now: Instant) -> Instant {
        if !session_dirty {
            self.save_owed = false;
            return self.next_ping;
        }
        if !self.save_owed && self.next_save < now {
            self.next_save = next_tick(self.next_save, self.save_every, now);
        }
        self.save_owed = true;
        self.next_ping.min(self.next_save)
    }
}

/// The first `start + k * every` (k ≥ 1) after `now`.
fn next_tick(start: Instant, every: Duration, now: Instant) -> Instant {
    let behind = now.saturating_duration_since(start).as_nanos() / every.as_nanos().max(1);
    let steps = u32::try_from(behind + 1).unwrap_or(u32::MAX);
    start + every * steps
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

#[cfg(test)]
mod tests {
    use super::*;

    fn timers(start: Instant) -> Timers {
        Timers {
            ping_every: Duration::from_secs(25),
            next_ping: start + Duration::from_secs(25),
            save_every: Duration::from_secs(2),
            next_save: start + Duration::from_secs(2),
            save_owed: false,
        }
    }

    #[test]
    fn a_clean_session_wakes_only_for_the_heartbeat() {
        let start = Instant::now();
        let mut t = timers(start);
        assert_eq!(t.deadline(false, start), start + Duration::from_secs(25));
    }

    #[test]
    fn a_save_already_due_is_not_pushed_back_by_later_steps() {
        let start = Instant::now();
        let mut t = timers(start);
        let due = start + Duration::from_secs(2);
        assert_eq!(t.deadline(true, start + Duration::from_secs(1)), due);
        // A delivery handled just after the save time, before the timer fired.
        let late = due + Duration::from_millis(5);
        assert_eq!(t.deadline(true, late), due);
    }

    #[test]
    fn a_session_turning_dirty_after_its_save_time_waits_for_its_next_tick() {
        let start = Instant::now();
        let mut t = timers(start);
        assert_eq!(t.deadline(false, start), start + Duration::from_secs(25));
        let later = start + Duration::from_millis(4_500);
        assert_eq!(t.deadline(true, later), start + Duration::from_secs(6));
    }
}
