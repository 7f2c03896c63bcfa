//! The hand-written CPU kernels, each beside its portable form (candle ops,
//! the path CUDA takes): attention, the `x @ Wᵀ` product (and its form for
//! weights packed once for inference), the fused token log-probabilities,
//! the vectorized exp behind them, the MLP's gated activation (silu · up),
//! and the optimizer's in-place passes. They import only each other and
//! candle; `model/` and `train/` call them.
//!
//! One dispatch rule for every kernel, here: a CPU form applies to f32
//! tensors on the CPU, unless `R1PIPE_KERNELS=portable` forces the portable
//! form, so that a CPU runs exactly the op sequence CUDA runs (CI tests both).
//! Each kernel's public entry point takes that decision itself: callers never
//! test devices or dtypes.

pub mod attention;
pub mod inplace;
pub mod matmul_t;
pub mod packed;
pub mod row_exp;
pub mod swiglu;
pub(crate) mod threads;
pub mod token_logprobs;
pub mod transfer;

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{DType, Layout, Tensor};

/// Which form the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The hand-written CPU forms where they apply (the default).
    Cpu,
    /// candle ops everywhere: what CUDA runs.
    Portable,
}

/// The environment variable that forces the portable forms.
pub const ENV: &str = "R1PIPE_KERNELS";

impl Mode {
    /// `cpu` or `portable` (unset: `cpu`).
    pub fn parse(value: Option<&str>) -> Result<Mode, String> {
        match value.map(str::trim) {
            None | Some("") | Some("cpu") => Ok(Mode::Cpu),
            Some("portable") => Ok(Mode::Portable),
            Some(other) => Err(format!("{ENV}={other}: use `cpu` (the default) or `portable`")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Cpu => "cpu",
            Mode::Portable => "portable",
        }
    }
}

/// The mode `R1PIPE_KERNELS` asks for, read once per process. The binary
/// refuses an unknown value at startup ([`check_env`]); a library caller
/// that sets one gets the CPU forms.
fn process_mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| Mode::parse(std::env::var(ENV).ok().as_deref()).unwrap_or(Mode::Cpu))
}

thread_local! {
    /// A scoped override for this thread ([`with_mode`]): tests compare both forms in one process.
    static OVERRIDE: Cell<Option<Mode>> = const { Cell::new(None) };
}

/// The mode in force on this thread.
pub fn mode() -> Mode {
    OVERRIDE.with(Cell::get).unwrap_or_else(process_mode)
}

/// Run `f` with the kernels in `mode` on this thread (dispatch is decided on the
/// calling thread, so the pool threads a kernel uses follow it).
pub fn with_mode<T>(mode: Mode, f: impl FnOnce() -> T) -> T {
    let before = OVERRIDE.with(|o| o.replace(Some(mode)));
    let out = f();
    OVERRIDE.with(|o| o.set(before));
    out
}

/// An unknown `R1PIPE_KERNELS` value, as the message the binary prints.
pub fn check_env() -> Result<Mode, String> {
    Mode::parse(std::env::var(ENV).ok().as_deref())
}

/// The dispatch rule: whether the CPU form of a kernel applies to these tensors.
pub fn cpu_form(tensors: &[&Tensor]) -> bool {
    mode() == Mode::Cpu && tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// What a stage header prints: `cpu` when the hand-written forms run (an f32
/// model on the CPU in the default mode), else `portable`.
pub fn describe(on_cpu: bool, dtype: DType) -> &'static str {
    if on_cpu && dtype == DType::F32 && mode() == Mode::Cpu {
        Mode::Cpu.name()
    } else {
        Mode::Portable.name()
    }
}

/// cuBLAS's rule for a product `lhs [.., m, k] @ rhs [.., k, n]`: each operand's
/// two last dimensions are row-major or column-major (a transposed view), with
/// an exception where a dimension is 1; batch dimensions are evenly strided.
/// candle's CUDA matmul fails on anything else ("matmul is not contiguous"), so
/// debug and test builds check it on the CPU too, where nothing else would.
pub fn cublas_compatible(lhs: &Layout, rhs: &Layout) -> bool {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    if ld.len() < 2 || rd.len() < 2 {
        return false;
    }
    let (m, k, n) = (ld[ld.len() - 2], ld[ld.len() - 1], rd[rd.len() - 1]);
    let minor = |st: &[usize], rows: usize, cols: usize| {
        let (s1, s2) = (st[st.len() - 1], st[st.len() - 2]);
        ((s1 == 1 || cols == 1) && (s2 == cols || rows == 1)) || ((s1 == rows || cols == 1) && (s2 == 1 || rows == 1))
    };
    let batch = |l: &Layout| {
        let (st, d) = (l.stride(), l.dims());
        match st.len() {
            2 | 3 => true,
            4 => st[0] == st[1] * d[1] || d[0] == 1 || d[1] == 1,
            _ => false,
        }
    };
    minor(lhs.stride(), m, k) && minor(rhs.stride(), k, n) && batch(lhs) && batch(rhs)
}

/// In debug and test builds, an error where cuBLAS would refuse `lhs @ rhs`.
pub(crate) fn check_cublas(lhs: &Layout, rhs: &Layout, what: &str) -> candle_core::Result<()> {
    if cfg!(debug_assertions) && !cublas_compatible(lhs, rhs) {
        candle_core::bail!(
            "{what}: operands {:?} (strides {:?}) and {:?} (strides {:?}) break cuBLAS's layout rule; \
             make them contiguous first",
            lhs.dims(),
            lhs.stride(),
            rhs.dims(),
            rhs.stride()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_switch_reads_cpu_portable_or_nothing_and_refuses_the_rest() {
        assert_eq!(Mode::parse(None), Ok(Mode::Cpu));
        assert_eq!(Mode::parse(Some("portable")), Ok(Mode::Portable));
        assert_eq!(Mode::parse(Some("cpu")), Ok(Mode::Cpu));
        assert!(Mode::parse(Some("cuda")).unwrap_err().contains("use `cpu` (the default) or `portable`"));
    }

    #[test]
    fn the_scoped_mode_decides_the_cpu_form_and_is_restored() {
        let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let outside = mode();
        assert!(with_mode(Mode::Cpu, || cpu_form(&[&x])));
        assert!(!with_mode(Mode::Portable, || cpu_form(&[&x])));
        assert!(!with_mode(Mode::Cpu, || cpu_form(&[&x.to_dtype(DType::BF16).unwrap()])));
        assert_eq!(mode(), outside);
    }

    #[test]
    fn cublas_takes_row_and_column_major_operands_and_refuses_other_strides() {
        let a = Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((5, 6), DType::F32, &Device::Cpu).unwrap();
        let wt = w.t().unwrap();
        assert!(cublas_compatible(a.layout(), wt.layout()), "x @ Wᵀ as a transposed view");
        assert!(cublas_compatible(a.t().unwrap().t().unwrap().layout(), wt.layout()));
        // A column slice of a wider matrix has a row stride that is neither k nor 1.
        let wide = Tensor::zeros((4, 12), DType::F32, &Device::Cpu).unwrap();
        let sliced = wide.narrow(1, 0, 6).unwrap();
        assert!(!cublas_compatible(sliced.layout(), wt.layout()));
        assert!(check_cublas(sliced.layout(), wt.layout(), "test").is_err() || !cfg!(debug_assertions));
    }
}
