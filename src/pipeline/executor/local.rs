//! `executor: {kind: local}`: the stage runs in this process, on a thread
//! beside the scheduler (`run --jobs N` runs N at a time).

use anyhow::Result;

use super::{Executor, StageRun};

pub(super) struct Local;

impl Executor for Local {
    fn runs_here(&self) -> bool {
        true
    }
    /// The stages would share this machine's cores: one at a time unless asked.
    fn default_jobs(&self) -> usize {
        1
    }
    fn run_stage(&self, run: StageRun<'_>) -> Result<()> {
        run.kind.run(run.ctx)
    }
}
