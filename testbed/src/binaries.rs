//! Finding (and building) the `ringcast-node` and `ringcast-edge` executables.
//!
//! The binaries are looked for next to the testbed's own executable, in the same cargo
//! target profile folder (`target/release/` for `cargo run --release`, `target/debug/` for an
//! integration test whose executable sits in `target/debug/deps/`). With
//! [`Build::Always`] (the command's default) `cargo build -p ringcast-backend -p
//! ringcast-proxy` is run first in the same profile and target folder, so a `git pull`
//! never runs stale binaries; with [`Build::IfMissing`] (the tests' choice) cargo runs only
//! when a binary is absent. `RINGCAST_NODE_BIN` and `RINGCAST_EDGE_BIN` override the paths.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The node executable's name.
pub const NODE_BIN: &str = "ringcast-node";
/// The edge executable's name.
pub const EDGE_BIN: &str = "ringcast-edge";

/// When to run cargo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Always (cheap when up to date).
    Always,
    /// Only if a binary is missing.
    IfMissing,
    /// Never: fail if a binary is missing.
    Never,
}

/// Paths of the executables the testbed starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `ringcast-node`.
    pub node: PathBuf,
    /// `ringcast-edge`.
    pub edge: PathBuf,
}

impl Binaries {
    /// Locates (and per `build`, builds) the binaries.
    ///
    /// # Errors
    /// The executable's folder is unknown, cargo fails, or a binary is still missing.
    pub fn locate(build: Build) -> Result<Self> {
        let profile_dir = profile_dir()?;
        let found = Self {
            node: env_or("RINGCAST_NODE_BIN", profile_dir.join(NODE_BIN)),
            edge: env_or("RINGCAST_EDGE_BIN", profile_dir.join(EDGE_BIN)),
        };
        let missing = !found.node.exists() || !found.edge.exists();
        if build == Build::Always || (build == Build::IfMissing && missing) {
            cargo_build(&profile_dir)?;
        }
        for path in [&found.node, &found.edge] {
            if !path.exists() {
                bail!("{} not found; build it with `cargo build`", path.display());
            }
        }
        Ok(found)
    }
}

fn env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map_or(default, PathBuf::from)
}

/// The cargo profile folder this executable lives in.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the testbed's own executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no folder")?
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// `cargo build -p ringcast-backend -p ringcast-proxy` into `profile_dir`.
fn cargo_build(profile_dir: &Path) -> Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !workspace.join("Cargo.toml").exists() {
        bail!("the Ringcast workspace is not at {}", workspace.display());
    }
    let target_dir = profile_dir
        .parent()
        .context("profile folder has no parent")?;
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "-p", "ringcast-backend", "-p", "ringcast-proxy"]);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    eprintln!("building {NODE_BIN} and {EDGE_BIN} ({profile})…");
    let status = command.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build of the node and edge failed ({status})");
    }
    Ok(())
}
