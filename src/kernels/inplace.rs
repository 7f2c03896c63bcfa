//! The optimizer's passes over every parameter: the AdamW update, gradient
//! accumulation, the global norm and the clip. Each entry point takes the CPU
//! form (in place) where the kernels' dispatch rule allows and the tensors are
//! contiguous, else the portable form from candle ops (what CUDA runs).
//!
//! Why in place on the CPU: through candle ops each of these allocates fresh
//! tensors the size of the model (the AdamW update about nine per parameter),
//! gigabytes of new pages per step, and page faults are slow on these
//! machines; in place each pass is bound by memory bandwidth. The arithmetic
//! is the same as the candle ops' (tested against them), element by element
//! in f32.

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var, D};

use super::threads::{for_each_unit, SharedOut};

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

/// Whether the in-place forms apply: the kernels' dispatch rule, and every
/// tensor contiguous (they write storage directly).
fn applies(tensors: &[&Tensor]) -> bool {
    super::cpu_form(tensors) && tensors.iter().all(|t| t.is_contiguous())
}

/// One AdamW step of parameter `p` with gradient `g`:
/// m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g², then
/// p ← p (1 − lr·wd) − lr · (m / bc1) / (√(v / bc2) + ε).
/// In place on the CPU; the portable form sets `p` and replaces `m` and `v`.
pub fn adamw(p: &Var, m: &mut Tensor, v: &mut Tensor, g: &Tensor, c: Coefficients) -> Result<()> {
    if applies(&[p.as_tensor(), m, v, g]) {
        m.inplace_op2(g, &FirstMoment(c))?;
        v.inplace_op2(g, &SecondMoment(c))?;
        return p.as_tensor().inplace_op3(m, v, &Apply(c));
    }
    let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
    *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let update = ((&*m / c.bias_correction1 as f64)? / ((&*v / c.bias_correction2 as f64)?.sqrt()? + c.eps as f64)?)?;
    let lr = c.lr as f64;
    p.set(&((p.as_tensor() * (1.0 - lr * c.weight_decay as f64))? - (update * lr)?)?)
}

/// `acc + g` as the new accumulator: added in place on the CPU (`acc` must be
/// the caller's own tensor, shared with nobody), a new tensor otherwise.
pub fn accumulate(acc: Tensor, g: &Tensor) -> Result<Tensor> {
    // Accumulate in the accumulator's dtype (f32 gradients of f32 masters), whatever `g` came in.
    let cast;
    let g = if g.dtype() == acc.dtype() {
        g
    } else {
        cast = g.to_dtype(acc.dtype())?;
        &cast
    };
    if applies(&[&acc, g]) {
        acc.inplace_op2(g, &Add)?;
        Ok(acc)
    } else {
        &acc + g
    }
}

/// `t · s`: in place on the CPU, a new tensor otherwise.
pub fn scale(t: Tensor, s: f64) -> Result<Tensor> {
    if applies(&[&t]) {
        t.inplace_op1(&Scale(s as f32))?;
        Ok(t)
    } else {
        t * s
    }
}

/// Σ over every tensor of Σ t², in f64. The CPU form sums in f64 in a fixed
/// order; the portable form reduces each tensor on its device (by rows first:
/// a reduction to one value runs in a single CUDA block) and moves one number
/// to the host for all of them.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    let mut total = 0f64;
    let mut on_device = Vec::new();
    for t in tensors {
        if applies(&[t]) {
            total += sum_of_squares_cpu(t)?;
        } else {
            let sq = t.to_dtype(DType::F32)?.sqr()?;
            let rows = if sq.rank() >= 2 { sq.sum(D::Minus1)? } else { sq };
            on_device.push(rows.sum_all()?.to_dtype(DType::F64)?);
        }
    }
    if !on_device.is_empty() {
        total += super::transfer::to_scalar::<f64>(&Tensor::stack(&on_device, 0)?.sum_all()?)?;
    }
    Ok(total)
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

/// Σ t², accumulated in f64 in a fixed order (the same on every run).
fn sum_of_squares_cpu(t: &Tensor) -> Result<f64> {
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
    fn accumulate_scale_and_sum_of_squares_equal_candle_ops_in_both_forms() {
        use crate::kernels::{with_mode, Mode};
        // More than one unit of parallel work, not a multiple of it.
        let n = 3 * UNIT + 17;
        let (a, b) = (rand(n, 1), rand(n, 2));
        let want_sum = (&a + &b).unwrap().to_vec1::<f32>().unwrap();
        let want_sq: f64 = a.to_vec1::<f32>().unwrap().iter().map(|&x| x as f64 * x as f64).sum();
        for mode in [Mode::Cpu, Mode::Portable] {
            with_mode(mode, || {
                let acc = accumulate(a.copy().unwrap(), &b).unwrap();
                assert_eq!(acc.to_vec1::<f32>().unwrap(), want_sum, "{mode:?}");
                let scaled = scale(acc, 0.25).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(scaled, want_sum.iter().map(|x| x * 0.25).collect::<Vec<_>>(), "{mode:?}");
                // A matrix too: the portable form reduces its rows first.
                let m = a.narrow(0, 0, 7 * 7000).unwrap().reshape((7000, 7)).unwrap();
                let want_m: f64 =
                    m.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&x| x as f64 * x as f64).sum();
                let got = sum_of_squares(&[&a, &m]).unwrap();
                let tolerance = if mode == Mode::Cpu { 1e-9 } else { 1e-5 };
                let want = want_sq + want_m;
                assert!((got - want).abs() < tolerance * want, "{mode:?}: {got} vs {want}");
            });
        }
    }

    #[test]
    fn the_adamw_step_is_the_same_in_place_and_composed() {
        use crate::kernels::{with_mode, Mode};
        let n = UNIT + 5;
        let c = Coefficients {
            beta1: 0.9,
            beta2: 0.99,
            bias_correction1: 0.1,
            bias_correction2: 0.0199,
            eps: 1e-8,
            lr: 0.01,
            weight_decay: 0.1,
        };
        let run = |mode| {
            with_mode(mode, || {
                let p = Var::from_tensor(&rand(n, 3)).unwrap();
                let (mut m, mut v) = (rand(n, 4), (rand(n, 5).abs().unwrap()));
                adamw(&p, &mut m, &mut v, &rand(n, 6), c).unwrap();
                [p.as_tensor(), &m, &v].map(|t| t.to_vec1::<f32>().unwrap())
            })
        };
        let (cpu, portable) = (run(Mode::Cpu), run(Mode::Portable));
        for (a, b) in cpu.iter().zip(&portable) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d < 1e-6, "in place and composed differ by {d}");
        }
    }
}
