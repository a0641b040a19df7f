//! The simulated client fleet: real WebSocket clients that connect through the edge with
//! tokens, join rooms, publish at a steady total rate, reconnect and resume after faults,
//! and record everything they see for the [`checker`](crate::checker).
//!
//! The fleet speaks the wire protocol itself (rather than through the client library)
//! because the checker must see the wire as it is: every delivery, duplicates included,
//! before any client-side de-duplication. It resumes the way the protocol documents: `hello`
//! with the previous session id; rooms the welcome lists are restored by the node, the
//! others are joined again with the last offset and epoch seen.
//!
//! Like the client library, a client drops a delivery at or below the last offset it has
//! in the same epoch (a replay overlapping what it already had), and on a gap or an epoch
//! change it re-joins from its own position (the node may restore a room from a session
//! cursor that is ahead of what really reached the client, e.g. when a tunnel was cut with
//! data in flight) and drops what arrives until the answer. Such drops are recorded as
//! redeliveries, re-joins as resyncs, everything else as a delivery the checker judges.
//!
//! Client `i` is user `u<i>`, a member of room `room-<i mod rooms>`; every publish carries
//! `{"p": i, "s": seq}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use ringcast_shared::auth::{Claims, mint_token};
use ringcast_shared::protocol::{ClientFrame, ResumeStatus, ServerFrame, close};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::checker::{ClientId, Event, EventKind, MsgId, RoomId};
use crate::stats::Stats;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a client waits for the welcome and for its rooms after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: first ceiling and largest ceiling (full jitter below it).
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// What the fleet does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `ws://host:port/ws` of the edge.
    pub url: String,
    /// Number of clients.
    pub clients: u32,
    /// Number of rooms.
    pub rooms: u32,
    /// Publishes per second over the whole fleet.
    pub rate: f64,
    /// JWT secret shared with the nodes.
    pub secret: String,
    /// A client that cannot get back within this long is lost.
    pub resume_window: Duration,
    /// Clients connecting per second at the start.
    pub connect_rate: f64,
}

/// The name of room `room`.
pub fn room_name(room: RoomId) -> String {
    format!("room-{room}")
}

/// Records events with the run's clock.
#[derive(Debug, Clone)]
pub struct Recorder {
    stats: Arc<Stats>,
    tx: mpsc::UnboundedSender<Event>,
}

impl Recorder {
    fn record(&self, client: ClientId, kind: EventKind) {
        let at = self.stats.elapsed();
        let _ = self.tx.send(Event { at, client, kind });
    }
}

/// A running fleet.
pub struct Fleet {
    tasks: JoinSet<()>,
    publishing: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Fleet {
    /// Starts every client (spread at `connect_rate`) and returns once all have been started.
    pub async fn start(config: FleetConfig, stats: Arc<Stats>) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let (publishing, publishing_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        let recorder = Recorder { stats, tx };
        let config = Arc::new(config);
        let mut tasks = JoinSet::new();
        let spacing = Duration::from_secs_f64(1.0 / config.connect_rate.max(1.0));
        for id in 0..config.clients {
            let client = SimClient::new(id, config.clone(), recorder.clone());
            let (publishing, stop) = (publishing_rx.clone(), stop_rx.clone());
            tasks.spawn(client.run(publishing, stop));
            sleep(spacing).await;
        }
        Self {
            tasks,
            publishing,
            stop,
            events,
        }
    }

    /// Stops publishing (clients keep receiving).
    pub fn stop_publishing(&self) {
        let _ = self.publishing.send(false);
    }

    /// Closes every client and returns the event log.
    pub async fn finish(mut self) -> Vec<Event> {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }
}

/// Where a client stands in its room.
#[derive(Debug, Clone)]
struct Position {
    epoch: Arc<str>,
    offset: u64,
}

/// One simulated client.
struct SimClient {
    id: ClientId,
    room: RoomId,
    config: Arc<FleetConfig>,
    recorder: Recorder,
    token: String,
    session: Option<String>,
    position: Option<Position>,
    seq: u64,
    /// A re-synchronising join is on its way; messages are dropped until it is answered.
    syncing: bool,
    pending: HashMap<u64, u64>,
    epochs: HashMap<String, Arc<str>>,
}

/// Why a connection ended.
enum Ended {
    Stopped,
    Dropped { hint: Option<u16> },
}

impl SimClient {
    fn new(id: ClientId, config: Arc<FleetConfig>, recorder: Recorder) -> Self {
        let room = id % config.rooms.max(1);
        let name = room_name(room);
        let claims = Claims::new(format!("u{id}"), Duration::from_secs(24 * 3600))
            .with_rooms([name.clone()])
            .with_publish([name]);
        let token = mint_token(config.secret.as_bytes(), &claims).unwrap_or_default();
        Self {
            id,
            room,
            config,
            recorder,
            token,
            session: None,
            position: None,
            seq: 0,
            syncing: false,
            pending: HashMap::new(),
            epochs: HashMap::new(),
        }
    }

    async fn run(mut self, publishing: watch::Receiver<bool>, mut stop: watch::Receiver<bool>) {
        let mut since: Option<Instant> = None;
        loop {
            let connected = tokio::select! {
                connected = self.connect(since) => connected,
                _ = stopped(&mut stop) => return,
            };
            let Some((mut ws, node)) = connected else {
                self.recorder.record(self.id, EventKind::Lost);
                self.recorder.stats.lost.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if let Some(started) = since.take() {
                let took = started.elapsed();
                self.recorder
                    .record(self.id, EventKind::Reconnected { took });
                self.recorder
                    .stats
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.recorder.stats.node_connections(&node, 1);
            let ended = self.serve(&mut ws, publishing.clone(), stop.clone()).await;
            self.recorder.stats.node_connections(&node, -1);
            self.fail_pending();
            match ended {
                Ended::Stopped => {
                    let _ = ws.close(None).await;
                    return;
                }
                Ended::Dropped { hint } => {
                    tracing::debug!(client = self.id, node = %node, ?hint, "disconnected");
                    self.recorder.record(self.id, EventKind::Disconnected);
                    since = Some(Instant::now());
                }
            }
        }
    }

    /// Connects (retrying with backoff until the resume window ends) and re-joins the room.
    /// `None` when the client gave up.
    async fn connect(&mut self, since: Option<Instant>) -> Option<(Ws, String)> {
        let deadline = since.unwrap_or_else(Instant::now) + self.config.resume_window;
        let mut attempt: u32 = 0;
        loop {
            match self.handshake().await {
                Ok(connected) => return Some(connected),
                Err(err) => {
                    tracing::debug!(client = self.id, error = %err, "handshake failed");
                    self.recorder.record(self.id, EventKind::HandshakeFailed);
                    let stats = &self.recorder.stats;
                    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// One connection attempt: upgrade, hello, welcome, room joined.
    async fn handshake(&mut self) -> Result<(Ws, String)> {
        let url = format!("{}?user=u{}", self.config.url, self.id);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(8 * 1024);
        let (mut ws, _) = timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true),
        )
        .await
        .context("upgrade timed out")??;
        let hello = ClientFrame::Hello {
            version: ringcast_shared::protocol::PROTOCOL_VERSION,
            token: Some(self.token.clone()),
            session: self.session.clone(),
        };
        send(&mut ws, &hello).await?;
        let node = timeout(HANDSHAKE_TIMEOUT, self.welcome(&mut ws))
            .await
            .context("no welcome or join in time")??;
        Ok((ws, node))
    }

    /// Reads the welcome, re-joins the room unless it is restored, and waits for `joined`.
    async fn welcome(&mut self, ws: &mut Ws) -> Result<String> {
        let (node, restored) = loop {
            match next_frame(ws).await? {
                ServerFrame::Welcome {
                    session,
                    node,
                    rooms,
                    ..
                } => {
                    self.session = Some(session);
                    break (node, rooms.contains(&room_name(self.room)));
                }
                ServerFrame::Ping => send(ws, &ClientFrame::Pong).await?,
                other => bail!("expected welcome, got {other:?}"),
            }
        };
        self.syncing = false;
        if !restored {
            self.rejoin(ws).await?;
        }
        loop {
            let frame = next_frame(ws).await?;
            let joined = matches!(frame, ServerFrame::Joined { .. });
            self.handle(ws, frame).await?;
            if joined {
                return Ok(node);
            }
        }
    }

    /// The connected state: receive, publish on schedule, until dropped or stopped.
    async fn serve(
        &mut self,
        ws: &mut Ws,
        publishing: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) -> Ended {
        let period = Duration::from_secs_f64(f64::from(self.config.clients) / self.config.rate);
        let first = period.mul_f64(rand::rng().random::<f64>());
        let mut tick = tokio::time::interval_at(Instant::now() + first, period);
        loop {
            let publish_now = *publishing.borrow();
            tokio::select! {
                _ = stopped(&mut stop) => return Ended::Stopped,
                _ = tick.tick(), if publish_now => {
                    if self.publish(ws).await.is_err() {
                        return Ended::Dropped { hint: None };
                    }
                }
                incoming = ws.next() => match incoming {
                    Some(Ok(WsMessage::Text(text))) => {
                        let handled = match serde_json::from_str::<ServerFrame>(&text) {
                            Ok(frame) => self.handle(ws, frame).await,
                            Err(err) => Err(anyhow!("bad frame: {err}")),
                        };
                        if let Err(err) = handled {
                            tracing::warn!(client = self.id, error = %err, "frame");
                        }
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let hint = frame.map(|f| u16::from(f.code));
                        if hint.is_some_and(|code| !close::should_reconnect(code)) {
                            tracing::warn!(client = self.id, ?hint, "closed without reconnect");
                        }
                        return Ended::Dropped { hint };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Ended::Dropped { hint: None },
                },
            }
        }
    }

    async fn publish(&mut self, ws: &mut Ws) -> Result<()> {
        self.seq += 1;
        let frame = ClientFrame::Publish {
            id: Some(self.seq),
            room: room_name(self.room),
            data: json!({"p": self.id, "s": self.seq}),
        };
        self.pending.insert(self.seq, self.seq);
        send(ws, &frame).await
    }

    fn fail_pending(&mut self) {
        for _ in self.pending.drain() {
            self.recorder.record(self.id, EventKind::Unacked);
        }
    }

    fn epoch(&mut self, epoch: &str) -> Arc<str> {
        self.epochs
            .entry(epoch.to_owned())
            .or_insert_with(|| Arc::from(epoch))
            .clone()
    }

    /// Records a frame and keeps the room position up to date.
    async fn handle(&mut self, ws: &mut Ws, frame: ServerFrame) -> Result<()> {
        match frame {
            ServerFrame::Joined {
                room,
                epoch,
                offset,
                resume,
                ..
            } => self.joined(&room, &epoch, offset, resume),
            ServerFrame::Message {
                epoch,
                offset,
                data,
                ..
            } => self.message(ws, &epoch, offset, &data).await?,
            ServerFrame::Ack {
                id, epoch, offset, ..
            } => self.ack(id, &epoch, offset),
            ServerFrame::Ping => send(ws, &ClientFrame::Pong).await?,
            ServerFrame::Error { id, code, reason } => {
                tracing::warn!(client = self.id, ?id, ?code, %reason, "error reply");
                if let Some(id) = id
                    && self.pending.remove(&id).is_some()
                {
                    self.recorder.record(self.id, EventKind::Unacked);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn joined(&mut self, room: &str, epoch: &str, offset: u64, resume: Option<ResumeStatus>) {
        if room != room_name(self.room) {
            return;
        }
        self.syncing = false;
        let epoch = self.epoch(epoch);
        let keep = resume == Some(ResumeStatus::Recovered)
            && self.position.as_ref().is_some_and(|p| p.epoch == epoch);
        if !keep {
            self.position = Some(Position {
                epoch: epoch.clone(),
                offset,
            });
        }
        let kind = EventKind::Joined {
            room: self.room,
            epoch,
            offset,
            resume,
        };
        self.recorder.record(self.id, kind);
    }

    /// Delivers the next message in order; drops what it already has; on a gap or an
    /// epoch change re-joins from its own position (as the client library does) and drops
    /// what arrives until the `joined` answer.
    async fn message(
        &mut self,
        ws: &mut Ws,
        epoch: &str,
        offset: u64,
        data: &serde_json::Value,
    ) -> Result<()> {
        let epoch = self.epoch(epoch);
        let Some(position) = self.position.clone() else {
            self.recorder.record(self.id, EventKind::Redelivered);
            return Ok(());
        };
        let same_epoch = position.epoch == epoch;
        if same_epoch && offset <= position.offset {
            self.recorder.record(self.id, EventKind::Redelivered);
            return Ok(());
        }
        if !same_epoch || offset != position.offset + 1 {
            self.recorder.record(self.id, EventKind::Redelivered);
            if !self.syncing {
                self.syncing = true;
                self.recorder.record(self.id, EventKind::Resync);
                self.rejoin(ws).await?;
            }
            return Ok(());
        }
        self.position = Some(Position {
            epoch: epoch.clone(),
            offset,
        });
        self.recorder
            .stats
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        let kind = EventKind::Delivered {
            room: self.room,
            epoch,
            offset,
            msg: msg_id(data),
        };
        self.recorder.record(self.id, kind);
        Ok(())
    }

    /// Sends `join` for the room, from the client's own position when it has one.
    async fn rejoin(&mut self, ws: &mut Ws) -> Result<()> {
        let join = ClientFrame::Join {
            id: Some(0),
            room: room_name(self.room),
            offset: self.position.as_ref().map(|p| p.offset),
            epoch: self.position.as_ref().map(|p| p.epoch.to_string()),
        };
        send(ws, &join).await
    }

    fn ack(&mut self, id: Option<u64>, epoch: &str, offset: u64) {
        let Some(seq) = id.and_then(|id| self.pending.remove(&id)) else {
            return;
        };
        let epoch = self.epoch(epoch);
        self.recorder.stats.acked.fetch_add(1, Ordering::Relaxed);
        let kind = EventKind::Acked {
            room: self.room,
            epoch,
            offset,
            seq,
        };
        self.recorder.record(self.id, kind);
    }
}

/// Resolves once `stop` is (or becomes) true, or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The `{"p": publisher, "s": seq}` tag of a message's data.
fn msg_id(data: &serde_json::Value) -> Option<MsgId> {
    let publisher = u32::try_from(data.get("p")?.as_u64()?).ok()?;
    let seq = data.get("s")?.as_u64()?;
    Some(MsgId { publisher, seq })
}

/// Exponential backoff with full jitter.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

async fn send(ws: &mut Ws, frame: &ClientFrame) -> Result<()> {
    let text = serde_json::to_string(frame)?;
    ws.send(WsMessage::text(text)).await?;
    Ok(())
}

/// The next protocol frame; a close or the end of the stream is an error.
async fn next_frame(ws: &mut Ws) -> Result<ServerFrame> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(WsMessage::Close(frame))) => bail!("closed: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        for attempt in 0..40 {
            let wait = backoff(attempt);
            assert!(wait <= BACKOFF_CAP);
        }
        assert!(backoff(0) <= BACKOFF_BASE);
    }
}
