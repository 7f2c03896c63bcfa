//! The settings every training algorithm shares (TRL's `TrainingArguments`
//! names), their checks, and the arithmetic of steps. An algorithm's own
//! config (`grpo::GrpoConfig`, `sft::SftConfig`) flattens this one in, with
//! its own defaults: each algorithm's config, defaults and checks sit in one
//! place beside it, as TRL's `grpo_config.py` does.

use serde::{Deserialize, Serialize};

use super::schedule::{self, Schedule, ScheduleKwargs};
use crate::common::params::batch_problem;
use crate::common::ParamError;
use crate::model::lora::LoraConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingConfig {
    pub learning_rate: f64,
    pub lr_scheduler_type: Schedule,
    /// What the schedule takes beyond its name (`min_lr_rate`, `num_cycles`, …).
    pub lr_scheduler_kwargs: ScheduleKwargs,
    pub warmup_ratio: f64,
    /// Warmup in steps (transformers 5: a value below 1 is a fraction of the
    /// run); replaces `warmup_ratio` when given.
    pub warmup_steps: Option<f64>,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Stop after this many optimizer steps (else `num_train_epochs` of the data).
    pub max_steps: Option<u64>,
    pub num_train_epochs: f64,
    pub save_steps: u64,
    pub save_total_limit: usize,
    /// A line of the step's numbers every this many steps (and after the first
    /// and the last); the log file has every step whatever this says.
    pub logging_steps: u64,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// LoRA adapters instead of full fine-tuning: `{r, alpha, dropout, target_modules}`.
    pub lora: Option<LoraConfig>,
    /// Compute in bf16 (true) or f32 (false) for this stage; unset: the pipeline's `dtype:`.
    pub bf16: Option<bool>,
    /// This stage's seed; unset: the pipeline's `seed:`.
    pub seed: Option<u64>,
    /// Where else each step's numbers go (TRL's name): `tensorboard`,
    /// `mlflow`, `none`; one name or a list. Not part of the fingerprint.
    #[serde(deserialize_with = "one_or_many")]
    pub report_to: Vec<String>,
}

/// A name or a list of names (TRL takes both for `report_to`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d).map_err(|_| serde::de::Error::custom("expected a name or a list of names"))? {
        OneOrMany::One(s) => Ok(vec![s]),
        OneOrMany::Many(v) => Ok(v),
    }
}

impl Default for TrainingConfig {
    /// TRL's SFTConfig's values (TrainingArguments with SFT's learning rate and
    /// gradient checkpointing on), with cosine decay after a 10% warmup, one
    /// epoch and two checkpoints kept; an algorithm's config changes what differs.
    fn default() -> Self {
        TrainingConfig {
            learning_rate: 2e-5,
            lr_scheduler_type: Schedule::Cosine,
            lr_scheduler_kwargs: ScheduleKwargs::default(),
            warmup_ratio: 0.1,
            warmup_steps: None,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_steps: None,
            num_train_epochs: 1.0,
            save_steps: 500,
            save_total_limit: 2,
            logging_steps: 10,
            gradient_checkpointing: true,
            lora: None,
            bf16: None,
            seed: None,
            report_to: vec!["none".into()],
        }
    }
}

impl TrainingConfig {
    /// Examples (SFT) or completions (GRPO) per optimizer step.
    pub fn per_step(&self) -> usize {
        self.per_device_train_batch_size.saturating_mul(self.gradient_accumulation_steps)
    }

    /// Warmup steps of a run of `total` steps: `warmup_steps` (a fraction when
    /// below 1, as transformers 5 reads it), else `warmup_ratio` of the run.
    pub fn warmup(&self, total: u64) -> u64 {
        match self.warmup_steps {
            Some(w) if w >= 1.0 => w as u64,
            Some(w) => (w * total as f64).ceil() as u64,
            None => (self.warmup_ratio * total as f64).ceil() as u64,
        }
    }

    /// The compute dtype this stage asks for (`bf16:`), over the pipeline's.
    pub fn dtype<'a>(&self, pipeline: &'a str) -> &'a str {
        match self.bf16 {
            Some(true) => "bf16",
            Some(false) => "f32",
            None => pipeline,
        }
    }

    /// Steps for `units` units of data at `per_step` per optimizer step: `max_steps`, or the epochs' worth.
    pub fn total_steps(&self, units: usize, per_step: usize) -> u64 {
        self.max_steps
            .unwrap_or_else(|| ((self.num_train_epochs * units as f64 / per_step.max(1) as f64).ceil() as u64).max(1))
    }

    /// Problems with the settings, each named by its key.
    pub fn problems(&self) -> Vec<ParamError> {
        let mut errors = Vec::new();
        for (k, v) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ] {
            errors.extend(batch_problem(k, v));
        }
        errors.extend(crate::tracking::problems(&self.report_to));
        if self.save_total_limit == 0 {
            errors.push(ParamError::new("save_total_limit", "must be at least 1"));
        }
        if self.save_steps == 0 {
            errors.push(ParamError::new("save_steps", "must be at least 1"));
        }
        if self.logging_steps == 0 {
            errors.push(ParamError::new("logging_steps", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            errors.push(ParamError::new("max_steps", "must be at least 1 (or leave it out to train num_train_epochs)"));
        }
        if !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) {
            errors.push(ParamError::new("num_train_epochs", "must be a positive number"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            errors.push(ParamError::new("learning_rate", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            errors.push(ParamError::new("warmup_ratio", "must be in [0, 1)"));
        }
        if let Some(w) = self.warmup_steps {
            if !(w.is_finite() && w >= 0.0) || (w >= 1.0 && w.fract() != 0.0) {
                errors.push(
                    ParamError::new("warmup_steps", format!("{w} is neither a step count nor a fraction below 1"))
                        .hint("e.g. `warmup_steps: 100`, or `warmup_steps: 0.1` for a tenth of the run"),
                );
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            errors.push(ParamError::new("adam_epsilon", "must be a positive number"));
        }
        let warmup_given = self.warmup_steps.is_some_and(|w| w > 0.0) || self.warmup_ratio > 0.0;
        errors.extend(schedule::problems(
            self.lr_scheduler_type,
            &self.lr_scheduler_kwargs,
            self.learning_rate,
            warmup_given,
        ));
        for (k, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                errors.push(ParamError::new(k, "must be in [0, 1)"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            errors.push(ParamError::new("weight_decay", "must be ≥ 0"));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            errors.push(ParamError::new("max_grad_norm", "must be ≥ 0 (0: no clipping)"));
        }
        if let Some(l) = &self.lora {
            errors.extend(l.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
        }
        errors
    }
}
