//! The fanout bench (not written yet).

use super::report::Ctx;

/// Runs the fanout bench and returns its report section.
pub async fn run(_ctx: &Ctx) -> anyhow::Result<String> {
    anyhow::bail!("the fanout bench is not implemented yet")
}
