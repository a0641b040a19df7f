//! The scale bench (not written yet).

use super::report::Ctx;

/// Runs the scale bench and returns its report section.
pub async fn run(_ctx: &Ctx) -> anyhow::Result<String> {
    anyhow::bail!("the scale bench is not implemented yet")
}
