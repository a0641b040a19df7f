//! `ringcast-testbed`: runs a whole Ringcast cluster on this machine.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks against nginx, HAProxy and the socket.io stack.
    Bench(ringcast_testbed::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => ringcast_testbed::bench::run(args).await,
    }
}
