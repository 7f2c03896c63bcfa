//! Device and dtype selection: `auto` picks CUDA when r1pipe was built with the
//! `cuda` feature and a GPU is present, else the CPU.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

pub fn select(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => cuda(n),
            None => bail!("unknown device `{s}`: use auto, cpu, cuda or cuda:N"),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!("device cuda:{ordinal} needs r1pipe built with `--features cuda` (see README: CUDA)");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// `cpu` or `cuda`, for fingerprints.
pub fn class(spec: &str) -> Result<String> {
    Ok(match spec {
        "cpu" => "cpu".into(),
        "auto" => if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() { "cuda" } else { "cpu" }.into(),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !cfg!(feature = "cuda") {
                bail!("device `{s}` needs r1pipe built with `--features cuda` (see README: CUDA)");
            }
            "cuda".into()
        }
        s => bail!("unknown device `{s}`: use auto, cpu, cuda or cuda:N"),
    })
}

/// The compute dtype: `auto` is f32 on CPU and bf16 on CUDA (weights stay f32 masters).
pub fn compute_dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec {
        "auto" => {
            if device.is_cuda() {
                DType::BF16
            } else {
                DType::F32
            }
        }
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        s => bail!("unknown dtype `{s}`: use auto, f32, bf16 or f16"),
    })
}

/// The device for a person: the CPU's threads, or the GPU's name, memory and
/// compute capability (what `device: auto` chose, printed by every model stage).
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let mem =
                ctx.total_mem().map(|b| format!(", {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default();
            let cc = ctx.compute_capability().map(|(a, b)| format!(", compute capability {a}.{b}")).unwrap_or_default();
            format!("cuda:{} ({name}{mem}{cc})", ctx.ordinal())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
