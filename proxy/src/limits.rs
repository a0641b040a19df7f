//! Admission control: per-client-IP concurrency and request rate, and the per-backend
//! cap on new upgrades per second. Each over-limit request is rejected with a status and
//! `Retry-After` (see `proxy::reject`) and counted by limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::pool::lock;

/// Which limit rejected a request (the `limit` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Too many concurrent connections from one client IP (429).
    ClientConcurrent,
    /// Too many new requests per second from one client IP (429).
    ClientRate,
    /// Too many new upgrades per second to one backend (503).
    BackendUpgradeRate,
    /// No backend takes new connections (503).
    NoBackend,
}

impl Limit {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientConcurrent => "client_concurrent",
            Self::ClientRate => "client_rate",
            Self::BackendUpgradeRate => "backend_upgrade_rate",
            Self::NoBackend => "no_backend",
        }
    }

    /// HTTP status of the rejection.
    pub fn status(self) -> u16 {
        match self {
            Self::ClientConcurrent | Self::ClientRate => 429,
            Self::BackendUpgradeRate | Self::NoBackend => 503,
        }
    }
}

/// A fixed one-second window counter.
#[derive(Debug, Default)]
pub struct RateWindow {
    started: Option<Instant>,
    count: u32,
}

impl RateWindow {
    /// Counts one event unless `limit` events already happened this second (0 = no limit).
    pub fn try_take(&mut self, now: Instant, limit: u32) -> bool {
        if limit == 0 {
            return true;
        }
        let fresh = self
            .started
            .is_none_or(|started| now.duration_since(started).as_secs() >= 1);
        if fresh {
            self.started = Some(now);
            self.count = 0;
        }
        if self.count >= limit {
            return false;
        }
        self.count += 1;
        true
    }
}

#[derive(Default)]
struct ClientEntry {
    concurrent: u32,
    window: RateWindow,
}

/// Per-client-IP counters.
#[derive(Default)]
pub struct ClientLimits {
    clients: Mutex<HashMap<IpAddr, ClientEntry>>,
}

/// Holds one concurrent-connection slot of a client; released on drop.
pub struct ClientSlot {
    limits: Arc<ClientLimits>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = lock(&self.limits.clients);
        if let Some(entry) = clients.get_mut(&self.ip) {
            entry.concurrent = entry.concurrent.saturating_sub(1);
        }
    }
}

/// Entries kept before idle ones are swept.
const SWEEP_AT: usize = 10_000;

impl ClientLimits {
    /// Admits one request of `ip` or says which limit it hit (0 disables a limit).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_concurrent: u32,
        max_per_second: u32,
    ) -> Result<ClientSlot, Limit> {
        let now = Instant::now();
        let mut clients = lock(&self.clients);
        if clients.len() >= SWEEP_AT {
            clients.retain(|_, e| {
                e.concurrent > 0
                    || e.window
                        .started
                        .is_some_and(|s| now.duration_since(s).as_secs() < 1)
            });
        }
        let entry = clients.entry(ip).or_default();
        if max_concurrent > 0 && entry.concurrent >= max_concurrent {
            return Err(Limit::ClientConcurrent);
        }
        if !entry.window.try_take(now, max_per_second) {
            return Err(Limit::ClientRate);
        }
        entry.concurrent += 1;
        Ok(ClientSlot {
            limits: self.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_allows_limit_per_second() {
        let mut window = RateWindow::default();
        let now = Instant::now();
        assert!((0..3).all(|_| window.try_take(now, 3)));
        assert!(!window.try_take(now, 3));
        assert!(window.try_take(now + std::time::Duration::from_secs(1), 3));
    }

    #[test]
    fn concurrency_slot_is_released_on_drop() {
        let limits = Arc::new(ClientLimits::default());
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let first = limits.admit(ip, 1, 0).expect("first");
        assert!(matches!(
            limits.admit(ip, 1, 0),
            Err(Limit::ClientConcurrent)
        ));
        drop(first);
        assert!(limits.admit(ip, 1, 0).is_ok());
    }
}
