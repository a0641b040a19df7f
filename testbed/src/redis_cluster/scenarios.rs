//! Behavioural scenarios every [`ClusterState`] implementation must pass, written once.
//!
//! A [`Backend`] opens instances (one per simulated node) that share one state: a
//! [`MemoryBackend`] shares a [`MemoryHub`], a [`RedisBackend`] a Redis Cluster. Each
//! scenario asks its backend for a fresh configuration (a unique key prefix on Redis), so
//! scenarios can run concurrently on one cluster. [`run_all`] runs every scenario and
//! names the ones that failed; [`cluster_scenario_tests!`](crate::cluster_scenario_tests)
//! turns each into its own `#[tokio::test]`.

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::future::BoxFuture;
use ringcast_shared::cluster::memory::MemoryHub;
use ringcast_shared::cluster::{
    ClusterEvent, ClusterEvents, ClusterState, ConnectionRef, NodeInfo, Replay, RoomPosition,
    SessionRecord, SessionRoom, unix_ms,
};
use ringcast_shared::config::ClusterConfig;
use ringcast_shared::protocol::{ClientInfo, PresenceChange, PresenceMember};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a scenario waits for an event that must come.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(5);

/// A node's instance of the shared state, as a scenario holds it.
pub struct Opened {
    /// The instance.
    pub state: Arc<dyn ClusterState>,
    /// Its events.
    pub events: ClusterEvents,
}

/// Opens instances that share one state.
pub trait Backend: Send + Sync {
    /// A configuration for one scenario (on Redis: seed URLs and a unique key prefix).
    fn config(&self) -> ClusterConfig;

    /// Opens the instance of node `node` with `config`.
    fn open<'a>(
        &'a self,
        config: &'a ClusterConfig,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Opened>>;
}

/// Instances sharing one in-process [`MemoryHub`].
#[derive(Default)]
pub struct MemoryBackend {
    hub: MemoryHub,
}

impl Backend for MemoryBackend {
    fn config(&self) -> ClusterConfig {
        ClusterConfig::default()
    }

    fn open<'a>(
        &'a self,
        config: &'a ClusterConfig,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Opened>> {
        Box::pin(async move {
            let (state, events) = self.hub.connect(config, node_info(node));
            Ok(Opened { state, events })
        })
    }
}

/// Instances connected to one Redis Cluster through [`ringcast_shared::cluster::connect`].
pub struct RedisBackend {
    /// Seed URLs of the cluster.
    pub seeds: Vec<String>,
}

impl Backend for RedisBackend {
    fn config(&self) -> ClusterConfig {
        ClusterConfig {
            nodes: self.seeds.clone(),
            key_prefix: super::unique_prefix(),
            ..ClusterConfig::default()
        }
    }

    fn open<'a>(
        &'a self,
        config: &'a ClusterConfig,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Opened>> {
        Box::pin(async move {
            let (state, events) = ringcast_shared::cluster::connect(config, node_info(node))
                .await
                .with_context(|| format!("connecting node {node}"))?;
            Ok(Opened { state, events })
        })
    }
}

/// A node registration for `id`.
pub fn node_info(id: &str) -> NodeInfo {
    let now = unix_ms();
    NodeInfo {
        id: id.to_owned(),
        address: format!("127.0.0.1:1{}", id.len()),
        started_at_ms: now,
        heartbeat_ms: now,
    }
}

/// A publisher identity.
pub fn client(user: &str) -> ClientInfo {
    ClientInfo {
        user: user.to_owned(),
        conn: format!("{user}-conn"),
    }
}

/// A presence member on `node`.
pub fn member(user: &str, conn: &str, node: &str) -> PresenceMember {
    PresenceMember {
        user: user.to_owned(),
        conn: conn.to_owned(),
        node: node.to_owned(),
        joined_at_ms: unix_ms(),
    }
}

/// Waits for the first event that `pick` accepts, skipping others.
pub async fn wait_for<T>(
    events: &mut ClusterEvents,
    what: &str,
    mut pick: impl FnMut(&ClusterEvent) -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| anyhow!("timed out waiting for {what}"))?
            .ok_or_else(|| anyhow!("event stream closed while waiting for {what}"))?;
        if let Some(found) = pick(&event) {
            return Ok(found);
        }
    }
}

/// Waits for the next publication of `room` and returns its offset and data.
pub async fn next_publication(
    events: &mut ClusterEvents,
    room: &str,
) -> Result<(u64, serde_json::Value)> {
    wait_for(events, "a publication", |event| match event {
        ClusterEvent::Publication(p) if p.room == room => Some((p.offset, p.data.clone())),
        _ => None,
    })
    .await
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await? {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("condition still false after {limit:?}")
}

/// Publishes `count` messages `{"n": i}` (i from 1) to `room`.
pub async fn publish_n(state: &dyn ClusterState, room: &str, count: u64) -> Result<RoomPosition> {
    let mut last = None;
    for n in 1..=count {
        let publication = state
            .publish(room, client("pub"), json!({ "n": n }))
            .await?;
        last = Some(RoomPosition {
            epoch: publication.epoch,
            offset: publication.offset,
        });
    }
    last.ok_or_else(|| anyhow!("published nothing"))
}

/// Offsets assigned in order, one epoch, delivered in order to a subscriber.
pub async fn publish_offsets_and_epoch(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let start = a.state.subscribe_room("lobby").await?;
    ensure!(start.offset == 0, "a new room starts at 0, got {start:?}");

    for n in 1..=3u64 {
        let p = a.state.publish("lobby", client("u1"), json!(n)).await?;
        ensure!(
            p.offset == n && p.epoch == start.epoch,
            "publish {n} gave {p:?}"
        );
    }
    let position = a.state.position("lobby").await?;
    ensure!(
        position
            == RoomPosition {
                epoch: start.epoch.clone(),
                offset: 3
            }
    );

    for n in 1..=3u64 {
        let (offset, data) = next_publication(&mut a.events, "lobby").await?;
        ensure!(
            offset == n && data == json!(n),
            "delivery {n} was {offset}: {data}"
        );
    }
    Ok(())
}

/// Two instances see each other's messages, in the same order.
pub async fn two_instances_exchange(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let mut b = backend.open(&config, "node-b").await?;
    a.state.subscribe_room("chat").await?;
    b.state.subscribe_room("chat").await?;

    a.state
        .publish("chat", client("alice"), json!("from a"))
        .await?;
    b.state
        .publish("chat", client("bob"), json!("from b"))
        .await?;

    for (name, opened) in [("a", &mut a), ("b", &mut b)] {
        let first = next_publication(&mut opened.events, "chat").await?;
        let second = next_publication(&mut opened.events, "chat").await?;
        ensure!(
            first == (1, json!("from a")) && second == (2, json!("from b")),
            "node {name} saw {first:?} then {second:?}"
        );
    }
    Ok(())
}

/// History after a gap holds exactly the missed messages.
pub async fn history_after_gap(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let a = backend.open(&config, "node-a").await?;
    let last = publish_n(a.state.as_ref(), "news", 5).await?;

    let Replay::Complete(missed) = a.state.history("news", 2, &last.epoch).await? else {
        bail!("history after 2 should be recoverable");
    };
    let offsets: Vec<u64> = missed.iter().map(|p| p.offset).collect();
    let values: Vec<_> = missed.iter().map(|p| p.data.clone()).collect();
    ensure!(offsets == [3, 4, 5], "offsets {offsets:?}");
    ensure!(values == [json!({"n":3}), json!({"n":4}), json!({"n":5})]);

    let up_to_date = a.state.history("news", 5, &last.epoch).await?;
    ensure!(up_to_date == Replay::Complete(Vec::new()), "{up_to_date:?}");
    let Replay::Complete(all) = a.state.history("news", 0, &last.epoch).await? else {
        bail!("history from 0 should be recoverable");
    };
    ensure!(all.len() == 5 && all[0].offset == 1, "full history {all:?}");
    Ok(())
}

/// A gap reaching beyond the capped history is not recoverable; one inside it is.
pub async fn trimmed_history_not_recoverable(backend: &dyn Backend) -> Result<()> {
    let config = ClusterConfig {
        stream_length: 3,
        ..backend.config()
    };
    let a = backend.open(&config, "node-a").await?;
    let last = publish_n(a.state.as_ref(), "capped", 5).await?;

    let replay = a.state.history("capped", 1, &last.epoch).await?;
    ensure!(replay == Replay::NotRecoverable(last.clone()), "{replay:?}");
    let Replay::Complete(kept) = a.state.history("capped", 2, &last.epoch).await? else {
        bail!("the last 3 messages are kept");
    };
    let offsets: Vec<u64> = kept.iter().map(|p| p.offset).collect();
    ensure!(offsets == [3, 4, 5], "{offsets:?}");
    Ok(())
}

/// An unknown epoch (or an offset from the future) is not recoverable.
pub async fn epoch_mismatch_not_recoverable(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let a = backend.open(&config, "node-a").await?;
    let last = publish_n(a.state.as_ref(), "epochs", 2).await?;

    let replay = a.state.history("epochs", 0, "not-this-epoch").await?;
    ensure!(replay == Replay::NotRecoverable(last.clone()), "{replay:?}");
    let replay = a.state.history("epochs", 7, &last.epoch).await?;
    ensure!(replay == Replay::NotRecoverable(last), "{replay:?}");
    Ok(())
}

/// Joins and leaves are announced to subscribers and listed by every node.
pub async fn presence_events_and_listing(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let b = backend.open(&config, "node-b").await?;
    a.state.subscribe_room("hall").await?;
    let carol = member("carol", "c-1", "node-b");

    b.state.presence_join("hall", carol.clone()).await?;
    let joined = wait_presence(&mut a.events, "hall", PresenceChange::Join).await?;
    ensure!(joined == carol, "join event for {joined:?}");
    for opened in [&a, &b] {
        let listed = opened.state.presence("hall").await?;
        ensure!(listed == [carol.clone()], "listed {listed:?}");
    }

    b.state.presence_leave("hall", &carol).await?;
    let left = wait_presence(&mut a.events, "hall", PresenceChange::Leave).await?;
    ensure!(left == carol, "leave event for {left:?}");
    ensure!(a.state.presence("hall").await?.is_empty());
    Ok(())
}

async fn wait_presence(
    events: &mut ClusterEvents,
    room: &str,
    want: PresenceChange,
) -> Result<PresenceMember> {
    wait_for(events, "a presence event", |event| match event {
        ClusterEvent::Presence {
            room: r,
            change,
            member,
        } if r == room && *change == want => Some(member.clone()),
        _ => None,
    })
    .await
}

/// Entries of an instance dropped without shutdown vanish within `presence_ttl`.
pub async fn dropped_instance_expires(backend: &dyn Backend) -> Result<()> {
    let config = ClusterConfig {
        presence_ttl: Duration::from_secs(1),
        ..backend.config()
    };
    let mut a = backend.open(&config, "node-a").await?;
    let b = backend.open(&config, "node-b").await?;
    a.state.subscribe_room("ghosts").await?;
    let dave = member("dave", "d-1", "node-b");
    b.state.presence_join("ghosts", dave.clone()).await?;
    b.state.register_connection("dave", "d-1").await?;
    ensure!(a.state.presence("ghosts").await?.len() == 1);
    ensure!(a.state.nodes().await?.len() == 2);

    // Let the owner refresh a few times: the entries outlive the TTL while it runs.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    ensure!(
        a.state.presence("ghosts").await? == [dave.clone()],
        "refreshed entry"
    );
    drop(b);

    let bound = config.presence_ttl + Duration::from_millis(700);
    let state = a.state.clone();
    eventually(bound, || {
        let state = state.clone();
        async move {
            let gone = state.presence("ghosts").await?.is_empty()
                && state.connections("dave").await?.is_empty()
                && state.nodes().await?.iter().all(|n| n.id != "node-b");
            Ok(gone)
        }
    })
    .await
    .context("entries of the dropped instance are still listed")?;
    let left = wait_presence(&mut a.events, "ghosts", PresenceChange::Leave).await?;
    ensure!(left.conn == dave.conn, "leave announced for {left:?}");
    Ok(())
}

/// Sessions load within their TTL, and not after.
pub async fn sessions_expire(backend: &dyn Backend) -> Result<()> {
    let config = ClusterConfig {
        session_ttl: Duration::from_secs(1),
        ..backend.config()
    };
    let a = backend.open(&config, "node-a").await?;
    let b = backend.open(&config, "node-b").await?;
    let mut record = SessionRecord {
        id: "s-1".to_owned(),
        user: "erin".to_owned(),
        rooms: vec![SessionRoom {
            room: "r1".to_owned(),
            offset: 4,
            epoch: "e1".to_owned(),
        }],
    };
    a.state.save_session(&record).await?;
    ensure!(b.state.load_session("s-1").await?.as_ref() == Some(&record));
    ensure!(
        b.state.load_session("s-2").await?.is_none(),
        "unknown session"
    );

    record.rooms[0].offset = 9;
    a.state.save_session(&record).await?;
    ensure!(b.state.load_session("s-1").await?.as_ref() == Some(&record));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(
        b.state.load_session("s-1").await?.is_none(),
        "session outlived its TTL"
    );
    Ok(())
}

/// The connection registry finds a user everywhere; direct messages reach each connection.
pub async fn connection_registry_and_direct(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let mut b = backend.open(&config, "node-b").await?;
    a.state.register_connection("frank", "f-a").await?;
    b.state.register_connection("frank", "f-b").await?;
    let mut conns = a.state.connections("frank").await?;
    conns.sort_by(|x, y| x.conn.cmp(&y.conn));
    ensure!(
        conns == [conn_ref("node-a", "f-a"), conn_ref("node-b", "f-b")],
        "{conns:?}"
    );

    let sent = a
        .state
        .send_direct("frank", client("gina"), json!("hi"))
        .await?;
    ensure!(sent == 2, "sent to {sent} connections");
    for (opened, conn) in [(&mut a, "f-a"), (&mut b, "f-b")] {
        let got = wait_direct(&mut opened.events).await?;
        ensure!(got == (conn.to_owned(), json!("hi")), "got {got:?}");
    }

    b.state.unregister_connection("frank", "f-b").await?;
    ensure!(a.state.connections("frank").await? == [conn_ref("node-a", "f-a")]);
    let sent = b
        .state
        .send_direct("frank", client("gina"), json!(2))
        .await?;
    ensure!(sent == 1, "sent to {sent} connections after unregister");
    ensure!(wait_direct(&mut a.events).await? == ("f-a".to_owned(), json!(2)));
    ensure!(
        a.state
            .send_direct("nobody", client("gina"), json!(3))
            .await?
            == 0
    );
    Ok(())
}

fn conn_ref(node: &str, conn: &str) -> ConnectionRef {
    ConnectionRef {
        node: node.to_owned(),
        conn: conn.to_owned(),
    }
}

async fn wait_direct(events: &mut ClusterEvents) -> Result<(String, serde_json::Value)> {
    wait_for(events, "a direct message", |event| match event {
        ClusterEvent::Direct { conn, data, .. } => Some((conn.clone(), data.clone())),
        _ => None,
    })
    .await
}

/// Live nodes are listed; a shut-down node leaves the registry and its presence.
pub async fn node_registry_and_shutdown(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let b = backend.open(&config, "node-b").await?;
    let ids: Vec<String> = a.state.nodes().await?.into_iter().map(|n| n.id).collect();
    ensure!(ids == ["node-a", "node-b"], "{ids:?}");
    let listed = b.state.nodes().await?;
    ensure!(
        listed[1].address == node_info("node-b").address,
        "{listed:?}"
    );

    a.state.subscribe_room("exit").await?;
    b.state
        .presence_join("exit", member("hank", "h-1", "node-b"))
        .await?;
    b.state.shutdown().await?;
    let left = wait_presence(&mut a.events, "exit", PresenceChange::Leave).await?;
    ensure!(left.conn == "h-1");
    let ids: Vec<String> = a.state.nodes().await?.into_iter().map(|n| n.id).collect();
    ensure!(ids == ["node-a"], "{ids:?}");
    ensure!(a.state.presence("exit").await?.is_empty());
    Ok(())
}

/// After unsubscribing, a node gets nothing more from the room; resubscribing resumes.
pub async fn unsubscribe_stops_delivery(backend: &dyn Backend) -> Result<()> {
    let config = backend.config();
    let mut a = backend.open(&config, "node-a").await?;
    let b = backend.open(&config, "node-b").await?;
    a.state.subscribe_room("quiet").await?;
    a.state.unsubscribe_room("quiet").await?;
    b.state.publish("quiet", client("ivan"), json!(1)).await?;
    b.state.publish("other", client("ivan"), json!(2)).await?;

    let silent = tokio::time::timeout(Duration::from_millis(400), a.events.recv()).await;
    ensure!(silent.is_err(), "got {silent:?} without a subscription");

    let position = a.state.subscribe_room("quiet").await?;
    ensure!(position.offset == 1, "{position:?}");
    b.state.publish("quiet", client("ivan"), json!(3)).await?;
    ensure!(next_publication(&mut a.events, "quiet").await? == (2, json!(3)));
    Ok(())
}

/// A scenario, by name.
pub type Scenario = for<'a> fn(&'a dyn Backend) -> BoxFuture<'a, Result<()>>;

macro_rules! scenario_list {
    ($($name:ident),* $(,)?) => {
        /// Every scenario with its name.
        pub const ALL: &[(&str, Scenario)] = &[
            $((stringify!($name), |backend| Box::pin($name(backend))),)*
        ];
    };
}

scenario_list!(
    publish_offsets_and_epoch,
    two_instances_exchange,
    history_after_gap,
    trimmed_history_not_recoverable,
    epoch_mismatch_not_recoverable,
    presence_events_and_listing,
    dropped_instance_expires,
    sessions_expire,
    connection_registry_and_direct,
    node_registry_and_shutdown,
    unsubscribe_stops_delivery,
);

/// Runs every scenario concurrently; the error names each failed one.
///
/// # Errors
/// One line per failed scenario.
pub async fn run_all(backend: &dyn Backend) -> Result<()> {
    let runs = ALL.iter().map(|(name, scenario)| async move {
        scenario(backend)
            .await
            .map_err(|err| format!("{name}: {err:#}"))
    });
    let failures: Vec<String> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    ensure!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Generates one `#[tokio::test]` per scenario, each with a backend built by `$backend`.
#[macro_export]
macro_rules! cluster_scenario_tests {
    ($backend:expr) => {
        $crate::cluster_scenario_tests!(@each $backend;
            publish_offsets_and_epoch,
            two_instances_exchange,
            history_after_gap,
            trimmed_history_not_recoverable,
            epoch_mismatch_not_recoverable,
            presence_events_and_listing,
            dropped_instance_expires,
            sessions_expire,
            connection_registry_and_direct,
            node_registry_and_shutdown,
            unsubscribe_stops_delivery
        );
    };
    (@each $backend:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $backend;
                $crate::redis_cluster::scenarios::$name(&backend)
                    .await
                    .expect(stringify!($name));
            }
        )*
    };
}
