//! The admin listener (loopback by default, no authentication):
//!
//! - `GET /backends`: every backend with state, open tunnels and new connections;
//! - `POST /backends` (JSON `{"id","address","weight"}`): add a backend;
//! - `DELETE /backends/{id}`: remove one (its open tunnels stay);
//! - `POST /backends/{id}/drain`, `POST /backends/{id}/undrain`;
//! - `POST /reload`: apply the backend list of the config file (as SIGHUP does);
//! - `GET /metrics`: Prometheus text.
//!
//! None of these closes a tunnel.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ringcast_shared::config::{BackendConfig, MAX_WEIGHT, valid_id};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::lifecycle::Reloader;
use crate::pool::{Health, Pool, PoolError};

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The backends.
    pub pool: Arc<Pool>,
    /// Re-reads the config file.
    pub reloader: Arc<Reloader>,
}

#[derive(Serialize)]
struct BackendView {
    id: String,
    address: String,
    weight: u32,
    state: Health,
    active_tunnels: u64,
    new_connections: u64,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/backends", get(list).post(add))
        .route("/backends/{id}", delete(remove))
        .route("/backends/{id}/drain", post(drain))
        .route("/backends/{id}/undrain", post(undrain))
        .route("/reload", post(reload))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the admin API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState) {
    if let Err(err) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %err, "admin listener stopped");
    }
}

async fn list(State(state): State<AdminState>) -> Json<Vec<BackendView>> {
    let all = state.pool.all();
    let views = all.iter().map(|b| BackendView {
        id: b.id.clone(),
        address: b.address.to_string(),
        weight: b.weight,
        state: b.state(),
        active_tunnels: b.tunnels.load(Ordering::Relaxed),
        new_connections: b.new_connections.load(Ordering::Relaxed),
    });
    Json(views.collect())
}

fn answer(result: Result<(), PoolError>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(err @ PoolError::Unknown(_)) => {
            (StatusCode::NOT_FOUND, format!("{err}\n")).into_response()
        }
        Err(err) => (StatusCode::CONFLICT, format!("{err}\n")).into_response(),
    }
}

async fn add(State(state): State<AdminState>, body: axum::body::Bytes) -> Response {
    let config: BackendConfig = match serde_json::from_slice(&body) {
        Ok(config) => config,
        Err(err) => {
            return (StatusCode::BAD_REQUEST, format!("bad backend: {err}\n")).into_response();
        }
    };
    if !valid_id(&config.id) || config.weight > MAX_WEIGHT {
        let problem = format!(
            "bad backend: id must be 1-64 of [A-Za-z0-9._-], weight at most {MAX_WEIGHT}\n"
        );
        return (StatusCode::BAD_REQUEST, problem).into_response();
    }
    answer(state.pool.add(&config).await)
}

async fn remove(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    answer(state.pool.remove(&id).await)
}

async fn drain(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    answer(state.pool.set_drained(&id, true).await)
}

async fn undrain(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    answer(state.pool.set_drained(&id, false).await)
}

async fn reload(State(state): State<AdminState>) -> Response {
    match state.reloader.reload().await {
        Ok(summary) => (StatusCode::OK, format!("{summary}\n")).into_response(),
        Err(err) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{err}\n")).into_response(),
    }
}

async fn metrics() -> Response {
    let headers = [("content-type", "text/plain; version=0.0.4")];
    (headers, crate::metrics::render()).into_response()
}
