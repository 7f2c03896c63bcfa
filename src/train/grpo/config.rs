//! GRPO's configuration: TRL 1.16's `GRPOConfig` names and defaults (the
//! shared training settings flattened in, with GRPO's defaults), and every
//! check, in the YAML's own field names. The `grpo` stage's preset
//! (`stages/grpo.yaml`) is the R1 recipe on top of these.

use serde::{Deserialize, Serialize};

use super::super::config::TrainingConfig;
use super::super::grpo_loss::{IsMode, LossType, ScaleRewards};
use crate::common::ParamError;
use crate::model::SamplingParams;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrpoConfig {
    #[serde(flatten)]
    pub training: TrainingConfig,
    pub num_generations: usize,
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub num_iterations: usize,
    pub mask_truncated_completions: bool,
    /// Every this many steps, a few prompt/completion/reward samples go into the log (0: never).
    pub log_completions: u64,
    /// How a full fine-tuning run keeps its reference policy (β > 0): `bf16` halves its memory.
    pub reference_dtype: ReferenceDtype,
    /// With a rollout server: weight each token's policy term by πold / πsampler
    /// (the server samples with its own kernels and precision, so slightly off-policy).
    /// TRL's names; off by default here until measured for a setup (the log's
    /// `sampling/sampling_logp_difference/*` shows the mismatch either way).
    pub vllm_importance_sampling_correction: bool,
    pub vllm_importance_sampling_mode: IsMode,
    pub vllm_importance_sampling_clip_min: Option<f64>,
    pub vllm_importance_sampling_clip_max: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceDtype {
    /// An exact f32 copy of the starting weights.
    F32,
    /// The starting weights rounded to bf16, computed in the policy's dtype (see docs/grpo.md: memory).
    Bf16,
}

impl Default for GrpoConfig {
    /// TRL's GRPOConfig, with the R1 recipe's optimizer settings where TRL
    /// inherits the Trainer's (β2 0.99, weight decay 0.1, clipping 0.1, warmup 0.1).
    fn default() -> Self {
        GrpoConfig {
            training: TrainingConfig {
                learning_rate: 1e-6,
                adam_beta2: 0.99,
                weight_decay: 0.1,
                max_grad_norm: 0.1,
                ..TrainingConfig::default()
            },
            num_generations: 8,
            max_prompt_length: 512,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            log_completions: 0,
            reference_dtype: ReferenceDtype::Bf16,
            vllm_importance_sampling_correction: false,
            vllm_importance_sampling_mode: IsMode::TokenTruncate,
            vllm_importance_sampling_clip_min: None,
            vllm_importance_sampling_clip_max: Some(3.0),
        }
    }
}

impl GrpoConfig {
    /// How completions are sampled.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_completion_length,
            stop: Vec::new(),
            include_stop_str_in_output: false,
        }
    }

    /// Prompts per round: a step's completions are whole groups.
    pub fn prompts_per_round(&self) -> usize {
        self.training.per_step() / self.num_generations.max(1)
    }

    /// Every problem with the settings, in the YAML's field names.
    pub fn problems(&self) -> Vec<ParamError> {
        let mut errors = self.training.problems();
        for (k, v) in [
            ("num_iterations", self.num_iterations),
            ("max_completion_length", self.max_completion_length),
            ("max_prompt_length", self.max_prompt_length),
        ] {
            if v == 0 {
                errors.push(ParamError::new(k, "must be at least 1"));
            }
        }
        let per_step = self.training.per_step();
        if self.num_generations < 2 {
            errors.push(ParamError::new(
                "num_generations",
                "must be at least 2: advantages compare completions of one prompt",
            ));
        } else if per_step > 0 && !per_step.is_multiple_of(self.num_generations) {
            errors.push(
                ParamError::new(
                    "num_generations",
                    format!(
                        "per_device_train_batch_size × gradient_accumulation_steps = {per_step} is not a multiple \
                         of num_generations = {}",
                        self.num_generations
                    ),
                )
                .hint("each optimizer step takes whole groups of completions"),
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            errors.push(ParamError::new("temperature", "GRPO samples: temperature must be > 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            errors.push(ParamError::new("top_p", "must be in (0, 1]"));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            errors.push(ParamError::new("beta", "must be ≥ 0 (0: no KL term and no reference model)"));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            errors.push(ParamError::new("epsilon", "clipping ranges must be ≥ 0"));
        }
        if self.epsilon_high.is_some_and(|e| !(e.is_finite() && e >= 0.0)) {
            errors.push(ParamError::new("epsilon_high", "clipping ranges must be ≥ 0"));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_their_own_checks_and_each_bad_value_is_named() {
        assert!(GrpoConfig::default().problems().is_empty());
        let mut c = GrpoConfig { num_generations: 3, temperature: 0.0, max_completion_length: 0, ..Default::default() };
        c.training.learning_rate = f64::NAN;
        let named: Vec<String> = c.problems().into_iter().map(|e| e.path).collect();
        assert_eq!(named, ["learning_rate", "max_completion_length", "num_generations", "temperature"]);
    }
}
