//! Prometheus metrics of a node, served at `/metrics`.
//!
//! Every counter and gauge lives in one [`Metrics`] value owned by the node context; the
//! names all start with `ringcast_node_`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections (after the upgrade).
    pub connections: IntGauge,
    /// Rooms with at least one local member.
    pub rooms: IntGauge,
    /// Frames received from clients.
    pub frames_in: IntCounter,
    /// Frames written to clients.
    pub frames_out: IntCounter,
    /// Publishes stored and acknowledged.
    pub publishes: IntCounter,
    /// Room messages written to clients (live and replayed).
    pub deliveries: IntCounter,
    /// Room resume outcomes: `recovered` or `not_recovered`; sessions: `session_restored`
    /// or `session_missing`.
    pub resumes: IntCounterVec,
    /// Connections closed because their send queue overflowed.
    pub slow_consumers: IntCounter,
    /// Refused handshakes by reason (`missing`, `invalid`, `expired`).
    pub auth_failures: IntCounterVec,
    /// Requests answered with an error frame, by error code.
    pub request_errors: IntCounterVec,
    /// Connections closed by the node, by close code.
    pub closes: IntCounterVec,
    /// Failed calls to the shared state (Redis or memory).
    pub cluster_errors: IntCounter,
    /// Live-delivery gaps that history could not fill (members told `not_recovered`).
    pub gaps: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Errors
    /// A registration conflict, which only a programming error can cause.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let metrics = Self {
            connections: gauge("connections", "Open WebSocket connections")?,
            rooms: gauge("rooms", "Rooms with at least one local member")?,
            frames_in: counter("frames_in_total", "Frames received from clients")?,
            frames_out: counter("frames_out_total", "Frames written to clients")?,
            publishes: counter("publishes_total", "Publishes stored and acknowledged")?,
            deliveries: counter("deliveries_total", "Room messages written to clients")?,
            resumes: counter_vec("resumes_total", "Resume outcomes", "outcome")?,
            slow_consumers: counter(
                "slow_consumers_closed_total",
                "Connections closed because their send queue overflowed",
            )?,
            auth_failures: counter_vec("auth_failures_total", "Refused handshakes", "reason")?,
            request_errors: counter_vec("request_errors_total", "Error replies", "code")?,
            closes: counter_vec("closes_total", "Connections closed by the node", "code")?,
            cluster_errors: counter("cluster_errors_total", "Failed shared-state calls")?,
            gaps: counter("gaps_total", "Delivery gaps reported as not recovered")?,
            registry,
        };
        metrics.register_all()?;
        Ok(metrics)
    }

    fn register_all(&self) -> prometheus::Result<()> {
        let r = &self.registry;
        r.register(Box::new(self.connections.clone()))?;
        r.register(Box::new(self.rooms.clone()))?;
        r.register(Box::new(self.frames_in.clone()))?;
        r.register(Box::new(self.frames_out.clone()))?;
        r.register(Box::new(self.publishes.clone()))?;
        r.register(Box::new(self.deliveries.clone()))?;
        r.register(Box::new(self.resumes.clone()))?;
        r.register(Box::new(self.slow_consumers.clone()))?;
        r.register(Box::new(self.auth_failures.clone()))?;
        r.register(Box::new(self.request_errors.clone()))?;
        r.register(Box::new(self.closes.clone()))?;
        r.register(Box::new(self.cluster_errors.clone()))?;
        r.register(Box::new(self.gaps.clone()))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|err| format!("# metrics encoding failed: {err}\n"))
    }
}

fn name(short: &str) -> String {
    format!("ringcast_node_{short}")
}

fn gauge(short: &str, help: &str) -> prometheus::Result<IntGauge> {
    IntGauge::new(name(short), help)
}

fn counter(short: &str, help: &str) -> prometheus::Result<IntCounter> {
    IntCounter::new(name(short), help)
}

fn counter_vec(short: &str, help: &str, label: &str) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name(short), help), &[label])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_names_every_family() {
        let metrics = Metrics::new().unwrap();
        metrics.slow_consumers.inc();
        metrics.resumes.with_label_values(&["recovered"]).inc();
        let text = metrics.render();
        assert!(
            text.contains("ringcast_node_slow_consumers_closed_total 1"),
            "{text}"
        );
        assert!(text.contains("ringcast_node_resumes_total{outcome=\"recovered\"} 1"));
    }
}
