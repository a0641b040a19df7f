//! The in-process implementation of [`ClusterState`], for a node that runs alone.
//!
//! Everything lives in one [`MemoryHub`] behind a mutex held only for short, non-blocking
//! steps. A hub can serve several instances in one process (tests use that to play several
//! nodes); [`connect`](super::connect) gives every standalone node a hub of its own.
//!
//! Each instance owns a refresh task that extends its presence, connection and node entries
//! every third of `presence_ttl` and sweeps expired presence entries (announcing their leave).
//! Dropping an instance without [`ClusterState::shutdown`] stops that task, so its entries
//! expire as if the node had crashed. Events are queued under the hub lock, which keeps every
//! room's events in offset order, and a forwarder task per instance moves them into the
//! bounded [`ClusterEvents`] channel, so a slow reader delays but never loses events.

use async_trait::async_trait;
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::{
    ClusterEvent, ClusterEvents, ClusterResult, ClusterState, ConnectionRef,
    EVENT_CHANNEL_CAPACITY, NodeInfo, Publication, Replay, RoomPosition, SessionRecord, new_epoch,
    unix_ms,
};
use crate::config::ClusterConfig;
use crate::protocol::{ClientInfo, Offset, PresenceChange, PresenceMember};

/// Shared state of every instance created from it. Cheap to clone.
#[derive(Clone, Default)]
pub struct MemoryHub {
    state: Arc<Mutex<Hub>>,
}

/// The instance id used for ownership of expiring entries.
type InstanceId = u64;

#[derive(Default)]
struct Hub {
    rooms: HashMap<String, Room>,
    presence: HashMap<String, HashMap<String, Owned<PresenceMember>>>,
    sessions: HashMap<String, (SessionRecord, Instant)>,
    connections: HashMap<String, HashMap<ConnectionRef, Owned<()>>>,
    nodes: HashMap<String, Owned<NodeInfo>>,
    instances: HashMap<InstanceId, Link>,
    next_instance: InstanceId,
}

/// A room's history.
struct Room {
    epoch: String,
    offset: Offset,
    history: VecDeque<Arc<Publication>>,
    touched: Instant,
}

/// An entry that expires unless its owner refreshes it.
struct Owned<T> {
    value: T,
    owner: InstanceId,
    expires: Instant,
}

/// How the hub reaches one instance.
struct Link {
    node: String,
    rooms: HashSet<String>,
    queue: mpsc::UnboundedSender<ClusterEvent>,
}

impl Room {
    fn new() -> Self {
        Self {
            epoch: new_epoch(),
            offset: 0,
            history: VecDeque::new(),
            touched: Instant::now(),
        }
    }

    fn position(&self) -> RoomPosition {
        RoomPosition {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }

    /// Messages after `after` in `epoch`, or `None` when history does not cover them.
    fn replay(&self, after: Offset, epoch: &str) -> Option<Vec<Publication>> {
        if epoch != self.epoch || after > self.offset {
            return None;
        }
        if after == self.offset {
            return Some(Vec::new());
        }
        let first = self.history.front().map_or(self.offset + 1, |p| p.offset);
        if after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(
            self.history
                .iter()
                .skip(skip)
                .map(|p| (**p).clone())
                .collect(),
        )
    }
}

impl Hub {
    /// The room, replaced by a fresh epoch when its history expired.
    fn room(&mut self, room: &str, ttl: Duration) -> &mut Room {
        let entry = self.rooms.entry(room.to_owned()).or_insert_with(Room::new);
        if entry.touched.elapsed() > ttl {
            *entry = Room::new();
        }
        entry
    }

    /// Queues `event` for every instance subscribed to `room`.
    fn fan_out(&self, room: &str, event: &ClusterEvent) {
        for link in self.instances.values() {
            if link.rooms.contains(room) {
                let _ = link.queue.send(event.clone());
            }
        }
    }

    fn announce(&self, room: &str, change: PresenceChange, member: PresenceMember) {
        let event = ClusterEvent::Presence {
            room: room.to_owned(),
            change,
            member,
        };
        self.fan_out(room, &event);
    }

    /// Drops expired presence entries and announces their leave.
    fn sweep_presence(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (room, members) in &mut self.presence {
            members.retain(|_, entry| {
                let live = entry.expires > now;
                if !live {
                    gone.push((room.clone(), entry.value.clone()));
                }
                live
            });
        }
        self.presence.retain(|_, members| !members.is_empty());
        for (room, member) in gone {
            self.announce(&room, PresenceChange::Leave, member);
        }
    }

    /// Extends every entry `owner` holds until `expires`.
    fn refresh(&mut self, owner: InstanceId, expires: Instant, node: &str) {
        let owned_by = |o: InstanceId| o == owner;
        for members in self.presence.values_mut() {
            for entry in members.values_mut().filter(|e| owned_by(e.owner)) {
                entry.expires = expires;
            }
        }
        for conns in self.connections.values_mut() {
            for entry in conns.values_mut().filter(|e| owned_by(e.owner)) {
                entry.expires = expires;
            }
        }
        if let Some(entry) = self.nodes.get_mut(node).filter(|e| owned_by(e.owner)) {
            entry.expires = expires;
            entry.value.heartbeat_ms = unix_ms();
        }
    }

    /// Removes everything `owner` holds; returns the presence entries removed.
    fn remove_owned(&mut self, owner: InstanceId, node: &str) -> Vec<(String, PresenceMember)> {
        let mut gone = Vec::new();
        for (room, members) in &mut self.presence {
            members.retain(|_, entry| {
                let keep = entry.owner != owner;
                if !keep {
                    gone.push((room.clone(), entry.value.clone()));
                }
                keep
            });
        }
        self.presence.retain(|_, members| !members.is_empty());
        for conns in self.connections.values_mut() {
            conns.retain(|_, entry| entry.owner != owner);
        }
        self.connections.retain(|_, conns| !conns.is_empty());
        if self.nodes.get(node).is_some_and(|e| e.owner == owner) {
            self.nodes.remove(node);
        }
        gone
    }
}

impl MemoryHub {
    /// A new, empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens an instance for `node` on this hub: registers the node and starts its refresh
    /// task. Must be called within a tokio runtime.
    pub fn connect(
        &self,
        config: &ClusterConfig,
        mut node: NodeInfo,
    ) -> (Arc<dyn ClusterState>, ClusterEvents) {
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        node.heartbeat_ms = unix_ms();
        let id = {
            let mut hub = lock(&self.state);
            hub.next_instance += 1;
            let id = hub.next_instance;
            let link = Link {
                node: node.id.clone(),
                rooms: HashSet::new(),
                queue: queue_tx,
            };
            hub.instances.insert(id, link);
            let entry = Owned {
                value: node.clone(),
                owner: id,
                expires: Instant::now() + config.presence_ttl,
            };
            hub.nodes.insert(node.id.clone(), entry);
            id
        };
        let state = Arc::new(MemoryState {
            hub: self.state.clone(),
            id,
            node: node.id,
            config: config.clone(),
            tasks: Mutex::new(Vec::new()),
            shut_down: AtomicBool::new(false),
        });
        let forwarder = tokio::spawn(forward(queue_rx, events_tx));
        let refresher = tokio::spawn(refresh_loop(Arc::downgrade(&state)));
        lock(&state.tasks).extend([forwarder.abort_handle(), refresher.abort_handle()]);
        (state, events_rx)
    }
}

/// Moves queued events into the node's bounded channel, in order.
async fn forward(
    mut queue: mpsc::UnboundedReceiver<ClusterEvent>,
    events: mpsc::Sender<ClusterEvent>,
) {
    while let Some(event) = queue.recv().await {
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// Refreshes the instance's entries until the instance is dropped.
async fn refresh_loop(state: Weak<MemoryState>) {
    loop {
        let period = match state.upgrade() {
            Some(state) => {
                state.refresh();
                state.config.presence_ttl / 3
            }
            None => return,
        };
        tokio::time::sleep(period).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that
    // matters more than stopping the node would, so keep going with the data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One node's view of a [`MemoryHub`].
pub struct MemoryState {
    hub: Arc<Mutex<Hub>>,
    id: InstanceId,
    node: String,
    config: ClusterConfig,
    tasks: Mutex<Vec<AbortHandle>>,
    shut_down: AtomicBool,
}

impl MemoryState {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    fn expiry(&self) -> Instant {
        Instant::now() + self.config.presence_ttl
    }

    fn refresh(&self) {
        let now = Instant::now();
        let mut hub = self.hub();
        hub.refresh(self.id, self.expiry(), &self.node);
        hub.sweep_presence(now);
        hub.sessions.retain(|_, (_, expires)| *expires > now);
        let history_ttl = self.config.history_ttl;
        hub.rooms
            .retain(|_, room| room.touched.elapsed() <= history_ttl);
    }

    fn stop_tasks(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

impl Drop for MemoryState {
    fn drop(&mut self) {
        self.stop_tasks();
        self.hub().instances.remove(&self.id);
    }
}

#[async_trait]
impl ClusterState for MemoryState {
    async fn subscribe_room(&self, room: &str) -> ClusterResult<RoomPosition> {
        let mut hub = self.hub();
        let position = hub.room(room, self.config.history_ttl).position();
        if let Some(link) = hub.instances.get_mut(&self.id) {
            link.rooms.insert(room.to_owned());
        }
        Ok(position)
    }

    async fn unsubscribe_room(&self, room: &str) -> ClusterResult<()> {
        if let Some(link) = self.hub().instances.get_mut(&self.id) {
            link.rooms.remove(room);
        }
        Ok(())
    }

    async fn publish(
        &self,
        room: &str,
        from: ClientInfo,
        data: Value,
    ) -> ClusterResult<Publication> {
        let mut hub = self.hub();
        let max_len = usize::try_from(self.config.stream_length).unwrap_or(usize::MAX);
        let state = hub.room(room, self.config.history_ttl);
        state.offset += 1;
        state.touched = Instant::now();
        let publication = Arc::new(Publication {
            room: room.to_owned(),
            offset: state.offset,
            epoch: state.epoch.clone(),
            from,
            data,
        });
        state.history.push_back(publication.clone());
        while state.history.len() > max_len {
            state.history.pop_front();
        }
        hub.fan_out(room, &ClusterEvent::Publication(publication.clone()));
        Ok((*publication).clone())
    }

    async fn position(&self, room: &str) -> ClusterResult<RoomPosition> {
        Ok(self.hub().room(room, self.config.history_ttl).position())
    }

    async fn history(&self, room: &str, after: Offset, epoch: &str) -> ClusterResult<Replay> {
        let mut hub = self.hub();
        let state = hub.room(room, self.config.history_ttl);
        Ok(match state.replay(after, epoch) {
            Some(publications) => Replay::Complete(publications),
            None => Replay::NotRecoverable(state.position()),
        })
    }

    async fn presence_join(&self, room: &str, member: PresenceMember) -> ClusterResult<()> {
        let mut hub = self.hub();
        let entry = Owned {
            value: member.clone(),
            owner: self.id,
            expires: self.expiry(),
        };
        let members = hub.presence.entry(room.to_owned()).or_default();
        members.insert(member.conn.clone(), entry);
        hub.announce(room, PresenceChange::Join, member);
        Ok(())
    }

    async fn presence_leave(&self, room: &str, member: &PresenceMember) -> ClusterResult<()> {
        let mut hub = self.hub();
        let removed = hub
            .presence
            .get_mut(room)
            .and_then(|members| members.remove(&member.conn));
        if let Some(entry) = removed {
            hub.announce(room, PresenceChange::Leave, entry.value);
        }
        Ok(())
    }

    async fn presence(&self, room: &str) -> ClusterResult<Vec<PresenceMember>> {
        let now = Instant::now();
        let hub = self.hub();
        let mut members: Vec<PresenceMember> = hub
            .presence
            .get(room)
            .into_iter()
            .flat_map(|members| members.values())
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.value.clone())
            .collect();
        members.sort_by(|a, b| (a.joined_at_ms, &a.conn).cmp(&(b.joined_at_ms, &b.conn)));
        Ok(members)
    }

    async fn save_session(&self, session: &SessionRecord) -> ClusterResult<()> {
        let expires = Instant::now() + self.config.session_ttl;
        let mut hub = self.hub();
        hub.sessions
            .insert(session.id.clone(), (session.clone(), expires));
        Ok(())
    }

    async fn load_session(&self, id: &str) -> ClusterResult<Option<SessionRecord>> {
        let now = Instant::now();
        let hub = self.hub();
        let session = hub.sessions.get(id).filter(|(_, expires)| *expires > now);
        Ok(session.map(|(record, _)| record.clone()))
    }

    async fn register_connection(&self, user: &str, conn: &str) -> ClusterResult<()> {
        let key = ConnectionRef {
            node: self.node.clone(),
            conn: conn.to_owned(),
        };
        let entry = Owned {
            value: (),
            owner: self.id,
            expires: self.expiry(),
        };
        let mut hub = self.hub();
        hub.connections
            .entry(user.to_owned())
            .or_default()
            .insert(key, entry);
        Ok(())
    }

    async fn unregister_connection(&self, user: &str, conn: &str) -> ClusterResult<()> {
        let key = ConnectionRef {
            node: self.node.clone(),
            conn: conn.to_owned(),
        };
        let mut hub = self.hub();
        if let Some(conns) = hub.connections.get_mut(user) {
            conns.remove(&key);
            if conns.is_empty() {
                hub.connections.remove(user);
            }
        }
        Ok(())
    }

    async fn connections(&self, user: &str) -> ClusterResult<Vec<ConnectionRef>> {
        let now = Instant::now();
        let hub = self.hub();
        let mut conns: Vec<ConnectionRef> = hub
            .connections
            .get(user)
            .into_iter()
            .flat_map(|conns| conns.iter())
            .filter(|(_, entry)| entry.expires > now)
            .map(|(conn, _)| conn.clone())
            .collect();
        conns.sort_by(|a, b| (&a.node, &a.conn).cmp(&(&b.node, &b.conn)));
        Ok(conns)
    }

    async fn send_direct(&self, user: &str, from: ClientInfo, data: Value) -> ClusterResult<u64> {
        let targets = self.connections(user).await?;
        let hub = self.hub();
        let mut delivered = 0;
        for target in targets {
            let event = ClusterEvent::Direct {
                user: user.to_owned(),
                conn: target.conn.clone(),
                from: from.clone(),
                data: data.clone(),
            };
            let links = hub.instances.values().filter(|l| l.node == target.node);
            let sent = links
                .filter(|l| l.queue.send(event.clone()).is_ok())
                .count();
            delivered += u64::from(sent > 0);
        }
        Ok(delivered)
    }

    async fn nodes(&self) -> ClusterResult<Vec<NodeInfo>> {
        let now = Instant::now();
        let hub = self.hub();
        let mut nodes: Vec<NodeInfo> = hub
            .nodes
            .values()
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.value.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    fn is_available(&self) -> bool {
        !self.shut_down.load(Ordering::Relaxed)
    }

    async fn shutdown(&self) -> ClusterResult<()> {
        self.shut_down.store(true, Ordering::Relaxed);
        self.stop_tasks();
        let mut hub = self.hub();
        for (room, member) in hub.remove_owned(self.id, &self.node) {
            hub.announce(&room, PresenceChange::Leave, member);
        }
        hub.instances.remove(&self.id);
        Ok(())
    }
}
