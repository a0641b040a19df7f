//! Fan-out: the node's room registry (room → local connections) and the dispatcher task
//! that turns [`ClusterEvent`]s into frames queued on those connections.
//!
//! A publication is serialised once and the same bytes are shared by every recipient. The
//! dispatcher never waits for a connection: each one has a bounded queue (frames and bytes),
//! and a connection whose queue is full is asked to close as a slow consumer while the
//! others carry on. Ordering and gap filling per connection and room happen in the
//! connection task, which reads the queue.

use axum::extract::ws::Utf8Bytes;
use ringcast_shared::cluster::{ClusterEvent, ClusterEvents, Publication, RoomPosition};
use ringcast_shared::protocol::{Epoch, Offset, ServerFrame, close};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc};

use crate::node::Node;

/// Bytes charged to the queue for an item without a payload.
const CONTROL_ITEM_BYTES: usize = 64;

/// A publication serialised once, shared by every local recipient.
#[derive(Debug)]
pub struct Delivery {
    /// Room name.
    pub room: String,
    /// Offset of the publication.
    pub offset: Offset,
    /// Epoch of the publication.
    pub epoch: Epoch,
    /// The `message` frame, ready to write.
    pub text: Utf8Bytes,
}

/// What the dispatcher queues on a connection.
#[derive(Debug)]
pub enum Outbound {
    /// A room message (ordered and de-duplicated by the connection).
    Publication(Arc<Delivery>),
    /// A ready frame (presence event, direct message).
    Frame(Utf8Bytes),
    /// The cluster lost live messages of a room; the connection checks its own position.
    Gap {
        /// Room name.
        room: String,
        /// Where the room's history stands.
        position: RoomPosition,
    },
}

impl Outbound {
    fn charged_bytes(&self) -> usize {
        match self {
            Self::Publication(delivery) => delivery.text.len(),
            Self::Frame(text) => text.len(),
            Self::Gap { .. } => CONTROL_ITEM_BYTES,
        }
    }
}

/// The registry's view of one connection: its queue and a way to ask it to close.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection id.
    pub conn: String,
    tx: mpsc::Sender<Outbound>,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    close_requested: AtomicBool,
    close_reason: Mutex<Option<(u16, &'static str)>>,
    close_signal: Notify,
}

impl ConnHandle {
    /// A handle whose queue holds `max_items` items and `max_bytes` bytes; returns the
    /// receiving end for the connection task.
    pub fn new(
        conn: String,
        max_items: usize,
        max_bytes: usize,
    ) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(max_items);
        let handle = Self {
            conn,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: max_bytes,
            close_requested: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            close_signal: Notify::new(),
        };
        (Arc::new(handle), rx)
    }

    /// Queues `item` without waiting. A full queue asks the connection to close as a slow
    /// consumer; returns whether the item was queued.
    pub fn offer(&self, item: Outbound) -> bool {
        if self.close_requested.load(Ordering::Relaxed) {
            return false;
        }
        let len = item.charged_bytes();
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.request_close(close::SLOW_CONSUMER, "send queue overflow");
            return false;
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(err) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if matches!(err, mpsc::error::TrySendError::Full(_)) {
                    self.request_close(close::SLOW_CONSUMER, "send queue overflow");
                }
                false
            }
        }
    }

    /// Called by the connection task for each item it takes from the queue.
    pub fn taken(&self, item: &Outbound) {
        self.queued_bytes
            .fetch_sub(item.charged_bytes(), Ordering::AcqRel);
    }

    /// Asks the connection to close with `code`; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str) {
        if self.close_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut slot) = self.close_reason.lock() {
            *slot = Some((code, reason));
        }
        self.close_signal.notify_one();
    }

    /// Waits until a close is requested and returns its code and reason.
    pub async fn close_requested(&self) -> (u16, &'static str) {
        loop {
            if let Some(found) = self.close_reason.lock().ok().and_then(|slot| *slot) {
                return found;
            }
            self.close_signal.notified().await;
        }
    }
}

/// One room's local members and whether this node is subscribed to it.
#[derive(Default)]
struct RoomSlot {
    members: HashMap<String, Arc<ConnHandle>>,
    subscribed: Arc<tokio::sync::Mutex<bool>>,
}

/// Rooms and connections of this node.
#[derive(Default)]
pub struct Registry {
    rooms: Mutex<HashMap<String, RoomSlot>>,
    conns: Mutex<HashMap<String, Arc<ConnHandle>>>,
}

impl Registry {
    /// Adds a live connection (target of direct messages and drain).
    pub fn add_conn(&self, handle: &Arc<ConnHandle>) {
        lock(&self.conns).insert(handle.conn.clone(), Arc::clone(handle));
    }

    /// Removes a connection.
    pub fn remove_conn(&self, conn: &str) {
        lock(&self.conns).remove(conn);
    }

    /// Every live connection.
    pub fn conns(&self) -> Vec<Arc<ConnHandle>> {
        lock(&self.conns).values().cloned().collect()
    }

    /// Number of live connections.
    pub fn conn_count(&self) -> usize {
        lock(&self.conns).len()
    }

    fn conn(&self, conn: &str) -> Option<Arc<ConnHandle>> {
        lock(&self.conns).get(conn).cloned()
    }

    fn members(&self, room: &str) -> Vec<Arc<ConnHandle>> {
        lock(&self.rooms)
            .get(room)
            .map(|slot| slot.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes `handle` a member of `room` (it receives live events at once) and subscribes
    /// the node to the room if it was not yet.
    ///
    /// # Errors
    /// The subscription failed; the member is removed again.
    pub async fn join(
        &self,
        node: &Node,
        room: &str,
        handle: &Arc<ConnHandle>,
    ) -> Result<(), ringcast_shared::cluster::ClusterError> {
        let subscribed = {
            let mut rooms = lock(&self.rooms);
            let slot = rooms.entry(room.to_owned()).or_default();
            slot.members.insert(handle.conn.clone(), Arc::clone(handle));
            Arc::clone(&slot.subscribed)
        };
        let mut subscribed = subscribed.lock().await;
        if *subscribed {
            return Ok(());
        }
        match node.cluster.subscribe_room(room).await {
            Ok(_) => {
                *subscribed = true;
                node.metrics.rooms.inc();
                Ok(())
            }
            Err(err) => {
                drop(subscribed);
                self.leave(node, room, &handle.conn).await;
                Err(err)
            }
        }
    }

    /// Removes `conn` from `room`, unsubscribing the node when it was the last member.
    pub async fn leave(&self, node: &Node, room: &str, conn: &str) {
        let subscribed = {
            let mut rooms = lock(&self.rooms);
            let Some(slot) = rooms.get_mut(room) else {
                return;
            };
            slot.members.remove(conn);
            if !slot.members.is_empty() {
                return;
            }
            Arc::clone(&slot.subscribed)
        };

        // Holding the room's subscription lock, re-check that nobody joined meanwhile; a
        // joiner that arrives later waits for this lock and subscribes again.
        let mut guard = subscribed.lock().await;
        if !self.is_empty(room) {
            return;
        }
        if *guard {
            if let Err(err) = node.cluster.unsubscribe_room(room).await {
                node.metrics.cluster_errors.inc();
                tracing::warn!(room, error = %err, "unsubscribe failed");
            }
            *guard = false;
            node.metrics.rooms.dec();
        }
        let mut rooms = lock(&self.rooms);
        if rooms.get(room).is_some_and(|slot| {
            slot.members.is_empty() && Arc::ptr_eq(&slot.subscribed, &subscribed)
        }) {
            rooms.remove(room);
        }
    }

    fn is_empty(&self, room: &str) -> bool {
        lock(&self.rooms)
            .get(room)
            .is_none_or(|slot| slot.members.is_empty())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serialises a server frame. Our frames always serialise; should one not, the client gets
/// an internal-error frame rather than the node failing.
pub fn encode(frame: &ServerFrame) -> Utf8Bytes {
    match serde_json::to_string(frame) {
        Ok(text) => Utf8Bytes::from(text),
        Err(err) => {
            tracing::error!(error = %err, "frame serialisation failed");
            Utf8Bytes::from_static(r#"{"type":"error","code":501,"reason":"encoding failed"}"#)
        }
    }
}

/// Consumes the node's cluster events until the stream ends.
pub async fn run_dispatcher(node: Arc<Node>, mut events: ClusterEvents) {
    while let Some(event) = events.recv().await {
        dispatch(&node, event);
    }
    tracing::info!("cluster event stream ended");
}

fn dispatch(node: &Node, event: ClusterEvent) {
    match event {
        ClusterEvent::Publication(publication) => fan_out(node, &publication),
        ClusterEvent::Presence {
            room,
            change,
            member,
        } => {
            let text = encode(&ServerFrame::PresenceEvent {
                room: room.clone(),
                change,
                member,
            });
            for handle in node.registry.members(&room) {
                handle.offer(Outbound::Frame(text.clone()));
            }
        }
        ClusterEvent::Direct {
            conn, from, data, ..
        } => {
            if let Some(handle) = node.registry.conn(&conn) {
                handle.offer(Outbound::Frame(encode(&ServerFrame::Direct { from, data })));
            }
        }
        ClusterEvent::Gap { room, position } => {
            tracing::warn!(room, epoch = %position.epoch, offset = position.offset, "live gap");
            for handle in node.registry.members(&room) {
                handle.offer(Outbound::Gap {
                    room: room.clone(),
                    position: position.clone(),
                });
            }
        }
        ClusterEvent::Connectivity(up) => {
            tracing::warn!(available = up, "cluster connectivity changed");
        }
    }
}

fn fan_out(node: &Node, publication: &Publication) {
    let members = node.registry.members(&publication.room);
    if members.is_empty() {
        return;
    }
    let delivery = Arc::new(Delivery {
        room: publication.room.clone(),
        offset: publication.offset,
        epoch: publication.epoch.clone(),
        text: encode(&message_frame(publication)),
    });
    for handle in members {
        handle.offer(Outbound::Publication(Arc::clone(&delivery)));
    }
}

/// The `message` frame of a publication.
pub fn message_frame(publication: &Publication) -> ServerFrame {
    ServerFrame::Message {
        room: publication.room.clone(),
        offset: publication.offset,
        epoch: publication.epoch.clone(),
        from: publication.from.clone(),
        data: publication.data.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Outbound {
        Outbound::Frame(Utf8Bytes::from("x".repeat(len)))
    }

    #[test]
    fn queue_overflow_by_count_requests_slow_consumer_close() {
        let (handle, _rx) = ConnHandle::new("c".into(), 2, 1 << 20);
        assert!(handle.offer(frame(1)));
        assert!(handle.offer(frame(1)));
        assert!(!handle.offer(frame(1)));
        let reason = *handle.close_reason.lock().unwrap();
        assert_eq!(reason.map(|r| r.0), Some(close::SLOW_CONSUMER));
        assert!(
            !handle.offer(frame(1)),
            "nothing is queued after a close request"
        );
    }

    #[test]
    fn queue_overflow_by_bytes_requests_close_and_taking_frees_bytes() {
        let (handle, mut rx) = ConnHandle::new("c".into(), 100, 10);
        assert!(handle.offer(frame(6)));
        let item = rx.try_recv().unwrap();
        handle.taken(&item);
        assert!(handle.offer(frame(6)));
        assert!(!handle.offer(frame(6)));
        assert!(handle.close_requested.load(Ordering::Relaxed));
    }
}
