//! The state Ringcast nodes share, behind one trait: [`ClusterState`].
//!
//! A node calls it to fan out room messages, keep and replay history, track presence,
//! save sessions for resume, find a user's live connections, and list live nodes. Two
//! implementations exist:
//! - the Redis Cluster one (`redis` submodule), through which many nodes share rooms;
//! - the in-process memory one (`memory` submodule), for a single node with no Redis.
//!
//! Both give the same guarantees, and the same behavioural tests run against both:
//! - every publish is stored in the room's history with the next offset before it is
//!   delivered, so a delivered message can always be found again;
//! - events for one room reach the node in offset order with no gap: a gap in live delivery
//!   (say, while a subscription was re-established) is filled from history, and when history
//!   cannot fill it a [`ClusterEvent::Gap`] says so;
//! - entries a node owns (presence, connection registry, node registry) expire within
//!   [`ClusterConfig::presence_ttl`](crate::config::ClusterConfig::presence_ttl) once their
//!   owner stops refreshing them, so a crashed node leaves no ghosts.
//!
//! Slot routing, MOVED/ASK redirections and reconnects are redis-rs's job; this module only
//! owns Ringcast's keys, channels and scripts. `docs/cluster.md` describes the layout.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::protocol::{ClientInfo, Epoch, Offset, PresenceChange, PresenceMember};

pub mod memory;
pub mod redis;

/// Capacity of the [`ClusterEvents`] channel. When the node reads slower than events
/// arrive, delivery waits (events are queued, never dropped).
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// A fresh random epoch.
pub(crate) fn new_epoch() -> Epoch {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A message stored in a room's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// Room name.
    pub room: String,
    /// Position in the room's history.
    pub offset: Offset,
    /// The history it belongs to.
    pub epoch: Epoch,
    /// Who published it.
    pub from: ClientInfo,
    /// The published value.
    pub data: Value,
}

/// Where a room's history stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPosition {
    /// Current epoch.
    pub epoch: Epoch,
    /// Offset of the newest message, 0 when the room has none in this epoch.
    pub offset: Offset,
}

/// The answer to a resume request.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Every message after the requested offset, in order (possibly none). They carry the
    /// room's current epoch, which differs from the requested one when the history was
    /// continued across a master change (see `docs/cluster.md`); they still follow the
    /// requested offset without a gap, so a reader should adopt their epoch.
    Complete(Vec<Publication>),
    /// History does not cover the gap (trimmed, expired, or the epoch changed). Nothing is
    /// replayed, never a partial history.
    NotRecoverable(RoomPosition),
}

/// A room a session was in, with the last position its client saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRoom {
    /// Room name.
    pub room: String,
    /// Last offset delivered to the client.
    pub offset: Offset,
    /// Epoch of that offset.
    pub epoch: Epoch,
}

/// What a node saves so that a reconnecting client can be restored on any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id handed to the client.
    pub id: String,
    /// The authenticated user.
    pub user: String,
    /// Rooms with their last delivered positions.
    pub rooms: Vec<SessionRoom>,
}

/// A live node, as registered in the node registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id, unique in the cluster.
    pub id: String,
    /// Address clients (or the edge) reach it at, `host:port`.
    pub address: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Last heartbeat, milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
}

/// A live connection of a user, as registered in the connection registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectionRef {
    /// Node the connection is on.
    pub node: String,
    /// Connection id.
    pub conn: String,
}

/// Something a node must act on, delivered through the [`ClusterEvents`] stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// A message in a room this node has joined, in offset order per room.
    Publication(Arc<Publication>),
    /// A member joined or left a room this node has joined.
    Presence {
        /// Room name.
        room: String,
        /// Join or leave.
        change: PresenceChange,
        /// The member.
        member: PresenceMember,
    },
    /// A direct message for a connection on this node.
    Direct {
        /// Target user.
        user: String,
        /// Target connection on this node.
        conn: String,
        /// Sender.
        from: ClientInfo,
        /// The value sent.
        data: Value,
    },
    /// Live delivery of `room` skipped messages that history could no longer supply; members
    /// missed messages up to `position` and must be told.
    Gap {
        /// Room name.
        room: String,
        /// Where the room's history stands now.
        position: RoomPosition,
    },
    /// The shared state became unreachable (`false`) or reachable again (`true`).
    Connectivity(bool),
}

/// The receiving end of a node's cluster events.
pub type ClusterEvents = mpsc::Receiver<ClusterEvent>;

/// Errors of the cluster module.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The shared state cannot be reached now; the module keeps retrying in the background.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A request did not complete in time.
    #[error("cluster request timed out: {0}")]
    Timeout(String),
    /// A `replicated` publish was stored but no replica confirmed it in time; the message may
    /// be lost if the master dies.
    #[error("no replica confirmed the write of {room} at offset {offset}")]
    NotReplicated {
        /// Room name.
        room: String,
        /// Offset that was written.
        offset: Offset,
    },
    /// Stored data could not be decoded (written by an incompatible version?).
    #[error("corrupt cluster data at {key}: {reason}")]
    Corrupt {
        /// The key or channel that held it.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The configuration cannot be used.
    #[error("invalid cluster configuration: {0}")]
    Config(String),
}

impl ClusterError {
    /// Whether repeating the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Timeout(_) | Self::NotReplicated { .. }
        )
    }
}

/// Shorthand for the module's results.
pub type ClusterResult<T> = Result<T, ClusterError>;

/// What a node needs from the shared state. Implementations are cheap to share (`Arc`) and
/// every method may be called concurrently.
#[async_trait]
pub trait ClusterState: Send + Sync + 'static {
    /// Starts receiving `room`'s publications and presence events on this node (the node
    /// calls it when the room gets its first local member) and returns where its history
    /// stands. Every publication with an offset above the returned one is delivered.
    async fn subscribe_room(&self, room: &str) -> ClusterResult<RoomPosition>;

    /// Stops receiving `room`'s events (the room's last local member left).
    async fn unsubscribe_room(&self, room: &str) -> ClusterResult<()>;

    /// Stores a message in `room`'s history with the next offset and fans it out to every
    /// node subscribed to the room. Returns the stored publication.
    async fn publish(
        &self,
        room: &str,
        from: ClientInfo,
        data: Value,
    ) -> ClusterResult<Publication>;

    /// Where `room`'s history stands.
    async fn position(&self, room: &str) -> ClusterResult<RoomPosition>;

    /// Every message after `after` in `epoch`, or [`Replay::NotRecoverable`].
    async fn history(&self, room: &str, after: Offset, epoch: &str) -> ClusterResult<Replay>;

    /// Adds a member to `room`'s presence and announces the join to the room. The entry is
    /// refreshed by this instance until removed, and expires if this instance dies.
    async fn presence_join(&self, room: &str, member: PresenceMember) -> ClusterResult<()>;

    /// Removes a member from `room`'s presence and announces the leave.
    async fn presence_leave(&self, room: &str, member: &PresenceMember) -> ClusterResult<()>;

    /// Every live member of `room`, on every node.
    async fn presence(&self, room: &str) -> ClusterResult<Vec<PresenceMember>>;

    /// Saves (or replaces) a session; it can be loaded for `session_ttl`.
    async fn save_session(&self, session: &SessionRecord) -> ClusterResult<()>;

    /// Loads a session saved within `session_ttl`.
    async fn load_session(&self, id: &str) -> ClusterResult<Option<SessionRecord>>;

    /// Registers a live connection of `user` on this node (refreshed until unregistered).
    async fn register_connection(&self, user: &str, conn: &str) -> ClusterResult<()>;

    /// Removes a connection from the registry.
    async fn unregister_connection(&self, user: &str, conn: &str) -> ClusterResult<()>;

    /// The live connections of `user`, on every node.
    async fn connections(&self, user: &str) -> ClusterResult<Vec<ConnectionRef>>;

    /// Delivers a direct message to every live connection of `user`; returns how many
    /// connections it was sent to.
    async fn send_direct(&self, user: &str, from: ClientInfo, data: Value) -> ClusterResult<u64>;

    /// The live nodes of the cluster, this one included.
    async fn nodes(&self) -> ClusterResult<Vec<NodeInfo>>;

    /// Whether the shared state is reachable now (for readiness checks).
    fn is_available(&self) -> bool;

    /// Graceful exit: removes this node's presence entries, connection registrations and
    /// node registration, then stops background work. Sessions are kept.
    async fn shutdown(&self) -> ClusterResult<()>;
}

/// Opens the shared state described by `config` for the node `node`: the Redis Cluster when
/// `config.nodes` is set, the in-process memory implementation otherwise. Registers the node
/// and starts the background refresh of everything it owns.
///
/// # Errors
/// [`ClusterError::Unavailable`] when no seed node answers within the request timeout.
pub async fn connect(
    config: &crate::config::ClusterConfig,
    node: NodeInfo,
) -> ClusterResult<(Arc<dyn ClusterState>, ClusterEvents)> {
    if config.nodes.is_empty() {
        return Ok(memory::MemoryHub::new().connect(config, node));
    }
    redis::connect(config, node).await
}
