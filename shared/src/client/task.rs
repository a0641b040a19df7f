//! The client's background task: one per client, owning the WebSocket, the rooms and the
//! pending requests; it reconnects with backoff and rejoins rooms from their offsets.

use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, HashSet};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::backoff::Backoff;
use super::rooms::{MessageVerdict, Rooms};
use super::{ClientConfig, ClientError, Command, Event, Events, Reply};
use crate::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame, close};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Shortest silence after which the connection is considered dead.
const MIN_WATCHDOG: Duration = Duration::from_secs(1);

/// Why a connection ended.
struct Ended {
    code: Option<u16>,
    reason: String,
    reconnect: bool,
}

impl Ended {
    fn lost(reason: impl Into<String>) -> Self {
        Self {
            code: None,
            reason: reason.into(),
            reconnect: true,
        }
    }

    fn closed(code: u16, reason: String) -> Self {
        Self {
            code: Some(code),
            reason,
            reconnect: close::should_reconnect(code),
        }
    }
}

/// What a `welcome` said.
struct Welcome {
    node: String,
    session: String,
    heartbeat_ms: u64,
    resumed: bool,
    restored: Vec<String>,
}

/// A request waiting for its answer.
struct Pending {
    reply: Reply,
    joining: Option<String>,
}

struct Task {
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    rooms: Rooms,
    session: Option<String>,
    url_index: usize,
    backoff: Backoff,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    watchdog: Duration,
}

/// Connects once (waiting for `welcome`) and spawns the task.
pub(super) async fn start(
    config: ClientConfig,
) -> Result<(mpsc::Sender<Command>, Events), ClientError> {
    if config.urls.is_empty() {
        return Err(ClientError::Connect("no URL given".into()));
    }
    let (command_tx, commands) = mpsc::channel(64);
    let (events, event_rx) = mpsc::channel(config.event_capacity.max(1));
    let mut task = Task {
        backoff: Backoff::new(config.backoff_min, config.backoff_max),
        config,
        commands,
        events,
        rooms: Rooms::default(),
        session: None,
        url_index: 0,
        next_id: 1,
        pending: HashMap::new(),
        watchdog: MIN_WATCHDOG,
    };
    let (ws, welcome) = task
        .connect_once()
        .await
        .map_err(|ended| ClientError::Connect(ended.reason))?;
    tokio::spawn(task.run(ws, welcome));
    Ok((command_tx, event_rx))
}

impl Task {
    async fn run(mut self, mut ws: Ws, mut welcome: Welcome) {
        loop {
            let ended = match self.on_welcome(&mut ws, welcome).await {
                Ok(()) => self.serve(&mut ws).await,
                Err(ended) => ended,
            };
            self.fail_pending();
            if !ended.reconnect {
                let _ = self.events.send(closed_event(ended)).await;
                return;
            }
            let _ = self.events.send(disconnected_event(&ended)).await;
            match self.reconnect().await {
                Some((next_ws, next_welcome)) => {
                    ws = next_ws;
                    welcome = next_welcome;
                }
                None => return,
            }
        }
    }

    /// One attempt: TCP, upgrade, hello, welcome.
    async fn connect_once(&mut self) -> Result<(Ws, Welcome), Ended> {
        let url = self.config.urls[self.url_index % self.config.urls.len()].clone();
        let hello = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: self.config.token.clone(),
            session: self.session.clone(),
        };
        let attempt = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(|err| Ended::lost(format!("{url}: {err}")))?;
            send_frame(&mut ws, &hello).await?;
            let welcome = read_welcome(&mut ws).await?;
            Ok((ws, welcome))
        };
        match tokio::time::timeout(self.config.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Ended::lost(format!("{url}: connect timed out"))),
        }
    }

    /// Waits with backoff (answering commands with `Disconnected`) and connects to the next
    /// URL until it works; `None` when the client must stop.
    async fn reconnect(&mut self) -> Option<(Ws, Welcome)> {
        loop {
            let wake = Instant::now() + self.backoff.next_delay();
            loop {
                tokio::select! {
                    _ = sleep_until(wake) => break,
                    command = self.commands.recv() => match command {
                        None | Some(Command::Close) => {
                            let reason = "closed by the application".to_owned();
                            let _ = self.events.send(Event::Closed { code: None, reason }).await;
                            return None;
                        }
                        Some(command) => reply_disconnected(command),
                    }
                }
            }
            self.url_index = self.url_index.wrapping_add(1);
            match self.connect_once().await {
                Ok(connected) => return Some(connected),
                Err(ended) if !ended.reconnect => {
                    let _ = self.events.send(closed_event(ended)).await;
                    return None;
                }
                Err(ended) => {
                    let _ = self.events.send(disconnected_event(&ended)).await;
                }
            }
        }
    }

    /// Reports the connection and puts the node's room set in line with the client's:
    /// rooms the node did not restore are joined again from the client's own offsets.
    async fn on_welcome(&mut self, ws: &mut Ws, welcome: Welcome) -> Result<(), Ended> {
        self.backoff.reset();
        self.session = Some(welcome.session.clone());
        let restored: HashSet<String> = welcome.restored.into_iter().collect();
        let connected = Event::Connected {
            node: welcome.node,
            session: welcome.session,
            resumed: welcome.resumed,
        };
        let _ = self.events.send(connected).await;
        self.watchdog = watchdog(welcome.heartbeat_ms);

        for room in &restored {
            if !self.rooms.contains(room) {
                let leave = ClientFrame::Leave {
                    id: None,
                    room: room.clone(),
                };
                send_frame(ws, &leave).await?;
            }
        }
        let rejoin: Vec<String> = self
            .rooms
            .iter()
            .filter(|(room, _)| !restored.contains(*room))
            .map(|(room, _)| room.clone())
            .collect();
        for room in rejoin {
            self.send_join(ws, &room, None).await?;
        }
        Ok(())
    }
}

impl Task {
    /// Runs one connection until it ends.
    async fn serve(&mut self, ws: &mut Ws) -> Ended {
        let mut silent_until = Instant::now() + self.watchdog;
        loop {
            let step = tokio::select! {
                frame = ws.next() => {
                    silent_until = Instant::now() + self.watchdog;
                    self.on_socket(ws, frame).await
                }
                command = self.commands.recv() => self.on_command(ws, command).await,
                _ = sleep_until(silent_until) => Err(Ended::lost("heartbeat timeout")),
            };
            if let Err(ended) = step {
                return ended;
            }
        }
    }

    async fn on_socket(
        &mut self,
        ws: &mut Ws,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), Ended> {
        match frame {
            None => Err(Ended::lost("connection closed")),
            Some(Err(err)) => Err(Ended::lost(err.to_string())),
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => self.on_frame(ws, frame).await,
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable frame from node");
                    Ok(())
                }
            },
            Some(Ok(Message::Close(frame))) => Err(match frame {
                Some(CloseFrame { code, reason }) => {
                    Ended::closed(u16::from(code), reason.to_string())
                }
                None => Ended::lost("closed without a code"),
            }),
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn on_frame(&mut self, ws: &mut Ws, frame: ServerFrame) -> Result<(), Ended> {
        match frame {
            ServerFrame::Ping => send_frame(ws, &ClientFrame::Pong).await,
            ServerFrame::Message {
                room,
                offset,
                epoch,
                from,
                data,
            } => match self.rooms.on_message(&room, &epoch, offset) {
                MessageVerdict::Deliver => {
                    let event = Event::Message {
                        room,
                        offset,
                        epoch,
                        from,
                        data,
                    };
                    self.emit(event).await
                }
                MessageVerdict::Drop => Ok(()),
                MessageVerdict::Resync => self.send_join(ws, &room, None).await,
            },
            ServerFrame::Joined {
                id,
                ref room,
                ref epoch,
                offset,
                ref resume,
            } => {
                if self.rooms.on_joined(room, epoch, offset, resume.as_ref()) {
                    self.send_join(ws, room, None).await?;
                }
                if let Some(status) = resume.clone() {
                    let event = Event::Resumed {
                        room: room.clone(),
                        status,
                        epoch: epoch.clone(),
                        offset,
                    };
                    self.emit(event).await?;
                }
                self.answer(id, frame);
                Ok(())
            }
            other => self.on_other(other).await,
        }
    }

    async fn on_other(&mut self, frame: ServerFrame) -> Result<(), Ended> {
        match frame {
            ServerFrame::Left { id, .. }
            | ServerFrame::Ack { id, .. }
            | ServerFrame::Presence { id, .. }
            | ServerFrame::Sent { id, .. } => {
                self.answer(id, frame);
                Ok(())
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                reason,
            } => {
                if let Some(pending) = self.pending.remove(&id) {
                    if let Some(room) = pending.joining {
                        self.rooms.remove(&room);
                    }
                    let _ = pending.reply.send(Err(ClientError::Node { code, reason }));
                }
                Ok(())
            }
            ServerFrame::Error { code, reason, .. } => {
                self.emit(Event::Error { code, reason }).await
            }
            ServerFrame::PresenceEvent {
                room,
                change,
                member,
            } => {
                let event = Event::Presence {
                    room,
                    change,
                    member,
                };
                self.emit(event).await
            }
            ServerFrame::Direct { from, data } => self.emit(Event::Direct { from, data }).await,
            _ => Ok(()),
        }
    }

    async fn on_command(&mut self, ws: &mut Ws, command: Option<Command>) -> Result<(), Ended> {
        let Some(command) = command else {
            return self.close(ws).await;
        };
        match command {
            Command::Join(room, reply) => {
                self.rooms.insert(&room);
                let id = self.track(reply, Some(room.clone()));
                self.send_join(ws, &room, Some(id)).await
            }
            Command::Leave(room, reply) => {
                self.rooms.remove(&room);
                let id = Some(self.track(reply, None));
                send_frame(ws, &ClientFrame::Leave { id, room }).await
            }
            Command::Publish(room, data, reply) => {
                let id = Some(self.track(reply, None));
                send_frame(ws, &ClientFrame::Publish { id, room, data }).await
            }
            Command::Presence(room, reply) => {
                let id = Some(self.track(reply, None));
                send_frame(ws, &ClientFrame::Presence { id, room }).await
            }
            Command::Direct(user, data, reply) => {
                let id = Some(self.track(reply, None));
                send_frame(ws, &ClientFrame::Direct { id, user, data }).await
            }
            Command::Close => self.close(ws).await,
        }
    }

    async fn close(&mut self, ws: &mut Ws) -> Result<(), Ended> {
        let frame = CloseFrame {
            code: close::NORMAL.into(),
            reason: "client closed".into(),
        };
        let _ = tokio::time::timeout(MIN_WATCHDOG, ws.close(Some(frame))).await;
        Err(Ended {
            code: Some(close::NORMAL),
            reason: "closed by the application".into(),
            reconnect: false,
        })
    }

    /// Joins `room`, from the client's own position when it has one (a resume).
    async fn send_join(&mut self, ws: &mut Ws, room: &str, id: Option<u64>) -> Result<(), Ended> {
        let cursor = self.rooms.iter().find(|(name, _)| *name == room);
        let (offset, epoch) = match cursor.and_then(|(_, c)| c.epoch.clone().map(|e| (c.last, e))) {
            Some((last, epoch)) => (Some(last), Some(epoch)),
            None => (None, None),
        };
        if offset.is_some() {
            self.rooms.mark_syncing(room);
        }
        let frame = ClientFrame::Join {
            id,
            room: room.to_owned(),
            offset,
            epoch,
        };
        send_frame(ws, &frame).await
    }

    fn track(&mut self, reply: Reply, joining: Option<String>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Pending { reply, joining });
        id
    }

    fn answer(&mut self, id: Option<u64>, frame: ServerFrame) {
        if let Some(pending) = id.and_then(|id| self.pending.remove(&id)) {
            let _ = pending.reply.send(Ok(frame));
        }
    }

    /// Fails every pending request; a join that never completed is forgotten.
    fn fail_pending(&mut self) {
        for (_, pending) in self.pending.drain() {
            if let Some(room) = pending.joining {
                let never_joined = self
                    .rooms
                    .iter()
                    .any(|(name, cursor)| *name == room && cursor.epoch.is_none());
                if never_joined {
                    self.rooms.remove(&room);
                }
            }
            let _ = pending.reply.send(Err(ClientError::Disconnected));
        }
    }

    /// Hands an event to the application (waiting while its buffer is full).
    async fn emit(&self, event: Event) -> Result<(), Ended> {
        self.events.send(event).await.map_err(|_| Ended {
            code: None,
            reason: "event receiver dropped".into(),
            reconnect: false,
        })
    }
}

async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> Result<(), Ended> {
    let text = serde_json::to_string(frame).map_err(|err| Ended::lost(err.to_string()))?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|err| Ended::lost(err.to_string()))
}

async fn read_welcome(ws: &mut Ws) -> Result<Welcome, Ended> {
    loop {
        let message = match ws.next().await {
            None => return Err(Ended::lost("closed before welcome")),
            Some(Err(err)) => return Err(Ended::lost(err.to_string())),
            Some(Ok(message)) => message,
        };
        match message {
            Message::Text(text) => {
                if let Ok(ServerFrame::Welcome {
                    session,
                    node,
                    heartbeat_ms,
                    resumed,
                    rooms,
                    ..
                }) = serde_json::from_str::<ServerFrame>(&text)
                {
                    return Ok(Welcome {
                        node,
                        session,
                        heartbeat_ms,
                        resumed,
                        restored: rooms,
                    });
                }
            }
            Message::Close(Some(frame)) => {
                return Err(Ended::closed(
                    u16::from(frame.code),
                    frame.reason.to_string(),
                ));
            }
            Message::Close(None) => return Err(Ended::lost("closed before welcome")),
            _ => {}
        }
    }
}

/// Twice the node's heartbeat interval, at least [`MIN_WATCHDOG`].
fn watchdog(heartbeat_ms: u64) -> Duration {
    Duration::from_millis(heartbeat_ms.saturating_mul(2)).max(MIN_WATCHDOG)
}

fn reply_disconnected(command: Command) {
    let reply = match command {
        Command::Join(_, reply)
        | Command::Leave(_, reply)
        | Command::Publish(_, _, reply)
        | Command::Presence(_, reply)
        | Command::Direct(_, _, reply) => reply,
        Command::Close => return,
    };
    let _ = reply.send(Err(ClientError::Disconnected));
}

fn disconnected_event(ended: &Ended) -> Event {
    Event::Disconnected {
        code: ended.code,
        reason: ended.reason.clone(),
        reconnect: true,
    }
}

fn closed_event(ended: Ended) -> Event {
    Event::Closed {
        code: ended.code,
        reason: ended.reason,
    }
}
