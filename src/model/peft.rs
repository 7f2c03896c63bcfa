//! LoRA adapters in PEFT's layout, which `peft`, vLLM (`--enable-lora`,
//! `/v1/load_lora_adapter`), SGLang and TRL load: a folder with
//! `adapter_config.json` and `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight`
//! ([out, r]), the update `(lora_alpha / r)·B·A` (no rsLoRA, no DoRA, no bias).
//! r1pipe's factors are the same matrices with the same scale, so saving is a
//! renaming; the test against an adapter PEFT itself saved holds it there.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::lora::LoraConfig;
use super::transformer::Transformer;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's name of a factor of the adapted weight `weight` (`model.layers.0.self_attn.q_proj.weight`).
fn peft_name(weight: &str, factor: &str) -> String {
    format!("base_model.model.{}.{factor}.weight", weight.trim_end_matches(".weight"))
}

/// Write the model's adapters to `out` in PEFT layout. `base_model` goes into
/// the config as `base_model_name_or_path` (what the adapter applies to).
pub fn save_adapter(model: &Transformer, base_model: &str, out: &Path) -> Result<()> {
    let cfg = model.lora.as_ref().ok_or_else(|| anyhow!("the model has no LoRA adapters to save"))?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tensors = HashMap::new();
    for (weight, f) in model.lora_factors() {
        for (factor, v) in [("lora_A", &f.a), ("lora_B", &f.b)] {
            tensors.insert(peft_name(&weight, factor), v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
    }
    crate::common::fsutil::save_safetensors(&tensors, &out.join(WEIGHTS_FILE))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    crate::common::fsutil::write_file(&out.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// The LoRA settings of a PEFT adapter folder; what r1pipe cannot apply is an error naming the key.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            bail!("{}: peft_type is `{t}`; only LORA adapters are supported", path.display());
        }
    }
    for k in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if field(k).and_then(Value::as_bool) == Some(true) {
            bail!("{}: `{k}` is true, which r1pipe does not implement", path.display());
        }
    }
    if field("bias").and_then(Value::as_str).is_some_and(|b| b != "none") {
        bail!("{}: `bias` must be \"none\" (adapters that train biases are not supported)", path.display());
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            bail!("{}: `{k}` (per-module ranks) is not supported", path.display());
        }
    }
    let r = field("r").and_then(Value::as_u64).ok_or_else(|| anyhow!("{}: no integer `r`", path.display()))?;
    let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let target_modules = match field("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) => {
            bail!("{}: target_modules is the pattern `{s}`; r1pipe reads a list of module names", path.display())
        }
        _ => bail!("{}: no `target_modules`", path.display()),
    };
    let cfg = LoraConfig { r: r as usize, alpha, dropout: 0.0, target_modules };
    if let Some((k, m)) = cfg.problems().into_iter().next() {
        bail!("{}: {k}: {m}", path.display());
    }
    Ok(cfg)
}

/// Add the adapters of a PEFT folder to `model` (which must have none yet).
pub fn load_adapter(model: &mut Transformer, dir: &Path) -> Result<()> {
    let cfg = read_config(dir)?;
    if model.lora.is_some() {
        bail!("the model already has LoRA adapters");
    }
    model.add_lora(cfg, 0)?;
    let path = dir.join(WEIGHTS_FILE);
    let mut file: BTreeMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect();
    for (weight, f) in model.lora_factors() {
        for (factor, v) in [("lora_A", &f.a), ("lora_B", &f.b)] {
            let name = peft_name(&weight, factor);
            let t = file.remove(&name).ok_or_else(|| anyhow!("{}: no tensor `{name}`", path.display()))?;
            if t.dims() != v.as_tensor().dims() {
                bail!("{}: `{name}` has shape {:?}, the model needs {:?}", path.display(), t.dims(), v.dims());
            }
            v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
    }
    if let Some(extra) = file.keys().next() {
        bail!("{}: `{extra}` adapts nothing in this model (a different base model?)", path.display());
    }
    Ok(())
}
