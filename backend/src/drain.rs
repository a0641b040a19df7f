//! Graceful drain on SIGTERM (or SIGINT): `/readyz` turns 503 at once; after `drain.delay`
//! every connection is closed with 1012 ("reconnect now and resume"), the closes spread
//! evenly over `drain.window` so the clients do not reconnect as one herd; each connection
//! flushes its queue and saves its session as it closes; then the node leaves the shared
//! state. All of it is bounded by `drain.deadline`.

use ringcast_shared::protocol::close;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::node::Node;

/// Close reason sent with 1012: the reconnect hint.
pub const DRAIN_REASON: &str = "node draining: reconnect and resume";

/// How often the drain checks whether every connection is gone.
const POLL: Duration = Duration::from_millis(50);

/// Waits for SIGTERM or SIGINT and returns its name.
///
/// # Errors
/// The signal handlers cannot be installed.
pub async fn wait_for_signal() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Drains the node; returns how many connections were still open at the deadline.
pub async fn drain(node: Arc<Node>) -> usize {
    node.start_draining();
    let config = node.config.drain.clone();
    let started = Instant::now();
    let shutdown_budget = (config.deadline / 10).min(Duration::from_secs(2));
    let connections_deadline = started + config.deadline - shutdown_budget;
    tracing::info!(connections = node.registry.conn_count(), "drain started");

    sleep(config.delay).await;
    close_spread(&node, config.window).await;
    let left = wait_for_connections(&node, connections_deadline).await;

    let shutdown = node.cluster.shutdown();
    match tokio::time::timeout(shutdown_budget, shutdown).await {
        Ok(Ok(())) => tracing::info!("left the cluster"),
        Ok(Err(err)) => tracing::warn!(error = %err, "cluster shutdown failed"),
        Err(_) => tracing::warn!("cluster shutdown timed out"),
    }
    left
}

/// Asks every connection to close, one after the other over `window`.
async fn close_spread(node: &Node, window: Duration) {
    let conns = node.registry.conns();
    let start = Instant::now();
    let count = conns.len().max(1) as u32;
    for (index, handle) in conns.iter().enumerate() {
        sleep_until(start + window * index as u32 / count).await;
        handle.request_close(close::SERVICE_RESTART, DRAIN_REASON);
    }
}

/// Waits until no connection is left (closing late arrivals too) or the deadline passes.
async fn wait_for_connections(node: &Node, deadline: Instant) -> usize {
    loop {
        let open = usize::try_from(node.metrics.connections.get()).unwrap_or(0);
        if open == 0 || Instant::now() >= deadline {
            if open > 0 {
                tracing::warn!(open, "drain deadline reached with connections open");
            }
            return open;
        }
        for handle in node.registry.conns() {
            handle.request_close(close::SERVICE_RESTART, DRAIN_REASON);
        }
        sleep(POLL).await;
    }
}
