//! LoRA settings: low-rank updates `W + (alpha / r)·B·A` on chosen projections
//! (the factors live in the projections, `layers.rs`; `Transformer::add_lora`
//! adds them). With adapters the base weights are frozen (no gradient, no
//! optimizer state); a pass without adapters is the base model, which GRPO
//! uses as its reference policy without a copy. Saving merges the adapters.

use serde::{Deserialize, Serialize};

pub const MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input; only 0 is supported (a random mask would break bitwise resume).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_targets")]
    pub target_modules: Vec<String>,
}

fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj"].iter().map(|s| s.to_string()).collect()
}

impl LoraConfig {
    /// Problems with the settings, as (key, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.r == 0 {
            out.push(("lora.r".into(), "must be at least 1".into()));
        }
        if self.dropout != 0.0 {
            out.push((
                "lora.dropout".into(),
                "only 0 is supported: dropout would break bitwise-reproducible resume".into(),
            ));
        }
        for m in &self.target_modules {
            if !MODULES.contains(&m.as_str()) {
                out.push((
                    "lora.target_modules".into(),
                    format!("unknown module `{m}` (valid: {})", MODULES.join(", ")),
                ));
            }
        }
        if self.target_modules.is_empty() {
            out.push(("lora.target_modules".into(), "no modules to adapt".into()));
        }
        out
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}
