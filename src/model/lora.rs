//! LoRA adapters: low-rank updates `W + (alpha / r)·B·A` on chosen projections.
//! With adapters the base weights are frozen (no gradient, no optimizer state);
//! turning adapters off gives the base model back, which GRPO uses as its
//! reference policy without a copy. Saving merges the adapters into the weights.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub const MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input; only 0 is supported (see README).
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

/// The adapters of a model: for each adapted weight, A [r, in] and B [out, r].
pub struct Adapters {
    pub cfg: LoraConfig,
    pub ab: BTreeMap<String, (Var, Var)>,
}

impl Adapters {
    /// A uniform in ±1/√in (seeded), B zero: the adapted model starts equal to the base.
    pub fn new(cfg: LoraConfig, weights: &BTreeMap<String, Var>, seed: u64, device: &Device) -> Result<Adapters> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x10ca);
        let mut ab = BTreeMap::new();
        for (name, w) in weights {
            let adapted = cfg.target_modules.iter().any(|m| name.ends_with(&format!(".{m}.weight")));
            if !adapted {
                continue;
            }
            let (out, inp) = w.as_tensor().dims2()?;
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, cfg.r), DType::F32, device)?)?;
            ab.insert(name.clone(), (a, b));
        }
        Ok(Adapters { cfg, ab })
    }

    /// Trainable parameters, named `<weight>.lora_A` / `.lora_B`.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.ab
            .iter()
            .flat_map(|(n, (a, b))| [(format!("{n}.lora_A"), a.clone()), (format!("{n}.lora_B"), b.clone())])
            .collect()
    }

    /// `W + scale·B·A` for an adapted weight.
    pub fn merged(&self, name: &str, w: &Tensor) -> Result<Tensor> {
        match self.ab.get(name) {
            Some((a, b)) => w + (b.as_tensor().matmul(a.as_tensor())? * self.cfg.scale())?,
            None => Ok(w.clone()),
        }
    }
}
