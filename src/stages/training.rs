//! What the training stages share: the parameters every algorithm takes
//! (declared once, with each algorithm's code defaults), their checks, the
//! runner's context as the training loop's host, and the outputs (model, log,
//! metrics). A training stage kind is its own parameters plus a call to [`run`].

use std::path::PathBuf;

use anyhow::Result;
use serde::Deserialize;
use serde_json::Value;

use super::model_common::{check_model_ref, open_model};
use crate::common::ParamError;
use crate::model::lora::LoraConfig;
use crate::model::LoadedModel;
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext};
use crate::train::optim::Schedule;
use crate::train::trainer::{self, Algorithm, Hyper, Summary};

/// The parameters every training stage takes (TRL's names). Unset values
/// take the algorithm's code defaults ([`Hyper`] values in its stage file).
#[derive(Debug, Clone, Deserialize)]
pub struct TrainingArgs {
    pub model: String,
    /// Training data: an artifact (`${prompts.train}`) or a local JSONL.
    pub train: String,
    pub learning_rate: Option<f64>,
    pub lr_scheduler_type: Option<Schedule>,
    pub warmup_ratio: Option<f64>,
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub per_device_train_batch_size: Option<usize>,
    pub gradient_accumulation_steps: Option<usize>,
    pub max_steps: Option<u64>,
    pub num_train_epochs: Option<f64>,
    pub save_steps: Option<u64>,
    pub save_total_limit: Option<usize>,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub gradient_checkpointing: Option<bool>,
    /// LoRA adapters instead of full fine-tuning: `{r, alpha, dropout, target_modules}`.
    pub lora: Option<LoraConfig>,
}

impl TrainingArgs {
    pub const KEYS: &'static [&'static str] = &[
        "model",
        "train",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_ratio",
        "adam_beta1",
        "adam_beta2",
        "weight_decay",
        "max_grad_norm",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "num_train_epochs",
        "save_steps",
        "save_total_limit",
        "gradient_checkpointing",
        "lora",
    ];

    /// The values in force: this stage's where given, the algorithm's defaults elsewhere.
    pub fn resolve(&self, d: &Hyper) -> Hyper {
        Hyper {
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            lr_scheduler_type: self.lr_scheduler_type.unwrap_or(d.lr_scheduler_type),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            adam_beta1: self.adam_beta1.unwrap_or(d.adam_beta1),
            adam_beta2: self.adam_beta2.unwrap_or(d.adam_beta2),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: self.max_grad_norm.unwrap_or(d.max_grad_norm),
            per_device_train_batch_size: self.per_device_train_batch_size.unwrap_or(d.per_device_train_batch_size),
            gradient_accumulation_steps: self.gradient_accumulation_steps.unwrap_or(d.gradient_accumulation_steps),
            max_steps: self.max_steps.or(d.max_steps),
            num_train_epochs: self.num_train_epochs.unwrap_or(d.num_train_epochs),
            save_steps: self.save_steps.unwrap_or(d.save_steps),
            save_total_limit: self.save_total_limit.unwrap_or(d.save_total_limit),
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(d.gradient_checkpointing),
        }
    }

    /// The checks every training stage shares: the model and data references,
    /// positive sizes, checkpoint cadence and LoRA settings.
    pub fn check(&self, hp: &Hyper, project: &Project) -> (Requirements, Vec<ParamError>) {
        let mut errors = Vec::new();
        let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
        match check_model_ref("model", &self.model, project) {
            Ok(Some(local)) => req.local_paths.push(local),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
        if let Some(local) = project.local_path(&self.train) {
            req.local_paths.push(("train".into(), local));
        }
        for (k, v) in [
            ("per_device_train_batch_size", hp.per_device_train_batch_size),
            ("gradient_accumulation_steps", hp.gradient_accumulation_steps),
            ("save_total_limit", hp.save_total_limit),
        ] {
            if v == 0 {
                errors.push(ParamError::new(k, "must be at least 1"));
            }
        }
        if hp.save_steps == 0 {
            errors.push(ParamError::new("save_steps", "must be at least 1"));
        }
        if hp.max_steps == Some(0) {
            errors.push(ParamError::new("max_steps", "must be at least 1 (or leave it out to train num_train_epochs)"));
        }
        if !(hp.learning_rate.is_finite() && hp.learning_rate > 0.0) {
            errors.push(ParamError::new("learning_rate", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&hp.warmup_ratio) {
            errors.push(ParamError::new("warmup_ratio", "must be in [0, 1)"));
        }
        if let Some(l) = &self.lora {
            errors.extend(l.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
        }
        (req, errors)
    }

    pub fn train_path(&self, project: &Project) -> PathBuf {
        project.local_path(&self.train).unwrap_or_else(|| self.train.clone().into())
    }
}

/// LoRA runs write their adapters in PEFT layout beside the merged model.
pub const ADAPTER_OUTPUT: OutputSpec = OutputSpec {
    name: "adapter",
    file_name: "adapter",
    is_dir: true,
    description: "LoRA runs: the adapters in PEFT layout (peft, vLLM, SGLang load it)",
};

/// Outputs a training stage with these parameters does not write.
pub fn absent_outputs(params: &Value) -> Vec<(&'static str, &'static str)> {
    match params.get("lora") {
        Some(l) if !l.is_null() => Vec::new(),
        _ => vec![("adapter", "only LoRA runs (`lora:`) write an adapter; this run's result is `model`")],
    }
}

/// A training stage's model, with LoRA adapters added when asked for.
pub fn open_trainable(ctx: &StageContext, args: &TrainingArgs) -> Result<LoadedModel> {
    let mut loaded = open_model(ctx, &args.model)?;
    if let Some(l) = &args.lora {
        loaded.model.add_lora(l.clone(), ctx.env.seed)?;
    }
    Ok(loaded)
}

/// Run `algo` on the loaded model through the loop, then write the stage's
/// outputs: the model (Hugging Face layout, adapters merged), the per-step
/// log and the summary metrics (with `extra` added); with LoRA also the
/// adapters in PEFT layout, naming `base_model` (the `model` parameter) as their base.
pub fn run<A: Algorithm>(
    ctx: &mut StageContext,
    loaded: &mut LoadedModel,
    base_model: &str,
    algo: &mut A,
    hp: &Hyper,
    extra: Value,
) -> Result<Summary> {
    let summary = trainer::train(&mut loaded.model, algo, hp, ctx)?;
    crate::model::load::save(&loaded.model, &loaded.files_dir, &ctx.output_path("model"))?;
    if loaded.model.lora.is_some() {
        crate::model::peft::save_adapter(&loaded.model, base_model, &ctx.output_path("adapter"))?;
    }
    std::fs::copy(trainer::log_path(ctx), ctx.output_path("log"))?;
    crate::train::plots::render(
        &ctx.output_path("log"),
        &ctx.output_path("plots"),
        &format!("{} ({})", ctx.stage, ctx.kind),
    )?;
    let mut metrics = serde_json::to_value(&summary)?;
    if let (Some(m), Value::Object(e)) = (metrics.as_object_mut(), extra) {
        m.extend(e);
    }
    std::fs::write(ctx.output_path("metrics"), serde_json::to_string_pretty(&metrics)?)?;
    if summary.resumed_from_step > 0 {
        eprintln!("{}: resumed at step {} of {}", ctx.stage, summary.resumed_from_step, summary.steps);
    }
    ctx.set_metrics(metrics);
    Ok(summary)
}

/// The render hook of the training kinds: the per-step log's curves, from the
/// finished `log` output or the work folder's log of an unfinished run.
pub fn render(
    artifacts: &std::collections::BTreeMap<String, PathBuf>,
    work_dir: Option<&std::path::Path>,
    out: &std::path::Path,
    title: &str,
) -> Option<Result<PathBuf>> {
    let log = match (artifacts.get("log"), work_dir) {
        (Some(log), _) => log.clone(),
        (None, Some(dir)) => {
            let log = dir.join(trainer::LOG_FILE);
            if !log.exists() {
                return Some(Err(anyhow::anyhow!("no training step logged yet (no {})", log.display())));
            }
            log
        }
        (None, None) => return None,
    };
    Some(crate::train::plots::render(&log, out, title))
}
