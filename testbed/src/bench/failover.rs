//! The failover bench (not written yet).

use super::report::Ctx;

/// Runs the failover bench and returns its report section.
pub async fn run(_ctx: &Ctx) -> anyhow::Result<String> {
    anyhow::bail!("the failover bench is not implemented yet")
}
