//! A Rust client for Ringcast nodes: connect with a token, reconnect with exponential
//! backoff and full jitter, resume rooms by offset and epoch, drop duplicates, publish with
//! acks, and receive a stream of [`Event`]s.
//!
//! One background task per client owns the WebSocket. The client keeps, per room, the epoch
//! and the last offset it handed to the application; those are the source of truth for "no
//! gap, no duplicate": a message at or below the last offset is dropped, and a message that
//! skips ahead makes the client join the room again from its last offset, so the node
//! replays what is missing. When the node says history cannot cover a gap, the
//! application gets [`Event::Resumed`] with [`ResumeStatus::NotRecovered`].
//!
//! ```no_run
//! use ringcast_shared::client::{Client, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(["ws://127.0.0.1:8080/ws"]).token("a JWT");
//! let (client, mut events) = Client::connect(config).await?;
//! client.join("chat/general").await?;
//! let ack = client.publish("chat/general", serde_json::json!({"text": "hi"})).await?;
//! println!("stored at offset {}", ack.offset);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message { room, offset, data, .. } = event {
//!         println!("{room}#{offset}: {data}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Requests made while the connection is down fail with [`ClientError::Disconnected`];
//! rooms joined earlier are rejoined automatically after a reconnect. A publish that fails
//! with `Disconnected` may or may not have been stored.

mod backoff;
mod rooms;
mod task;

use serde_json::Value;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    ClientInfo, Epoch, ErrorCode, Offset, PresenceChange, PresenceMember, ResumeStatus,
};

pub use backoff::Backoff;

/// How a [`Client`] connects and reconnects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// WebSocket URLs (`ws://host:port/ws`), tried in turn: each reconnect moves to the next.
    pub urls: Vec<String>,
    /// Token sent in `hello`.
    pub token: Option<String>,
    /// First reconnect delay bound. Default 100 ms.
    pub backoff_min: Duration,
    /// Largest reconnect delay bound. Default 5 s.
    pub backoff_max: Duration,
    /// Time for a connection attempt (TCP, upgrade and welcome). Default 5 s.
    pub connect_timeout: Duration,
    /// Time to wait for the answer to a request. Default 10 s.
    pub request_timeout: Duration,
    /// Events buffered for the application; when full the client stops reading the
    /// socket (and a node eventually closes it as a slow consumer). Default 4096.
    pub event_capacity: usize,
}

impl ClientConfig {
    /// Defaults for the given URLs.
    pub fn new<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            token: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            event_capacity: 4096,
        }
    }

    /// Sets the token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// The answer to a publish: where the message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The message's offset.
    pub offset: Offset,
    /// The room's epoch.
    pub epoch: Epoch,
}

/// What the client reports to the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection was established (first or after a reconnect).
    Connected {
        /// Node serving it.
        node: String,
        /// Session id.
        session: String,
        /// Whether the node restored the previous session.
        resumed: bool,
    },
    /// The connection was lost; the client reconnects when `reconnect` is true.
    Disconnected {
        /// Close code, when the node sent one.
        code: Option<u16>,
        /// Close reason or error text.
        reason: String,
        /// Whether the client will reconnect.
        reconnect: bool,
    },
    /// A room message, in offset order, never twice.
    Message {
        /// Room name.
        room: String,
        /// Offset.
        offset: Offset,
        /// Epoch.
        epoch: Epoch,
        /// Publisher.
        from: ClientInfo,
        /// Published value.
        data: Value,
    },
    /// Someone joined or left a room the client is in.
    Presence {
        /// Room name.
        room: String,
        /// Join or leave.
        change: PresenceChange,
        /// The member.
        member: PresenceMember,
    },
    /// A direct message.
    Direct {
        /// Sender.
        from: ClientInfo,
        /// Value.
        data: Value,
    },
    /// A room was resumed (after a reconnect or a gap): `Recovered` means the missed
    /// messages follow; `NotRecovered` means some were lost and the room continues from
    /// `offset`.
    Resumed {
        /// Room name.
        room: String,
        /// Outcome.
        status: ResumeStatus,
        /// Epoch.
        epoch: Epoch,
        /// Newest offset when resumed.
        offset: Offset,
    },
    /// An error frame not tied to a request of this client.
    Error {
        /// Code.
        code: ErrorCode,
        /// Reason.
        reason: String,
    },
    /// The client stopped for good (closed by the application, or a "do not reconnect"
    /// close code such as an invalid or expired token).
    Closed {
        /// Close code, when the node sent one.
        code: Option<u16>,
        /// Reason.
        reason: String,
    },
}

/// Errors of client requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Not connected right now (the client is reconnecting); retry later.
    #[error("not connected")]
    Disconnected,
    /// The client has stopped.
    #[error("client closed")]
    Closed,
    /// No answer within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The node answered with an error frame.
    #[error("node error {code:?}: {reason}")]
    Node {
        /// Error code.
        code: ErrorCode,
        /// Reason.
        reason: String,
    },
    /// The first connection failed.
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl ClientError {
    /// Whether repeating the request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Disconnected | Self::Timeout => true,
            Self::Node { code, .. } => code.is_retryable(),
            Self::Closed | Self::Connect(_) => false,
        }
    }
}

/// A request handed to the client task.
#[derive(Debug)]
enum Command {
    Join(String, Reply),
    Leave(String, Reply),
    Publish(String, Value, Reply),
    Presence(String, Reply),
    Direct(String, Value, Reply),
    Close,
}

/// The raw answer to a request: the matching server frame.
type Reply = oneshot::Sender<Result<crate::protocol::ServerFrame, ClientError>>;

/// A handle to a connected client; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    request_timeout: Duration,
}

/// The application's end of the event stream.
pub type Events = mpsc::Receiver<Event>;

impl Client {
    /// Connects (waiting for the first `welcome`) and starts the background task.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the first connection fails or is refused.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let request_timeout = config.request_timeout;
        let (commands, events) = task::start(config).await?;
        Ok((
            Client {
                commands,
                request_timeout,
            },
            events,
        ))
    }

    /// Joins `room` (and keeps it joined across reconnects).
    ///
    /// # Errors
    /// The node's refusal (forbidden, bad name, too many rooms) or a connection problem.
    pub async fn join(&self, room: &str) -> Result<(), ClientError> {
        self.request(|reply| Command::Join(room.to_owned(), reply))
            .await
            .map(|_| ())
    }

    /// Leaves `room`.
    ///
    /// # Errors
    /// As [`Client::join`].
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        self.request(|reply| Command::Leave(room.to_owned(), reply))
            .await
            .map(|_| ())
    }

    /// Publishes `data` to `room`; returns once the node stored it.
    ///
    /// # Errors
    /// As [`Client::join`]; [`ClientError::Disconnected`] leaves it unknown whether the
    /// message was stored.
    pub async fn publish(&self, room: &str, data: Value) -> Result<Ack, ClientError> {
        let frame = self
            .request(|reply| Command::Publish(room.to_owned(), data, reply))
            .await?;
        match frame {
            crate::protocol::ServerFrame::Ack { offset, epoch, .. } => Ok(Ack { offset, epoch }),
            _ => Err(ClientError::Disconnected),
        }
    }

    /// Every member of `room`, on every node.
    ///
    /// # Errors
    /// As [`Client::join`].
    pub async fn presence(&self, room: &str) -> Result<Vec<PresenceMember>, ClientError> {
        let frame = self
            .request(|reply| Command::Presence(room.to_owned(), reply))
            .await?;
        match frame {
            crate::protocol::ServerFrame::Presence { members, .. } => Ok(members),
            _ => Err(ClientError::Disconnected),
        }
    }

    /// Sends `data` to every live connection of `user`; returns how many got it.
    ///
    /// # Errors
    /// As [`Client::join`].
    pub async fn direct(&self, user: &str, data: Value) -> Result<u64, ClientError> {
        let frame = self
            .request(|reply| Command::Direct(user.to_owned(), data, reply))
            .await?;
        match frame {
            crate::protocol::ServerFrame::Sent { delivered, .. } => Ok(delivered),
            _ => Err(ClientError::Disconnected),
        }
    }

    /// Closes the connection (code 1000) and stops reconnecting.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }

    async fn request(
        &self,
        build: impl FnOnce(Reply) -> Command,
    ) -> Result<crate::protocol::ServerFrame, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(build(reply))
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Err(_) => Err(ClientError::Timeout),
        }
    }
}
