//! `ringcast-testbed bench`: Ringcast side by side with the stack it replaces, measured in
//! the same run on the same machine with the same load generator.
//!
//! - [`edge`]: WebSocket echo through the Ringcast edge, nginx and HAProxy (throughput,
//!   added latency, handshakes/s).
//! - [`idle`]: resident memory per idle WebSocket in the proxies, in `ringcast-node` and in
//!   the socket.io server.
//! - [`fanout`], [`failover`], [`scale`]: room fan-out against the socket.io stack, node
//!   loss behind the edge, and how many connections the box holds.
//!
//! Compared targets alternate within every round (speed drifts 5–10 % within an hour here),
//! every figure is a median over rounds with its range, and the load generator's own ceiling
//! (direct to the echo backends) is measured in the same rounds so that a result limited by
//! the generator is flagged. Helpers: [`loadgen`], [`echo`], [`hold`], [`proxies`],
//! [`procs`], [`stats`], [`report`], [`seed`], [`setup`].

pub mod echo;
pub mod edge;
pub mod failover;
pub mod fanout;
pub mod hold;
pub mod idle;
pub mod loadgen;
pub mod procs;
pub mod profile;
pub mod proxies;
pub mod report;
pub mod ringcast;
pub mod rooms;
pub mod scale;
pub mod seed;
pub mod setup;
pub mod stats;

use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Arguments of `ringcast-testbed bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[command(subcommand)]
    pub which: Which,
}

/// The benchmarks, plus the helper processes they start.
#[derive(Debug, Subcommand)]
pub enum Which {
    /// Echo through the Ringcast edge, nginx and HAProxy.
    Edge(Common),
    /// Memory per idle WebSocket (proxies, node vs socket.io).
    Idle(Common),
    /// Room fan-out: three Ringcast nodes vs three socket.io servers.
    Fanout(Common),
    /// Time to route around a killed node, and its clients' reconnects.
    Failover(Common),
    /// Most concurrent connections the box holds through edges.
    Scale(Common),
    /// Every benchmark, written to docs/benchmarks.md.
    All(Common),
    /// (internal) the echo backend process.
    #[command(hide = true)]
    EchoServer {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// (internal) a process holding idle connections.
    #[command(hide = true)]
    Hold(hold::HoldArgs),
}

/// Settings shared by every benchmark.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Rounds per benchmark; targets alternate within each round.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Worker processes/threads of every proxy.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Connections of the echo throughput and latency runs.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Messages per second of the open-loop latency run (all connections together).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Seconds measured per run (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Idle connections per target in the idle bench (a proxy is capped near 9,900 by the
    /// 20,000 open-files limit: two descriptors per tunnel).
    #[arg(long, default_value_t = 10_000)]
    pub idle_conns: usize,
    /// Connections the scale bench tries to hold.
    #[arg(long, default_value_t = 50_000)]
    pub scale_conns: usize,
    /// Where `ringcast-edge` and `ringcast-node` are (default: built in release next to
    /// this binary, as the demo does).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The seed stack (nginx + socket.io + Redis Cluster) folder; when it is not set up,
    /// `--seed-src` is copied there and its setup.sh run.
    #[arg(long, default_value = "~/.cache/ringcast-bench/seed-stack")]
    pub seed_dir: String,
    /// A pristine copy of the seed stack, used to set up `--seed-dir` when needed.
    #[arg(long, default_value = "../shared/seed-stack")]
    pub seed_src: PathBuf,
    /// Take `perf` CPU profiles of the compared processes (first round only).
    #[arg(long)]
    pub profile: bool,
    /// Write the markdown report here (`all` defaults to docs/benchmarks.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `ringcast-testbed bench …`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Which::EchoServer { listen } => {
            tokio::task::spawn_blocking(move || echo::serve(listen)).await?
        }
        Which::Hold(hold) => hold::run(hold).await,
        Which::Edge(c) => report::run(&c, &[report::Part::Edge]).await,
        Which::Idle(c) => report::run(&c, &[report::Part::Idle]).await,
        Which::Fanout(c) => report::run(&c, &[report::Part::Fanout]).await,
        Which::Failover(c) => report::run(&c, &[report::Part::Failover]).await,
        Which::Scale(c) => report::run(&c, &[report::Part::Scale]).await,
        Which::All(mut c) => {
            c.out
                .get_or_insert_with(|| PathBuf::from("docs/benchmarks.md"));
            report::run(&c, &report::Part::ALL).await
        }
    }
}
