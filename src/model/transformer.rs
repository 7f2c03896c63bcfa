//! A decoder-only transformer (Qwen2 and Llama families) written for training
//! as well as inference: a full-sequence forward with padding mask and
//! per-sequence positions that returns every position's logits through
//! differentiable ops, and an incremental forward with a KV cache through
//! fused kernels. Both compute the same function (tested).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::config::Config;
use super::cpu_attention;
use super::ops::{linear, rms_norm, rope, softmax_last, Kernels};
use super::token_logprobs::token_logprobs;

/// Additive bias for masked attention: large and finite, so a fully masked
/// row (a padding query) yields a uniform softmax instead of NaN.
const MASKED: f32 = -1e9;

pub struct Transformer {
    pub cfg: Config,
    /// Master weights by their Hugging Face names (f32). Trainable ones are `Var`s
    /// so an optimizer can update them in place.
    pub weights: BTreeMap<String, Var>,
    /// The dtype activations are computed in (f32 on CPU; bf16 on CUDA by default).
    pub compute_dtype: DType,
    pub device: Device,
    /// LoRA adapters; when present the base weights are frozen.
    pub lora: Option<super::lora::Adapters>,
    /// Adapters switched off: the base model (GRPO's reference policy with LoRA).
    adapters_off: std::cell::Cell<bool>,
}

/// A left-padded batch of token sequences, as tensors.
pub struct Batch {
    /// [B, T] u32
    pub ids: Tensor,
    /// [B, T] u32: position of each token within its own sequence (0 for padding).
    pub positions: Tensor,
    /// [B, T] validity (1 = token, 0 = padding), as host data for mask building.
    pub valid: Vec<Vec<bool>>,
    /// Number of padding tokens at the left of each row.
    pub pad_left: Vec<usize>,
    /// Packed rows: tokens attend only within their own segment. `None`: one segment per row.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Rows of equal length with their validity (padding anywhere); positions
    /// count the valid tokens before each one.
    pub fn from_rows(ids: Vec<Vec<u32>>, valid: Vec<Vec<bool>>, device: &Device) -> Result<Batch> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        let mut pos = Vec::with_capacity(b * t);
        for v in &valid {
            let mut n = 0u32;
            for &ok in v {
                pos.push(if ok { n } else { 0 });
                n += ok as u32;
            }
        }
        let pad_left = valid.iter().map(|v| v.iter().take_while(|x| !**x).count()).collect();
        Ok(Batch {
            ids: Tensor::from_vec(ids.concat(), (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            valid,
            pad_left,
            segments: None,
        })
    }

    /// Several sequences packed per row (right-padded to a common length): each
    /// restarts its positions and attends only to itself.
    pub fn packed(rows: &[Vec<Vec<u32>>], pad_id: u32, device: &Device) -> Result<Batch> {
        let t = rows.iter().map(|r| r.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
        let (mut ids, mut pos, mut valid, mut segments) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            let (mut v, mut seg) = (Vec::with_capacity(t), Vec::with_capacity(t));
            for (k, s) in r.iter().enumerate() {
                ids.extend(s);
                pos.extend(0..s.len() as u32);
                v.extend(std::iter::repeat_n(true, s.len()));
                seg.extend(std::iter::repeat_n(k as u32, s.len()));
            }
            let pad = t - v.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            pos.extend(std::iter::repeat_n(0u32, pad));
            v.extend(std::iter::repeat_n(false, pad));
            seg.extend(std::iter::repeat_n(u32::MAX, pad));
            valid.push(v);
            segments.push(seg);
        }
        let b = rows.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            pad_left: vec![0; b],
            valid,
            segments: Some(segments),
        })
    }

    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let b = seqs.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut valid = Vec::with_capacity(b);
        let mut pad_left = Vec::with_capacity(b);
        for s in seqs {
            let pad = t - s.len();
            pad_left.push(pad);
            ids.extend(std::iter::repeat_n(pad_id, pad).chain(s.iter().copied()));
            pos.extend(std::iter::repeat_n(0u32, pad).chain(0..s.len() as u32));
            valid.push((0..t).map(|i| i >= pad).collect());
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            valid,
            pad_left,
            segments: None,
        })
    }
}

/// Keys and values of every layer so far, preallocated to a capacity so each
/// step writes in place instead of copying the whole cache.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
    capacity: usize,
    /// Validity of every cached key position, per row.
    pub valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize) -> KvCache {
        KvCache { layers: vec![None; num_layers], len: 0, capacity, valid: Vec::new() }
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if self.len + t > self.capacity {
            candle_core::bail!("KV cache full: {} + {t} > capacity {}", self.len, self.capacity);
        }
        let slot = &mut self.layers[layer];
        if slot.is_none() {
            let kb = Tensor::zeros((b, h, self.capacity, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, self.capacity, d), v.dtype(), v.device())?;
            *slot = Some((kb, vb));
        }
        let (kb, vb) = slot.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, self.len + t)?, vb.narrow(2, 0, self.len + t)?))
    }

    /// A cache whose row i is row `rows[i]` of this one: a prompt prefilled
    /// once serves every sample of its group.
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let dev = self.layers.iter().flatten().next().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::new(rows, &dev)?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let valid = rows.iter().map(|&r| self.valid[r as usize].clone()).collect();
        Ok(KvCache { layers, len: self.len, capacity: self.capacity, valid })
    }
}

impl Transformer {
    /// A model from named weights (f32 or any float dtype; stored as f32 Vars).
    pub fn new(
        cfg: Config,
        weights: BTreeMap<String, Tensor>,
        device: &Device,
        compute_dtype: DType,
    ) -> anyhow::Result<Self> {
        let mut vars = BTreeMap::new();
        let mut weights = weights;
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
            bail!("unexpected weight `{extra}` for a {:?} model", cfg.arch);
        }
        Ok(Transformer {
            cfg,
            weights: vars,
            compute_dtype,
            device: device.clone(),
            lora: None,
            adapters_off: std::cell::Cell::new(false),
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

    /// A weight in the compute dtype. With LoRA the base is frozen: detached, so
    /// no gradient is ever computed for it.
    fn w(&self, name: &str) -> Result<Tensor> {
        let v = self.weights.get(name).unwrap_or_else(|| panic!("model has no weight `{name}`"));
        let t = if self.lora.is_some() { v.as_tensor().detach() } else { v.as_tensor().clone() };
        t.to_dtype(self.compute_dtype)
    }

    fn maybe_w(&self, name: &str) -> Result<Option<Tensor>> {
        if self.weights.contains_key(name) {
            Ok(Some(self.w(name)?))
        } else {
            Ok(None)
        }
    }

    /// A projection `x @ W^T (+ b)`, plus its LoRA update when adapted and adapters are on.
    fn proj(&self, x: &Tensor, weight: &str, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = linear(x, &self.w(weight)?, bias)?;
        match self.lora.as_ref().filter(|_| !self.adapters_off.get()).and_then(|l| l.ab.get(weight).map(|ab| (l, ab))) {
            Some((l, (a, b))) => {
                let a = a.as_tensor().to_dtype(self.compute_dtype)?;
                let b = b.as_tensor().to_dtype(self.compute_dtype)?;
                y + (linear(&linear(x, &a, None)?, &b, None)? * l.cfg.scale())?
            }
            None => Ok(y),
        }
    }

    /// Add LoRA adapters (the base weights become frozen).
    pub fn add_lora(&mut self, cfg: super::lora::LoraConfig, seed: u64) -> anyhow::Result<()> {
        self.lora = Some(super::lora::Adapters::new(cfg, &self.weights, seed, &self.device)?);
        Ok(())
    }

    /// Run `f` on the base model, adapters off (a no-op without LoRA).
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.adapters_off.replace(true);
        let out = f();
        self.adapters_off.set(before);
        out
    }

    /// What an optimizer trains: the adapters with LoRA, else every weight.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        match &self.lora {
            Some(l) => l.params(),
            None => self.weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
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
    /// sees key j when j ≤ offset + i and key j is a real token.
    fn mask(&self, key_valid: &[Vec<bool>], segments: Option<&[Vec<u32>]>, offset: usize, t: usize) -> Result<Tensor> {
        let b = key_valid.len();
        let s = offset + t;
        let mut m = Vec::with_capacity(b * t * s);
        for (r, row) in key_valid.iter().enumerate() {
            let seg = segments.map(|x| &x[r]);
            for i in 0..t {
                for (j, &ok) in row.iter().enumerate().take(s) {
                    let same = seg.is_none_or(|sg| sg[j] == sg[offset + i]);
                    m.push(if ok && same && j <= offset + i { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, s), &self.device)?.to_dtype(self.compute_dtype)
    }

    /// The layers over embeddings `x` [B, T, H]; `cache` holds earlier keys and values.
    fn layers(
        &self,
        mut x: Tensor,
        positions: &Tensor,
        mask: &Tensor,
        k: Kernels,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (cos, sin) = self.rotary(positions)?;
        let rep = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let h = rms_norm(&x, &self.w(&format!("{p}.input_layernorm.weight"))?, c.rms_norm_eps, k)?;
            let proj = |name: &str| -> Result<Tensor> {
                self.proj(
                    &h,
                    &format!("{p}.self_attn.{name}.weight"),
                    self.maybe_w(&format!("{p}.self_attn.{name}.bias"))?.as_ref(),
                )
            };
            let q = proj("q_proj")?.reshape((b, t, c.num_heads, c.head_dim))?.transpose(1, 2)?;
            let kk = proj("k_proj")?.reshape((b, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?;
            // Contiguous: the attention matmuls take per-head blocks (as do cache views).
            let v = proj("v_proj")?.reshape((b, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let q = rope(&q, &cos, &sin, k)?;
            let kk = rope(&kk, &cos, &sin, k)?;
            let (kk, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(l, &kk, &v)?,
                None => (kk, v),
            };
            // Grouped-query attention without copying keys and values per query head: the
            // `rep` query heads of a key/value head (adjacent, as in HF's repeat_kv) become
            // `rep × t` query rows against that head's keys.
            let s = kk.dim(2)?;
            let q = q.reshape((b, c.num_kv_heads, rep * t, c.head_dim))?;
            let attn = if cpu_attention::applies(&q) {
                cpu_attention::attention(&q, &kk, &v, mask, scale)?
            } else {
                let scores = (q.matmul(&kk.t()?)? * scale)?
                    .reshape((b, c.num_kv_heads, rep, t, s))?
                    .broadcast_add(&mask.unsqueeze(1)?)?;
                softmax_last(&scores, k)?.reshape((b, c.num_kv_heads, rep * t, s))?.matmul(&v)?
            };
            let attn = attn.reshape((b, c.num_heads, t, c.head_dim))?.transpose(1, 2)?.reshape((
                b,
                t,
                c.num_heads * c.head_dim,
            ))?;
            x = (x + self.proj(&attn, &format!("{p}.self_attn.o_proj.weight"), None)?)?;
            let h = rms_norm(&x, &self.w(&format!("{p}.post_attention_layernorm.weight"))?, c.rms_norm_eps, k)?;
            let gate = self.proj(&h, &format!("{p}.mlp.gate_proj.weight"), None)?.silu()?;
            let up = self.proj(&h, &format!("{p}.mlp.up_proj.weight"), None)?;
            x = (x + self.proj(&(gate * up)?, &format!("{p}.mlp.down_proj.weight"), None)?)?;
        }
        rms_norm(&x, &self.w("model.norm.weight")?, c.rms_norm_eps, k)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.w("model.embed_tokens.weight")?.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))
    }

    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let w =
            if self.cfg.tie_word_embeddings { self.w("model.embed_tokens.weight")? } else { self.w("lm_head.weight")? };
        linear(h, &w, None)
    }

    /// Logits [B, T, V] at every position (f32, or f64 for f64 compute).
    pub fn forward(&self, batch: &Batch, k: Kernels) -> Result<Tensor> {
        let t = batch.ids.dim(1)?;
        let mask = self.mask(&batch.valid, batch.segments.as_deref(), 0, t)?;
        let h = self.layers(self.embed(&batch.ids)?, &batch.positions, &mask, k, None)?;
        self.lm_head(&h)?.to_dtype(self.logits_dtype())
    }

    /// Logits and log-probabilities are at least f32 (bf16 compute is upcast).
    fn logits_dtype(&self) -> DType {
        if self.compute_dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// log π(token_{t+1} | tokens ≤ t) for every position but the last: [B, T-1].
    /// Differentiable; the training path for GRPO and SFT.
    pub fn next_token_logprobs(&self, batch: &Batch) -> Result<Tensor> {
        let t = batch.ids.dim(1)?;
        self.next_token_logprobs_range(batch, 0, t - 1, 1.0)
    }

    /// log π of the tokens at positions `start + 1 ..= start + len`, predicted from
    /// positions `start .. start + len`: [B, len]. Only those positions go through
    /// the vocabulary projection, which dominates memory for long prompts.
    /// Logits are divided by `temperature` first (GRPO scores tokens under the
    /// distribution it sampled them from, as TRL does).
    pub fn next_token_logprobs_range(
        &self,
        batch: &Batch,
        start: usize,
        len: usize,
        temperature: f64,
    ) -> Result<Tensor> {
        let t = batch.ids.dim(1)?;
        let mask = self.mask(&batch.valid, batch.segments.as_deref(), 0, t)?;
        let h = self.layers(self.embed(&batch.ids)?, &batch.positions, &mask, Kernels::Differentiable, None)?;
        let logits = self.lm_head(&h.narrow(1, start, len)?)?.to_dtype(self.logits_dtype())?;
        let (b, _, v) = logits.dims3()?;
        let targets = batch.ids.narrow(1, start + 1, len)?.flatten_all()?;
        token_logprobs(&logits.reshape((b * len, v))?, &targets, temperature)?.reshape((b, len))
    }

    /// Incremental forward: feed `ids` [B, t] after what `cache` holds; returns
    /// the last position's logits [B, V] (f32). `valid` marks padding in `ids`.
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
        let mask = self.mask(&cache.valid, None, offset, t)?;
        let h = self.layers(self.embed(&ids_t)?, &positions, &mask, Kernels::Fused, Some(cache))?;
        cache.len += t;
        self.lm_head(&h.narrow(1, t - 1, 1)?.squeeze(1)?)?.to_dtype(DType::F32)
    }

    pub fn num_parameters(&self) -> usize {
        self.weights.values().map(|v| v.elem_count()).sum()
    }

    /// The weights as plain tensors by Hugging Face name, LoRA adapters merged in (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.weights
            .iter()
            .map(|(k, v)| {
                let t = match &self.lora {
                    Some(l) => l.merged(k, v.as_tensor()).expect("adapter shapes match their weight"),
                    None => v.as_tensor().clone(),
                };
                (k.clone(), t)
            })
            .collect()
    }
}

/// A token id marking a padding slot in `forward_cached` input (never a real id).
pub const PAD_SENTINEL: u32 = u32::MAX;
