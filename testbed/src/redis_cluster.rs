//! A real Redis Cluster on loopback for tests, and the behavioural scenarios every
//! implementation of the cluster state must pass ([`scenarios`]).

pub mod scenarios;

/// A key prefix no other test uses, so tests can share one cluster.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}
