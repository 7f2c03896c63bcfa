//! The architecture of a decoder-only model, read and validated from a
//! Hugging Face `config.json`. Families differ only by the flags below (see
//! `family.rs` for which family sets which): one forward serves them all.

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use super::family::Family;
use super::family::FamilyInfo;

/// The MLP's activation between gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm over each head of q and k before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Added to every RMSNorm weight before use (0 for these families; Gemma-style norms use 1).
    pub norm_offset: f32,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    /// The `config.json` as read, written back on save so other tools see the same model.
    pub raw: Value,
}

impl Config {
    pub fn from_json(raw: Value) -> Result<Config> {
        let info = FamilyInfo::of_config(&raw)?;
        let get_u = |k: &str| raw.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let need = |k: &str| get_u(k).with_context(|| format!("config.json has no integer `{k}`"));
        let activation = match raw.get("hidden_act").and_then(Value::as_str).unwrap_or("silu") {
            "silu" | "swish" => Activation::Silu,
            other => bail!("`hidden_act`: `{other}` is not supported (only silu)"),
        };
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let num_kv_heads = get_u("num_key_value_heads").unwrap_or(num_heads);
        positive("hidden_size", hidden_size)?;
        positive("num_attention_heads", num_heads)?;
        positive("num_key_value_heads", num_kv_heads)?;
        if num_heads % num_kv_heads != 0 {
            bail!(
                "`num_attention_heads` = {num_heads} is not a multiple of `num_key_value_heads` = {num_kv_heads}: \
                 each key/value head must serve a whole group of query heads"
            );
        }
        let head_dim = match get_u("head_dim") {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => bail!(
                "`hidden_size` = {hidden_size} is not a multiple of `num_attention_heads` = {num_heads}, \
                 and there is no explicit `head_dim`"
            ),
        };
        positive("head_dim", head_dim)?;
        if head_dim % 2 != 0 {
            bail!("`head_dim` = {head_dim} must be even (rotary embeddings rotate pairs)");
        }
        let rope_theta = raw
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| raw.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        if let Some(kind) = raw
            .pointer("/rope_scaling/rope_type")
            .or_else(|| raw.pointer("/rope_parameters/rope_type"))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                bail!("`rope_scaling`: rope type `{kind}` is not supported (only default rotary embeddings)");
            }
        }
        let cfg = Config {
            family: info.family,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: raw.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: info
                .attention_bias
                .unwrap_or_else(|| raw.get("attention_bias").and_then(Value::as_bool).unwrap_or(false)),
            qk_norm: info.qk_norm,
            norm_offset: 0.0,
            activation,
            max_position_embeddings: get_u("max_position_embeddings").unwrap_or(4096),
            raw,
        };
        positive("vocab_size", cfg.vocab_size)?;
        positive("intermediate_size", cfg.intermediate_size)?;
        positive("num_hidden_layers", cfg.num_layers)?;
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps > 0.0) {
            bail!("`rms_norm_eps` = {} must be a small positive number (e.g. 1e-6)", cfg.rms_norm_eps);
        }
        if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
            bail!("`rope_theta` = {} must be a positive number (e.g. 10000)", cfg.rope_theta);
        }
        cfg.check_size()?;
        Ok(cfg)
    }

    /// The number of weights this shape has, without listing them (a hostile
    /// config's layer count could make the list itself too large); `None` when it
    /// overflows.
    pub fn parameter_count(&self) -> Option<u128> {
        let (h, i, hd) = (self.hidden_size as u128, self.intermediate_size as u128, self.head_dim as u128);
        let q = (self.num_heads as u128).checked_mul(hd)?;
        let kv = (self.num_kv_heads as u128).checked_mul(hd)?;
        let mut layer = h.checked_mul(2)?; // the two norms
        layer = layer.checked_add(q.checked_mul(h)?.checked_mul(2)?)?; // q_proj, o_proj
        layer = layer.checked_add(kv.checked_mul(h)?.checked_mul(2)?)?; // k_proj, v_proj
        layer = layer.checked_add(h.checked_mul(i)?.checked_mul(3)?)?; // gate, up, down
        if self.attention_bias {
            layer = layer.checked_add(q + 2 * kv)?;
        }
        if self.qk_norm {
            layer = layer.checked_add(2 * hd)?;
        }
        let embeddings = (self.vocab_size as u128).checked_mul(h)?;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        embeddings.checked_mul(heads)?.checked_add(h)?.checked_add(layer.checked_mul(self.num_layers as u128)?)
    }

    /// A shape whose f32 weights cannot fit in this machine's memory is refused
    /// before anything is allocated, naming the fields that make it so.
    fn check_size(&self) -> Result<()> {
        let (memory, what) = crate::common::memory::memory_limit();
        let memory = memory as u128;
        let bytes = self.parameter_count().and_then(|n| n.checked_mul(4));
        match bytes {
            Some(b) if memory == 0 || b <= memory => Ok(()),
            _ => bail!(
                "config.json describes {} weights ({} in f32), more than the {:.1} GiB of {what}: \
                 check `num_hidden_layers` = {}, `hidden_size` = {}, `intermediate_size` = {}, `vocab_size` = {}",
                self.parameter_count().map_or("more than 2^128".into(), |n| format!("{:.3e}", n as f64)),
                bytes.map_or("beyond counting".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)),
                memory as f64 / (1u64 << 30) as f64,
                self.num_layers,
                self.hidden_size,
                self.intermediate_size,
                self.vocab_size
            ),
        }
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Every weight name of this architecture in the Hugging Face layout, with its shape.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

fn positive(field: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("`{field}` is 0; it must be a positive integer");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "rope_theta": 1000000.0, "tie_word_embeddings": true, "rms_norm_eps": 1e-6
        })
    }

    #[test]
    fn reads_qwen_llama_and_qwen3_configs_with_both_rope_styles() {
        let q = Config::from_json(qwen()).unwrap();
        assert_eq!(
            (q.family, q.head_dim, q.attention_bias, q.qk_norm, q.rope_theta),
            (Family::Qwen2, 64, true, false, 1e6)
        );
        let l = Config::from_json(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": true
        }))
        .unwrap();
        assert_eq!((l.family, l.head_dim, l.attention_bias, l.rope_theta), (Family::Llama, 64, false, 1e5));
        // Qwen3: explicit head_dim (not hidden / heads), qk-norm, no qkv bias.
        let q3 = Config::from_json(serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": true, "attention_bias": false
        }))
        .unwrap();
        assert_eq!((q3.family, q3.head_dim, q3.attention_bias, q3.qk_norm), (Family::Qwen3, 128, false, true));
        assert!(Config::from_json(serde_json::json!({"model_type": "gpt2"})).is_err());
    }

    #[test]
    fn impossible_head_counts_are_errors_that_name_the_field() {
        let with = |k: &str, v: Value| {
            let mut c = qwen();
            c[k] = v;
            Config::from_json(c).unwrap_err().to_string()
        };
        assert!(with("num_attention_heads", 0.into()).contains("`num_attention_heads` is 0"));
        assert!(with("num_key_value_heads", 0.into()).contains("`num_key_value_heads` is 0"));
        assert!(with("num_key_value_heads", 3.into()).contains("not a multiple of `num_key_value_heads` = 3"));
        assert!(with("num_attention_heads", 12.into()).contains("not a multiple of `num_attention_heads` = 12"));
        assert!(with("vocab_size", 0.into()).contains("`vocab_size` is 0"));
        assert!(with("hidden_act", "gelu".into()).contains("`hidden_act`"));
    }
}
