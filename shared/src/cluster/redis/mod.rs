//! The Redis Cluster implementation of [`ClusterState`].
//!
//! Built on one redis-rs cluster connection speaking RESP3: commands and scripts are
//! routed by slot (MOVED/ASK, topology refresh and reconnects are redis-rs's job), and
//! sharded pub/sub messages arrive as push messages that the [`fanout`] pump turns into
//! ordered [`ClusterEvent`]s. Each concern has its file: [`keys`] (layout and hash tags),
//! [`history`] (publish, offsets, epochs), [`fanout`], [`presence`], [`sessions`] and
//! [`registry`] (connections, direct messages, nodes).
//!
//! A background task refreshes everything this instance owns every third of
//! `presence_ttl` and doubles as the health probe: while Redis cannot be reached it
//! retries with backoff, [`ClusterState::is_available`] is false and a
//! [`ClusterEvent::Connectivity`] reports each change. Dropping the instance aborts its
//! tasks without cleanup, exactly like a crash as far as other nodes can tell.

mod error;
mod fanout;
mod history;
pub mod keys;
mod presence;
mod registry;
mod sessions;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, RedisResult};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use self::error::classify;
use self::fanout::{Control, Pump};
use self::keys::Keys;
use super::{
    ClusterError, ClusterEvent, ClusterEvents, ClusterResult, ClusterState, ConnectionRef,
    EVENT_CHANNEL_CAPACITY, NodeInfo, Publication, Replay, RoomPosition, SessionRecord,
};
use crate::config::ClusterConfig;
use crate::protocol::{ClientInfo, Offset, PresenceMember};

/// Refresh tasks run this many refreshes at once.
const REFRESH_CONCURRENCY: usize = 16;

/// First retry delay after a failed refresh; doubles up to the refresh period.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// Failed refresh rounds in a row (about 6 s with the backoff above) after which the
/// cluster connection is replaced by a new one, and again after as many more.
const REPLACE_AFTER_FAILED_ROUNDS: u32 = 5;

/// What this instance must keep refreshing.
#[derive(Default)]
pub(crate) struct Owned {
    /// Room → connection id → member JSON.
    pub presence: HashMap<String, HashMap<String, String>>,
    /// User → connection ids on this node.
    pub connections: HashMap<String, HashSet<String>>,
}

/// State shared by the API side and the background tasks.
pub(crate) struct Shared {
    /// The cluster connection; replaced when it stays unusable (see `replace_connection`).
    conn: Mutex<ClusterConnection>,
    /// Builds replacement connections with the same settings and push channel.
    client: redis::cluster::ClusterClient,
    pub keys: Keys,
    pub config: ClusterConfig,
    pub node: NodeInfo,
    events: mpsc::Sender<ClusterEvent>,
    available: AtomicBool,
    owned: Mutex<Owned>,
    rooms: Mutex<HashSet<String>>,
    pub control: mpsc::UnboundedSender<Control>,
    probe: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// A handle on the current cluster connection (cheap: connections are shared handles).
    pub fn conn(&self) -> ClusterConnection {
        lock(&self.conn).clone()
    }

    /// Builds a new cluster connection and puts it in place of the current one.
    ///
    /// redis-rs normally repairs its connections itself, but after a master failover one
    /// node's connection was seen timing out on every request for good while the other
    /// nodes recovered at once. A fresh connection discovers the topology anew; the
    /// subscriptions are sent again once Redis answers (`resubscribe_all`).
    async fn replace_connection(&self) {
        let fresh = tokio::time::timeout(
            self.config.request_timeout,
            self.client.get_async_connection(),
        )
        .await;
        match fresh {
            Ok(Ok(conn)) => {
                *lock(&self.conn) = conn;
                warn!(node = %self.node.id, "replaced the Redis Cluster connection after a long outage");
            }
            Ok(Err(err)) => {
                debug!(node = %self.node.id, %err, "no new Redis Cluster connection yet")
            }
            Err(_) => {
                debug!(node = %self.node.id, "no new Redis Cluster connection yet: timed out")
            }
        }
    }

    pub fn owned(&self) -> MutexGuard<'_, Owned> {
        lock(&self.owned)
    }

    /// Runs one Redis request, classifying its error and recording reachability.
    pub async fn call<T>(
        &self,
        key: &str,
        request: impl Future<Output = RedisResult<T>>,
    ) -> ClusterResult<T> {
        let result = request.await.map_err(|err| classify(&err, key));
        if let Err(ClusterError::Unavailable(_) | ClusterError::Timeout(_)) = &result {
            // Only the refresh task declares Redis reachable again, after a full round,
            // so mixed answers during a failover do not make availability flap.
            let _ = self.set_available(false);
            self.probe.notify_one();
        }
        result
    }

    /// Records reachability; returns whether it changed.
    fn set_available(&self, up: bool) -> bool {
        if self.available.swap(up, Ordering::Relaxed) == up {
            return false;
        }
        if up {
            info!(node = %self.node.id, "Redis Cluster reachable again");
        } else {
            warn!(node = %self.node.id, "Redis Cluster unreachable; retrying");
        }
        if self
            .events
            .try_send(ClusterEvent::Connectivity(up))
            .is_err()
        {
            warn!(node = %self.node.id, "event channel full; connectivity change not queued");
        }
        true
    }

    /// Subscribes again to every channel this node needs, then has every room checked
    /// against history.
    ///
    /// After a master failover, redis-rs does not always move a sharded subscription to
    /// the promoted replica (seen with redis-rs 1.8: live messages of the failed shard
    /// stopped until the next periodic check). Subscribing again routes each channel by
    /// the current slot map; `SSUBSCRIBE` of a channel already subscribed is harmless.
    async fn resubscribe_all(&self) {
        let rooms: Vec<String> = lock(&self.rooms).iter().cloned().collect();
        let mut channels = vec![self.keys.direct_channel(&self.node.id)];
        channels.extend(rooms.iter().map(|room| self.keys.room(room).channel));
        let mut conn = self.conn();
        let mut failed = 0_usize;
        for channel in &channels {
            if conn.ssubscribe(channel).await.is_err() {
                failed += 1;
            }
        }
        info!(node = %self.node.id, channels = channels.len(), failed, "subscribed again after an outage");
        let _ = self.control.send(Control::CheckAll);
    }

    /// One refresh round: heartbeat, owned entries, sweeps of subscribed rooms.
    async fn refresh(&self) -> ClusterResult<()> {
        registry::heartbeat(self).await?;
        let (presence, connections) = {
            let owned = self.owned();
            let presence: Vec<(String, Vec<(String, String)>)> = owned
                .presence
                .iter()
                .map(|(room, m)| (room.clone(), m.clone().into_iter().collect()))
                .collect();
            let connections: Vec<(String, Vec<String>)> = owned
                .connections
                .iter()
                .map(|(user, c)| (user.clone(), c.iter().cloned().collect()))
                .collect();
            (presence, connections)
        };
        let rooms: Vec<String> = lock(&self.rooms).iter().cloned().collect();

        let presence = presence
            .into_iter()
            .map(|(room, members)| async move { presence::refresh(self, &room, members).await });
        run_all(presence).await?;
        let users = connections
            .into_iter()
            .map(|(user, conns)| async move { self.refresh_connections(&user, conns).await });
        run_all(users).await?;
        let sweeps = rooms
            .into_iter()
            .map(|room| async move { presence::sweep(self, &room).await });
        run_all(sweeps).await
    }
}

impl Shared {
    /// Extends this node's connections of `user`; one unregistered while the refresh ran
    /// (and re-added by it) is removed again.
    async fn refresh_connections(&self, user: &str, conns: Vec<String>) -> ClusterResult<()> {
        registry::register(self, user, &conns).await?;
        let gone: Vec<String> = {
            let owned = self.owned();
            let still = |c: &String| owned.connections.get(user).is_some_and(|s| s.contains(c));
            conns.into_iter().filter(|c| !still(c)).collect()
        };
        for conn in gone {
            registry::unregister(self, user, &conn).await?;
        }
        Ok(())
    }
}

/// Runs `tasks` a few at a time; the first error wins.
async fn run_all<F>(tasks: impl Iterator<Item = F>) -> ClusterResult<()>
where
    F: Future<Output = ClusterResult<()>>,
{
    let mut results = futures_util::stream::iter(tasks).buffer_unordered(REFRESH_CONCURRENCY);
    let mut first_error = None;
    while let Some(result) = results.next().await {
        if let Err(err) = result {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Refreshes until aborted; retries sooner, with backoff, while refreshes fail. A failed
/// request elsewhere wakes it early. Its outcome is what `is_available` reports.
async fn refresh_loop(shared: Arc<Shared>) {
    let period = shared.config.presence_ttl / 3;
    let mut failures: u32 = 0;
    loop {
        let delay = match failures {
            0 => period,
            n => FIRST_RETRY.saturating_mul(1 << (n - 1).min(16)).min(period),
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.probe.notified(), if failures == 0 => {}
        }
        match shared.refresh().await {
            Ok(()) => {
                failures = 0;
                if shared.set_available(true) {
                    shared.resubscribe_all().await;
                }
            }
            Err(err) => {
                if failures == 0 {
                    warn!(node = %shared.node.id, %err, "refresh failed; retrying with backoff");
                }
                failures = failures.saturating_add(1);
                let _ = shared.set_available(false);
                if failures.is_multiple_of(REPLACE_AFTER_FAILED_ROUNDS) {
                    shared.replace_connection().await;
                }
            }
        }
    }
}

/// One node's handle on the Redis Cluster state.
pub struct RedisState {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// Connects to the cluster, registers `node` and starts the background tasks.
pub(crate) async fn connect(
    config: &ClusterConfig,
    node: NodeInfo,
) -> ClusterResult<(Arc<dyn ClusterState>, ClusterEvents)> {
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let response_timeout = config
        .request_timeout
        .max(config.replica_ack_timeout + Duration::from_millis(500));
    let client = ClusterClientBuilder::new(config.nodes.clone())
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(push_tx)
        .connection_timeout(config.request_timeout)
        .response_timeout(response_timeout)
        .build()
        .map_err(|err| ClusterError::Config(err.to_string()))?;
    let conn = tokio::time::timeout(config.request_timeout, client.get_async_connection())
        .await
        .map_err(|_| ClusterError::Unavailable("no seed node answered in time".to_owned()))?
        .map_err(|err| ClusterError::Unavailable(format!("connecting: {err}")))?;

    let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        client,
        keys: Keys::new(&config.key_prefix),
        config: config.clone(),
        node,
        events: events_tx,
        available: AtomicBool::new(true),
        owned: Mutex::new(Owned::default()),
        rooms: Mutex::new(HashSet::new()),
        control: control_tx,
        probe: Notify::new(),
    });
    let direct = shared.keys.direct_channel(&shared.node.id);
    let mut conn = shared.conn();
    shared.call(&direct, conn.ssubscribe(&direct)).await?;
    registry::heartbeat(&shared).await?;
    info!(node = %shared.node.id, seeds = ?config.nodes, "connected to the Redis Cluster");

    let pump = tokio::spawn(Pump::new(shared.clone(), push_rx, control_rx).run());
    let refresher = tokio::spawn(refresh_loop(shared.clone()));
    let state = RedisState {
        shared,
        tasks: Mutex::new(vec![pump.abort_handle(), refresher.abort_handle()]),
    };
    Ok((Arc::new(state), events_rx))
}

impl RedisState {
    fn stop_tasks(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }

    fn control(&self, control: Control) {
        // The pump lives as long as this handle; a send can only fail after shutdown.
        let _ = self.shared.control.send(control);
    }
}

impl Drop for RedisState {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

#[async_trait]
impl ClusterState for RedisState {
    async fn subscribe_room(&self, room: &str) -> ClusterResult<RoomPosition> {
        let channel = self.shared.keys.room(room).channel;
        self.control(Control::Want(room.to_owned()));
        let mut conn = self.shared.conn();
        let subscribed = self.shared.call(&channel, conn.ssubscribe(&channel)).await;
        let position = match subscribed {
            Ok(()) => history::position(&self.shared, room).await,
            Err(err) => {
                self.control(Control::Forget(room.to_owned()));
                return Err(err);
            }
        };
        match position {
            Ok(position) => {
                lock(&self.shared.rooms).insert(room.to_owned());
                self.control(Control::Activate(room.to_owned(), position.clone()));
                Ok(position)
            }
            Err(err) => {
                self.control(Control::Forget(room.to_owned()));
                let _ = conn.sunsubscribe(&channel).await;
                Err(err)
            }
        }
    }

    async fn unsubscribe_room(&self, room: &str) -> ClusterResult<()> {
        let channel = self.shared.keys.room(room).channel;
        lock(&self.shared.rooms).remove(room);
        self.control(Control::Forget(room.to_owned()));
        let mut conn = self.shared.conn();
        self.shared
            .call(&channel, conn.sunsubscribe(&channel))
            .await
    }

    async fn publish(
        &self,
        room: &str,
        from: ClientInfo,
        data: Value,
    ) -> ClusterResult<Publication> {
        history::publish(&self.shared, room, from, data).await
    }

    async fn position(&self, room: &str) -> ClusterResult<RoomPosition> {
        history::position(&self.shared, room).await
    }

    async fn history(&self, room: &str, after: Offset, epoch: &str) -> ClusterResult<Replay> {
        history::history(&self.shared, room, after, epoch).await
    }

    async fn presence_join(&self, room: &str, member: PresenceMember) -> ClusterResult<()> {
        presence::join(&self.shared, room, &member).await
    }

    async fn presence_leave(&self, room: &str, member: &PresenceMember) -> ClusterResult<()> {
        presence::leave(&self.shared, room, &member.conn).await
    }

    async fn presence(&self, room: &str) -> ClusterResult<Vec<PresenceMember>> {
        presence::list(&self.shared, room).await
    }

    async fn save_session(&self, session: &SessionRecord) -> ClusterResult<()> {
        sessions::save(&self.shared, session).await
    }

    async fn load_session(&self, id: &str) -> ClusterResult<Option<SessionRecord>> {
        sessions::load(&self.shared, id).await
    }

    async fn register_connection(&self, user: &str, conn: &str) -> ClusterResult<()> {
        registry::register(&self.shared, user, &[conn.to_owned()]).await?;
        let mut owned = self.shared.owned();
        owned
            .connections
            .entry(user.to_owned())
            .or_default()
            .insert(conn.to_owned());
        Ok(())
    }

    async fn unregister_connection(&self, user: &str, conn: &str) -> ClusterResult<()> {
        {
            let mut owned = self.shared.owned();
            if let Some(conns) = owned.connections.get_mut(user) {
                conns.remove(conn);
                if conns.is_empty() {
                    owned.connections.remove(user);
                }
            }
        }
        registry::unregister(&self.shared, user, conn).await
    }

    async fn connections(&self, user: &str) -> ClusterResult<Vec<ConnectionRef>> {
        registry::connections(&self.shared, user).await
    }

    async fn send_direct(&self, user: &str, from: ClientInfo, data: Value) -> ClusterResult<u64> {
        registry::send_direct(&self.shared, user, from, data).await
    }

    async fn nodes(&self) -> ClusterResult<Vec<NodeInfo>> {
        registry::nodes(&self.shared).await
    }

    fn is_available(&self) -> bool {
        self.shared.available.load(Ordering::Relaxed)
    }

    async fn shutdown(&self) -> ClusterResult<()> {
        self.stop_tasks();
        let owned = std::mem::take(&mut *self.shared.owned());
        for (room, members) in owned.presence {
            for conn in members.into_keys() {
                presence::leave(&self.shared, &room, &conn).await?;
            }
        }
        let connections = owned
            .connections
            .into_iter()
            .flat_map(|(user, conns)| conns.into_iter().map(move |c| (user.clone(), c)))
            .collect();
        registry::leave(&self.shared, connections).await?;
        info!(node = %self.shared.node.id, "left the Redis Cluster state");
        Ok(())
    }
}
