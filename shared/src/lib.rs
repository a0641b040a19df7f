//! Everything the Ringcast binaries share.
//!
//! - [`config`]: TOML configuration for every binary, loaded with serde, with a default for
//!   every optional field, unknown keys rejected, and one validation step whose error names
//!   the file, the key and the problem.
//! - [`protocol`]: the client wire protocol (JSON text frames) and the close and error codes
//!   with their documented ranges.
//! - [`telemetry`]: tracing setup (text or JSON), including the bridge that carries
//!   pingora's `log` records into the same output.
//! - [`cluster`]: the state a node shares with its peers (room fan-out, history, presence,
//!   sessions, the connection and node registries) behind one trait, with a Redis Cluster
//!   implementation and an in-process memory implementation for a single node.
//! - [`auth`]: HS256 JWT claims with room patterns, and helpers to mint and verify tokens.
//! - [`client`]: a Rust client for Ringcast nodes with reconnect and lossless resume.
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod protocol;
pub mod telemetry;
