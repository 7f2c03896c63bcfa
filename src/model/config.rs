//! The architecture of a decoder-only model, read from a Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Qwen2 / Qwen2.5: bias on q, k, v.
    Qwen2,
    /// Llama, SmolLM2, Llama 3: no bias.
    Llama,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
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
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    /// The `config.json` as read, written back on save so other tools see the same model.
    pub raw: Value,
}

impl Config {
    pub fn from_json(raw: Value) -> Result<Config> {
        let get_u = |k: &str| raw.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let need = |k: &str| get_u(k).with_context(|| format!("config.json has no integer `{k}`"));
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let arch = if model_type == "qwen2" || archs.iter().any(|a| a.starts_with("Qwen2")) {
            Arch::Qwen2
        } else if model_type == "llama" || archs.iter().any(|a| a.starts_with("Llama")) {
            Arch::Llama
        } else {
            bail!(
                "unsupported model: model_type `{model_type}`, architectures {archs:?}; r1pipe supports the Qwen2 and Llama families"
            );
        };
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("unsupported hidden_act `{act}` (only silu)");
            }
        }
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
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
                bail!("unsupported rope type `{kind}` (only default rotary embeddings)");
            }
        }
        Ok(Config {
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads: get_u("num_key_value_heads").unwrap_or(num_heads),
            head_dim: get_u("head_dim").unwrap_or(hidden_size / num_heads),
            rms_norm_eps: raw.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: raw.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: match arch {
                Arch::Qwen2 => true,
                Arch::Llama => raw.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            },
            max_position_embeddings: get_u("max_position_embeddings").unwrap_or(4096),
            raw,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qwen_and_llama_configs_with_both_rope_styles() {
        let q = Config::from_json(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "rope_theta": 1000000.0, "tie_word_embeddings": true, "rms_norm_eps": 1e-6
        }))
        .unwrap();
        assert_eq!((q.arch, q.head_dim, q.attention_bias, q.rope_theta), (Arch::Qwen2, 64, true, 1e6));
        let l = Config::from_json(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": true
        }))
        .unwrap();
        assert_eq!((l.arch, l.head_dim, l.attention_bias, l.rope_theta), (Arch::Llama, 64, false, 1e5));
        assert!(Config::from_json(serde_json::json!({"model_type": "gpt2"})).is_err());
    }
}
