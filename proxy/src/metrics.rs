//! Prometheus metrics of the edge (pingora registers none of its own), served as text on
//! the admin listener's `/metrics`.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::LazyLock;

struct Metrics {
    registry: Registry,
    tunnels_active: IntGaugeVec,
    upgrades: IntCounterVec,
    requests: IntCounterVec,
    connect_failures: IntCounterVec,
    retries: IntCounter,
    health_transitions: IntCounterVec,
    rejections: IntCounterVec,
    idle_timeouts: IntCounter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(build);

fn build() -> Metrics {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    };
    let counter_vec = |name: &str, help: &str, labels: &[&str]| {
        let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    };
    let counter = |name: &str, help: &str| {
        let metric = IntCounter::new(name, help).expect("valid metric");
        registry
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    };
    Metrics {
        tunnels_active: gauge(
            "ringcast_edge_tunnels_active",
            "Upgraded connections open, per backend",
            &["backend"],
        ),
        upgrades: counter_vec(
            "ringcast_edge_upgrades_total",
            "Upgrade requests by backend and result (switched, refused, refused_retried, failed)",
            &["backend", "result"],
        ),
        requests: counter_vec(
            "ringcast_edge_requests_total",
            "Plain HTTP requests proxied, per backend",
            &["backend"],
        ),
        connect_failures: counter_vec(
            "ringcast_edge_upstream_connect_failures_total",
            "Failed connects to a backend",
            &["backend"],
        ),
        retries: counter(
            "ringcast_edge_upstream_retries_total",
            "Requests retried on the next ring node after a connect failure",
        ),
        health_transitions: counter_vec(
            "ringcast_edge_health_transitions_total",
            "Backend state changes by new state (healthy, draining, down, ejected)",
            &["backend", "to"],
        ),
        rejections: counter_vec(
            "ringcast_edge_rejections_total",
            "Requests rejected by admission control, per limit",
            &["limit"],
        ),
        idle_timeouts: counter(
            "ringcast_edge_tunnel_idle_timeouts_total",
            "Tunnels closed by tunnel.idle_timeout",
        ),
        registry,
    }
}

/// One more (or one fewer, `delta = -1`) open tunnel on `backend`.
pub fn tunnel_delta(backend: &str, delta: i64) {
    METRICS
        .tunnels_active
        .with_label_values(&[backend])
        .add(delta);
}

/// An upgrade answered with `result`.
pub fn upgrade(backend: &str, result: &str) {
    METRICS.upgrades.with_label_values(&[backend, result]).inc();
}

/// A plain request proxied to `backend`.
pub fn request(backend: &str) {
    METRICS.requests.with_label_values(&[backend]).inc();
}

/// A connect to `backend` failed.
pub fn connect_failure(backend: &str) {
    METRICS.connect_failures.with_label_values(&[backend]).inc();
}

/// A request was retried on another backend.
pub fn retry() {
    METRICS.retries.inc();
}

/// `backend` changed state to `to`.
pub fn health_transition(backend: &str, to: &str) {
    METRICS
        .health_transitions
        .with_label_values(&[backend, to])
        .inc();
}

/// A request was rejected by `limit`.
pub fn rejection(limit: &str) {
    METRICS.rejections.with_label_values(&[limit]).inc();
}

/// A tunnel was closed for being idle.
pub fn idle_timeout() {
    METRICS.idle_timeouts.inc();
}

/// Everything in the Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    let families = METRICS.registry.gather();
    if let Err(err) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %err, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}
