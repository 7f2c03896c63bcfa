//! The optimizer's passes over every parameter, in place on the CPU: the AdamW
//! update, gradient accumulation, and the global-norm clip.
//!
//! Why: through candle ops each of these allocates fresh tensors the size of
//! the model (the AdamW update about nine per parameter), gigabytes of new
//! pages per step, and page faults are slow on these machines; in place each
//! pass is bound by memory bandwidth. The arithmetic is the same as the candle
//! ops' (tested against them), element by element in f32.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::cpu_threads::{for_each_unit, SharedOut};

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

/// Whether the in-place ops apply: every tensor f32 and contiguous on the CPU.
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
    let shared = SharedOut::new(dst);
    for_each_unit(n.div_ceil(UNIT), true, |r| {
        let (a, b) = (r.start * UNIT, (r.end * UNIT).min(n));
        // SAFETY: each range of units is handed to one thread; `dst` outlives the call.
        f(a, unsafe { shared.part(a, b - a) });
    });
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

/// dst += src, in place.
pub fn add(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.inplace_op2(src, &Add)
}

/// t *= s, in place.
pub fn scale(t: &Tensor, s: f32) -> Result<()> {
    t.inplace_op1(&Scale(s))
}

/// Σ t², accumulated in f64 in a fixed order (the same on every run).
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("sum of squares: not on the CPU") };
    let x = slice(cpu, layout)?;
    let units = x.len().div_ceil(UNIT);
    let mut partial = vec![0f64; units];
    let shared = SharedOut::new(&mut partial);
    for_each_unit(units, true, |r| {
        for u in r {
            let chunk = &x[u * UNIT..((u + 1) * UNIT).min(x.len())];
            // SAFETY: unit u alone writes partial[u]; `partial` outlives the call.
            unsafe { shared.part(u, 1)[0] = chunk.iter().map(|&v| (v as f64) * (v as f64)).sum() };
        }
    });
    Ok(partial.iter().sum())
}

struct Add;
struct Scale(f32);

impl InplaceOp2 for Add {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let src = slice(s2, l2)?;
        par_chunks(slice_mut(s1, l1)?, |o, d| {
            for (d, s) in d.iter_mut().zip(&src[o..]) {
                *d += s;
            }
        });
        Ok(())
    }
}

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout) -> Result<()> {
        let k = self.0;
        par_chunks(slice_mut(s1, l1)?, |_, d| d.iter_mut().for_each(|x| *x *= k));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(n: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Tensor::from_vec((0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), n, &Device::Cpu).unwrap()
    }

    #[test]
    fn add_scale_and_sum_of_squares_equal_candle_ops() {
        // More than one unit of parallel work, not a multiple of it.
        let n = 3 * UNIT + 17;
        let (a, b) = (rand(n, 1), rand(n, 2));
        let want_sum = (&a + &b).unwrap();
        let acc = a.copy().unwrap();
        add(&acc, &b).unwrap();
        assert_eq!(acc.to_vec1::<f32>().unwrap(), want_sum.to_vec1::<f32>().unwrap());
        scale(&acc, 0.25).unwrap();
        assert_eq!(acc.to_vec1::<f32>().unwrap(), (want_sum * 0.25).unwrap().to_vec1::<f32>().unwrap());
        let want: f64 = a.to_vec1::<f32>().unwrap().iter().map(|&x| x as f64 * x as f64).sum();
        assert!((sum_of_squares(&a).unwrap() - want).abs() < 1e-9 * want);
    }
}
