//! The shared behavioural scenarios against a real Redis Cluster (all on one cluster, each
//! with its own key prefix).

use ringcast_testbed::redis_cluster::RedisCluster;
use ringcast_testbed::redis_cluster::scenarios::{RedisBackend, run_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_against_redis_cluster() {
    let cluster = RedisCluster::start().await.expect("cluster starts");
    let backend = RedisBackend {
        seeds: cluster.seed_urls(),
    };
    run_all(&backend).await.expect("scenarios");
}
