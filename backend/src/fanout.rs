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
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Notify;

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

/// The registry's view of one connection: its send queue and a way to ask it to close.
///
/// The queue is a plain deque behind a mutex rather than a channel: it allocates nothing
/// until the first item arrives, so an idle connection costs only this struct, and taking
/// an item is one uncontended lock. The connection task waits on `wake`, which is notified
/// when the queue stops being empty and when a close is requested.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection id.
    pub conn: String,
    queue: Mutex<SendQueue>,
    max_items: usize,
    max_bytes: usize,
    close_reason: OnceLock<(u16, &'static str)>,
    wake: Notify,
}

/// Items waiting for the connection task and the bytes they are charged.
#[derive(Debug, Default)]
struct SendQueue {
    items: VecDeque<Outbound>,
    bytes: usize,
}

/// Capacity above which an emptied queue gives its memory back (a burst's worth of slots
/// would otherwise stay allocated on an idle connection).
const KEPT_QUEUE_SLOTS: usize = 16;

/// What the connection task is woken for.
pub enum Wakeup {
    /// An item to deliver.
    Item(Outbound),
    /// The connection is asked to close with this code and reason.
    Close(u16, &'static str),
}

impl ConnHandle {
    /// A handle whose queue holds `max_items` items and `max_bytes` bytes.
    pub fn new(conn: String, max_items: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            conn,
            queue: Mutex::default(),
            max_items,
            max_bytes,
            close_reason: OnceLock::new(),
            wake: Notify::new(),
        })
    }

    /// Queues `item` without waiting. A full queue asks the connection to close as a slow
    /// consumer; returns whether the item was queued.
    pub fn offer(&self, item: Outbound) -> bool {
        if self.close_reason.get().is_some() {
            return false;
        }
        let len = item.charged_bytes();
        let was_empty = {
            let mut queue = lock(&self.queue);
            if queue.items.len() >= self.max_items || queue.bytes + len > self.max_bytes {
                None
            } else {
                queue.bytes += len;
                queue.items.push_back(item);
                Some(queue.items.len() == 1)
            }
        };
        match was_empty {
            None => {
                self.request_close(close::SLOW_CONSUMER, "send queue overflow");
                false
            }
            Some(true) => {
                self.wake.notify_one();
                true
            }
            // The task has not yet seen the queue empty, so it will find this item.
            Some(false) => true,
        }
    }

    /// Takes the oldest queued item.
    pub fn take(&self) -> Option<Outbound> {
        let mut queue = lock(&self.queue);
        let item = queue.items.pop_front()?;
        queue.bytes -= item.charged_bytes();
        if queue.items.is_empty() && queue.items.capacity() > KEPT_QUEUE_SLOTS {
            queue.items = VecDeque::new();
        }
        Some(item)
    }

    /// Whether an item is waiting in the queue.
    pub fn has_queued(&self) -> bool {
        !lock(&self.queue).items.is_empty()
    }

    /// Drops everything queued (a slow consumer's backlog is freed before its close).
    pub fn discard_queued(&self) {
        *lock(&self.queue) = SendQueue::default();
    }

    /// Asks the connection to close with `code`; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str) {
        if self.close_reason.set((code, reason)).is_ok() {
            self.wake.notify_one();
        }
    }

    /// The close requested so far, if any.
    pub fn close_reason(&self) -> Option<(u16, &'static str)> {
        self.close_reason.get().copied()
    }

    /// Waits until a close is requested and returns its code and reason.
    pub async fn close_requested(&self) -> (u16, &'static str) {
        loop {
            if let Some(found) = self.close_reason() {
                return found;
            }
            self.wake.notified().await;
        }
    }

    /// Waits for the next thing to do: a requested close first, then the oldest item.
    ///
    /// Every waiter checks the state before it sleeps and `Notify` keeps a wakeup that
    /// found nobody waiting, so no item or close is missed between the check and the wait.
    pub async fn next_wakeup(&self) -> Wakeup {
        loop {
            if let Some((code, reason)) = self.close_reason() {
                return Wakeup::Close(code, reason);
            }
            if let Some(item) = self.take() {
                return Wakeup::Item(item);
            }
            self.wake.notified().await;
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
        let handle = ConnHandle::new("c".into(), 2, 1 << 20);
        assert!(handle.offer(frame(1)));
        assert!(handle.offer(frame(1)));
        assert!(!handle.offer(frame(1)));
        assert_eq!(
            handle.close_reason().map(|r| r.0),
            Some(close::SLOW_CONSUMER)
        );
        assert!(
            !handle.offer(frame(1)),
            "nothing is queued after a close request"
        );
    }

    #[test]
    fn queue_overflow_by_bytes_requests_close_and_taking_frees_bytes() {
        let handle = ConnHandle::new("c".into(), 100, 10);
        assert!(handle.offer(frame(6)));
        assert!(handle.take().is_some());
        assert!(handle.offer(frame(6)));
        assert!(!handle.offer(frame(6)));
        assert!(handle.close_reason().is_some());
    }

    #[test]
    fn items_come_out_in_order_and_a_close_comes_first() {
        let handle = ConnHandle::new("c".into(), 10, 1 << 20);
        for len in 1..=3 {
            assert!(handle.offer(frame(len)));
        }
        let len_of = |item: Option<Outbound>| match item {
            Some(Outbound::Frame(text)) => text.len(),
            _ => 0,
        };
        assert_eq!(len_of(handle.take()), 1);
        handle.request_close(close::SERVICE_RESTART, "drain");
        handle.request_close(close::SLOW_CONSUMER, "later requests lose");
        let first = futures_util::FutureExt::now_or_never(handle.next_wakeup());
        assert!(matches!(
            first,
            Some(Wakeup::Close(close::SERVICE_RESTART, "drain"))
        ));
        assert_eq!(len_of(handle.take()), 2, "queued items stay for a flush");
        assert_eq!(len_of(handle.take()), 3);
        assert!(handle.take().is_none());
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_an_item_offered_later() {
        let handle = ConnHandle::new("c".into(), 10, 1 << 20);
        let waiter = tokio::spawn({
            let handle = Arc::clone(&handle);
            async move { matches!(handle.next_wakeup().await, Wakeup::Item(_)) }
        });
        tokio::task::yield_now().await;
        assert!(handle.offer(frame(4)));
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(woken, Ok(Ok(true))));
    }
}
