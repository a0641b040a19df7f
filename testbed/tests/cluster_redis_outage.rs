//! The whole Redis Cluster goes away and comes back: the module reports it and recovers
//! without a restart.

use ringcast_shared::cluster::{ClusterEvent, connect};
use ringcast_shared::config::ClusterConfig;
use ringcast_testbed::redis_cluster::scenarios::{client, next_publication, node_info, wait_for};
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_reported_and_recovered_from() {
    let mut cluster = RedisCluster::start().await.expect("cluster starts");
    let config = ClusterConfig {
        nodes: cluster.seed_urls(),
        key_prefix: unique_prefix(),
        presence_ttl: Duration::from_secs(1),
        request_timeout: Duration::from_millis(500),
        ..ClusterConfig::default()
    };
    let (state, mut events) = connect(&config, node_info("node-a"))
        .await
        .expect("connect");
    state.subscribe_room("live").await.expect("subscribe");
    assert!(state.is_available());

    for port in cluster.ports() {
        cluster.kill(port).expect("kill");
    }
    let down = wait_for(&mut events, "connectivity lost", |event| match event {
        ClusterEvent::Connectivity(up) => Some(*up),
        _ => None,
    })
    .await
    .expect("outage reported");
    assert!(!down);
    assert!(!state.is_available());
    let err = state
        .publish("live", client("x"), json!(0))
        .await
        .expect_err("no Redis, no publish");
    assert!(err.is_retryable(), "{err}");

    // Stay down long enough for the module to try replacing its connection (it does so
    // after five failed refresh rounds); recovery must work whichever connection wins.
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.restart_all().await.expect("cluster back");
    let up = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Some(ClusterEvent::Connectivity(true)) | None => return,
                Some(_) => {}
            }
        }
    })
    .await;
    assert!(up.is_ok(), "recovery reported");
    assert!(state.is_available());

    // The data is gone (no persistence), the subscription is back.
    let published = state
        .publish("live", client("x"), json!("again"))
        .await
        .expect("publish after recovery");
    assert_eq!(published.offset, 1);
    let (_, data) = next_publication(&mut events, "live")
        .await
        .expect("delivery");
    assert_eq!(data, json!("again"));
}
