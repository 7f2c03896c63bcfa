//! The transformer's operations besides attention: RMSNorm, softmax and the
//! rotary embedding each in two forms, candle's fused kernel for inference
//! and a composition of differentiable candle ops for training (candle's fused
//! `rms_norm`, `softmax_last` and `rope` have no backward pass and silently
//! drop gradients, so training must never use them); and the one linear layer
//! product. Both forms exist on every device; which hand-written CPU kernels
//! run underneath is the kernels' own business (`crate::kernels`).

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::matmul_t::matmul_t;

/// Which form of the ops a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// Fused kernels, no gradients: generation and evaluation.
    Fused,
    /// Differentiable compositions: training and anything that needs gradients.
    Differentiable,
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, k: Ops) -> Result<Tensor> {
    match k {
        Ops::Fused => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Ops::Differentiable => {
            // Accumulate in f32 even for bf16 activations, as the fused kernel does.
            let dtype = x.dtype();
            let xf = if matches!(dtype, DType::BF16 | DType::F16) { x.to_dtype(DType::F32)? } else { x.clone() };
            let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
            normed.to_dtype(dtype)?.broadcast_mul(weight)
        }
    }
}

pub fn softmax_last(x: &Tensor, k: Ops) -> Result<Tensor> {
    match k {
        Ops::Fused => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Ops::Differentiable => {
            // In f32 for bf16 scores, as the fused kernel and transformers' eager attention do.
            let dtype = x.dtype();
            let xf = if matches!(dtype, DType::BF16 | DType::F16) { x.to_dtype(DType::F32)? } else { x.clone() };
            // The max only stabilizes; softmax does not depend on it, so no gradient flows through it.
            let max = xf.max_keepdim(D::Minus1)?.detach();
            let e = xf.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
        }
    }
}

/// Rotary position embedding, rotate-half layout (as Hugging Face Llama/Qwen2).
/// `x`: [B, H, T, D]; `cos`, `sin`: [B, T, D/2] (per-sequence positions, for left padding).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, k: Ops) -> Result<Tensor> {
    match k {
        Ops::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?),
        Ops::Differentiable => {
            let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
            let half = x.dim(D::Minus1)? / 2;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        }
    }
}

/// `x @ wᵀ + b` for `x` of any rank ≥ 2: the product of every linear layer,
/// on every device (`kernels::matmul_t`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((last, lead)) = dims.split_last() else {
        candle_core::bail!("linear: a scalar input");
    };
    let rows: usize = lead.iter().product();
    let y = matmul_t(&x.reshape((rows, *last))?, w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_and_differentiable_kernels_agree() {
        let x = rand(&[2, 3, 5, 8], 1);
        let w = rand(&[8], 2);
        let a = rms_norm(&x, &w, 1e-6, Ops::Fused).unwrap();
        let b = rms_norm(&x, &w, 1e-6, Ops::Differentiable).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let a = softmax_last(&x, Ops::Fused).unwrap();
        let b = softmax_last(&x, Ops::Differentiable).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let cos = rand(&[2, 5, 4], 3);
        let sin = rand(&[2, 5, 4], 4);
        let a = rope(&x, &cos, &sin, Ops::Fused).unwrap();
        let b = rope(&x, &cos, &sin, Ops::Differentiable).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn differentiable_kernels_pass_gradients_and_fused_ones_do_not() {
        let x = Var::from_tensor(&rand(&[2, 3, 5, 8], 5)).unwrap();
        let w = Var::from_tensor(&rand(&[8], 6)).unwrap();
        let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, Ops::Differentiable).unwrap();
        let y = softmax_last(&y, Ops::Differentiable).unwrap();
        let g = (y * rand(&[2, 3, 5, 8], 7)).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some() && g.get(&w).is_some());
        // The trap this module exists for: the fused kernel leaves its inputs without gradient.
        let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, Ops::Fused).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
    }

    #[test]
    fn log_softmax_matches_log_of_softmax() {
        let x = rand(&[4, 11], 8);
        let a = crate::kernels::token_logprobs::log_softmax_last(&x).unwrap();
        let b = softmax_last(&x, Ops::Differentiable).unwrap().log().unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn the_training_softmax_of_bf16_scores_works_in_f32() {
        // Scores whose softmax in bf16 arithmetic loses the small probabilities' digits.
        let x = rand(&[3, 40], 9);
        let want = softmax_last(&x, Ops::Differentiable).unwrap();
        let got = softmax_last(&x.to_dtype(DType::BF16).unwrap(), Ops::Differentiable).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let fused = softmax_last(&x.to_dtype(DType::BF16).unwrap(), Ops::Fused).unwrap();
        // Both within bf16's rounding of the inputs and the output (2⁻⁸ relative).
        let d = max_diff(&got.to_dtype(DType::F32).unwrap(), &want);
        let df = max_diff(&fused.to_dtype(DType::F32).unwrap(), &want);
        assert!(d < 2e-2 && df < 2e-2, "bf16 softmax off by {d} (fused: {df})");
        assert!(max_diff(&got.to_dtype(DType::F32).unwrap(), &fused.to_dtype(DType::F32).unwrap()) < 1e-2);
    }
}
