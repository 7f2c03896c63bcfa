//! Device and dtype selection. `auto` asks for a GPU (when r1pipe is built
//! with the `cuda` feature) and falls back to the CPU, saying why, when none
//! answers: a driver missing or too old, no device, a library that will not
//! load. An explicit `cuda` never falls back: it fails with the reason.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// A pipeline's `device:` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => Ok(DeviceSpec::Cuda(n)),
                None => Err(format!("unknown device `{s}`")),
            },
        }
    }
}

/// The hint for a bad `device:` value.
pub const DEVICE_HINT: &str = "use auto, cpu, cuda or cuda:N";
/// The hint for a bad `dtype:` value.
pub const DTYPE_HINT: &str = "use auto, f32, bf16 or f16";

/// What `auto` found, probed once per process so that the device a stage runs
/// on and the class its fingerprint names always agree.
fn auto_device() -> &'static Device {
    static AUTO: OnceLock<Device> = OnceLock::new();
    AUTO.get_or_init(|| match probe_cuda() {
        Ok(d) => d,
        Err(why) => {
            if cfg!(feature = "cuda") {
                eprintln!("device auto: using the CPU ({why})");
            }
            tracing::info!(reason = %why, "device auto chose the CPU");
            Device::Cpu
        }
    })
}

/// GPU 0, or why there is none to use.
fn probe_cuda() -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("r1pipe was built without the `cuda` feature".into());
    }
    let attempt = quietly(|| Device::new_cuda(0));
    match attempt {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(explain_cuda_error(&e.to_string())),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA libraries could not be loaded".into());
            Err(explain_cuda_error(&text))
        }
    }
}

/// Run `f`, turning a panic into an error without printing it. A missing driver
/// library makes cudarc panic rather than fail (it loads the libraries lazily);
/// that is a reason to report, not a crash.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    out
}

/// A CUDA start-up failure in words a user can act on: which library or
/// driver is missing or too old, and what to do.
pub fn explain_cuda_error(e: &str) -> String {
    // candle's errors carry a backtrace after the first line when RUST_BACKTRACE is set.
    let e = e.lines().next().unwrap_or(e).trim();
    let lower = e.to_lowercase();
    let advice = if lower.contains("libcuda") || lower.contains("no cuda-capable device") || lower.contains("no device")
    {
        "no NVIDIA driver or GPU found (`nvidia-smi` should list one)"
    } else if lower.contains("insufficient_driver") || lower.contains("driver version is insufficient") {
        "the NVIDIA driver is older than the CUDA version r1pipe was built for: rebuild for the driver's CUDA \
         (`CUDA_VERSION=12 . scripts/cuda-env.sh`, see docs/cuda.md) or update the driver"
    } else if lower.contains("libcublas") || lower.contains("libnvrtc") || lower.contains("libcurand") {
        "a CUDA library r1pipe was built against is not on the library path (LD_LIBRARY_PATH): install the \
         CUDA runtime of the version it was built for, or rebuild for the one installed (docs/cuda.md)"
    } else {
        "see docs/cuda.md"
    };
    format!("{e}: {advice}")
}

pub fn select(spec: &str) -> Result<Device> {
    match DeviceSpec::parse(spec).map_err(|e| anyhow::anyhow!("{e}: {DEVICE_HINT}"))? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(auto_device().clone()),
        DeviceSpec::Cuda(n) => cuda(n),
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!("device cuda:{ordinal} needs r1pipe built with `--features cuda` (see docs/cuda.md)");
    }
    let attempt = quietly(|| Device::new_cuda(ordinal));
    match attempt {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => bail!("cuda:{ordinal}: {}", explain_cuda_error(&e.to_string())),
        Err(_) => bail!("cuda:{ordinal}: {}", explain_cuda_error("the CUDA libraries could not be loaded")),
    }
}

/// How many CUDA devices answer (0 in a build without CUDA or with no driver).
pub fn gpu_count() -> usize {
    if !cfg!(feature = "cuda") {
        return 0;
    }
    (0..64).take_while(|&i| cuda(i).is_ok()).count()
}

/// `cpu` or `cuda`, for fingerprints.
pub fn class(spec: &str) -> Result<String> {
    Ok(match DeviceSpec::parse(spec).map_err(|e| anyhow::anyhow!("{e}: {DEVICE_HINT}"))? {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Auto => if auto_device().is_cuda() { "cuda" } else { "cpu" }.into(),
        DeviceSpec::Cuda(_) => {
            if !cfg!(feature = "cuda") {
                bail!("device `{spec}` needs r1pipe built with `--features cuda` (see docs/cuda.md)");
            }
            "cuda".into()
        }
    })
}

/// A `dtype:` value: `auto`, `f32`, `bf16`, `f16`.
pub fn check_dtype(spec: &str) -> Result<(), String> {
    match spec {
        "auto" | "f32" | "bf16" | "f16" => Ok(()),
        s => Err(format!("unknown dtype `{s}`")),
    }
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
        s => bail!("unknown dtype `{s}`: {DTYPE_HINT}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_values_parse_and_unknown_ones_say_so() {
        assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("auto"), Ok(DeviceSpec::Auto));
        assert!(DeviceSpec::parse("gpu").unwrap_err().contains("unknown device `gpu`"));
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert!(check_dtype("bf16").is_ok() && check_dtype("f8").is_err());
    }

    /// On a machine without a GPU (CI), `auto` falls back to the CPU, whatever
    /// the build; the class in fingerprints agrees with the device chosen.
    #[test]
    fn auto_falls_back_to_the_cpu_where_no_gpu_answers() {
        let dev = select("auto").unwrap();
        let has_gpu = std::path::Path::new("/dev/nvidia0").exists();
        if !has_gpu {
            assert!(dev.is_cpu(), "no GPU here, yet auto chose {dev:?}");
        }
        assert_eq!(class("auto").unwrap(), if dev.is_cuda() { "cuda" } else { "cpu" });
        if cfg!(feature = "cuda") && !has_gpu {
            assert!(probe_cuda().is_err(), "a cuda build without a GPU must report why it fell back");
        }
    }

    #[test]
    fn cuda_failures_name_what_to_do() {
        assert!(explain_cuda_error("CUDA_ERROR_INSUFFICIENT_DRIVER").contains("older than the CUDA version"));
        assert!(explain_cuda_error("libcublas.so.13: cannot open shared object file").contains("library path"));
        assert!(explain_cuda_error("libcuda.so.1: not found").contains("no NVIDIA driver"));
    }
}
