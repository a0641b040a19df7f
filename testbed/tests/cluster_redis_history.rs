//! History on a real Redis Cluster: exact replay after a gap, trimming, flushing.

use ringcast_shared::cluster::{ClusterEvent, Replay, connect};
use ringcast_shared::config::ClusterConfig;
use ringcast_testbed::redis_cluster::scenarios::{
    client, next_publication, node_info, publish_n, wait_for,
};
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use serde_json::json;

fn config(cluster: &RedisCluster) -> ClusterConfig {
    ClusterConfig {
        nodes: cluster.seed_urls(),
        key_prefix: unique_prefix(),
        ..ClusterConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_trim_and_flush() {
    let cluster = RedisCluster::start().await.expect("cluster starts");
    let config = config(&cluster);
    let (a, _a_events) = connect(&config, node_info("node-a")).await.expect("a");
    let (b, mut b_events) = connect(&config, node_info("node-b")).await.expect("b");

    // A client that saw offsets up to 4 gets exactly 5..=12 back.
    let last = publish_n(a.as_ref(), "feed", 12).await.expect("publish");
    let Replay::Complete(missed) = b.history("feed", 4, &last.epoch).await.expect("history") else {
        panic!("the gap is covered by history");
    };
    let got: Vec<(u64, serde_json::Value)> =
        missed.iter().map(|p| (p.offset, p.data.clone())).collect();
    let want: Vec<(u64, serde_json::Value)> = (5..=12).map(|n| (n, json!({ "n": n }))).collect();
    assert_eq!(got, want);

    // A capped stream: a gap older than the kept messages is not recoverable.
    let capped = ClusterConfig {
        stream_length: 5,
        ..config.clone()
    };
    let (c, _c_events) = connect(&capped, node_info("node-c")).await.expect("c");
    let last = publish_n(c.as_ref(), "capped", 20).await.expect("publish");
    let replay = c.history("capped", 10, &last.epoch).await.expect("history");
    assert_eq!(replay, Replay::NotRecoverable(last.clone()));
    let Replay::Complete(kept) = c.history("capped", 15, &last.epoch).await.expect("history")
    else {
        panic!("the last five are kept");
    };
    assert_eq!(kept.first().map(|p| p.offset), Some(16));

    // Flushing every master loses history: a new epoch, and subscribers see a gap.
    let position = b.subscribe_room("feed").await.expect("subscribe");
    assert_eq!(position.offset, 12);
    cluster.flush_all().await.expect("flush");
    let replay = b
        .history("feed", 4, &position.epoch)
        .await
        .expect("history");
    let Replay::NotRecoverable(now) = replay else {
        panic!("flushed history cannot be replayed: {replay:?}");
    };
    assert_ne!(now.epoch, position.epoch, "a flushed room gets a new epoch");
    assert_eq!(now.offset, 0);

    let published = a
        .publish("feed", client("z"), json!("after"))
        .await
        .expect("publish");
    assert_eq!(
        (published.epoch.as_str(), published.offset),
        (now.epoch.as_str(), 1)
    );
    let gap = wait_for(&mut b_events, "a gap", |event| match event {
        ClusterEvent::Gap { room, position } if room == "feed" => Some(position.clone()),
        _ => None,
    })
    .await
    .expect("gap event");
    assert_eq!(gap.epoch, now.epoch);
    let (offset, data) = next_publication(&mut b_events, "feed")
        .await
        .expect("delivery");
    assert_eq!((offset, data), (1, json!("after")));
}
