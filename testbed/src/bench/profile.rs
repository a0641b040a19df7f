//! CPU profiles of compared processes taken with `perf` during a benchmark run, so that a
//! shortfall in the report can be explained by where the time went rather than by a guess.
//! Enabled with `--profile`; when `perf` is missing or not permitted the profile is skipped
//! and the report says so.

use super::procs::Proc;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Sampling frequency, per second.
const FREQUENCY: &str = "499";
/// Symbols shown per profile.
const TOP: usize = 14;

/// A running `perf record` attached to some processes.
pub struct Profile {
    proc: Proc,
    file: PathBuf,
    /// What was profiled, for the report.
    pub label: String,
}

impl Profile {
    /// Starts sampling `pids` (all threads) until [`Profile::finish`].
    pub fn start(label: &str, pids: &[u32], dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(!pids.is_empty(), "nothing to profile");
        let file = dir.join(format!("perf-{}.data", label.replace(['/', ' '], "_")));
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut cmd = Command::new("perf");
        // DWARF unwinding: the release builds keep no frame pointers, and frame-pointer
        // call chains stop at the first Rust frame, so callers would be lost.
        cmd.args(["record", "-F", FREQUENCY, "--call-graph", "dwarf", "-p"])
            .arg(list.join(","))
            .arg("-o")
            .arg(&file);
        let log = dir.join(format!("perf-{}.log", label.replace(['/', ' '], "_")));
        let proc = Proc::spawn("perf", cmd, &log)?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(Self {
            proc,
            file,
            label: label.to_owned(),
        })
    }

    /// Stops sampling and returns the hottest symbols as text.
    pub fn finish(self) -> anyhow::Result<String> {
        stop(&self.proc);
        drop(self.proc);
        let by_binary = report(&self.file, "dso", false, |_| true, SHARES)?;
        // Kernel time is mostly the same TCP work for every proxy; the user-space symbols
        // are where the programs differ.
        let user = report(
            &self.file,
            "dso,sym",
            false,
            |line| !line.contains("[k]"),
            TOP,
        )?;
        // Time spent in a function and everything it called (system calls included), for
        // the Ringcast and pingora functions: which step of the work costs what.
        let steps = report(&self.file, "sym", true, is_own_step, TOP).unwrap_or_default();
        let mut text = format!(
            "share of samples by binary:\n{by_binary}\n\nhottest user-space symbols (self time):\n{user}"
        );
        if !steps.is_empty() {
            text += &format!(
                "\n\nRingcast and pingora functions, time including callees (children, self):\n{steps}"
            );
        }
        Ok(text)
    }
}

/// The system calls counted by [`SyscallCount`], by tracepoint name.
const SYSCALLS: [&str; 7] = [
    "recvfrom",
    "sendto",
    "read",
    "write",
    "epoll_wait",
    "epoll_ctl",
    "futex",
];

/// A running `perf stat` counting the system calls some processes make, so that two
/// programs doing the same work can be compared call by call.
pub struct SyscallCount {
    proc: Proc,
    file: PathBuf,
}

impl SyscallCount {
    /// Starts counting the system calls of `pids` (all threads) until [`SyscallCount::finish`].
    pub fn start(label: &str, pids: &[u32], dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(!pids.is_empty(), "nothing to count");
        let name = label.replace(['/', ' '], "_");
        let file = dir.join(format!("syscalls-{name}.csv"));
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let events: Vec<String> = std::iter::once("raw_syscalls:sys_enter".to_owned())
            .chain(SYSCALLS.iter().map(|s| format!("syscalls:sys_enter_{s}")))
            .collect();
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x", ",", "-e", &events.join(","), "-p"])
            .arg(list.join(","))
            .arg("-o")
            .arg(&file);
        let proc = Proc::spawn("perf-stat", cmd, &dir.join(format!("syscalls-{name}.log")))?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(Self { proc, file })
    }

    /// Stops counting and returns the calls per unit of work (`units` of it were done):
    /// each counted call, then "other", then the total.
    pub fn finish(self, units: f64) -> anyhow::Result<String> {
        stop(&self.proc);
        drop(self.proc);
        let text = std::fs::read_to_string(&self.file)?;
        let counts = parse_stat(&text);
        let total = counts.get("raw_syscalls:sys_enter").copied();
        let total = total.context("perf stat counted no system calls")?;
        let per = |n: u64| n as f64 / units.max(1.0);
        let mut named = 0;
        let mut parts = Vec::new();
        for name in SYSCALLS {
            let n = counts.get(&format!("syscalls:sys_enter_{name}")).copied();
            let n = n.unwrap_or(0);
            named += n;
            if n > 0 {
                parts.push(format!("{name} {:.2}", per(n)));
            }
        }
        parts.push(format!("other {:.2}", per(total.saturating_sub(named))));
        Ok(format!("{} (total {:.2})", parts.join(", "), per(total)))
    }
}

/// Event counts from `perf stat -x ,` output (`count,unit,event,…` lines).
fn parse_stat(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split(',');
            let count = fields.next()?.trim().parse().ok()?;
            let event = fields.nth(1)?.trim();
            Some((event.to_owned(), count))
        })
        .collect()
}

/// Sends SIGINT to a `perf` process and waits (up to 5 s) until it has written its output.
fn stop(proc: &Proc) {
    let pid = nix::unistd::Pid::from_raw(proc.pid() as i32);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).is_err() {
        return;
    }
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() || zombie(pid.as_raw() as u32) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lines shown of the split by binary.
const SHARES: usize = 6;

/// Whether a `perf report` line names a step of Ringcast's or pingora's own work (rather
/// than the runtime, the allocator or the kernel).
fn is_own_step(line: &str) -> bool {
    ["ringcast_", "pingora_"].iter().any(|c| line.contains(c))
}

/// The first `take` lines of `perf report --sort <sort>` that `keep` accepts; with
/// `children`, each symbol's share includes the functions it called.
fn report(
    file: &Path,
    sort: &str,
    children: bool,
    keep: impl Fn(&str) -> bool,
    take: usize,
) -> anyhow::Result<String> {
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-inline",
            if children {
                "--children"
            } else {
                "--no-children"
            },
            "-g",
            "none",
            "--sort",
            sort,
            "-i",
        ])
        .arg(file)
        .stderr(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && keep(l))
        .take(take)
        .collect();
    anyhow::ensure!(!lines.is_empty(), "perf recorded no samples");
    Ok(lines.join("\n"))
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// A report subsection with every profile taken.
pub fn render(profiles: &[(String, String)]) -> String {
    if profiles.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "CPU profiles (`perf record --call-graph dwarf` during an extra, uncounted run of the same load):\n\n",
    );
    for (label, text) in profiles {
        out += &format!("{label}:\n\n```\n{text}\n```\n\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_csv_is_parsed() {
        let text = "# started on Fri Dec  4 12:00:00 2026\n\n\
            59976,,syscalls:sys_enter_recvfrom,1002520821,100.00,,\n\
            <not counted>,,syscalls:sys_enter_futex,0,100.00,,\n\
            90001,,raw_syscalls:sys_enter,1002520821,100.00,,\n";
        let counts = parse_stat(text);
        assert_eq!(counts.get("syscalls:sys_enter_recvfrom"), Some(&59976));
        assert_eq!(counts.get("raw_syscalls:sys_enter"), Some(&90001));
        assert_eq!(counts.get("syscalls:sys_enter_futex"), None);
    }
}
