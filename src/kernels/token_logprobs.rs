//! log softmax(logits / τ)[target] per row, fused, with its backward: the
//! last step of every training forward (SFT's cross-entropy, GRPO's ratios).
//!
//! Why fused: the logits are [tokens, vocabulary], 200 MB for a 4 × 256 batch
//! of a 49k-vocabulary model. Composed from candle ops, log-softmax and gather
//! allocate about six tensors of that size forward and as many backward, and
//! their page faults and memory traffic cost as much as the vocabulary matmul.
//! Fused, the forward reads each row of logits twice (max, then sum of
//! exponentials) and writes one number per row; the backward writes the one
//! gradient tensor, (onehot(target) − softmax(logits / τ)) · g / τ.
//!
//! Off the CPU (or with the portable kernels) the composed candle ops run
//! instead, in f32 whatever the logits' dtype (the same function, tested).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::row_exp;
use super::threads::{for_each_unit, SharedOut};

/// log softmax(logits / temperature)[targets]: `logits` [N, V], `targets` [N] u32
/// → [N]. Differentiable with respect to `logits`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if super::cpu_form(&[logits]) {
        logits.apply_op2(targets, TokenLogprobs { inv_t: (1.0 / temperature) as f32 })
    } else {
        composed(logits, targets, temperature)
    }
}

/// The same function from candle ops (any device, any float dtype; computed in
/// at least f32).
pub fn composed(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let l = at_least_f32(logits)?;
    let l = if temperature != 1.0 { (l / temperature)? } else { l };
    log_softmax_last(&l)?.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?.squeeze(D::Minus1)
}

/// log-softmax over the last dimension from differentiable candle ops.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    // The max only stabilizes: no gradient flows through it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// bf16 and f16 upcast to f32; f32 and f64 as they are.
fn at_least_f32(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F64 | DType::F32 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    }
}

/// log softmax(logits / τ)[target] and the entropy −Σ p log p of softmax(logits / τ),
/// per row: [N, 2], no graph. The CPU form reads each row twice (max, then the
/// normalizer and the probability-weighted logit together).
pub fn logprobs_and_entropy(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if super::cpu_form(&[logits]) {
        return logits
            .contiguous()?
            .apply_op2_no_bwd(&targets.contiguous()?, &LogprobsEntropy { inv_t: (1.0 / temperature) as f32 });
    }
    let l = at_least_f32(logits)?;
    let l = if temperature != 1.0 { (l / temperature)? } else { l };
    let lsm = log_softmax_last(&l)?;
    let lp = lsm.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    let h = (lsm.exp()? * &lsm)?.sum_keepdim(D::Minus1)?.neg()?;
    Tensor::cat(&[lp, h], 1)
}

/// d/d logits of Σ g_lp · log p[target] + g_h · H, for p = softmax(logits / τ):
/// [g_lp (onehot − p) − g_h p (log p + H)] / τ, from candle ops (no graph). Only
/// an entropy bonus needs it; the log-probability alone goes through [`logits_grad`].
pub fn logits_grad_with_entropy(
    logits: &Tensor,
    targets: &Tensor,
    g_lp: &Tensor,
    g_h: &Tensor,
    inv_t: f64,
) -> Result<Tensor> {
    let l = (at_least_f32(logits)? * inv_t)?;
    let lsm = log_softmax_last(&l)?;
    let p = lsm.exp()?;
    let h = (&p * &lsm)?.sum_keepdim(D::Minus1)?.neg()?;
    let entropy_part = (&p * lsm.broadcast_add(&h)?)?.broadcast_mul(&g_h.unsqueeze(1)?)?;
    let lp_part = p.broadcast_mul(&g_lp.unsqueeze(1)?)?;
    let d = ((lp_part + entropy_part)?.neg()? * inv_t)?;
    let idx = targets.unsqueeze(1)?.contiguous()?;
    d.scatter_add(&idx, &(g_lp * inv_t)?.unsqueeze(1)?.contiguous()?, 1)
}

/// d/d logits of Σ g · log softmax(logits / τ)[target]: (onehot(target) − softmax(logits / τ)) · g / τ.
/// `logits` [N, V] f32, `targets` [N] u32, `g` [N] f32; no graph.
pub fn logits_grad(logits: &Tensor, targets: &Tensor, g: &Tensor, inv_t: f64) -> Result<Tensor> {
    if super::cpu_form(&[logits]) {
        return logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &g.contiguous()?,
            &TokenLogprobsGrad { inv_t: inv_t as f32 },
        );
    }
    let p = candle_nn::ops::softmax_last_dim(&(logits * inv_t)?.contiguous()?)?;
    let gs = (g * inv_t)?;
    let neg = p.broadcast_mul(&gs.unsqueeze(1)?)?.neg()?;
    let idx = targets.unsqueeze(1)?.contiguous()?;
    neg.scatter_add(&idx, &gs.unsqueeze(1)?.contiguous()?, 1)
}

struct TokenLogprobs {
    inv_t: f32,
}

/// [`logprobs_and_entropy`]'s CPU form.
struct LogprobsEntropy {
    inv_t: f32,
}

impl CustomOp2 for LogprobsEntropy {
    fn name(&self) -> &'static str {
        "token-logprobs-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, n, v) = rows(s1, l1, s2, l2)?;
        let mut out = vec![0f32; 2 * n];
        let shared = SharedOut::new(&mut out);
        for_rows(n, v, |i| {
            let row = &logits[i * v..(i + 1) * v];
            let max = row_exp::max(row) * self.inv_t;
            let (sum, weighted) = row_exp::sum_exp_weighted(row, self.inv_t, max);
            let lse = max + sum.ln();
            // H = lse − Σ p z with z = x/τ: Σ p z = (Σ e x)/(Σ e) / τ.
            let entropy = lse - weighted / sum * self.inv_t;
            // SAFETY: row i alone writes out[2i], out[2i + 1]; `out` outlives the call.
            let o = unsafe { shared.part(2 * i, 2) };
            o[0] = row[targets[i] as usize] * self.inv_t - lse;
            o[1] = entropy;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }
}

/// Gradient of [`TokenLogprobs`] with respect to the logits, given the
/// gradient of its output.
struct TokenLogprobsGrad {
    inv_t: f32,
}

/// Row-major f32 rows and their u32 targets, borrowed from contiguous storage.
fn rows<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize, usize)> {
    let (n, v) = l1.shape().dims2()?;
    if l2.shape().dims() != [n] {
        candle_core::bail!("token logprobs: {n} rows of logits but targets of shape {:?}", l2.shape());
    }
    let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("token logprobs: logits and targets must be contiguous");
    };
    let logits = &s1.as_slice::<f32>()?[a..b];
    let targets = &s2.as_slice::<u32>()?[c..d];
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("token logprobs: target {bad} is outside the vocabulary of {v}");
    }
    Ok((logits, targets, n, v))
}

/// max and log Σ exp of a row scaled by `inv_t` (the row's log-sum-exp is max + that).
fn row_max_logsumexp(row: &[f32], inv_t: f32) -> (f32, f32) {
    let max = row_exp::max(row) * inv_t;
    (max, row_exp::sum_exp(row, inv_t, max).ln())
}

/// Run `f(i)` for every row index, split across the CPU threads when worth it.
fn for_rows(n: usize, work_per_row: usize, f: impl Fn(usize) + Sync) {
    for_each_unit(n, n * work_per_row > 1 << 16, |r| r.for_each(&f));
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, n, v) = rows(s1, l1, s2, l2)?;
        let mut out = vec![0f32; n];
        let shared = SharedOut::new(&mut out);
        for_rows(n, v, |i| {
            let row = &logits[i * v..(i + 1) * v];
            let (max, lse) = row_max_logsumexp(row, self.inv_t);
            // SAFETY: row i alone writes out[i]; `out` outlives the call.
            unsafe { shared.part(i, 1)[0] = row[targets[i] as usize] * self.inv_t - max - lse };
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(logits_grad(logits, targets, grad, self.inv_t as f64)?), None))
    }
}

impl CustomOp3 for TokenLogprobsGrad {
    fn name(&self) -> &'static str {
        "token-logprobs-grad"
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
        let (logits, targets, n, v) = rows(s1, l1, s2, l2)?;
        let Some((a, b)) = l3.contiguous_offsets() else {
            candle_core::bail!("token logprobs: gradient not contiguous")
        };
        let g = &s3.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; n * v];
        let shared = SharedOut::new(&mut out);
        for_rows(n, v, |i| {
            let row = &logits[i * v..(i + 1) * v];
            // SAFETY: row i alone writes out[i·v .. (i+1)·v]; `out` outlives the call.
            let o = unsafe { shared.part(i * v, v) };
            let gi = g[i] * self.inv_t;
            if gi == 0.0 {
                return; // masked tokens: a zero gradient row, already there
            }
            let (max, lse) = row_max_logsumexp(row, self.inv_t);
            let shift = max + lse;
            row_exp::write_exp(row, self.inv_t, shift, -gi, o);
            o[targets[i] as usize] += gi;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits(n: usize, v: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f32> = (0..n * v).map(|_| rng.random_range(-6.0..6.0)).collect();
        Tensor::from_vec(x, (n, v), &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_a_hand_computed_case() {
        // Row [0, ln 3] at τ = 1: probabilities 1/4, 3/4.
        let l = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let got = token_logprobs(&l, &t, 1.0).unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.75f32.ln()).abs() < 1e-6 && (got[1] - 0.5f32.ln()).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        for temperature in [1.0, 0.7] {
            let x = Var::from_tensor(&logits(5, 37, 1)).unwrap();
            let t = Tensor::new(&[3u32, 0, 36, 7, 7], &Device::Cpu).unwrap();
            // Zero weight on row 2 exercises the masked-row shortcut.
            let w = Tensor::new(&[1.0f32, -2.0, 0.0, 0.5, 3.0], &Device::Cpu).unwrap();
            let fused = token_logprobs(x.as_tensor(), &t, temperature).unwrap();
            let reference = composed(x.as_tensor(), &t, temperature).unwrap();
            let d = (&fused - &reference).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "values differ by {d}");
            let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "gradients differ by {d} at temperature {temperature}");
        }
    }

    #[test]
    fn the_cpu_logits_gradient_equals_the_composed_one() {
        let l = logits(4, 29, 3);
        let t = Tensor::new(&[0u32, 28, 5, 5], &Device::Cpu).unwrap();
        let g = Tensor::new(&[1.0f32, -0.5, 0.0, 2.0], &Device::Cpu).unwrap();
        let fused = logits_grad(&l, &t, &g, 1.0 / 0.7).unwrap();
        // The composed path, as any non-CPU device runs it.
        let p = candle_nn::ops::softmax_last_dim(&(&l * (1.0 / 0.7)).unwrap()).unwrap();
        let gs = (&g * (1.0 / 0.7)).unwrap();
        let neg = p.broadcast_mul(&gs.unsqueeze(1).unwrap()).unwrap().neg().unwrap();
        let want = neg.scatter_add(&t.unsqueeze(1).unwrap(), &gs.unsqueeze(1).unwrap(), 1).unwrap();
        let d =
            (fused - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        // The CPU form checks; token ids are checked where they enter (tokenizer, server).
        crate::kernels::with_mode(crate::kernels::Mode::Cpu, || {
            let t = Tensor::new(&[40u32], &Device::Cpu).unwrap();
            let e = token_logprobs(&logits(1, 37, 2), &t, 1.0).unwrap_err().to_string();
            assert!(e.contains("outside the vocabulary of 37"), "{e}");
        });
    }

    #[test]
    fn logprobs_with_entropy_match_the_composed_ops_in_both_forms_and_their_gradient_finite_differences() {
        use crate::kernels::{with_mode, Mode};
        let l = logits(4, 31, 9);
        let t = Tensor::new(&[0u32, 30, 5, 12], &Device::Cpu).unwrap();
        let dense = |x: &Tensor, tau: f64| -> (Vec<f64>, Vec<f64>) {
            let x: Vec<Vec<f32>> = x.to_vec2().unwrap();
            let (mut lp, mut h) = (vec![], vec![]);
            for (r, row) in x.iter().enumerate() {
                let z: Vec<f64> = row.iter().map(|&v| v as f64 / tau).collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                lp.push(z[[0usize, 30, 5, 12][r]] - lse);
                h.push(-z.iter().map(|v| (v - lse).exp() * (v - lse)).sum::<f64>());
            }
            (lp, h)
        };
        for tau in [1.0, 0.7] {
            let (want_lp, want_h) = dense(&l, tau);
            for mode in [Mode::Cpu, Mode::Portable] {
                let got: Vec<Vec<f32>> =
                    with_mode(mode, || logprobs_and_entropy(&l, &t, tau).unwrap().to_vec2().unwrap());
                for r in 0..4 {
                    assert!((got[r][0] as f64 - want_lp[r]).abs() < 1e-5, "{mode:?} τ={tau} lp[{r}]");
                    assert!((got[r][1] as f64 - want_h[r]).abs() < 1e-5, "{mode:?} τ={tau} H[{r}]");
                }
            }
            // The gradient of Σ g_lp·lp + g_h·H against central differences in f64.
            let (g_lp, g_h) = ([0.5f32, -1.0, 0.0, 2.0], [1.0f32, 0.3, -0.7, 0.0]);
            let d: Vec<Vec<f32>> = logits_grad_with_entropy(
                &l,
                &t,
                &Tensor::new(&g_lp, &Device::Cpu).unwrap(),
                &Tensor::new(&g_h, &Device::Cpu).unwrap(),
                1.0 / tau,
            )
            .unwrap()
            .to_vec2()
            .unwrap();
            let base: Vec<Vec<f32>> = l.to_vec2().unwrap();
            let value = |x: &Vec<Vec<f32>>| {
                let (lp, h) = dense(&Tensor::new(x.clone(), &Device::Cpu).unwrap(), tau);
                (0..4).map(|r| g_lp[r] as f64 * lp[r] + g_h[r] as f64 * h[r]).sum::<f64>()
            };
            for (r, j) in [(0usize, 0usize), (0, 7), (1, 30), (2, 3), (3, 12)] {
                let eps = 1e-2f32;
                let (mut up, mut down) = (base.clone(), base.clone());
                up[r][j] += eps;
                down[r][j] -= eps;
                let fd = (value(&up) - value(&down)) / (2.0 * eps as f64);
                assert!((fd - d[r][j] as f64).abs() < 1e-3, "τ={tau} [{r}][{j}]: {} vs {fd}", d[r][j]);
            }
        }
    }
}
