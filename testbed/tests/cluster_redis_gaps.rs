//! Live delivery skips a message (its pub/sub notice never came): the module fills the
//! gap from history, and reports a `Gap` when history no longer holds it.

use ringcast_shared::cluster::redis::keys::{Keys, RoomKeys};
use ringcast_shared::cluster::{ClusterEvent, Publication, RoomPosition, connect};
use ringcast_shared::config::ClusterConfig;
use ringcast_testbed::redis_cluster::scenarios::{client, node_info, wait_for};
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use serde_json::json;

const ROOM: &str = "holes";

/// Stores messages in history the way a publish does, but without announcing them,
/// keeping at most `max_len` entries. Returns the new newest offset.
async fn store_silently(
    cluster: &RedisCluster,
    keys: &RoomKeys,
    offsets: std::ops::RangeInclusive<u64>,
    max_len: u64,
) -> u64 {
    let port = cluster.master_of_key(&keys.meta).await.expect("master");
    let mut conn = cluster.connection(port).await.expect("connection");
    let last = *offsets.end();
    for offset in offsets {
        let body = json!({"from": {"user": "raw", "conn": "raw"}, "data": offset});
        let _: String = redis::cmd("XADD")
            .arg(&keys.log)
            .arg("MAXLEN")
            .arg(max_len)
            .arg(format!("0-{offset}"))
            .arg("m")
            .arg(body.to_string())
            .query_async(&mut conn)
            .await
            .expect("XADD");
    }
    let _: i64 = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("offset")
        .arg(last)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    last
}

enum Seen {
    Message(Publication),
    Gap(RoomPosition),
}

async fn next_seen(events: &mut ringcast_shared::cluster::ClusterEvents) -> Seen {
    wait_for(events, "a publication or gap", |event| match event {
        ClusterEvent::Publication(p) if p.room == ROOM => Some(Seen::Message((**p).clone())),
        ClusterEvent::Gap { room, position } if room == ROOM => Some(Seen::Gap(position.clone())),
        _ => None,
    })
    .await
    .expect("event")
}

fn expect_message(seen: Seen, offset: u64, data: serde_json::Value) {
    match seen {
        Seen::Message(p) => assert_eq!((p.offset, p.data), (offset, data)),
        Seen::Gap(position) => panic!("gap at {position:?}, expected message {offset}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_live_messages_are_filled_or_reported() {
    let cluster = RedisCluster::start().await.expect("cluster starts");
    let config = ClusterConfig {
        nodes: cluster.seed_urls(),
        key_prefix: unique_prefix(),
        ..ClusterConfig::default()
    };
    let keys = Keys::new(&config.key_prefix).room(ROOM);
    let (a, _a_events) = connect(&config, node_info("node-a")).await.expect("a");
    let (b, mut b_events) = connect(&config, node_info("node-b")).await.expect("b");
    b.subscribe_room(ROOM).await.expect("subscribe");

    a.publish(ROOM, client("p"), json!(1))
        .await
        .expect("publish");
    expect_message(next_seen(&mut b_events).await, 1, json!(1));

    // Offset 2 is in history but was never announced: it is filled before 3.
    store_silently(&cluster, &keys, 2..=2, 1000).await;
    a.publish(ROOM, client("p"), json!(3))
        .await
        .expect("publish");
    expect_message(next_seen(&mut b_events).await, 2, json!(2));
    expect_message(next_seen(&mut b_events).await, 3, json!(3));

    // Offsets 4..=6 were never announced and 4 and 5 are trimmed: a gap, then 7.
    store_silently(&cluster, &keys, 4..=6, 1).await;
    let published = a
        .publish(ROOM, client("p"), json!(7))
        .await
        .expect("publish");
    match next_seen(&mut b_events).await {
        Seen::Gap(position) => {
            assert_eq!(position.epoch, published.epoch);
            assert_eq!(position.offset, 6, "{position:?}");
        }
        Seen::Message(p) => panic!("expected a gap, got message {}", p.offset),
    }
    expect_message(next_seen(&mut b_events).await, 7, json!(7));
}
