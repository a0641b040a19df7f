//! The Ringcast testbed library: starts real Redis Clusters, nodes and edges on loopback for
//! tests and for the `ringcast-testbed` command, drives simulated clients through faults and
//! checks what was lost.
//!
//! - [`checker`]: the loss checker (pure logic over the event log of a run).
pub mod checker;
