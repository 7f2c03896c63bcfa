//! Stage kinds: one file each. A stage is the only place where the runner
//! (pipeline/) and the ML core (model/, train/, rewards/, data/) meet.

pub mod download;
pub mod evaluate;
pub mod format;
pub mod grpo;
pub mod infer;
pub mod model_common;
pub mod sft;
pub mod testing;

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
    if std::env::var_os("R1PIPE_TEST_KINDS").is_some() {
        // Kinds that exist to test the runner itself (interruption, resume).
        r.register(testing::Counter);
    }
    r
}

/// `cpu` or `cuda` for a pipeline's `device:` (what enters fingerprints).
pub fn device_class(device: &str) -> Result<String> {
    crate::model::device::class(device)
}
