//! A master dies while a room is being published to: publishing and delivery resume, and
//! with `replicated` acks no acknowledged message is lost.

use ringcast_shared::cluster::redis::keys::Keys;
use ringcast_shared::cluster::{ClusterEvent, ClusterState, Publication, Replay, connect};
use ringcast_shared::config::{AckMode, ClusterConfig};
use ringcast_testbed::redis_cluster::scenarios::{client, node_info};
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const ROOM: &str = "stream";
const RESUME_BOUND: Duration = Duration::from_secs(10);

/// A publish that succeeded, and when.
struct Acked {
    at: Instant,
    publication: Publication,
}

/// Publishes `{"n": i}` every 20 ms until `stop`; returns the acknowledged ones.
async fn publish_until(state: Arc<dyn ClusterState>, stop: Arc<AtomicBool>) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if let Ok(publication) = state.publish(ROOM, client("p"), json!({ "n": n })).await {
            acked.push(Acked {
                at: Instant::now(),
                publication,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

/// Collects delivered publications (with arrival time) and gaps.
async fn collect(
    mut events: mpsc::Receiver<ClusterEvent>,
    out: mpsc::UnboundedSender<(Instant, Option<Publication>)>,
) {
    while let Some(event) = events.recv().await {
        let item = match event {
            ClusterEvent::Publication(p) => Some((*p).clone()),
            ClusterEvent::Gap { .. } => None,
            _ => continue,
        };
        if out.send((Instant::now(), item)).is_err() {
            return;
        }
    }
}

struct Outcome {
    acked: Vec<Acked>,
    delivered: Vec<Publication>,
    gaps: usize,
    first_ack_after_kill: Duration,
    first_delivery_after_kill: Duration,
    history: Replay,
}

/// Kills the room's master while publishing. With `restart_killed` the dead node is
/// started again once its replica took over, so the new master gets a replica (which
/// `replicated` acks need).
async fn kill_master_mid_stream(ack: AckMode, restart_killed: bool) -> Outcome {
    let mut cluster = RedisCluster::start().await.expect("cluster starts");
    let config = ClusterConfig {
        nodes: cluster.seed_urls(),
        key_prefix: unique_prefix(),
        ack,
        stream_length: 100_000,
        request_timeout: Duration::from_secs(1),
        ..ClusterConfig::default()
    };
    let meta_key = Keys::new(&config.key_prefix).room(ROOM).meta;
    let (publisher, _p_events) = connect(&config, node_info("node-p")).await.expect("p");
    let (reader, events) = connect(&config, node_info("node-r")).await.expect("r");
    reader.subscribe_room(ROOM).await.expect("subscribe");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(collect(events, tx));

    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publish_until(publisher.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = Instant::now();
    let killed = cluster
        .fail_over_key(&meta_key, Duration::from_secs(20))
        .await
        .expect("a replica takes over");
    if restart_killed {
        cluster
            .restart(killed)
            .await
            .expect("the killed node rejoins");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = publishing.await.expect("publisher");

    let last = acked
        .last()
        .expect("something was acked")
        .publication
        .clone();
    let mut delivered = Vec::new();
    let mut gaps = 0;
    let mut first_delivery_after_kill = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.last().map(|p: &Publication| p.offset) != Some(last.offset) {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((at, item))) = tokio::time::timeout(wait, rx.recv()).await else {
            break;
        };
        match item {
            Some(p) => {
                let published_after_kill = acked
                    .iter()
                    .any(|a| a.at > killed_at && a.publication.offset == p.offset);
                if published_after_kill && first_delivery_after_kill.is_none() {
                    first_delivery_after_kill = Some(at - killed_at);
                }
                delivered.push(p);
            }
            None => gaps += 1,
        }
    }
    collector.abort();
    let first_ack_after_kill = acked
        .iter()
        .find(|a| a.at > killed_at)
        .map(|a| a.at - killed_at)
        .expect("publishing resumed after the kill");
    let first_epoch = acked[0].publication.epoch.clone();
    let history = publisher
        .history(ROOM, 0, &first_epoch)
        .await
        .expect("history");
    Outcome {
        acked,
        delivered,
        gaps,
        first_ack_after_kill,
        first_delivery_after_kill: first_delivery_after_kill.expect("delivery resumed"),
        history,
    }
}

fn data_of(p: &Publication) -> serde_json::Value {
    p.data.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_acks_survive_a_master_kill() {
    let outcome = kill_master_mid_stream(AckMode::Replicated, true).await;
    assert!(
        outcome.first_ack_after_kill < RESUME_BOUND,
        "{:?}",
        outcome.first_ack_after_kill
    );
    assert!(
        outcome.first_delivery_after_kill < RESUME_BOUND,
        "{:?}",
        outcome.first_delivery_after_kill
    );

    let Replay::Complete(history) = outcome.history else {
        panic!(
            "history from the first epoch is still recoverable: {:?}",
            outcome.history
        );
    };
    let stored: Vec<_> = history.iter().map(data_of).collect();
    let delivered: Vec<_> = outcome.delivered.iter().map(data_of).collect();
    for acked in &outcome.acked {
        let data = data_of(&acked.publication);
        assert!(stored.contains(&data), "acked {data} missing from history");
        assert!(delivered.contains(&data), "acked {data} was not delivered");
    }
    assert_eq!(outcome.gaps, 0, "no gap with replicated acks");
    let offsets: Vec<u64> = outcome.delivered.iter().map(|p| p.offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_acks_resume_after_a_master_kill() {
    let outcome = kill_master_mid_stream(AckMode::Leader, false).await;
    assert!(
        outcome.first_ack_after_kill < RESUME_BOUND,
        "{:?}",
        outcome.first_ack_after_kill
    );
    assert!(
        outcome.first_delivery_after_kill < RESUME_BOUND,
        "{:?}",
        outcome.first_delivery_after_kill
    );
    // Delivery is ordered; what a dead master lost is reported as a gap, never skipped
    // silently: within each stretch offsets grow by one.
    let offsets: Vec<u64> = outcome.delivered.iter().map(|p| p.offset).collect();
    let jumps = offsets.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(
        jumps <= outcome.gaps,
        "{jumps} jumps but {} gaps: {offsets:?}",
        outcome.gaps
    );
    let last = outcome.acked.last().expect("acked").publication.offset;
    assert_eq!(
        offsets.last(),
        Some(&last),
        "the newest message was delivered"
    );
}
