//! log softmax(h Wᵀ / τ)[target] per row, straight from the hidden states,
//! with its backward, never holding more than a chunk of rows' logits: the
//! vocabulary projection of every training forward (SFT's cross-entropy,
//! GRPO's policy, old and reference log-probabilities).
//!
//! Why: the logits of a training batch are [tokens, vocabulary]; with Qwen's
//! 152k vocabulary a 16 × 256-token GRPO step's logits alone are 2.5 GB, and
//! autograd keeps them (and their softmax) until the backward. Here the
//! forward computes the log-probabilities chunk by chunk without a graph, and
//! a custom op attaches the backward, which recomputes each chunk's logits:
//! d logits = (onehot(target) − softmax(logits / τ)) · g / τ, then
//! dh = d logits · W and dW += d logitsᵀ · h. The largest live tensor is one
//! chunk of logits (the technique of Liger's fused linear cross-entropy). The
//! price is one more vocabulary matmul in the backward.
//!
//! Rows whose gradient is zero (padding, masked tokens) are skipped in the backward.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};

use super::checkpointing::{copy_cpu, copy_cuda};
use super::grads::GradSink;
use super::ops::linear;
use crate::kernels::inplace::accumulate;
use crate::kernels::token_logprobs::{self, token_logprobs};
use crate::kernels::transfer;

/// Logit elements per chunk on the CPU (64 MiB of f32): 110 rows of Qwen's
/// vocabulary, 341 of SmolLM2's; small enough to stay near the caches.
const CPU_CHUNK_ELEMENTS: usize = 1 << 24;
/// On a GPU (1 GiB of f32): 1,766 rows of Qwen's vocabulary, so a chunk's
/// products are large enough to fill the device instead of many small GEMMs.
const GPU_CHUNK_ELEMENTS: usize = 1 << 28;

fn chunk_elements(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        CPU_CHUNK_ELEMENTS
    } else {
        GPU_CHUNK_ELEMENTS
    }
}

/// Where the weight's gradient goes: straight into the model's accumulator,
/// summed over chunks in f32 whatever the compute dtype (a bf16 gradient
/// summed chunk by chunk in bf16 would lose the small contributions).
#[derive(Clone)]
pub struct WeightGrad {
    pub var: Var,
    pub sink: GradSink,
}

/// `h` [N, H], `w` [V, H], `targets` [N] u32 → [N] f32: log softmax(h wᵀ / τ)[target],
/// and with `entropy` the entropy of softmax(h wᵀ / τ) per row ([N]), computed in
/// the same pass over each chunk of logits. Differentiable in `h` (both), and in
/// `w` through `direct` when given or through the graph when `w` tracks one; a
/// frozen `w` (LoRA) gets no gradient computed.
pub fn logprobs_from_hidden(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    direct: Option<WeightGrad>,
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let out = chunked(h, w, targets, temperature, direct, chunk_elements(h.device()), entropy)?;
    if entropy {
        Ok((out.narrow(1, 0, 1)?.squeeze(1)?, Some(out.narrow(1, 1, 1)?.squeeze(1)?)))
    } else {
        Ok((out, None))
    }
}

/// [N] log-probabilities, or [N, 2] with the entropies.
fn chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    direct: Option<WeightGrad>,
    chunk_elements: usize,
    entropy: bool,
) -> Result<Tensor> {
    let step = (chunk_elements / w.dim(0)?.max(1)).max(1);
    let values = forward_values(&h.detach(), &w.detach(), targets, temperature, step, entropy)?;
    if !h.track_op() && !w.track_op() && direct.is_none() {
        return Ok(values);
    }
    let weight_grad = direct.is_some() || w.track_op();
    let op = VocabLogprobs { targets: targets.clone(), inv_t: 1.0 / temperature, direct, weight_grad, step };
    h.apply_op3(w, &values, op)
}

/// The values, `step` rows at a time, with no graph.
fn forward_values(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    step: usize,
    entropy: bool,
) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let mut parts = Vec::with_capacity(n.div_ceil(step));
    let mut start = 0;
    while start < n {
        let len = step.min(n - start);
        let logits = at_least_f32(linear(&h.narrow(0, start, len)?, w, None)?)?;
        let t = targets.narrow(0, start, len)?;
        parts.push(if entropy {
            token_logprobs::logprobs_and_entropy(&logits, &t, temperature)?
        } else {
            token_logprobs(&logits, &t, temperature)?
        });
        start += len;
    }
    if parts.is_empty() {
        let dt = at_least_f32(h.narrow(0, 0, 0)?)?.dtype();
        return if entropy { Tensor::zeros((0, 2), dt, h.device()) } else { Tensor::zeros(0, dt, h.device()) };
    }
    Tensor::cat(&parts, 0)
}

/// Logits are computed in at least f32 (bf16 activations are upcast; f64 stays f64).
fn at_least_f32(t: Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F64 | DType::F32 => Ok(t),
        _ => t.to_dtype(DType::F32),
    }
}

struct VocabLogprobs {
    targets: Tensor,
    inv_t: f64,
    direct: Option<WeightGrad>,
    /// Whether the weight needs a gradient at all (a frozen head does not).
    weight_grad: bool,
    /// Rows per chunk of logits.
    step: usize,
}

impl CustomOp3 for VocabLogprobs {
    fn name(&self) -> &'static str {
        "vocab-logprobs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_cpu(s3, l3)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_cuda(s3, l3)
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, hd) = h.dims2()?;
        let (h, w) = (h.detach(), w.detach());
        let grad = if grad.dtype() == DType::F64 { grad.clone() } else { grad.to_dtype(DType::F32)? };
        // [N] for the log-probabilities alone, [N, 2] with the entropies: their two gradients.
        let (grad, grad_h) = if grad.rank() == 2 {
            (grad.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?, Some(grad.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?))
        } else {
            (grad, None)
        };
        // Only rows with a gradient: padding and masked tokens contribute nothing.
        let g: Vec<f32> = transfer::to_vec1(&grad.to_dtype(DType::F32)?)?;
        let gh: Option<Vec<f32>> = match &grad_h {
            Some(t) => Some(transfer::to_vec1(&t.to_dtype(DType::F32)?)?),
            None => None,
        };
        let grad_h = grad_h.filter(|_| gh.as_ref().is_some_and(|v| v.iter().any(|&x| x != 0.0)));
        let live: Vec<u32> = (0..n as u32)
            .filter(|&i| g[i as usize] != 0.0 || gh.as_ref().is_some_and(|v| v[i as usize] != 0.0))
            .collect();
        let dev = h.device();
        let graph_dw = self.weight_grad && self.direct.is_none();
        if live.is_empty() {
            return Ok((Some(h.zeros_like()?), if graph_dw { Some(w.zeros_like()?) } else { None }, None));
        }
        let idx = Tensor::new(live.as_slice(), dev)?;
        let (hl, tl) = (h.index_select(&idx, 0)?, self.targets.index_select(&idx, 0)?);
        let gl = grad.index_select(&idx, 0)?;
        let ghl = match &grad_h {
            Some(t) => Some(t.index_select(&idx, 0)?),
            None => None,
        };
        let m = live.len();
        let step = self.step;
        let (mut dh_parts, mut dw): (Vec<Tensor>, Option<Tensor>) = (Vec::new(), None);
        let mut start = 0;
        while start < m {
            let len = step.min(m - start);
            let hc = hl.narrow(0, start, len)?;
            let logits = at_least_f32(linear(&hc, &w, None)?)?;
            let (tc, gc) = (tl.narrow(0, start, len)?, gl.narrow(0, start, len)?);
            let dl = match &ghl {
                // An entropy term in the loss: its gradient from candle ops (a rare option).
                Some(gh) => {
                    token_logprobs::logits_grad_with_entropy(&logits, &tc, &gc, &gh.narrow(0, start, len)?, self.inv_t)?
                }
                None => token_logprobs::logits_grad(&logits, &tc, &gc, self.inv_t)?,
            }
            .to_dtype(w.dtype())?;
            dh_parts.push(dl.matmul(&w)?);
            if self.weight_grad {
                // In the compute dtype (the product accumulates in f32 inside the GEMM), summed
                // over chunks in f32.
                let part = dl.t()?.matmul(&hc)?;
                dw = Some(match dw {
                    Some(acc) => accumulate(acc, &part)?,
                    None => part.to_dtype(DType::F32)?.contiguous()?,
                });
            }
            start += len;
        }
        let dh_live = Tensor::cat(&dh_parts, 0)?;
        let dh = if m == n {
            dh_live
        } else {
            Tensor::zeros((n, hd), dh_live.dtype(), dev)?.index_add(&idx, &dh_live, 0)?
        };
        let dw = match (&self.direct, dw) {
            (Some(d), Some(dw)) => {
                d.sink.add(&d.var, &dw)?;
                None
            }
            (None, Some(dw)) => Some(dw.to_dtype(w.dtype())?),
            (_, None) => None,
        };
        Ok((Some(dh), dw, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rand(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The unfused path: the whole [N, V] logits, then log-softmax and gather.
    fn unfused(h: &Tensor, w: &Tensor, t: &Tensor, temperature: f64) -> Tensor {
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        token_logprobs::composed(&logits, t, temperature).unwrap()
    }

    #[test]
    fn values_and_gradients_equal_the_unfused_path_across_chunks_and_masked_rows() {
        // V large enough that a chunk holds fewer rows than N: several chunks, a ragged last one.
        // Chunks of 3 rows over N = 7: three chunks, the last one ragged.
        let (n, hd, v) = (7usize, 12usize, 301usize);
        let h = Var::from_tensor(&rand((n, hd), 1, 1.0)).unwrap();
        let w = Var::from_tensor(&rand((v, hd), 2, 0.5)).unwrap();
        let chunk = 3 * v + 10;
        let t = Tensor::new(&[3u32, 0, (v - 1) as u32, 7, 7, 100, 5], &Device::Cpu).unwrap();
        // Row 2 weighted 0: skipped by the backward, and its gradient must still be 0.
        let up = Tensor::new(&[1.0f32, -2.0, 0.0, 0.5, 3.0, 1.5, -1.0], &Device::Cpu).unwrap();
        for temperature in [1.0, 0.7] {
            let fused = chunked(h.as_tensor(), w.as_tensor(), &t, temperature, None, chunk, false).unwrap();
            let reference = unfused(h.as_tensor(), w.as_tensor(), &t, temperature);
            assert!(max_diff(&fused, &reference) < 1e-5, "values at τ = {temperature}");
            let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("h", &h), ("w", &w)] {
                let d = max_diff(g1.get(x).unwrap(), g2.get(x).unwrap());
                assert!(d < 1e-5, "d{name} differs by {d} at τ = {temperature}");
            }
        }
    }

    #[test]
    fn the_weight_gradient_can_go_straight_into_the_sink() {
        let (n, hd, v) = (5usize, 8usize, 50usize);
        let h = Var::from_tensor(&rand((n, hd), 3, 1.0)).unwrap();
        let w = Var::from_tensor(&rand((v, hd), 4, 0.5)).unwrap();
        let t = Tensor::new(&[1u32, 2, 3, 4, 49], &Device::Cpu).unwrap();
        let sink = GradSink::default();
        let direct = WeightGrad { var: w.clone(), sink: sink.clone() };
        let (l, _) = logprobs_from_hidden(h.as_tensor(), w.as_tensor(), &t, 1.0, Some(direct), false).unwrap();
        let store = l.sum_all().unwrap().backward().unwrap();
        assert!(store.get(w.as_tensor()).is_none(), "the weight's gradient went through the graph");
        let reference = unfused(h.as_tensor(), w.as_tensor(), &t, 1.0).sum_all().unwrap().backward().unwrap();
        let got = sink.take().remove(&w.as_tensor().id()).expect("gradient in the sink");
        assert!(max_diff(&got, reference.get(w.as_tensor()).unwrap()) < 1e-5);
        assert!(max_diff(store.get(h.as_tensor()).unwrap(), reference.get(h.as_tensor()).unwrap()) < 1e-5);
    }

    /// In bf16 the head's gradient is a sum over many chunks of rows: summed in f32
    /// it stays within the rounding of the bf16 logits of the f64 value.
    #[test]
    fn in_bf16_the_weight_gradient_is_summed_over_chunks_in_f32() {
        let (n, hd, v) = (512usize, 16usize, 64usize);
        let h32 = rand((n, hd), 5, 1.0);
        let w = Var::from_tensor(&rand((v, hd), 6, 0.5)).unwrap();
        let t = Tensor::from_vec((0..n as u32).map(|i| i * 7 % v as u32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        let sink = GradSink::default();
        let direct = WeightGrad { var: w.clone(), sink: sink.clone() };
        let h = Var::from_tensor(&h32.to_dtype(DType::BF16).unwrap()).unwrap();
        let wb = w.as_tensor().to_dtype(DType::BF16).unwrap().detach();
        // 4 rows a chunk: 128 chunks, every one adding to every entry of the gradient.
        let lp = chunked(h.as_tensor(), &wb, &t, 1.0, Some(direct), 4 * v, false).unwrap();
        lp.sum_all().unwrap().backward().unwrap();
        let got = sink.take().remove(&w.as_tensor().id()).expect("gradient in the sink");
        assert_eq!(got.dtype(), DType::F32);
        // The f64 reference on the bf16-rounded inputs.
        let (h64, w64) = (
            Var::from_tensor(&h.as_tensor().to_dtype(DType::F64).unwrap()).unwrap(),
            Var::from_tensor(&wb.to_dtype(DType::F64).unwrap()).unwrap(),
        );
        let g = unfused(h64.as_tensor(), w64.as_tensor(), &t, 1.0).sum_all().unwrap().backward().unwrap();
        let want = g.get(w64.as_tensor()).unwrap();
        let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
        let rel = diff.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
            / want.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
        // 0.18% measured (the bf16 logits' rounding); summed in bf16 it was 1.2%.
        assert!(rel < 0.005, "the chunked bf16 head gradient is {:.3}% off", 100.0 * rel);
    }

    /// The entropy from the chunked op equals a dense one, values and gradients
    /// (through h and w, with an entropy term in the loss), across chunks.
    #[test]
    fn the_entropy_from_the_chunked_op_equals_the_dense_one_with_its_gradient() {
        use crate::kernels::{with_mode, Mode};
        let (n, hd, v) = (6usize, 10usize, 57usize);
        let h = Var::from_tensor(&rand((n, hd), 11, 1.0)).unwrap();
        let w = Var::from_tensor(&rand((v, hd), 12, 0.6)).unwrap();
        let t = Tensor::new(&[1u32, 56, 3, 3, 20, 9], &Device::Cpu).unwrap();
        let (g_lp, g_h) = (
            Tensor::new(&[1.0f32, 0.0, -0.5, 2.0, 0.0, 1.0], &Device::Cpu).unwrap(),
            Tensor::new(&[0.3f32, 1.0, 0.0, -0.2, 0.0, 0.5], &Device::Cpu).unwrap(),
        );
        for mode in [Mode::Cpu, Mode::Portable] {
            with_mode(mode, || {
                let out = chunked(h.as_tensor(), w.as_tensor(), &t, 0.8, None, 2 * v + 3, true).unwrap();
                let (lp, ent) = (
                    out.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
                    out.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(),
                );
                // Dense: the whole logits, log-softmax, entropy.
                let logits = (h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap() / 0.8).unwrap();
                let lsm = crate::kernels::token_logprobs::log_softmax_last(&logits).unwrap();
                let dlp = lsm.gather(&t.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
                let dent = (lsm.exp().unwrap() * &lsm).unwrap().sum(1).unwrap().neg().unwrap();
                assert!(max_diff(&lp, &dlp) < 1e-5 && max_diff(&ent, &dent) < 1e-5, "{mode:?}: values");
                let loss =
                    |a: &Tensor, b: &Tensor| ((a * &g_lp).unwrap() + (b * &g_h).unwrap()).unwrap().sum_all().unwrap();
                let g1 = loss(&lp, &ent).backward().unwrap();
                let g2 = loss(&dlp, &dent).backward().unwrap();
                for (name, x) in [("h", &h), ("w", &w)] {
                    let d = max_diff(g1.get(x).unwrap(), g2.get(x).unwrap());
                    assert!(d < 1e-4, "{mode:?}: d{name} differs by {d}");
                }
            });
        }
    }
}
