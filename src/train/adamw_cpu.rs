//! The AdamW update in place on the CPU: three passes over contiguous f32
//! memory that write into the parameter and its moments, with no temporaries.
//!
//! Why: through candle ops each parameter's update allocates about nine
//! tensors of its size (for a 135M-parameter model, gigabytes of fresh pages
//! per step) and takes over a second; in place it is bound by memory bandwidth.
//! The arithmetic is the one `AdamW::step` documents, element by element in f32.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use crate::model::skinny_matmul::OutPtr;

/// The scalars of one AdamW step for one parameter.
#[derive(Debug, Clone, Copy)]
pub struct Coefficients {
    pub beta1: f32,
    pub beta2: f32,
    /// 1 − β1^t and 1 − β2^t.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    pub eps: f32,
    pub lr: f32,
    pub weight_decay: f32,
}

/// Whether the in-place update applies: every tensor f32 and contiguous on the CPU.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g², then
/// p ← p (1 − lr·wd) − lr · (m / bc1) / (√(v / bc2) + ε), all in place.
pub fn step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: Coefficients) -> Result<()> {
    m.inplace_op2(g, &FirstMoment(c))?;
    v.inplace_op2(g, &SecondMoment(c))?;
    p.inplace_op3(m, v, &Apply(c))
}

struct FirstMoment(Coefficients);
struct SecondMoment(Coefficients);
struct Apply(Coefficients);

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("adamw: tensor not contiguous"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("adamw: tensor not contiguous") };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected f32 storage"),
    }
}

/// Elements per unit of parallel work.
const UNIT: usize = 1 << 14;

/// `f(offset, chunk)` over `dst` in chunks, split across the CPU threads.
fn par_chunks(dst: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let n = dst.len();
    let ptr = OutPtr(dst.as_mut_ptr());
    let run = |r: std::ops::Range<usize>| {
        let (a, b) = (r.start * UNIT, (r.end * UNIT).min(n));
        // SAFETY: each range of units is handed to one thread; `dst` outlives the call.
        f(a, unsafe { std::slice::from_raw_parts_mut(ptr.get().add(a), b - a) });
    };
    let units = n.div_ceil(UNIT);
    if units > 1 {
        candle_core::utils::barrier_pool().execute_chunked(units, run);
    } else {
        run(0..units);
    }
}

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (b1, g) = (self.0.beta1, slice(s2, l2)?);
        par_chunks(slice_mut(s1, l1)?, |o, m| {
            for (m, g) in m.iter_mut().zip(&g[o..]) {
                *m = b1 * *m + (1.0 - b1) * g;
            }
        });
        Ok(())
    }
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (b2, g) = (self.0.beta2, slice(s2, l2)?);
        par_chunks(slice_mut(s1, l1)?, |o, v| {
            for (v, g) in v.iter_mut().zip(&g[o..]) {
                *v = b2 * *v + (1.0 - b2) * (g * g);
            }
        });
        Ok(())
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let c = self.0;
        let (m, v) = (slice(s2, l2)?, slice(s3, l3)?);
        let keep = 1.0 - c.lr * c.weight_decay;
        par_chunks(slice_mut(s1, l1)?, |o, p| {
            for ((p, m), v) in p.iter_mut().zip(&m[o..]).zip(&v[o..]) {
                let update = (m / c.bias_correction1) / ((v / c.bias_correction2).sqrt() + c.eps);
                *p = *p * keep - c.lr * update;
            }
        });
        Ok(())
    }
}
