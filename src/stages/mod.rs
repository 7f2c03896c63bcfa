//! Stage kinds: one file each. A stage is the only place where the runner
//! (pipeline/) and the ML core (model/, train/, rewards/, data/) meet.

pub mod download;
pub mod evaluate;
pub mod format;
pub mod grpo;
pub mod infer;
pub mod model_common;
pub mod reward_param;
pub mod rollout_param;
pub mod sft;
#[cfg(feature = "test-kinds")]
pub mod testing;
pub mod training;

use anyhow::Result;

use crate::pipeline::Registry;

/// Every stage kind a pipeline can name.
pub fn registry() -> Registry {
    let mut r = Registry::new(device_class);
    r.register(download::Download);
    r.register(format::Format);
    r.register(evaluate::Evaluate);
    r.register(infer::Infer);
    r.register(grpo::Grpo);
    r.register(sft::Sft);
    // Kinds that exist to test the runner itself (interruption, resume): compiled
    // only into test builds (`--features test-kinds`, which scripts/test.sh passes).
    #[cfg(feature = "test-kinds")]
    r.register(testing::Counter);
    r
}

/// `cpu` or `cuda` for a pipeline's `device:` (what enters fingerprints).
pub fn device_class(device: &str) -> Result<String> {
    crate::model::device::class(device)
}
