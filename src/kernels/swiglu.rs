//! The MLP's gated activation, silu(gate) · up, fused and threaded, with its
//! backward: the element-wise work between the MLP's products.
//!
//! Why: composed from candle ops, the forward is two passes (silu, then the
//! product) and the backward seven (the product's two gradients, then silu's
//! derivative from neg, exp, +1, recip, 1 − silu, ·, +), each a tensor of
//! [tokens, intermediate] written and read again, each on one thread while the
//! other cores wait. Fused, the forward is one pass and the backward one, both
//! shared across the threads.
//!
//! The CPU form computes every element with the same f32 operations in the
//! same order as candle's ops (candle's silu is `g / (1 + exp(−g))`; its
//! backward `σ · (1 − silu) + silu` with `σ = 1 / (exp(−g) + 1)`), so values
//! and gradients are bitwise those of the composition (tested): no published
//! result moves. Off the CPU (or with the portable kernels) the composition runs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::threads::{for_each_unit, SharedOut};

/// silu(gate) · up, element-wise; differentiable with respect to both.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if super::cpu_form(&[gate, up]) && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        composed(gate, up)
    }
}

/// The same function from candle ops: what CUDA runs.
pub fn composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Elements per unit of threaded work: large enough that handing a unit out
/// costs little beside it, small enough that the units of an MLP's tensor
/// spread evenly over the threads.
const UNIT: usize = 1 << 14;

/// Whether `n` elements are worth sharing across threads.
fn parallel(n: usize) -> bool {
    n >= 4 * UNIT
}

#[inline(always)]
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// `f(range)` over the units covering `0..n`, threaded when worth it.
fn for_chunks(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    for_each_unit(n.div_ceil(UNIT), parallel(n), |units| {
        f(units.start * UNIT..(units.end * UNIT).min(n));
    });
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("silu·up: {what} not contiguous") };
    Ok(&s.as_slice::<f32>()?[a..b])
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu·up: gate {:?} and up {:?} differ in shape", l1.shape(), l2.shape());
        }
        let (gate, up) = (contiguous(s1, l1, "gate")?, contiguous(s2, l2, "up")?);
        let n = gate.len();
        let mut out = vec![0f32; n];
        let shared = SharedOut::new(&mut out);
        for_chunks(n, |r| {
            // SAFETY: each unit writes only its own range; `out` outlives the call.
            let o = unsafe { shared.part(r.start, r.len()) };
            for ((o, &g), &u) in o.iter_mut().zip(&gate[r.clone()]).zip(&up[r]) {
                *o = silu(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, as the two halves of one [2, …] tensor.
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// d/d gate and d/d up of Σ grad · silu(gate) · up, stacked: [2, …shape].
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("silu·up backward: gate, up and gradient differ in shape");
        }
        let (gate, up, grad) =
            (contiguous(s1, l1, "gate")?, contiguous(s2, l2, "up")?, contiguous(s3, l3, "gradient")?);
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let shared = SharedOut::new(&mut out);
        for_chunks(n, |r| {
            // SAFETY: each unit writes only its own range of each half; `out` outlives the call.
            let (dg, du) = unsafe { (shared.part(r.start, r.len()), shared.part(n + r.start, r.len())) };
            for (k, i) in r.enumerate() {
                let (g, u, d) = (gate[i], up[i], grad[i]);
                // candle's order: the product's gradients, then silu's derivative.
                let s = silu(g);
                let sigmoid = 1.0 / ((-g).exp() + 1.0);
                // candle's `1 − silu` is an affine s·(−1) + 1: exactly 1 − s.
                let ds = sigmoid * (1.0 - s) + s;
                dg[k] = (d * u) * ds;
                du[k] = d * s;
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{with_mode, Mode};
    use candle_core::{DType, Device, Var};

    fn random(shape: (usize, usize, usize), seed: u64, scale: f32) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2;
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(x, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// Values and both gradients of Σ w · silu(g) · u, through the fused op or the composition.
    fn run(g: &Tensor, u: &Tensor, w: &Tensor, mode: Mode) -> (Tensor, Tensor, Tensor) {
        with_mode(mode, || {
            let (gv, uv) = (Var::from_tensor(g).unwrap(), Var::from_tensor(u).unwrap());
            let y = silu_mul(gv.as_tensor(), uv.as_tensor()).unwrap();
            let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(&gv).unwrap().clone(), grads.get(&uv).unwrap().clone())
        })
    }

    #[test]
    fn values_and_gradients_are_bitwise_the_composed_ops_threaded_or_not() {
        // 3 × 5 × 7: one unit on one thread; 2 × 300 × 576 (345,600 elements):
        // units shared across the threads, with a partial last unit.
        for (shape, scale) in [((3, 5, 7), 4.0), ((2, 300, 576), 12.0)] {
            let (g, u, w) = (random(shape, 1, scale), random(shape, 2, 3.0), random(shape, 3, 1.0));
            let fused = run(&g, &u, &w, Mode::Cpu);
            let composed = run(&g, &u, &w, Mode::Portable);
            assert_eq!(bits(&fused.0), bits(&composed.0), "values, {shape:?}");
            assert_eq!(bits(&fused.1), bits(&composed.1), "d/d gate, {shape:?}");
            assert_eq!(bits(&fused.2), bits(&composed.2), "d/d up, {shape:?}");
        }
    }

    #[test]
    fn gradients_match_a_float64_reference() {
        // silu(g)·u and its derivatives in f64, by hand: d/dg = u·σ(g)·(1 + g·(1 − σ(g))), d/du = silu(g).
        let shape = (1, 4, 6);
        let (g, u, w) = (random(shape, 4, 6.0), random(shape, 5, 2.0), random(shape, 6, 1.0));
        let (y, dg, du) = run(&g, &u, &w, Mode::Cpu);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (gs, us, ws) = (f64s(&g), f64s(&u), f64s(&w));
        let (ys, dgs, dus) = (f64s(&y), f64s(&dg), f64s(&du));
        for i in 0..gs.len() {
            let sig = 1.0 / (1.0 + (-gs[i]).exp());
            let want_y = gs[i] * sig * us[i];
            let want_dg = ws[i] * us[i] * sig * (1.0 + gs[i] * (1.0 - sig));
            let want_du = ws[i] * gs[i] * sig;
            for (got, want, what) in [(ys[i], want_y, "value"), (dgs[i], want_dg, "d/dg"), (dus[i], want_du, "d/du")] {
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{what} at {i}: {got} against {want}");
            }
        }
    }

    #[test]
    fn a_strided_input_and_the_portable_mode_take_the_same_values() {
        // A transposed gate: made contiguous before the fused op, same result.
        let g = random((1, 6, 8), 7, 5.0).transpose(1, 2).unwrap();
        let u = random((1, 8, 6), 8, 2.0);
        let fused = silu_mul(&g, &u).unwrap();
        let composed = with_mode(Mode::Portable, || silu_mul(&g, &u).unwrap());
        assert_eq!(bits(&fused), bits(&composed));
    }
}
