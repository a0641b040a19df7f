//! The node context shared by every task: configuration, the shared state, the room
//! registry, authentication, metrics and the drain flag.

use ringcast_shared::cluster::ClusterState;
use ringcast_shared::config::NodeConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::auth::Authenticator;
use crate::fanout::Registry;
use crate::metrics::Metrics;

/// Everything a connection task or HTTP handler needs.
pub struct Node {
    /// Node id.
    pub id: String,
    /// The loaded configuration (after env overrides).
    pub config: NodeConfig,
    /// Shared state (Redis Cluster or memory).
    pub cluster: Arc<dyn ClusterState>,
    /// Local rooms and connections.
    pub registry: Registry,
    /// Token checks.
    pub auth: Authenticator,
    /// Metrics served at `/metrics`.
    pub metrics: Metrics,
    draining: AtomicBool,
}

impl Node {
    /// Builds the context.
    pub fn new(config: NodeConfig, cluster: Arc<dyn ClusterState>, metrics: Metrics) -> Self {
        Self {
            id: config.node.id.clone(),
            auth: Authenticator::new(config.auth.clone()),
            config,
            cluster,
            registry: Registry::default(),
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// Marks the node as draining: `/readyz` answers 503 and new upgrades are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether SIGTERM was received.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
