//! Model families: what tells them apart in `config.json` and GGUF metadata,
//! and the flags each sets. A new family whose layers already exist (bias,
//! qk-norm, tied embeddings, head_dim) is one entry here.

use anyhow::{bail, Result};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, SmolLM2, Llama 3.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k, v.
    Qwen2,
    /// Qwen3: RMSNorm per head on q and k, explicit head_dim, no bias.
    Qwen3,
}

pub struct FamilyInfo {
    pub family: Family,
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// The class name in `architectures`.
    pub architecture: &'static str,
    /// `general.architecture` in GGUF metadata.
    pub gguf_arch: &'static str,
    /// `Some(b)`: the family fixes the q/k/v bias; `None`: config.json's `attention_bias` decides.
    pub attention_bias: Option<bool>,
    pub qk_norm: bool,
    /// llama.cpp stores q and k permuted for its rotary layout (Llama only).
    pub gguf_permutes_qk: bool,
}

pub static FAMILIES: &[FamilyInfo] = &[
    FamilyInfo {
        family: Family::Llama,
        model_type: "llama",
        architecture: "LlamaForCausalLM",
        gguf_arch: "llama",
        attention_bias: None,
        qk_norm: false,
        gguf_permutes_qk: true,
    },
    FamilyInfo {
        family: Family::Qwen2,
        model_type: "qwen2",
        architecture: "Qwen2ForCausalLM",
        gguf_arch: "qwen2",
        attention_bias: Some(true),
        qk_norm: false,
        gguf_permutes_qk: false,
    },
    FamilyInfo {
        family: Family::Qwen3,
        model_type: "qwen3",
        architecture: "Qwen3ForCausalLM",
        gguf_arch: "qwen3",
        attention_bias: None,
        qk_norm: true,
        gguf_permutes_qk: false,
    },
];

impl FamilyInfo {
    /// The family a config.json describes (by `model_type`, else by `architectures`).
    pub fn of_config(raw: &Value) -> Result<&'static FamilyInfo> {
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(f) = FAMILIES.iter().find(|f| f.model_type == model_type) {
            return Ok(f);
        }
        if let Some(f) = FAMILIES.iter().find(|f| archs.contains(&f.architecture)) {
            return Ok(f);
        }
        bail!(
            "`model_type`: `{model_type}` (architectures {archs:?}) is not supported; r1pipe supports {}",
            FAMILIES.iter().map(|f| f.model_type).collect::<Vec<_>>().join(", ")
        )
    }

    pub fn of(family: Family) -> &'static FamilyInfo {
        FAMILIES.iter().find(|f| f.family == family).expect("every family has an entry")
    }

    pub fn of_gguf_arch(arch: &str) -> Option<&'static FamilyInfo> {
        FAMILIES.iter().find(|f| f.gguf_arch == arch)
    }
}
