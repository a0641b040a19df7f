//! The HTTP surface on the node's one listener: `/ws` (WebSocket upgrade), `/healthz`,
//! `/readyz` and `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;

use crate::connection;
use crate::node::Node;

/// Seconds a refused client is asked to wait before retrying.
const RETRY_AFTER_SECS: &str = "1";

/// The node's routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// Upgrades to a WebSocket with the configured buffer sizes and message limit. Refused
/// with 503 (and `Retry-After`) while draining or at the connection limit.
async fn upgrade(State(node): State<Arc<Node>>, upgrade: WebSocketUpgrade) -> Response {
    if node.is_draining() {
        return unavailable("draining");
    }
    let open = usize::try_from(node.metrics.connections.get()).unwrap_or(0);
    if open >= node.config.limits.max_connections {
        return unavailable("connection limit reached");
    }
    let limits = &node.config.limits;
    upgrade
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(limits.write_buffer_bytes)
        .max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        .on_upgrade(move |socket| connection::serve(node, socket))
}

fn unavailable(reason: &'static str) -> Response {
    let headers = [(header::RETRY_AFTER, RETRY_AFTER_SECS)];
    (StatusCode::SERVICE_UNAVAILABLE, headers, reason).into_response()
}

/// Alive as long as the process answers.
async fn healthz() -> &'static str {
    "ok"
}

/// 200 while taking new clients; 503 while draining or while the shared state is
/// unreachable.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !node.cluster.is_available() {
        (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable").into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, node.metrics.render()).into_response()
}
