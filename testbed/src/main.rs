//! `ringcast-testbed`: runs a whole Ringcast cluster on this machine (Redis Cluster, nodes,
//! edge), drives simulated clients through faults and reports what was lost.
//!
//! Commands: `up` (start everything, print the endpoints, run until Ctrl-C), `demo` (every
//! fault in order with 1,000 clients; exits non-zero on any loss), `scenario <fault>` (one
//! fault alone), `bench` (side-by-side benchmarks). Every process started is stopped on exit,
//! Ctrl-C, panic or failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ringcast_testbed::binaries::Build;
use ringcast_testbed::process;
use ringcast_testbed::runner::{self, CommonOptions};
use ringcast_testbed::scenario::{Fault, RunPlan};

#[derive(Parser)]
#[command(
    version,
    about = "Runs a whole Ringcast cluster on this machine and proves what was lost"
)]
struct Cli {
    /// Run folder for configs, logs and reports [default: runs/<UTC timestamp>].
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    /// Folder with the node.toml and edge.toml templates [default: the workspace's conf/].
    #[arg(long, global = true)]
    conf_dir: Option<PathBuf>,
    /// When to run `cargo build` for ringcast-node and ringcast-edge.
    #[arg(long, global = true, value_enum, default_value_t = BuildArg::Always)]
    build: BuildArg,
    /// Nodes at the start.
    #[arg(long, global = true, default_value_t = 3)]
    nodes: usize,
    /// No live view.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BuildArg {
    /// Always (a no-op when up to date).
    Always,
    /// Only when a binary is missing.
    IfMissing,
    /// Never.
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Start Redis Cluster, the nodes and the edge; print URLs and a token; run until Ctrl-C.
    Up,
    /// Every fault in order under load, then the report; exits 1 on any loss.
    Demo(Load),
    /// One fault alone under load, then the report; exits 1 on any loss.
    Scenario {
        /// The fault.
        #[arg(value_enum)]
        fault: Fault,
        #[command(flatten)]
        load: Load,
    },
    /// Benchmarks side by side with nginx, HAProxy and the socket.io stack.
    Bench(ringcast_testbed::bench::BenchArgs),
}

#[derive(Args)]
struct Load {
    /// Simulated clients.
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// Rooms (client i joins room i mod rooms).
    #[arg(long, default_value_t = 50)]
    rooms: u32,
    /// Publishes per second over the whole fleet.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long each fault phase lasts after its steps (e.g. 8s, 500ms).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    duration: Duration,
    /// Steady publishing before the first fault.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// A client that cannot get back within this long counts as lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resume_window: Duration,
    /// Clients connecting per second at the start.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 8s or 500ms"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|err| format!("{text:?}: {err}"))
}

impl Load {
    fn plan(&self, faults: Vec<Fault>) -> RunPlan {
        RunPlan {
            clients: self.clients,
            rooms: self.rooms,
            rate: self.rate,
            connect_rate: self.connect_rate,
            warmup: self.warmup,
            settle: self.duration,
            resume_window: self.resume_window,
            faults,
        }
    }
}

fn main() -> ExitCode {
    process::install_panic_hook();
    let cli = Cli::parse();
    let filter = tracing_subscriber_filter();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    process::kill_all();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn tracing_subscriber_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ringcast_testbed=info"))
}

/// Runs the command; `Ok(false)` when a run found losses.
async fn run(cli: Cli) -> Result<bool> {
    let options = CommonOptions {
        run_dir: cli.run_dir,
        conf_dir: cli.conf_dir.unwrap_or_else(runner::default_conf_dir),
        build: match cli.build {
            BuildArg::Always => Build::Always,
            BuildArg::IfMissing => Build::IfMissing,
            BuildArg::Never => Build::Never,
        },
        nodes: cli.nodes,
        edge_grace: Duration::from_secs(5),
        live: !cli.quiet,
    };
    if options.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let (name, plan) = match cli.command {
        Command::Up => {
            runner::up(&options).await?;
            return Ok(true);
        }
        Command::Bench(args) => {
            ringcast_testbed::bench::run(args).await?;
            return Ok(true);
        }
        Command::Demo(load) => ("demo".to_owned(), load.plan(Fault::ALL.to_vec())),
        Command::Scenario { fault, load } => {
            (format!("scenario {}", fault.name()), load.plan(vec![fault]))
        }
    };
    let work = runner::run_plan(&name, &options, &plan);
    let report = tokio::select! {
        report = work => report?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every process was stopped"),
    };
    println!("\n{}", report.markdown());
    Ok(report.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_units() {
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn the_cli_parses_a_scenario() {
        let cli = Cli::try_parse_from([
            "ringcast-testbed",
            "--nodes",
            "2",
            "scenario",
            "kill-node",
            "--clients",
            "10",
        ])
        .unwrap();
        assert_eq!(cli.nodes, 2);
        let Command::Scenario { fault, load } = cli.command else {
            panic!("not a scenario");
        };
        assert_eq!(fault, Fault::KillNode);
        assert_eq!(load.clients, 10);
        assert!(Cli::try_parse_from(["ringcast-testbed", "scenario", "melt"]).is_err());
    }
}
