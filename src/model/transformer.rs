//! A decoder-only transformer (the Llama, Qwen2 and Qwen3 families) written
//! for training as well as inference: typed layers built once at load (see
//! `layers.rs`), a full-sequence forward with padding mask and per-sequence
//! positions that trains through differentiable ops (with per-layer
//! activation checkpointing and a chunked vocabulary projection), and an
//! incremental forward with a KV cache through fused kernels. Both compute
//! the same function (tested).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::batch::{Batch, SHARED_PREFIX};
use super::checkpointing::checkpointed;
use super::config::Config;
use super::grads::GradSink;
use super::kv_cache::KvCache;
use super::layers::{Attention, DecoderLayer, LayerInputs, Linear, LoraFactors, Mlp, Param, Pass, RmsNorm};
use super::lora::LoraConfig;
use super::ops::Ops;
use super::vocab_logprobs::{logprobs_from_hidden, WeightGrad};
use crate::kernels::packed::{PackedWeight, Precision};

/// Additive bias for masked attention: large and finite, so a fully masked
/// row (a padding query) yields a uniform softmax instead of NaN.
const MASKED: f32 = -1e9;

pub struct Transformer {
    pub cfg: Config,
    /// Master weights by their Hugging Face names (f32 `Var`s, updated in place by
    /// the optimizer); the typed layers below hold the same variables.
    pub weights: BTreeMap<String, Var>,
    embed: Param,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when tied to the embedding.
    lm_head: Option<Param>,
    /// The head packed for the CPU's inference product ([`Transformer::pack_for_inference`]).
    packed_head: Option<Arc<PackedWeight>>,
    /// The dtype activations are computed in (f32 on CPU; bf16 on CUDA by default).
    pub compute_dtype: DType,
    pub device: Device,
    /// LoRA settings when adapters were added (the base weights are then frozen).
    pub lora: Option<LoraConfig>,
    /// Keep only each layer's input in a training forward and recompute the layer in backward.
    pub gradient_checkpointing: bool,
    /// Where a training backward accumulates gradients (see `grads.rs`).
    sink: GradSink,
}

impl Transformer {
    /// A model from named weights (any float dtype; stored as f32 master `Var`s).
    pub fn new(
        cfg: Config,
        weights: BTreeMap<String, Tensor>,
        device: &Device,
        compute_dtype: DType,
    ) -> anyhow::Result<Self> {
        let mut weights = weights;
        let mut vars = BTreeMap::new();
        for (name, shape) in cfg.weight_shapes() {
            let t = weights.remove(&name).with_context(|| format!("the weights have no `{name}`"))?;
            if t.dims() != shape.as_slice() {
                bail!("weight `{name}` has shape {:?}, the config implies {shape:?}", t.dims());
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        // A tied lm_head stored anyway (some exporters do) is the embedding: ignore it.
        if cfg.tie_word_embeddings {
            weights.remove("lm_head.weight");
        }
        if let Some(extra) = weights.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
            bail!("unexpected weight `{extra}` for a {:?} model", cfg.family);
        }
        Ok(Self::from_vars(cfg, vars, device, compute_dtype, |name, var, dt| Param::new(name, var, dt, false))?)
    }

    /// The typed layers over named variables; `param` makes each parameter.
    fn from_vars(
        cfg: Config,
        vars: BTreeMap<String, Var>,
        device: &Device,
        compute_dtype: DType,
        param: impl Fn(String, Var, DType) -> Result<Param>,
    ) -> Result<Self> {
        let p = |name: &str| param(name.to_string(), vars[name].clone(), compute_dtype);
        let maybe = |name: &str| -> Result<Option<Param>> {
            if vars.contains_key(name) {
                Ok(Some(p(name)?))
            } else {
                Ok(None)
            }
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm { w: p(name)?, eps: cfg.rms_norm_eps, offset: cfg.norm_offset })
        };
        let lin = |name: &str| -> Result<Linear> {
            Ok(Linear {
                w: p(&format!("{name}.weight"))?,
                b: maybe(&format!("{name}.bias"))?,
                lora: None,
                packed: None,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let pre = format!("model.layers.{l}");
            let qk_norm = |which: &str| -> Result<Option<RmsNorm>> {
                if cfg.qk_norm {
                    Ok(Some(norm(&format!("{pre}.self_attn.{which}.weight"))?))
                } else {
                    Ok(None)
                }
            };
            layers.push(DecoderLayer {
                index: l,
                input_norm: norm(&format!("{pre}.input_layernorm.weight"))?,
                attn: Attention {
                    q: lin(&format!("{pre}.self_attn.q_proj"))?,
                    k: lin(&format!("{pre}.self_attn.k_proj"))?,
                    v: lin(&format!("{pre}.self_attn.v_proj"))?,
                    o: lin(&format!("{pre}.self_attn.o_proj"))?,
                    q_norm: qk_norm("q_norm")?,
                    k_norm: qk_norm("k_norm")?,
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                },
                post_norm: norm(&format!("{pre}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: lin(&format!("{pre}.mlp.gate_proj"))?,
                    up: lin(&format!("{pre}.mlp.up_proj"))?,
                    down: lin(&format!("{pre}.mlp.down_proj"))?,
                },
            });
        }
        Ok(Transformer {
            embed: p("model.embed_tokens.weight")?,
            norm: norm("model.norm.weight")?,
            lm_head: if cfg.tie_word_embeddings { None } else { Some(p("lm_head.weight")?) },
            packed_head: None,
            layers,
            cfg,
            weights: vars,
            compute_dtype,
            device: device.clone(),
            lora: None,
            gradient_checkpointing: false,
            sink: GradSink::default(),
        })
    }

    /// Random weights (normal, std 0.02, biases included so tests exercise them; norms 1),
    /// reproducible from `seed`.
    pub fn random(cfg: Config, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("valid normal");
        let mut w = BTreeMap::new();
        for (name, shape) in cfg.weight_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Transformer::new(cfg, w, device, DType::F32)
    }

    /// A frozen copy of the current weights (LoRA adapters merged) for a reference
    /// policy, stored in `storage` and computed in `compute` (cast per layer at use,
    /// so a bf16 copy costs half of an f32 one and no more at run time).
    pub fn frozen_copy(&self, storage: DType, compute: DType) -> anyhow::Result<Transformer> {
        let mut vars = BTreeMap::new();
        for (name, t) in self.tensors() {
            // `copy`: a cast to the weight's own dtype is the same tensor, and a
            // Var made from a Var is that Var; the copy must never share the
            // policy's storage, which the optimizer updates in place.
            vars.insert(name, Var::from_tensor(&t.to_dtype(storage)?.copy()?)?);
        }
        let frozen = |name: String, var: Var, dt: DType| -> Result<Param> {
            if var.dtype() == dt {
                Param::new(name, var, dt, true)
            } else {
                Ok(Param::cast_on_use(name, var, dt))
            }
        };
        Ok(Self::from_vars(self.cfg.clone(), vars, &self.device, compute, frozen)?)
    }

    /// Move these weights toward `theirs` (by Hugging Face name, every weight
    /// present): w ← (1 − α)·w + α·w_theirs, computed in f32 and stored in each
    /// weight's own dtype (TR-DPO's reference sync); α = 1 copies them exactly.
    pub fn blend_weights(&mut self, theirs: &BTreeMap<String, Tensor>, alpha: f64) -> anyhow::Result<()> {
        self.drop_packed();
        for (name, var) in &self.weights {
            let t = theirs.get(name).ok_or_else(|| anyhow::anyhow!("no weight {name} to blend with"))?;
            if t.shape() != var.shape() {
                anyhow::bail!("{name} has shape {:?}, the model {:?}", t.dims(), var.dims());
            }
            let new = if alpha == 1.0 {
                t.to_dtype(var.dtype())?
            } else {
                let ours = var.as_tensor().to_dtype(DType::F32)?;
                ((ours * (1.0 - alpha))? + (t.to_dtype(DType::F32)? * alpha)?)?.to_dtype(var.dtype())?
            };
            var.set(&new)?;
        }
        for p in self.params_mut() {
            p.refresh_if_cached()?;
        }
        Ok(())
    }

    /// Pack every projection's weight and the head for the CPU's inference
    /// product (`kernels::packed`), for a model that only generates (evaluate,
    /// infer): the optimizer updates the master weights in place, which the
    /// packed copies would not follow. Costs one more copy of those weights in
    /// memory; a no-op where the CPU forms do not apply (CUDA, bf16, portable).
    pub fn pack_for_inference(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for (_, lin) in layer.linears_mut() {
                lin.packed = PackedWeight::for_tensor(&lin.w.get(Pass::INFERENCE)?, Precision::F32)?;
            }
        }
        self.packed_head = PackedWeight::for_tensor(&self.head().get(Pass::INFERENCE)?, Precision::F32)?;
        Ok(())
    }

    /// A model to sample GRPO's rollouts from: this one's variables (shared,
    /// not copied) with every projection and the head packed in `precision`
    /// for the CPU's inference product, so that a decode step reads half the
    /// bytes in bf16. The packed copies do not follow the optimizer's updates:
    /// build one per round of rollouts and drop it before the next step.
    /// `None` where nothing packs (no AVX-512, CUDA, bf16 compute, portable
    /// kernels): the caller samples from the policy itself, and says so.
    pub fn rollout_view(&self, precision: Precision) -> Result<Option<Transformer>> {
        use rayon::prelude::*;
        if !(crate::kernels::packed::packs_here() && self.device.is_cpu() && self.compute_dtype == DType::F32) {
            return Ok(None);
        }
        let mut layers = self.layers.clone();
        let mut linears: Vec<&mut Linear> =
            layers.iter_mut().flat_map(|l| l.linears_mut().into_iter().map(|(_, lin)| lin)).collect();
        // Packing is a pass over every weight; the projections pack on all threads.
        linears.par_iter_mut().try_for_each(|lin| -> Result<()> {
            lin.packed = PackedWeight::for_tensor(&lin.w.get(Pass::INFERENCE)?, precision)?;
            Ok(())
        })?;
        let packed_head = PackedWeight::for_tensor(&self.head().get(Pass::INFERENCE)?, precision)?;
        Ok(Some(Transformer {
            cfg: self.cfg.clone(),
            weights: self.weights.clone(),
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            packed_head,
            compute_dtype: self.compute_dtype,
            device: self.device.clone(),
            lora: self.lora.clone(),
            gradient_checkpointing: false,
            sink: GradSink::default(),
        }))
    }

    /// Forget the packed copies (their weights are about to change).
    fn drop_packed(&mut self) {
        for layer in &mut self.layers {
            for (_, lin) in layer.linears_mut() {
                lin.packed = None;
            }
        }
        self.packed_head = None;
    }

    /// Compute in `dtype` from now on (the master weights stay f32).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        self.drop_packed();
        self.compute_dtype = dtype;
        for p in self.params_mut() {
            *p = Param::new(p.name.clone(), p.var.clone(), dtype, p.frozen)?;
        }
        Ok(())
    }

    /// Recast the compute-dtype weights from the masters: once per optimizer step
    /// (a no-op for f32 compute, whose weights are the masters themselves).
    pub fn refresh_compute_weights(&mut self) -> Result<()> {
        self.drop_packed();
        if self.compute_dtype == DType::F32 {
            return Ok(());
        }
        for p in self.params_mut() {
            p.refresh()?;
        }
        Ok(())
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut out: Vec<&mut Param> = vec![&mut self.embed, &mut self.norm.w];
        if let Some(h) = self.lm_head.as_mut() {
            out.push(h);
        }
        for l in self.layers.iter_mut() {
            out.extend(l.params_mut());
        }
        out
    }

    /// Add LoRA adapters (the base weights become frozen): A uniform in ±1/√in
    /// (seeded), B zero, so the adapted model starts equal to the base.
    pub fn add_lora(&mut self, cfg: LoraConfig, seed: u64) -> anyhow::Result<()> {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x10ca);
        let device = self.device.clone();
        for p in self.params_mut() {
            p.frozen = true;
        }
        // Adapted weights in name order, so the initialization does not depend on layer layout.
        let mut by_name: BTreeMap<String, &mut Linear> = BTreeMap::new();
        for layer in self.layers.iter_mut() {
            for (module, lin) in layer.linears_mut() {
                if cfg.target_modules.iter().any(|m| m == module) {
                    by_name.insert(lin.w.name.clone(), lin);
                }
            }
        }
        for lin in by_name.into_values() {
            let (out, inp) = lin.w.var.as_tensor().dims2()?;
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, cfg.r), DType::F32, &device)?)?;
            lin.lora = Some(LoraFactors { a, b, scale: cfg.scale() });
        }
        self.lora = Some(cfg);
        Ok(())
    }

    /// LoRA adapters by `<weight>.lora_A` / `.lora_B` name.
    fn adapters(&self) -> BTreeMap<String, (&Linear, &LoraFactors)> {
        let mut out = BTreeMap::new();
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(f) = &lin.lora {
                    out.insert(lin.w.name.clone(), (lin, f));
                }
            }
        }
        out
    }

    /// The LoRA factors by the name of the weight they adapt (empty without LoRA).
    pub fn lora_factors(&self) -> BTreeMap<String, LoraFactors> {
        self.adapters().into_iter().map(|(n, (_, f))| (n, f.clone())).collect()
    }

    /// What an optimizer trains: the adapters with LoRA, else every weight.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        if self.lora.is_some() {
            return self
                .adapters()
                .into_iter()
                .flat_map(|(n, (_, f))| [(format!("{n}.lora_A"), f.a.clone()), (format!("{n}.lora_B"), f.b.clone())])
                .collect();
        }
        self.weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// cos and sin of the rotary angles for `positions` [B, T] → [B, T, D/2] each.
    fn rotary(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (self.cfg.rope_theta as f32).powf(2.0 * i as f32 / self.cfg.head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, 1, half), &self.device)?;
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?.to_dtype(self.compute_dtype)?, freqs.sin()?.to_dtype(self.compute_dtype)?))
    }

    /// Additive attention bias [B, 1, T, S]: query i (absolute index `offset + i`)
    /// sees key j when j ≤ offset + i and key j is a real token (of the same
    /// segment when packed, or of a shared prefix). Built on the device from
    /// per-key rows ([B, S] validity and segments): what crosses from the host
    /// grows with B × S, not B × T × S.
    fn mask(&self, key_valid: &[Vec<bool>], segments: Option<&[Vec<u32>]>, offset: usize, t: usize) -> Result<Tensor> {
        let (b, s, dev) = (key_valid.len(), offset + t, &self.device);
        let valid: Vec<u8> =
            key_valid.iter().flat_map(|row| (0..s).map(|j| row.get(j).copied().unwrap_or(false) as u8)).collect();
        let valid = Tensor::from_vec(valid, (b, 1, 1, s), dev)?;
        let keys = Tensor::arange(0u32, s as u32, dev)?.reshape((1, 1, 1, s))?;
        let queries = Tensor::arange(offset as u32, s as u32, dev)?.reshape((1, 1, t, 1))?;
        let causal = keys.broadcast_le(&queries)?.to_dtype(DType::F32)?; // [1, 1, T, S]
        let mut visible = causal.broadcast_mul(&valid.to_dtype(DType::F32)?)?; // [B, 1, T, S]
        if let Some(seg) = segments {
            let ids: Vec<u32> = seg.iter().flat_map(|row| (0..s).map(|j| row.get(j).copied().unwrap_or(0))).collect();
            let keys = Tensor::from_vec(ids, (b, 1, 1, s), dev)?;
            let queries = keys.narrow(3, offset, t)?.reshape((b, 1, t, 1))?;
            let same = keys.broadcast_eq(&queries)?.to_dtype(DType::F32)?;
            let shared = keys.eq(SHARED_PREFIX)?.to_dtype(DType::F32)?;
            visible = (visible * same.broadcast_maximum(&shared)?)?;
        }
        // 1 → 0, 0 → MASKED, exactly (both products are exact in f32).
        ((visible - 1.0)? * (-MASKED as f64))?.to_dtype(self.compute_dtype)
    }

    fn embed(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.flatten_all()?;
        let rows = if pass.grad && self.embed.trainable() {
            // Gathered from the f32 master, then cast: the lookup's gradient (an
            // index_add) accumulates in f32, where the bf16 copy would round small
            // contributions away (with tied embeddings, on top of the head's).
            self.embed.var.as_tensor().index_select(&ids, 0)?.to_dtype(self.compute_dtype)?
        } else {
            self.embed.get(pass)?.index_select(&ids, 0)?
        };
        rows.reshape((b, t, self.cfg.hidden_size))
    }

    fn head(&self) -> &Param {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final-normed hidden states [B, T, H] of a batch.
    pub fn hidden(&self, batch: &Batch, pass: Pass) -> Result<Tensor> {
        let t = batch.ids.dim(1)?;
        let (cos, sin) = self.rotary(&batch.positions)?;
        let inputs = LayerInputs { cos, sin, mask: self.mask(&batch.valid, batch.segments.as_deref(), 0, t)? };
        let mut x = self.embed(&batch.ids, pass)?;
        let checkpoint = pass.grad && self.gradient_checkpointing;
        let mut tracked = pass.grad && self.embed.trainable();
        for layer in &self.layers {
            x = if checkpoint {
                let vars = layer.trainable_vars();
                let layer_trains = !vars.is_empty();
                let out = checkpointed(layer, vars, &x, &inputs, pass, &self.sink, tracked)?;
                tracked |= layer_trains;
                out
            } else {
                layer.forward(&x, &inputs, pass, None)?
            };
        }
        self.norm.forward(&x, pass)
    }

    /// Logits [B, T, V] at every position (f32, or f64 for f64 compute). The
    /// training kernels build a graph; the fused ones do not.
    pub fn forward(&self, batch: &Batch, ops: Ops) -> Result<Tensor> {
        let pass = match ops {
            Ops::Fused => Pass::INFERENCE,
            Ops::Differentiable => Pass::TRAIN,
        };
        self.logits(batch, pass)
    }

    /// Logits [B, T, V] at every position under `pass` (which says whether
    /// adapters apply and whether a graph is built).
    pub fn logits(&self, batch: &Batch, pass: Pass) -> Result<Tensor> {
        let h = self.hidden(batch, pass)?;
        super::ops::linear(&h, &self.head().get(pass)?, None)?.to_dtype(self.logits_dtype())
    }

    /// Logits and log-probabilities are at least f32 (bf16 compute is upcast).
    fn logits_dtype(&self) -> DType {
        if self.compute_dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// log π(token_{t+1} | tokens ≤ t) for every position but the last: [B, T-1],
    /// through the training pass (a graph to the trainable parameters).
    pub fn next_token_logprobs(&self, batch: &Batch) -> Result<Tensor> {
        let t = batch.ids.dim(1)?;
        self.next_token_logprobs_range(batch, 0, t - 1, 1.0, Pass::TRAIN)
    }

    /// log π of the tokens at positions `start + 1 ..= start + len`, predicted from
    /// positions `start .. start + len`: [B, len]. Logits are divided by
    /// `temperature` first (GRPO scores tokens under the distribution it sampled
    /// them from, as TRL does). The vocabulary projection goes in chunks with its
    /// own backward: no [B, len, V] tensor is ever held.
    pub fn next_token_logprobs_range(
        &self,
        batch: &Batch,
        start: usize,
        len: usize,
        temperature: f64,
        pass: Pass,
    ) -> Result<Tensor> {
        let h = self.hidden(batch, pass)?;
        let (b, _, hd) = h.dims3()?;
        let h = h.narrow(1, start, len)?.reshape((b * len, hd))?;
        let targets = batch.ids.narrow(1, start + 1, len)?.flatten_all()?;
        self.target_logprobs(&h, &targets, temperature, pass, false)?.0.reshape((b, len))
    }

    /// log π of `targets[i]` as predicted at flat position `at[i]` (row × T + t)
    /// of `batch`: [N]. For layouts where the predicting positions are not one
    /// range per row (a shared prompt predicts the first token of every
    /// completion after it). Same chunked projection and temperature as
    /// [`Self::next_token_logprobs_range`].
    pub fn logprobs_at(
        &self,
        batch: &Batch,
        at: &[u32],
        targets: &[u32],
        temperature: f64,
        pass: Pass,
    ) -> Result<Tensor> {
        Ok(self.logprobs_at_with(batch, at, targets, temperature, pass, false)?.0)
    }

    /// [`Self::logprobs_at`] with the entropy of the policy at each of those
    /// positions (over the whole vocabulary, at `temperature`), from the same
    /// chunked pass: both [N], both differentiable under a training pass.
    pub fn logprobs_and_entropy_at(
        &self,
        batch: &Batch,
        at: &[u32],
        targets: &[u32],
        temperature: f64,
        pass: Pass,
    ) -> Result<(Tensor, Tensor)> {
        let (lp, entropy) = self.logprobs_at_with(batch, at, targets, temperature, pass, true)?;
        let entropy = entropy.ok_or_else(|| candle_core::Error::Msg("the vocabulary op gave no entropy".into()))?;
        Ok((lp, entropy.to_dtype(self.logits_dtype())?))
    }

    fn logprobs_at_with(
        &self,
        batch: &Batch,
        at: &[u32],
        targets: &[u32],
        temperature: f64,
        pass: Pass,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.hidden(batch, pass)?;
        let (b, t, hd) = h.dims3()?;
        let at_t = Tensor::from_slice(at, at.len(), &self.device)?;
        let h = h.reshape((b * t, hd))?.index_select(&at_t, 0)?;
        let targets = Tensor::from_slice(targets, targets.len(), &self.device)?;
        self.target_logprobs(&h, &targets, temperature, pass, entropy)
    }

    /// log π of `targets` [N] from final hidden states `h` [N, H] through the
    /// head, in chunks with their own backward.
    fn target_logprobs(
        &self,
        h: &Tensor,
        targets: &Tensor,
        temperature: f64,
        pass: Pass,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let head = self.head();
        // A trained head's gradient goes straight into the accumulator, in f32 (the
        // compute-dtype copy is used without a graph).
        let direct =
            (pass.grad && head.trainable()).then(|| WeightGrad { var: head.var.clone(), sink: self.sink.clone() });
        let w = head.get(Pass { grad: false, ..pass })?;
        let (lp, entropy) = logprobs_from_hidden(h, &w, targets, temperature, direct, entropy)?;
        Ok((lp.to_dtype(self.logits_dtype())?, entropy))
    }

    /// Differentiate `loss` (built by training passes) and add the trainable
    /// parameters' gradients to the model's accumulator.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        let store = loss.backward()?;
        for (_, var) in self.trainable() {
            if let Some(g) = store.get(var.as_tensor()) {
                self.sink.add(&var, g)?;
            }
        }
        Ok(())
    }

    /// The gradients accumulated since the last call, by parameter name (what
    /// the optimizer steps with); the accumulator is left empty.
    pub fn take_grads(&self) -> HashMap<String, Tensor> {
        let mut by_id = self.sink.take();
        self.trainable().into_iter().filter_map(|(name, v)| Some((name, by_id.remove(&v.as_tensor().id())?))).collect()
    }

    /// Incremental forward: feed `ids` [B, t] after what `cache` holds; returns
    /// the last position's logits [B, V] (f32). [`PAD_SENTINEL`] marks padding in `ids`.
    pub fn forward_cached(&self, ids: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        let b = ids.len();
        let t = ids[0].len();
        if cache.valid.is_empty() {
            cache.valid = vec![Vec::new(); b];
        }
        let offset = cache.len;
        let mut pos = Vec::with_capacity(b * t);
        for (row, seq) in ids.iter().enumerate() {
            let seen = cache.valid[row].iter().filter(|v| **v).count() as u32;
            let mut n = 0;
            for &tok in seq {
                let is_valid = tok != PAD_SENTINEL;
                pos.push(if is_valid { seen + n } else { 0 });
                n += is_valid as u32;
                cache.valid[row].push(is_valid);
            }
        }
        let flat: Vec<u32> = ids.iter().flatten().map(|&x| if x == PAD_SENTINEL { 0 } else { x }).collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &self.device)?;
        let positions = Tensor::from_vec(pos, (b, t), &self.device)?;
        let (cos, sin) = self.rotary(&positions)?;
        let inputs = LayerInputs { cos, sin, mask: self.mask(&cache.valid, None, offset, t)? };
        let pass = Pass::INFERENCE;
        let mut x = self.embed(&ids_t, pass)?;
        for layer in &self.layers {
            x = layer.forward(&x, &inputs, pass, Some(cache))?;
        }
        let h = self.norm.forward(&x, pass)?;
        cache.len += t;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        match &self.packed_head {
            Some(p) => crate::kernels::packed::product(&last, p),
            None => super::ops::linear(&last, &self.head().get(pass)?, None)?.to_dtype(DType::F32),
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.weights.values().map(|v| v.elem_count()).sum()
    }

    /// The weights as plain tensors by Hugging Face name, LoRA adapters merged in (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let adapters = self.adapters();
        self.weights
            .iter()
            .map(|(k, v)| {
                let t = match adapters.get(k) {
                    Some((_, f)) => (v.as_tensor() + (f.b.as_tensor().matmul(f.a.as_tensor())? * f.scale)?)?,
                    None => v.as_tensor().clone(),
                };
                Ok((k.clone(), t))
            })
            .collect::<Result<_>>()
            .expect("adapter shapes match their weight")
    }
}

/// A token id marking a padding slot in `forward_cached` input (never a real id).
pub const PAD_SENTINEL: u32 = u32::MAX;
