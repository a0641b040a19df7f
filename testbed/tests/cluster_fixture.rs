//! The Redis Cluster fixture itself: formation, slot ownership, failover, restart, teardown.

use ringcast_testbed::redis_cluster::{RedisCluster, SLOTS};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_fails_over_and_stops_on_drop() {
    let mut cluster = RedisCluster::start().await.expect("cluster starts");
    assert_eq!(cluster.seed_urls().len(), 6);
    let masters = cluster.masters().await.expect("topology");
    assert_eq!(masters.len(), 3, "three masters serve slots");
    let topology = cluster.topology().await.expect("topology");
    let served: u32 = topology
        .iter()
        .flat_map(|n| n.slots.iter())
        .map(|(low, high)| u32::from(high - low) + 1)
        .sum();
    assert_eq!(served, u32::from(SLOTS));

    let slot = cluster.keyslot("{room}:x").await.expect("keyslot");
    assert_eq!(slot, cluster.keyslot("room").await.expect("keyslot"));
    let old = cluster
        .fail_over_key("{room}:x", Duration::from_secs(15))
        .await
        .expect("a replica takes over");
    let new = cluster.master_of_slot(slot).await.expect("new master");
    assert_ne!(old, new);
    assert_eq!(cluster.masters().await.expect("topology").len(), 3);

    cluster.restart(old).await.expect("the old master rejoins");
    assert_eq!(cluster.master_of_slot(slot).await.expect("master"), new);
    let ports = cluster.ports();
    drop(cluster);
    for port in ports {
        let refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
        assert!(refused, "redis-server on {port} still runs after drop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_run_side_by_side() {
    let (a, b) = tokio::join!(RedisCluster::start(), RedisCluster::start());
    let (a, b) = (a.expect("first cluster"), b.expect("second cluster"));
    let mut ports = a.ports();
    ports.extend(b.ports());
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 12, "no port is shared");
}
