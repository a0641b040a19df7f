//! Backend selection: the set of upstream servers, their state, and the Ketama ring.
//!
//! The ring is pingora-load-balancing's `LoadBalancer<KetamaHashing>` fed by our own
//! [`ServiceDiscovery`] ([`Members`]), so backends can be added, removed and drained at
//! runtime. A drained, draining, down or passively ejected backend stays in the ring (its
//! keys do not move to anyone else's place) and is skipped by the selection filter, so only
//! its own keys go to the next node of the ring.
//!
//! Weight 0 never reaches Ketama (which asserts weight ≥ 1 and would kill the update task):
//! such a backend enters the ring with weight 1 and is treated as drained.

use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use ringcast_shared::config::{BackendConfig, HealthConfig};
use serde::Serialize;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::health::Probe;
use crate::limits::RateWindow;
use crate::metrics;

/// How many ring points a selection walks before giving up. With few backends down, a
/// small number returns nothing for some keys; a few hundred always finds a live one.
const MAX_RING_STEPS: usize = 512;

/// What the active checks say about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Answers its readiness check: takes new connections.
    Healthy,
    /// Answers, but not ready (e.g. 503 while it drains): keeps tunnels, no new clients.
    Draining,
    /// Does not answer: skipped.
    Down,
}

/// One upstream server and everything the edge tracks about it.
#[derive(Debug)]
pub struct BackendState {
    /// Unique name from the config.
    pub id: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Configured weight (0 = drained).
    pub weight: u32,
    admin_drained: AtomicBool,
    /// Active health state with its rise/fall counters.
    pub probe: Mutex<Probe>,
    ejected_until: Mutex<Option<Instant>>,
    /// Upgraded connections currently open through this backend.
    pub tunnels: AtomicU64,
    /// Requests and upgrades sent to this backend since it was added.
    pub new_connections: AtomicU64,
    /// New upgrades in the current second (for the per-backend cap).
    pub upgrade_window: Mutex<RateWindow>,
}

impl BackendState {
    fn new(config: &BackendConfig) -> Self {
        Self {
            id: config.id.clone(),
            address: config.address,
            weight: config.weight,
            admin_drained: AtomicBool::new(false),
            probe: Mutex::new(Probe::default()),
            ejected_until: Mutex::new(None),
            tunnels: AtomicU64::new(0),
            new_connections: AtomicU64::new(0),
            upgrade_window: Mutex::new(RateWindow::default()),
        }
    }

    /// The state shown to operators: drained by admin or weight 0 counts as draining.
    pub fn state(&self) -> Health {
        let health = lock(&self.probe).health();
        if health == Health::Healthy && self.ejected() {
            Health::Down
        } else if health == Health::Healthy && self.drained() {
            Health::Draining
        } else {
            health
        }
    }

    /// Whether new clients may be sent here.
    pub fn accepts_new(&self) -> bool {
        !self.drained() && !self.ejected() && lock(&self.probe).health() == Health::Healthy
    }

    fn drained(&self) -> bool {
        self.weight == 0 || self.admin_drained.load(Ordering::Relaxed)
    }

    fn ejected(&self) -> bool {
        lock(&self.ejected_until).is_some_and(|until| until > Instant::now())
    }

    /// Ends a passive ejection (a successful probe proved it reachable).
    pub fn clear_ejection(&self) {
        *lock(&self.ejected_until) = None;
    }

    fn ring_backend(&self) -> Backend {
        let mut backend = Backend::new_with_weight(&self.address.to_string(), 1)
            .expect("a SocketAddr always parses");
        backend.weight = self.weight.max(1) as usize;
        backend
    }
}

/// Locks a mutex, ignoring poisoning (state stays usable after a panicking holder).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The current membership, shared between the pool and the discovery.
#[derive(Default)]
struct Members {
    by_id: BTreeMap<String, Arc<BackendState>>,
}

/// Our [`ServiceDiscovery`]: returns the current members and an explicit enablement map
/// (`true` for every backend taking new clients, `false` for drained ones).
struct Discovery(Arc<RwLock<Arc<Members>>>);

#[async_trait]
impl ServiceDiscovery for Discovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let members = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut set = BTreeSet::new();
        let mut enabled = HashMap::new();
        for state in members.by_id.values() {
            let backend = state.ring_backend();
            enabled.insert(hash_of(&backend), !state.drained());
            set.insert(backend);
        }
        Ok((set, enabled))
    }
}

fn hash_of(backend: &Backend) -> u64 {
    let mut hasher = DefaultHasher::new();
    backend.hash(&mut hasher);
    hasher.finish()
}

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// No backend has this id.
    #[error("no backend named {0:?}")]
    Unknown(String),
    /// The id or the address is already in use.
    #[error("{0}")]
    Conflict(String),
    /// The last backend cannot be removed.
    #[error("the last backend cannot be removed")]
    LastBackend,
}

/// The backends and the ring over them.
pub struct Pool {
    members: Arc<RwLock<Arc<Members>>>,
    ring: LoadBalancer<KetamaHashing>,
    health: HealthConfig,
}

impl Pool {
    /// Builds the pool and its ring from the configured backends.
    pub async fn new(backends: &[BackendConfig], health: HealthConfig) -> Arc<Self> {
        let members = Arc::new(RwLock::new(Arc::new(Members::default())));
        let discovery = Box::new(Discovery(members.clone()));
        let ring = LoadBalancer::from_backends(Backends::new(discovery));
        let pool = Arc::new(Self {
            members,
            ring,
            health,
        });
        pool.replace_all(backends).await;
        pool
    }

    /// Every backend, ordered by id.
    pub fn all(&self) -> Vec<Arc<BackendState>> {
        self.snapshot().by_id.values().cloned().collect()
    }

    /// The backend with this id.
    pub fn get(&self, id: &str) -> Option<Arc<BackendState>> {
        self.snapshot().by_id.get(id).cloned()
    }

    fn snapshot(&self) -> Arc<Members> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first backend on the ring for `key` that takes new clients and is not in `skip`.
    pub fn select(&self, key: &[u8], skip: &[SocketAddr]) -> Option<Arc<BackendState>> {
        let members = self.snapshot();
        let by_addr: HashMap<SocketAddr, &Arc<BackendState>> = members
            .by_id
            .values()
            .map(|state| (state.address, state))
            .collect();
        let accept = |backend: &Backend, enabled: bool| {
            let addr = inet(&backend.addr);
            enabled
                && !addr.is_some_and(|addr| skip.contains(&addr))
                && addr
                    .and_then(|addr| by_addr.get(&addr))
                    .is_some_and(|state| state.accepts_new())
        };
        let chosen = self.ring.select_with(key, MAX_RING_STEPS, accept)?;
        inet(&chosen.addr).and_then(|addr| by_addr.get(&addr).map(|s| (*s).clone()))
    }

    /// Rebuilds the ring from the current membership.
    async fn rebuild(&self) {
        if let Err(err) = self.ring.update().await {
            tracing::error!(error = %err, "rebuilding the hash ring failed");
        }
    }

    fn publish(&self, members: Members) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(members);
    }

    /// Makes the membership equal to `backends`, keeping the state (health, counters) of
    /// every backend whose id, address and weight are unchanged. Returns (added, removed).
    pub async fn replace_all(&self, backends: &[BackendConfig]) -> (usize, usize) {
        let old = self.snapshot();
        let mut next = Members::default();
        let mut added = 0;
        for config in backends {
            let kept = old
                .by_id
                .get(&config.id)
                .filter(|state| state.address == config.address && state.weight == config.weight);
            let state = kept.cloned().unwrap_or_else(|| {
                added += 1;
                new_state(config)
            });
            next.by_id.insert(config.id.clone(), state);
        }
        let removed = old
            .by_id
            .keys()
            .filter(|id| !next.by_id.contains_key(*id))
            .count();
        self.publish(next);
        self.rebuild().await;
        (added, removed)
    }

    /// Adds one backend at runtime.
    pub async fn add(&self, config: &BackendConfig) -> Result<(), PoolError> {
        let old = self.snapshot();
        if old.by_id.contains_key(&config.id) {
            return Err(PoolError::Conflict(format!(
                "backend {:?} exists",
                config.id
            )));
        }
        if old.by_id.values().any(|s| s.address == config.address) {
            let problem = format!("address {} is in use", config.address);
            return Err(PoolError::Conflict(problem));
        }
        let mut by_id = old.by_id.clone();
        by_id.insert(config.id.clone(), new_state(config));
        self.publish(Members { by_id });
        self.rebuild().await;
        tracing::info!(backend = %config.id, address = %config.address, "backend added");
        Ok(())
    }

    /// Removes one backend at runtime; its open tunnels stay open.
    pub async fn remove(&self, id: &str) -> Result<(), PoolError> {
        let old = self.snapshot();
        if !old.by_id.contains_key(id) {
            return Err(PoolError::Unknown(id.to_owned()));
        }
        if old.by_id.len() == 1 {
            return Err(PoolError::LastBackend);
        }
        let mut by_id = old.by_id.clone();
        by_id.remove(id);
        self.publish(Members { by_id });
        self.rebuild().await;
        tracing::info!(backend = %id, "backend removed");
        Ok(())
    }

    /// Drains (`true`) or undrains a backend; its open tunnels stay open either way.
    pub async fn set_drained(&self, id: &str, drained: bool) -> Result<(), PoolError> {
        let state = self
            .get(id)
            .ok_or_else(|| PoolError::Unknown(id.to_owned()))?;
        state.admin_drained.store(drained, Ordering::Relaxed);
        self.rebuild().await;
        tracing::info!(backend = %id, drained, "backend drain changed by admin");
        Ok(())
    }

    /// Records a failed upstream connect: ejects the backend for `passive_eject_for`
    /// unless `max_passive_ejected` backends are already ejected.
    pub fn passive_failure(&self, address: SocketAddr) {
        let members = self.snapshot();
        let Some(state) = members.by_id.values().find(|s| s.address == address) else {
            return;
        };
        metrics::connect_failure(&state.id);
        let ejected = members.by_id.values().filter(|s| s.ejected()).count();
        if state.ejected() {
            return;
        }
        if ejected >= self.health.max_passive_ejected {
            tracing::warn!(backend = %state.id, ejected, "passive ejection cap reached; not ejecting");
            return;
        }
        *lock(&state.ejected_until) = Some(Instant::now() + self.health.passive_eject_for);
        metrics::health_transition(&state.id, "ejected");
        tracing::warn!(backend = %state.id, for_ms = duration_ms(self.health.passive_eject_for),
            "upstream connect failed; backend ejected");
    }
}

fn new_state(config: &BackendConfig) -> Arc<BackendState> {
    if config.weight == 0 {
        tracing::warn!(backend = %config.id, "weight 0: kept in the ring as drained");
    }
    Arc::new(BackendState::new(config))
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The IP socket address of a pingora peer address.
pub fn inet(addr: &PeerAddr) -> Option<SocketAddr> {
    addr.as_inet().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest observed deviation of one backend's key share from 1/N, plus margin.
    const RING_SPREAD: f64 = 0.06;

    fn configs(n: u16) -> Vec<BackendConfig> {
        (1..=n)
            .map(|i| BackendConfig {
                id: format!("b{i}"),
                address: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                weight: 1,
            })
            .collect()
    }

    fn owners(pool: &Pool, keys: usize) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let key = format!("10.{}.{}.7", k / 250, k % 250);
                pool.select(key.as_bytes(), &[])
                    .expect("a backend")
                    .id
                    .clone()
            })
            .collect()
    }

    #[tokio::test]
    async fn removing_one_of_n_moves_only_its_keys_and_about_one_nth() {
        for n in 3..=10u16 {
            let all = configs(n);
            let pool = Pool::new(&all, HealthConfig::default()).await;
            let before = owners(&pool, 10_000);
            pool.remove("b2").await.unwrap();
            let after = owners(&pool, 10_000);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            for (b, a) in before.iter().zip(&after) {
                assert!(b == a || b == "b2", "key of {b} moved to {a}");
            }
            // Exactly the removed backend's keys move; their share is its slice of the
            // ring, which Ketama's 160 points per backend keep near 1/N (nginx has the
            // same spread: the ring is the same).
            let owned = before.iter().filter(|b| *b == "b2").count();
            assert_eq!(moved, owned, "n={n}");
            let share = moved as f64 / 10_000.0;
            let ideal = 1.0 / f64::from(n);
            eprintln!("n={n} moved {share:.4} ideal {ideal:.4}");
            assert!((share - ideal).abs() <= RING_SPREAD, "n={n} moved {share}");

            pool.add(&all[1]).await.unwrap();
            assert_eq!(
                owners(&pool, 10_000),
                before,
                "n={n}: re-adding restores every key"
            );
        }
    }

    #[tokio::test]
    async fn weight_zero_is_drained_not_fatal() {
        let mut all = configs(3);
        all[2].weight = 0;
        let pool = Pool::new(&all, HealthConfig::default()).await;
        let picked = owners(&pool, 1000);
        assert!(picked.iter().all(|id| id != "b3"));
        assert_eq!(pool.get("b3").unwrap().state(), Health::Draining);
    }

    #[tokio::test]
    async fn drain_and_undrain_move_only_the_drained_keys() {
        let pool = Pool::new(&configs(4), HealthConfig::default()).await;
        let before = owners(&pool, 2000);
        pool.set_drained("b1", true).await.unwrap();
        let during = owners(&pool, 2000);
        for (b, d) in before.iter().zip(&during) {
            assert!(if b == "b1" { d != "b1" } else { b == d });
        }
        pool.set_drained("b1", false).await.unwrap();
        assert_eq!(owners(&pool, 2000), before);
    }

    #[tokio::test]
    async fn passive_ejections_are_capped() {
        let all = configs(3);
        let health = HealthConfig {
            max_passive_ejected: 1,
            ..HealthConfig::default()
        };
        let pool = Pool::new(&all, health).await;
        pool.passive_failure(all[0].address);
        pool.passive_failure(all[1].address);
        assert_eq!(pool.get("b1").unwrap().state(), Health::Down);
        assert_eq!(pool.get("b2").unwrap().state(), Health::Healthy);
    }
}
