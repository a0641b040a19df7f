//! `ringcast-edge`: the Ringcast edge proxy.
//!
//! `ringcast-edge -c conf/edge.toml` runs it; `-t` only validates the file (exit 0/1, like
//! `nginx -t`); `-u` takes the listeners over from a running edge (graceful upgrade: send
//! the old process SIGQUIT afterwards).

use clap::Parser;
use ringcast_shared::config::{self, EdgeConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "ringcast-edge", version, about)]
struct Args {
    /// The configuration file.
    #[arg(short = 'c', long = "config", default_value = "conf/edge.toml")]
    config: PathBuf,
    /// Check the configuration and exit: 0 when valid, 1 with the problem otherwise.
    #[arg(short = 't', long = "check")]
    check: bool,
    /// Graceful upgrade: take the listening sockets from the running edge.
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config: EdgeConfig = match config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ringcast-edge: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!(
            "ringcast-edge: the configuration file {} is valid",
            args.config.display()
        );
        return ExitCode::SUCCESS;
    }
    if let Err(err) = ringcast_shared::telemetry::init(&config.log) {
        eprintln!("ringcast-edge: {err}");
        return ExitCode::FAILURE;
    }
    match ringcast_proxy::lifecycle::run(args.config, config, args.upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringcast-edge: {err:#}");
            tracing::error!(error = %err, "edge failed to start");
            ExitCode::FAILURE
        }
    }
}
