//! What the commands do, as library calls the CLI and the integration tests share: bring a
//! stack up (and keep it up until told to stop), or run a plan of faults against it and
//! write the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::binaries::{Binaries, Build};
use crate::live;
use crate::report::Report;
use crate::runfolder::RunFolder;
use crate::scenario::{self, RunPlan};
use crate::stack::{Stack, StackOptions};
use crate::stats::Stats;

/// Options common to every command.
#[derive(Debug, Clone)]
pub struct CommonOptions {
    /// Run folder; `runs/<timestamp>` when `None`.
    pub run_dir: Option<PathBuf>,
    /// Folder with the `node.toml` and `edge.toml` templates.
    pub conf_dir: PathBuf,
    /// When to build the node and edge.
    pub build: Build,
    /// Nodes at the start.
    pub nodes: usize,
    /// Grace period of an old edge after an upgrade.
    pub edge_grace: Duration,
    /// Show the live view.
    pub live: bool,
}

/// The `conf/` folder of the workspace this testbed was built from, or `./conf`.
pub fn default_conf_dir() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf");
    if workspace.is_dir() {
        workspace
    } else {
        PathBuf::from("conf")
    }
}

async fn start(
    options: &CommonOptions,
) -> Result<(Stack, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let folder = RunFolder::create(options.run_dir.clone())?;
    let build = options.build;
    let binaries = tokio::task::spawn_blocking(move || Binaries::locate(build)).await??;
    let stack_options = StackOptions {
        nodes: options.nodes,
        conf_dir: options.conf_dir.clone(),
        binaries,
        edge_grace: options.edge_grace,
    };
    eprintln!("run folder: {}", folder.path().display());
    Stack::start(stack_options, folder).await
}

/// Prints how to reach a running stack.
fn print_endpoints(stack: &Stack) -> Result<()> {
    println!("client URL:   {}", stack.client_url());
    println!("edge admin:   http://{}/backends", stack.edge_admin);
    println!("edge metrics: http://{}/metrics", stack.edge_admin);
    for (id, listen) in stack.nodes() {
        println!("{id}:       http://{listen}/metrics (ws://{listen}/ws)");
    }
    println!("redis:        {}", stack.redis_urls().join(" "));
    println!("sample token: {}", stack.sample_token()?);
    println!("run folder:   {}", stack.folder().path().display());
    Ok(())
}

/// `up`: starts everything and keeps it running until Ctrl-C, SIGTERM or a child's death.
///
/// # Errors
/// Start-up fails, or a child died unexpectedly.
pub async fn up(options: &CommonOptions) -> Result<()> {
    let (stack, mut deaths) = start(options).await?;
    print_endpoints(&stack)?;
    println!("running; Ctrl-C stops every process");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let died = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        name = deaths.recv() => name,
    };
    eprintln!("stopping…");
    stack.shutdown().await;
    if let Some(name) = died {
        bail!("{name} died unexpectedly; everything was stopped");
    }
    Ok(())
}

/// Runs `plan` on a fresh stack, writes the report into the run folder and returns it.
///
/// # Errors
/// Start-up fails or the report cannot be written.
pub async fn run_plan(command: &str, options: &CommonOptions, plan: &RunPlan) -> Result<Report> {
    let (mut stack, mut deaths) = start(options).await?;
    print_endpoints(&stack)?;
    let stats = Arc::new(Stats::new());
    let sampler = {
        let stats = stats.clone();
        tokio::spawn(async move { stats.sample_forever().await })
    };
    let view = options.live.then(|| live::spawn(stats.clone()));
    let outcome = scenario::run(&mut stack, plan, stats.clone(), &mut deaths).await;
    sampler.abort();
    if let Some(view) = view {
        view.abort();
    }
    let folder = stack.folder().path().to_path_buf();
    stack.shutdown().await;
    let report = Report::new(
        command,
        plan,
        options.nodes,
        outcome,
        stats.series(),
        stats.marks(),
    );
    report.write(&folder)?;
    eprintln!("reports: {}/report.{{md,json,html}}", folder.display());
    Ok(report)
}
