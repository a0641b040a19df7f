//! Child process supervision: start a binary with its output in a log file, wait until it is
//! ready, signal it by PID, and make sure nothing outlives the testbed.
//!
//! Three layers keep the machine free of orphans:
//! - every child gets `PR_SET_PDEATHSIG = SIGKILL`, so the kernel kills it when the testbed
//!   dies for any reason (even `kill -9` of the testbed);
//! - every live PID is kept in a process-wide registry; [`install_panic_hook`] kills them all
//!   on a panic, and [`kill_all`] is called on every normal exit path;
//! - each child runs in its own process group, so a Ctrl-C in the terminal reaches only the
//!   testbed, which then stops its children in order instead of them dying mid-drain.
//!
//! A child that exits while nobody asked it to is reported on the [`Supervisor`]'s death
//! channel, so a command can stop everything instead of carrying on with a broken cluster.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};

use crate::http;

/// PIDs of every child that is still running.
static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends SIGKILL to every child still running. Safe to call more than once.
pub fn kill_all() {
    for pid in live().iter() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Chains a panic hook that kills every child before the previous hook runs.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all();
        previous(info);
    }));
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name used in logs and reports, e.g. `node-2`.
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub envs: Vec<(String, String)>,
    /// File that receives stdout and stderr (appended, so restarts keep earlier output).
    pub log: PathBuf,
}

/// How to tell that a started process is ready.
#[derive(Debug, Clone)]
pub enum Ready {
    /// `GET path` answers 200.
    Http(SocketAddr, &'static str),
    /// A TCP connection to the address succeeds.
    Tcp(SocketAddr),
}

/// Hands out children and reports the ones that die unexpectedly.
#[derive(Debug, Clone)]
pub struct Supervisor {
    died: mpsc::UnboundedSender<String>,
}

impl Supervisor {
    /// A supervisor and the receiver of the names of children that died unexpectedly.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (died, deaths) = mpsc::unbounded_channel();
        (Self { died }, deaths)
    }

    /// Starts `spec`. Must be called from within the tokio runtime (the parent-death signal
    /// is tied to the spawning thread, so not from a short-lived blocking thread).
    ///
    /// # Errors
    /// The log file cannot be opened or the program cannot be started.
    pub fn spawn(&self, spec: &Spec) -> Result<Child> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("cannot open log file {}", spec.log.display()))?;
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .envs(spec.envs.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", spec.program.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{} exited at once", spec.name))?;
        let pid = i32::try_from(pid)?;
        live().insert(pid);
        tracing::debug!(process = %spec.name, pid, "started");
        Ok(self.watch(spec.name.clone(), pid, child))
    }

    fn watch(&self, name: String, pid: i32, mut child: tokio::process::Child) -> Child {
        let (tx, exit) = watch::channel(None);
        let expected = Arc::new(AtomicBool::new(false));
        let died = self.died.clone();
        let expected_exit = expected.clone();
        let task_name = name.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            live().remove(&pid);
            if !expected_exit.load(Ordering::SeqCst) {
                tracing::warn!(process = %task_name, pid, ?status, "exited unexpectedly");
                let _ = died.send(task_name);
            }
            let _ = tx.send(Some(status));
        });
        Child {
            name,
            pid,
            exit,
            expected,
        }
    }
}

/// Asks the kernel to SIGKILL the child when the thread that started it goes away.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A started process.
#[derive(Debug)]
pub struct Child {
    name: String,
    pid: i32,
    exit: watch::Receiver<Option<Option<ExitStatus>>>,
    expected: Arc<AtomicBool>,
}

impl Child {
    /// The name given in its [`Spec`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Sends `signal`; the exit that follows is not reported as unexpected.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.expected.store(true, Ordering::SeqCst);
        if !self.is_running() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid), signal)
            .with_context(|| format!("cannot send {signal} to {}", self.name))
    }

    /// Waits until it exits, up to `deadline`.
    ///
    /// # Errors
    /// It is still running at the deadline.
    pub async fn wait_exit(&self, deadline: Duration) -> Result<Option<ExitStatus>> {
        let mut exit = self.exit.clone();
        let waited = timeout(deadline, exit.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(status)) => Ok(status.flatten()),
            Ok(Err(_)) => Ok(None),
            Err(_) => bail!("{} still running after {deadline:?}", self.name),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        if self.signal(Signal::SIGTERM).is_ok()
            && let Ok(status) = self.wait_exit(grace).await
        {
            return status;
        }
        let _ = self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5)).await.ok().flatten()
    }

    /// Polls until `ready` holds, failing early if the process exits.
    ///
    /// # Errors
    /// The process exited, or `deadline` passed first.
    pub async fn wait_ready(&self, ready: &Ready, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if !self.is_running() {
                bail!("{} exited before it was ready", self.name);
            }
            if probe(ready).await {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("{} not ready after {deadline:?}", self.name);
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.is_running() {
            self.expected.store(true, Ordering::SeqCst);
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

async fn probe(ready: &Ready) -> bool {
    let attempt = Duration::from_secs(1);
    match ready {
        Ready::Http(addr, path) => matches!(
            timeout(attempt, http::get(*addr, path)).await,
            Ok(Ok(response)) if response.status == 200
        ),
        Ready::Tcp(addr) => matches!(
            timeout(attempt, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        ),
    }
}

/// The path of a log file for `name` in `dir`.
pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path, name: &str, script: &str) -> Spec {
        Spec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            envs: Vec::new(),
            log: log_path(dir, name),
        }
    }

    #[tokio::test]
    async fn stop_terminates_and_unregisters_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let (supervisor, mut deaths) = Supervisor::new();
        let child = supervisor
            .spawn(&sleeper(dir.path(), "s", "echo hi; exec sleep 30"))
            .unwrap();
        assert!(child.is_running());
        assert!(live().contains(&child.pid()));
        sleep(Duration::from_millis(300)).await;
        child.stop(Duration::from_secs(5)).await;
        assert!(!child.is_running());
        assert!(!live().contains(&child.pid()));
        assert!(
            deaths.try_recv().is_err(),
            "a requested stop is not a death"
        );
        let log = std::fs::read_to_string(log_path(dir.path(), "s")).unwrap();
        assert_eq!(log, "hi\n");
    }

    #[tokio::test]
    async fn an_unexpected_exit_is_reported_and_fails_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let (supervisor, mut deaths) = Supervisor::new();
        let child = supervisor
            .spawn(&sleeper(dir.path(), "x", "exit 3"))
            .unwrap();
        let name = timeout(Duration::from_secs(5), deaths.recv())
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("x"));
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = child
            .wait_ready(&Ready::Tcp(addr), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("exited before it was ready"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn dropping_a_child_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let (supervisor, _deaths) = Supervisor::new();
        let child = supervisor
            .spawn(&sleeper(dir.path(), "d", "exec sleep 30"))
            .unwrap();
        let pid = child.pid();
        drop(child);
        sleep(Duration::from_millis(300)).await;
        let gone = kill(Pid::from_raw(pid), None).is_err() || !live().contains(&pid);
        assert!(gone);
    }
}
