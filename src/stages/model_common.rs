//! What the model stages share: model references in parameters, loading on
//! the pipeline's device, and the sampling parameters they accept.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::model::{device, load, LoadedModel, ModelRef, SamplingParams};
use crate::pipeline::{ParamError, Project, Requirements, StageContext};

/// A model reference in a parameter: local files enter the fingerprint (returned),
/// hub ids by name; artifact references are checked by the runner.
pub fn check_model_ref(param: &str, value: &str, project: &Project) -> Result<Option<(String, PathBuf)>, ParamError> {
    if value.contains("${") {
        return Ok(None);
    }
    match ModelRef::parse(value, &project.root) {
        Ok(r) => Ok(r.local_path().map(|p| (param.to_string(), p.to_path_buf()))),
        Err(e) => Err(ParamError::new(param, e.to_string())
            .hint("a model is a local folder (config.json, weights, tokenizer), a .gguf file, or a hub id like Qwen/Qwen2.5-0.5B-Instruct")),
    }
}

/// Load a model named by a (bound) parameter on the run's device and dtype.
pub fn open_model(ctx: &StageContext, reference: &str) -> Result<LoadedModel> {
    let dev = device::select(&ctx.env.device)?;
    let dtype = device::compute_dtype(&ctx.env.dtype, &dev)?;
    let r = ModelRef::parse(reference, &ctx.project.root)?;
    let t0 = std::time::Instant::now();
    let m = load::load(&r, &dev, dtype).with_context(|| format!("loading model `{reference}`"))?;
    tracing::info!(model = reference, device = %device::describe(&dev), ?dtype, params = m.model.num_parameters(), secs = t0.elapsed().as_secs_f64(), "model loaded");
    eprintln!(
        "{}: {reference} ({:.0}M parameters) on {}, {dtype:?}",
        ctx.stage,
        m.model.num_parameters() as f64 / 1e6,
        device::describe(&dev)
    );
    Ok(m)
}

/// Generation settings as stage parameters (TRL's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_max_new_tokens() -> usize {
    256
}
fn one() -> f32 {
    1.0
}

impl Sampling {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
        }
    }

    pub fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.temperature < 0.0 {
            e.push(ParamError::new("temperature", "must be ≥ 0 (0 is greedy)"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            e.push(ParamError::new("top_p", "must be in (0, 1]"));
        }
        if self.max_new_tokens == 0 {
            e.push(ParamError::new("max_new_tokens", "must be at least 1"));
        }
        e
    }
}

/// The checks every training stage shares: the model and training-data
/// references, positive sizes, checkpoint cadence and LoRA settings.
pub fn check_training(
    model: &str,
    train: &str,
    sizes: &[(&str, usize)],
    save_steps: u64,
    lora: Option<&crate::model::lora::LoraConfig>,
    project: &Project,
) -> (Requirements, Vec<ParamError>) {
    let mut errors = Vec::new();
    let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
    match check_model_ref("model", model, project) {
        Ok(Some(local)) => req.local_paths.push(local),
        Ok(None) => {}
        Err(e) => errors.push(e),
    }
    if let Some(local) = project.local_path(train) {
        req.local_paths.push(("train".into(), local));
    }
    for (k, v) in sizes {
        if *v == 0 {
            errors.push(ParamError::new(*k, "must be at least 1"));
        }
    }
    if save_steps == 0 {
        errors.push(ParamError::new("save_steps", "must be at least 1"));
    }
    if let Some(l) = lora {
        errors.extend(l.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
    }
    (req, errors)
}

/// A training stage's model, with LoRA adapters added when asked for.
pub fn open_trainable(
    ctx: &StageContext,
    reference: &str,
    lora: Option<&crate::model::lora::LoraConfig>,
) -> Result<LoadedModel> {
    let mut loaded = open_model(ctx, reference)?;
    if let Some(l) = lora {
        loaded.model.add_lora(l.clone(), ctx.env.seed)?;
    }
    Ok(loaded)
}

/// A training stage's outputs: the model (Hugging Face layout, adapters merged),
/// the per-step log from the work folder, and the summary metrics.
pub fn write_training_outputs(ctx: &mut StageContext, loaded: &LoadedModel, summary: serde_json::Value) -> Result<()> {
    crate::model::load::save(&loaded.model, &loaded.files_dir, &ctx.output_path("model"))?;
    std::fs::copy(ctx.work_dir.join("log.jsonl"), ctx.output_path("log"))?;
    std::fs::write(ctx.output_path("metrics"), serde_json::to_string_pretty(&summary)?)?;
    ctx.set_metrics(summary);
    Ok(())
}

/// Keys check for parameter structs that `#[serde(flatten)]` [`Sampling`]: serde
/// cannot deny unknown fields with `flatten`, so the known keys are listed by hand.
pub fn check_known_keys(params: &serde_json::Value, own: &[&str]) -> Result<(), Vec<ParamError>> {
    const SAMPLING: &[&str] = &["max_new_tokens", "temperature", "top_p", "top_k", "stop"];
    let known: Vec<&str> = own.iter().chain(SAMPLING).copied().collect();
    for k in params.as_object().map(|m| m.keys().collect::<Vec<_>>()).unwrap_or_default() {
        if !known.contains(&k.as_str()) {
            return Err(vec![ParamError::new(k.clone(), format!("unknown parameter `{k}`"))
                .hint(crate::pipeline::diagnostic::suggest(k, &known, "keys"))]);
        }
    }
    Ok(())
}
