//! The Ringcast testbed library: starts real Redis Clusters, nodes and edges on loopback for
//! tests and for the `ringcast-testbed` command.

pub mod bench;
