//! Finding, and where possible installing, what the benchmarks compare against: nginx and
//! HAProxy from the OS package manager, and the seed stack (nginx + socket.io + Redis
//! Cluster) with its Node.js packages in a cache folder.
//!
//! Nothing here is fatal: what cannot be found or installed is reported with the reason,
//! and the benchmarks that need it say in their section that they skipped it.

use super::proxies::{HAPROXY, NGINX, locate};
use super::seed;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes sure every incumbent is present and returns one line per incumbent saying where
/// it was found, that it was installed, or why it is missing.
pub fn prepare(seed_dir: &str, seed_src: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for (program, fallback) in [NGINX, HAPROXY] {
        let line = match ensure_program(program, fallback) {
            Ok((path, installed)) => {
                let how = if installed {
                    "installed with apt-get"
                } else {
                    "found"
                };
                format!("{program}: {how} at {}", path.display())
            }
            Err(err) => format!("{program}: **missing**, its columns are skipped: {err:#}"),
        };
        lines.push(line);
    }
    let line = match ensure_seed_stack(seed_dir, seed_src) {
        Ok((dir, true)) => format!("seed stack: set up in {} (setup.sh)", dir.display()),
        Ok((dir, false)) => format!("seed stack: found in {}", dir.display()),
        Err(err) => format!(
            "seed stack: **missing**, the socket.io side of idle, fan-out and failover is \
             skipped: {err:#}"
        ),
    };
    lines.push(line);
    lines
}

/// Finds `program`, or installs the Debian package of the same name when apt-get is there
/// and this process may use it; returns its path and whether it was installed now.
fn ensure_program(program: &str, fallback: &str) -> anyhow::Result<(PathBuf, bool)> {
    if let Ok(path) = locate(program, &[fallback]) {
        return Ok((path, false));
    }
    apt_install(program)?;
    Ok((locate(program, &[fallback])?, true))
}

fn apt_install(package: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new("/usr/bin/apt-get").exists(),
        "no apt-get here; install {package} with the system's package manager"
    );
    let root = nix::unistd::geteuid().is_root();
    anyhow::ensure!(
        root,
        "installing {package} needs root: run `sudo apt-get install {package}`"
    );
    eprintln!("bench: apt-get install {package}");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    anyhow::ensure!(
        status.success(),
        "apt-get install {package} failed ({status})"
    );
    Ok(())
}

/// Finds the seed stack set up in `seed_dir`, or copies it there from `seed_src` and runs
/// its `setup.sh` (which installs its npm packages into the folder's `.cache`); returns the
/// folder and whether it was set up now.
fn ensure_seed_stack(seed_dir: &str, seed_src: &Path) -> anyhow::Result<(PathBuf, bool)> {
    let dir = seed::expand_home(seed_dir);
    if seed::is_set_up(&dir) {
        return Ok((dir, false));
    }
    anyhow::ensure!(
        seed_src.join("setup.sh").exists(),
        "{} is not set up and there is no seed stack at {} to copy (pass --seed-src)",
        dir.display(),
        seed_src.display()
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in std::fs::read_dir(seed_src).with_context(|| format!("read {seed_src:?}"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = dir.join(entry.file_name());
            std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copy {:?} to {to:?}", entry.path()))?;
        }
    }
    eprintln!("bench: setting up the seed stack in {}", dir.display());
    let out = Command::new("bash")
        .arg(dir.join("setup.sh"))
        .output()
        .context("run the seed stack's setup.sh")?;
    anyhow::ensure!(
        out.status.success() && seed::is_set_up(&dir),
        "the seed stack's setup.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((dir, true))
}
