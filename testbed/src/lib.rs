//! The Ringcast testbed library: starts real Redis Clusters, nodes and edges on loopback for
//! tests and for the `ringcast-testbed` command, drives simulated clients through faults and
//! checks what was lost.
//!
//! - [`redis_cluster`]: the Redis Cluster test fixture (6 `redis-server` processes).
//! - [`process`]: child process supervision (logs, readiness, signals, no orphans).
//! - [`binaries`]: finding and building `ringcast-node` and `ringcast-edge`.
//! - [`runfolder`]: the run folder and the configs generated from `conf/` templates.
//! - [`stack`]: a whole cluster (Redis, nodes, edge) and the faults it can suffer.
//! - [`fleet`]: simulated WebSocket clients that record what they see.
//! - [`checker`]: the loss checker (pure logic over the event log of a run).
//! - [`stats`]: live counters, time series and fault marks.
//! - [`scenario`]: the fault scenarios and the demo sequence.
//! - [`report`]: terminal, JSON, Markdown and HTML reports.
//! - [`live`]: the live terminal view.
//! - [`runner`]: the commands as library calls (shared by the CLI and the tests).
//! - [`http`]: a minimal loopback HTTP client for probes and the edge admin API.
//! - [`bench`]: `ringcast-testbed bench`, Ringcast side by side with nginx, HAProxy and
//!   the socket.io stack.
pub mod bench;
pub mod binaries;
pub mod checker;
pub mod fleet;
pub mod http;
pub mod live;
pub mod process;
pub mod redis_cluster;
pub mod report;
pub mod runfolder;
pub mod runner;
pub mod scenario;
pub mod stack;
pub mod stats;
