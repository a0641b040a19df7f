//! The Ringcast testbed library: starts real Redis Clusters, nodes and edges on loopback for
//! tests and for the `ringcast-testbed` command, drives simulated clients through faults and
//! checks what was lost.
//!
//! - [`checker`]: the loss checker (pure logic over the event log of a run).
//! - [`process`]: child process supervision (logs, readiness, signals, no orphans).
//! - [`http`]: a minimal loopback HTTP client for probes and the edge admin API.
pub mod binaries;
pub mod checker;
pub mod fleet;
pub mod http;
pub mod process;
pub mod runfolder;
pub mod stats;
