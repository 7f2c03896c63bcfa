//! The typed layers of a decoder-only transformer, built once at load:
//! parameters with their compute-dtype view, linear projections with optional
//! LoRA adapters, RMSNorm, attention (with optional q/k bias and q/k norm) and
//! the gated MLP. Each is plain data (cheap `Arc` clones), so a layer can be
//! handed to the activation-checkpointing op and recomputed in backward.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};

use super::kv_cache::KvCache;
use super::ops::{linear, rms_norm, rope, softmax_last, Ops};
use crate::kernels;
use crate::kernels::packed::PackedWeight;
use crate::kernels::swiglu::silu_mul;

/// How a forward pass runs: which kernels, whether it builds a graph to the
/// trainable parameters, and whether LoRA adapters are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub ops: Ops,
    /// Build the autograd graph to the trainable parameters (training); when
    /// false every weight is detached and activations are freed as they go.
    pub grad: bool,
    /// Apply the LoRA adapters (false: the base model, GRPO's reference with LoRA).
    pub adapters: bool,
}

impl Pass {
    /// Generation and evaluation: fused kernels, no graph.
    pub const INFERENCE: Pass = Pass { ops: Ops::Fused, grad: false, adapters: true };
    /// The training forward: differentiable kernels, a graph to the trainable parameters.
    pub const TRAIN: Pass = Pass { ops: Ops::Differentiable, grad: true, adapters: true };
    /// Scoring for training without gradients (old and reference log-probabilities):
    /// the training kernels, so values equal the training forward's bit for bit.
    pub const SCORE: Pass = Pass { ops: Ops::Differentiable, grad: false, adapters: true };
}

/// A parameter: its master weights (f32 `Var`, what the optimizer updates and
/// checkpoints save) and the tensor the forward multiplies with.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// The compute-dtype view. For f32 compute it is the master itself (same
    /// storage, same graph node); otherwise a cast, redone by [`Param::refresh`]
    /// after each optimizer step. `None`: cast at each use (a frozen reference
    /// stored in a narrower dtype than it computes in).
    compute: Option<Tensor>,
    /// Frozen parameters never get a gradient (LoRA's base weights, a reference model).
    pub frozen: bool,
    dtype: DType,
}

impl Param {
    pub fn new(name: String, var: Var, dtype: DType, frozen: bool) -> Result<Param> {
        let mut p = Param { name, var, compute: None, frozen, dtype };
        p.refresh()?;
        Ok(p)
    }

    /// Stored as is (any dtype) and cast to `dtype` at each use: no cached copy.
    pub fn cast_on_use(name: String, var: Var, dtype: DType) -> Param {
        Param { name, var, compute: None, frozen: true, dtype }
    }

    /// Recompute the compute-dtype view from the master weights.
    pub fn refresh(&mut self) -> Result<()> {
        let t = self.var.as_tensor();
        self.compute = Some(if t.dtype() == self.dtype { t.clone() } else { t.to_dtype(self.dtype)? });
        Ok(())
    }

    /// Recompute the compute-dtype view if there is one (a weight cast on use has none, and gets none).
    pub fn refresh_if_cached(&mut self) -> Result<()> {
        if self.compute.is_some() {
            self.refresh()?;
        }
        Ok(())
    }

    /// The weight for a pass: attached to the master when the pass trains it.
    pub fn get(&self, pass: Pass) -> Result<Tensor> {
        let t = match &self.compute {
            Some(t) => t.clone(),
            None => self.var.as_tensor().detach().to_dtype(self.dtype)?,
        };
        Ok(if pass.grad && !self.frozen { t } else { t.detach() })
    }

    pub fn trainable(&self) -> bool {
        !self.frozen
    }
}

/// LoRA factors of one projection: `W + scale·B·A`.
#[derive(Clone)]
pub struct LoraFactors {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// `x @ Wᵀ (+ b)`, plus the LoRA update when adapted and the pass applies adapters.
#[derive(Clone)]
pub struct Linear {
    pub w: Param,
    pub b: Option<Param>,
    pub lora: Option<LoraFactors>,
    /// `w` packed for the CPU's inference product (a model loaded for evaluation
    /// or inference only, [`super::Transformer::pack_for_inference`]; or a
    /// round's bf16 rollout view, [`super::Transformer::rollout_view`]).
    pub packed: Option<Arc<PackedWeight>>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let b = match &self.b {
            Some(b) => Some(b.get(pass)?),
            None => None,
        };
        let y = match &self.packed {
            Some(p) if pass == Pass::INFERENCE => {
                let y = kernels::packed::product(x, p)?;
                match &b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            _ => linear(x, &self.w.get(pass)?, b.as_ref())?,
        };
        match &self.lora {
            Some(l) if pass.adapters => {
                let dt = x.dtype();
                let (a, bb) = (l.a.as_tensor().to_dtype(dt)?, l.b.as_tensor().to_dtype(dt)?);
                let (a, bb) = if pass.grad { (a, bb) } else { (a.detach(), bb.detach()) };
                y + (linear(&linear(x, &a, None)?, &bb, None)? * l.scale)?
            }
            _ => Ok(y),
        }
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        std::iter::once(&self.w).chain(self.b.as_ref())
    }
}

#[derive(Clone)]
pub struct RmsNorm {
    pub w: Param,
    pub eps: f64,
    pub offset: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let w = self.w.get(pass)?;
        let w = if self.offset != 0.0 { (w + self.offset as f64)? } else { w };
        rms_norm(x, &w, self.eps, pass.ops)
    }
}

#[derive(Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Per-head RMSNorm of q and k before the rotary embedding (Qwen3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_norm: RmsNorm,
    pub mlp: Mlp,
}

/// What every layer of one forward shares: rotary tables and the attention mask.
#[derive(Clone)]
pub struct LayerInputs {
    /// [B, T, D/2] each, in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive bias [B, 1, T, S].
    pub mask: Tensor,
}

impl DecoderLayer {
    /// `x` [B, T, H] → [B, T, H]; `cache` holds earlier keys and values (generation).
    pub fn forward(&self, x: &Tensor, inp: &LayerInputs, pass: Pass, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let a = &self.attn;
        let (b, t, _) = x.dims3()?;
        let k = pass.ops;
        let h = self.input_norm.forward(x, pass)?;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, a.head_dim))?;
            let y = match norm {
                Some(nm) => nm.forward(&y, pass)?,
                None => y,
            };
            y.transpose(1, 2)
        };
        let q = heads(a.q.forward(&h, pass)?, a.num_heads, &a.q_norm)?;
        let kk = heads(a.k.forward(&h, pass)?, a.num_kv_heads, &a.k_norm)?;
        // Contiguous: the attention matmuls take per-head blocks (as do cache views).
        let v = a.v.forward(&h, pass)?.reshape((b, t, a.num_kv_heads, a.head_dim))?.transpose(1, 2)?.contiguous()?;
        let q = rope(&q, &inp.cos, &inp.sin, k)?;
        let kk = rope(&kk, &inp.cos, &inp.sin, k)?;
        let (kk, v) = match cache {
            Some(cache) => cache.append(self.index, &kk, &v)?,
            None => (kk, v),
        };
        // Grouped-query attention without copying keys and values per query head: the
        // `rep` query heads of a key/value head (adjacent, as in HF's repeat_kv) become
        // `rep × t` query rows against that head's keys.
        let rep = a.num_heads / a.num_kv_heads;
        let scale = 1.0 / (a.head_dim as f64).sqrt();
        let s = kk.dim(2)?;
        let q = q.reshape((b, a.num_kv_heads, rep * t, a.head_dim))?;
        let attn = if kernels::attention::applies(&q) {
            kernels::attention::attention(&q, &kk, &v, &inp.mask, scale)?
        } else {
            let scores = (q.matmul(&kk.t()?)? * scale)?
                .reshape((b, a.num_kv_heads, rep, t, s))?
                .broadcast_add(&inp.mask.unsqueeze(1)?)?;
            softmax_last(&scores, k)?.reshape((b, a.num_kv_heads, rep * t, s))?.matmul(&v)?
        };
        let attn = attn.reshape((b, a.num_heads, t, a.head_dim))?.transpose(1, 2)?.reshape((
            b,
            t,
            a.num_heads * a.head_dim,
        ))?;
        let x = (x + a.o.forward(&attn, pass)?)?;
        let h = self.post_norm.forward(&x, pass)?;
        let gate = self.mlp.gate.forward(&h, pass)?;
        let up = self.mlp.up.forward(&h, pass)?;
        x + self.mlp.down.forward(&silu_mul(&gate, &up)?, pass)?
    }

    /// Every parameter of the layer (weights, biases, norms).
    pub fn params(&self) -> Vec<&Param> {
        let a = &self.attn;
        let mut out: Vec<&Param> = vec![&self.input_norm.w, &self.post_norm.w];
        for l in [&a.q, &a.k, &a.v, &a.o, &self.mlp.gate, &self.mlp.up, &self.mlp.down] {
            out.extend(l.params());
        }
        out.extend(a.q_norm.iter().chain(&a.k_norm).map(|n| &n.w));
        out
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let a = &mut self.attn;
        let mut out: Vec<&mut Param> = vec![&mut self.input_norm.w, &mut self.post_norm.w];
        for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut self.mlp.gate, &mut self.mlp.up, &mut self.mlp.down] {
            out.push(&mut l.w);
            if let Some(b) = l.b.as_mut() {
                out.push(b);
            }
        }
        if let Some(n) = a.q_norm.as_mut() {
            out.push(&mut n.w);
        }
        if let Some(n) = a.k_norm.as_mut() {
            out.push(&mut n.w);
        }
        out
    }

    /// The projections by their module name (`q_proj`, …, `down_proj`), for LoRA.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let a = &mut self.attn;
        vec![
            ("q_proj", &mut a.q),
            ("k_proj", &mut a.k),
            ("v_proj", &mut a.v),
            ("o_proj", &mut a.o),
            ("gate_proj", &mut self.mlp.gate),
            ("up_proj", &mut self.mlp.up),
            ("down_proj", &mut self.mlp.down),
        ]
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let a = &self.attn;
        vec![&a.q, &a.k, &a.v, &a.o, &self.mlp.gate, &self.mlp.up, &self.mlp.down]
    }

    /// The variables a training backward through this layer reaches: its
    /// unfrozen parameters and its LoRA factors.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut out: Vec<Var> = self.params().into_iter().filter(|p| p.trainable()).map(|p| p.var.clone()).collect();
        for l in self.linears() {
            if let Some(f) = &l.lora {
                out.push(f.a.clone());
                out.push(f.b.clone());
            }
        }
        out
    }
}
