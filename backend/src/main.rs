//! `ringcast-node`: a Ringcast WebSocket node.
//!
//! Serves clients over WebSocket (`/ws`, protocol in `docs/protocol.md`): rooms with
//! ordered, resumable history, presence, direct messages and heartbeats, sharing state with
//! its peers through a Redis Cluster (or, with no `[cluster] nodes`, running standalone on
//! the in-process memory implementation). On SIGTERM it drains gracefully.
//!
//! Modules: [`config`] (file + env overrides), [`node`] (shared context), [`http`]
//! (routes), [`connection`] (one task per client), [`fanout`] (room registry and
//! dispatcher), [`auth`], [`limits`], [`drain`], [`metrics`].

mod auth;
mod config;
mod connection;
mod drain;
mod fanout;
mod http;
mod limits;
mod metrics;
mod node;

use anyhow::Context;
use axum::serve::ListenerExt;
use clap::Parser;
use ringcast_shared::cluster::{self, ClusterEvents, ClusterState, NodeInfo};
use ringcast_shared::config::NodeConfig;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Pause between attempts to reach the shared state at startup.
const CLUSTER_RETRY: Duration = Duration::from_secs(1);

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "ringcast-node", version, about = "Ringcast WebSocket node")]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = "conf/node.toml")]
    config: PathBuf,
    /// Only check the configuration and exit (0 when valid, 1 otherwise).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ringcast-node: {err}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        println!("{}: configuration ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    if let Err(err) = ringcast_shared::telemetry::init(&config.log) {
        eprintln!("ringcast-node: {err}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ringcast-node: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "node failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.node.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.node.listen))?;
    let address = listener.local_addr()?;
    let info = node_info(&config.node.id, &address.to_string());
    let Some((cluster, events)) = connect_cluster(&config, info).await? else {
        return Ok(());
    };
    let node = Arc::new(node::Node::new(config, cluster, metrics::Metrics::new()?));
    tokio::spawn(fanout::run_dispatcher(Arc::clone(&node), events));

    // Tests and scripts read this line to learn the port when listening on port 0.
    println!("ringcast-node {} listening on {address}", node.id);
    std::io::stdout().flush()?;
    tracing::info!(node = %node.id, %address, "listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = http::router(Arc::clone(&node));
    // Frames are small and latency matters: never wait for Nagle's algorithm.
    let send_buffer = node.config.limits.socket_send_buffer_bytes;
    let listener = listener.tap_io(move |tcp| tune_socket(tcp, send_buffer));
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stop_rx.await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
    });

    let signal = drain::wait_for_signal().await?;
    tracing::info!(signal, "drain requested");
    let left = drain::drain(Arc::clone(&node)).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    tracing::info!(left, "node stopped");
    Ok(())
}

/// Connects to the shared state, retrying while it is unreachable; `None` when a signal
/// arrives first.
async fn connect_cluster(
    config: &NodeConfig,
    info: NodeInfo,
) -> anyhow::Result<Option<(Arc<dyn ClusterState>, ClusterEvents)>> {
    loop {
        match cluster::connect(&config.cluster, info.clone()).await {
            Ok(connected) => return Ok(Some(connected)),
            Err(err) if err.is_retryable() => {
                tracing::warn!(error = %err, "shared state unreachable, retrying");
            }
            Err(err) => return Err(err).context("cannot open the shared state"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CLUSTER_RETRY) => {}
            signal = drain::wait_for_signal() => {
                tracing::info!(signal = signal?, "stopped before the cluster was reachable");
                return Ok(None);
            }
        }
    }
}

/// Disables Nagle's algorithm (frames are small and latency matters) and applies the
/// configured kernel send buffer.
fn tune_socket(tcp: &mut tokio::net::TcpStream, send_buffer_bytes: usize) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "cannot set TCP_NODELAY");
    }
    if send_buffer_bytes > 0 {
        let socket = socket2::SockRef::from(&*tcp);
        if let Err(err) = socket.set_send_buffer_size(send_buffer_bytes) {
            tracing::debug!(error = %err, "cannot set SO_SNDBUF");
        }
    }
}

fn node_info(id: &str, address: &str) -> NodeInfo {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    NodeInfo {
        id: id.to_owned(),
        address: address.to_owned(),
        started_at_ms: now_ms,
        heartbeat_ms: now_ms,
    }
}
