//! Active health checks: a `GET` of each backend's readiness path every interval, with
//! rise/fall hysteresis so a flapping backend does not bounce its keys back and forth.
//!
//! 2xx = ready; any other answer = draining (it keeps its tunnels, gets no new clients);
//! no answer within the timeout = down. Every backend starts healthy, as in pingora, until
//! its first checks say otherwise.

use ringcast_shared::config::HealthConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics;
use crate::pool::{BackendState, Health, Pool, lock};

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// 2xx.
    Ready,
    /// Answered with another status.
    NotReady(u16),
    /// Could not connect, or no answer in time.
    Unreachable,
}

/// A backend's health with its consecutive-result counters.
#[derive(Debug, Clone)]
pub struct Probe {
    health: Health,
    streak: u32,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            health: Health::Healthy,
            streak: 0,
        }
    }
}

impl Probe {
    /// The current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Applies one result; returns the new state when it changed.
    pub fn observe(&mut self, result: ProbeResult, rise: u32, fall: u32) -> Option<Health> {
        let seen = match result {
            ProbeResult::Ready => Health::Healthy,
            ProbeResult::NotReady(_) => Health::Draining,
            ProbeResult::Unreachable => Health::Down,
        };
        let was_healthy = self.health == Health::Healthy;
        if (seen == Health::Healthy) == was_healthy {
            self.streak = 0;
            // Between the two unhealthy states, follow the latest answer at once.
            return (seen != self.health)
                .then(|| std::mem::replace(&mut self.health, seen))
                .map(|_| seen);
        }
        self.streak += 1;
        let needed = if was_healthy { fall } else { rise };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.health = seen;
        Some(seen)
    }
}

/// Sends one readiness request and classifies the answer.
pub async fn probe(address: SocketAddr, path: &str, timeout: Duration) -> ProbeResult {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 64];
        let mut filled = 0;
        while filled < 12 {
            let n = stream.read(&mut head[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok::<_, std::io::Error>(status_of(&head[..filled]))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(Some(status))) if (200..300).contains(&status) => ProbeResult::Ready,
        Ok(Ok(Some(status))) => ProbeResult::NotReady(status),
        _ => ProbeResult::Unreachable,
    }
}

fn status_of(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head).ok()?;
    let mut parts = text.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.get(..3)?.parse().ok()
}

/// Probes every backend once per interval until the process stops.
pub async fn run(pool: Arc<Pool>, config: HealthConfig) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let checks = pool.all().into_iter().map(|state| check(state, &config));
        futures_util::future::join_all(checks).await;
    }
}

async fn check(state: Arc<BackendState>, config: &HealthConfig) {
    let result = probe(state.address, &config.path, config.timeout).await;
    if result == ProbeResult::Ready {
        state.clear_ejection();
    }
    let changed = lock(&state.probe).observe(result, config.rise, config.fall);
    if let Some(health) = changed {
        let to = format!("{health:?}").to_lowercase();
        metrics::health_transition(&state.id, &to);
        tracing::info!(backend = %state.id, address = %state.address, state = %to,
            probe = ?result, "backend health changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_then_rise_need_consecutive_results() {
        let mut probe = Probe::default();
        assert_eq!(probe.observe(ProbeResult::Unreachable, 2, 3), None);
        assert_eq!(probe.observe(ProbeResult::Ready, 2, 3), None);
        assert_eq!(probe.observe(ProbeResult::Unreachable, 2, 3), None);
        assert_eq!(probe.observe(ProbeResult::Unreachable, 2, 3), None);
        assert_eq!(
            probe.observe(ProbeResult::Unreachable, 2, 3),
            Some(Health::Down)
        );
        assert_eq!(
            probe.observe(ProbeResult::NotReady(503), 2, 3),
            Some(Health::Draining)
        );
        assert_eq!(probe.observe(ProbeResult::Ready, 2, 3), None);
        assert_eq!(
            probe.observe(ProbeResult::Ready, 2, 3),
            Some(Health::Healthy)
        );
    }

    #[test]
    fn a_backend_flapping_every_check_stays_put() {
        let mut probe = Probe::default();
        for _ in 0..10 {
            assert_eq!(probe.observe(ProbeResult::Unreachable, 2, 2), None);
            assert_eq!(probe.observe(ProbeResult::Ready, 2, 2), None);
        }
        assert_eq!(probe.health(), Health::Healthy);
    }

    #[test]
    fn status_line_parses() {
        assert_eq!(
            status_of(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"garbage"), None);
    }
}
