//! The Ringcast edge: a pingora proxy in front of WebSocket backends with consistent
//! hashing, health-checked failover, drain and an admin API. Split by request phase:
//!
//! - [`key`]: client identity (trusted proxies) and the hash key from ordered sources;
//! - [`pool`]: backends, their state and the Ketama ring (own service discovery);
//! - [`health`]: active readiness checks with rise/fall;
//! - [`limits`]: admission control per client IP and per backend;
//! - [`proxy`]: the pingora callbacks (timeouts, selection, retries, tunnels);
//! - [`tunnel`]: WebSocket handshakes with failover, and the byte relay after `101`;
//! - [`admin`]: the operator HTTP API;
//! - [`metrics`]: Prometheus metrics;
//! - [`lifecycle`]: start-up, reload (SIGHUP) and background tasks.

pub mod admin;
pub mod health;
pub mod key;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod tunnel;
