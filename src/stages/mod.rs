//! Stage kinds: one file each. A stage is the only place where the runner
//! (pipeline/) and the ML core (model/, train/, rewards/, data/) meet.

pub mod download;
pub mod format;
pub mod testing;

use anyhow::{bail, Result};

use crate::pipeline::Registry;

/// Every stage kind a pipeline can name.
pub fn registry() -> Registry {
    let mut r = Registry::new(device_class);
    r.register(download::Download);
    r.register(format::Format);
    if std::env::var_os("R1PIPE_TEST_KINDS").is_some() {
        // Kinds that exist to test the runner itself (interruption, resume).
        r.register(testing::Counter);
    }
    r
}

/// `cpu` or `cuda` for a pipeline's `device:` (what enters fingerprints).
pub fn device_class(device: &str) -> Result<String> {
    match device {
        "cpu" => Ok("cpu".into()),
        "auto" => {
            Ok(if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() { "cuda" } else { "cpu" }.into())
        }
        d if d == "cuda" || d.starts_with("cuda:") => {
            if cfg!(feature = "cuda") {
                Ok("cuda".into())
            } else {
                bail!("device `{d}` needs r1pipe built with `--features cuda` (see README: CUDA)")
            }
        }
        d => bail!("unknown device `{d}`: use auto, cpu, cuda or cuda:N"),
    }
}
