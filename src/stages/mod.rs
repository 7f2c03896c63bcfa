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
pub mod trl_compat;

use crate::model::device;
use crate::pipeline::{Devices, Registry};

/// Every stage kind a pipeline can name.
pub fn registry() -> Registry {
    let mut r = Registry::new(ModelDevices);
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

/// The model side's device rules, as the runner asks for them.
struct ModelDevices;

impl Devices for ModelDevices {
    fn check_device(&self, d: &str) -> Option<(String, String)> {
        device::DeviceSpec::parse(d).err().map(|e| (e, device::DEVICE_HINT.into()))
    }
    fn check_dtype(&self, d: &str) -> Option<(String, String)> {
        device::check_dtype(d).err().map(|e| (e, device::DTYPE_HINT.into()))
    }
    fn class(&self, d: &str) -> anyhow::Result<String> {
        device::class(d)
    }
    fn gpu_count(&self) -> usize {
        device::gpu_count()
    }
}
