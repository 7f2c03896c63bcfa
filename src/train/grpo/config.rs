//! GRPO's configuration: TRL 1.16's `GRPOConfig` names and defaults (the
//! shared training settings flattened in, with GRPO's defaults), and every
//! check, in the YAML's own field names. The `grpo` stage's preset
//! (`stages/grpo.yaml`) is the R1 recipe on top of these.

use serde::{Deserialize, Serialize};

use super::super::config::TrainingConfig;
use super::super::schedule::Schedule;
use super::loss::{Aggregation, IsMode, LossConfig, LossParams, ScaleRewards};
use crate::common::params::batch_problem;
use crate::common::ParamError;
use crate::model::SamplingParams;
use crate::rollout::tools::ToolSettings;

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
    /// Keep only tokens at least this fraction as likely as the most likely one.
    pub min_p: Option<f32>,
    /// > 1 makes tokens already in the prompt or the completion less likely (HF's rule).
    pub repetition_penalty: f32,
    /// The loss's hyperparameters (`loss_type`, `beta`, `epsilon`, …), TRL's names at the top level.
    #[serde(flatten)]
    pub loss: LossParams,
    pub scale_rewards: ScaleRewards,
    pub multi_objective_aggregation: Aggregation,
    /// One weight per reward function, replacing the reward set's weights.
    pub reward_weights: Option<Vec<f32>>,
    pub num_iterations: usize,
    pub mask_truncated_completions: bool,
    /// Move the reference toward the policy every `ref_model_sync_steps`
    /// optimizer steps: π_ref ← α·π_θ + (1 − α)·π_ref (TR-DPO; needs β > 0 and
    /// full fine-tuning, as in TRL).
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: u64,
    /// Train only on the top ρ of completion tokens by the policy's entropy (1: all).
    pub top_entropy_quantile: f64,
    /// An entropy bonus: L = L_policy − coef · mean entropy.
    pub entropy_coef: f64,
    /// Skywork-OR1's controller: raise `entropy_coef` by `entropy_coef_delta` while the
    /// entropy is at or below `entropy_target`, lower it otherwise (within [min, max]).
    pub use_adaptive_entropy: bool,
    pub entropy_coef_min: f64,
    pub entropy_coef_max: f64,
    pub entropy_coef_delta: f64,
    pub entropy_target: f64,
    /// DAPO's dynamic sampling (verl's `filter_groups`): groups whose rewards all tie
    /// are dropped and fresh prompts sampled in their place, for up to
    /// `dynamic_sampling_max_rounds` extra rounds of generation per step.
    pub dynamic_sampling: bool,
    pub dynamic_sampling_max_rounds: usize,
    /// Evaluate the policy every this many steps on the stage's `eval_dataset`
    /// (and after the last step; unset: after the last step only).
    pub eval_steps: Option<u64>,
    /// The first this many evaluation questions (all when unset).
    pub eval_limit: Option<usize>,
    /// Completions per evaluation question: unset or 1 is greedy (what `evaluate`
    /// does); more are sampled as training samples and every one is judged.
    pub num_generations_eval: Option<usize>,
    /// Evaluation questions in flight at a time (continuous batching).
    pub per_device_eval_batch_size: usize,
    /// The evaluation metric that picks the best step (`accuracy_strict`, `reward`, …).
    pub metric_for_best_model: Option<String>,
    /// Whether a larger `metric_for_best_model` is better (default: yes, but for
    /// `truncation_rate`; `mean_completion_tokens` must say).
    pub greater_is_better: Option<bool>,
    /// The stage's model is the best evaluated step's weights, not the last step's.
    pub load_best_model_at_end: bool,
    /// Every this many steps, a few prompt/completion/reward samples go into the log (0: never).
    pub log_completions: u64,
    /// How a full fine-tuning run keeps its reference policy (β > 0): `bf16` halves its memory.
    pub reference_dtype: ReferenceDtype,
    /// The weights local rollouts decode with: `f32`, the policy's own; `bf16`,
    /// a copy rounded to bf16 and packed each round (half the bytes a decode
    /// step reads; AVX-512 CPUs, elsewhere f32 with a warning). The loss always
    /// takes the f32 policy's log-probabilities; the rollouts' own are kept, so
    /// `vllm_importance_sampling_correction` corrects for the rounding as it
    /// does for a server's rollouts.
    pub rollout_dtype: RolloutDtype,
    /// With a rollout server: weight each token's policy term by πold / πsampler
    /// (the server samples with its own kernels and precision, so slightly
    /// off-policy). Applies to rollouts from a server, as in TRL, and to local
    /// rollouts with `rollout_dtype: bf16` (the same gap, from the same cause).
    pub vllm_importance_sampling_correction: bool,
    pub vllm_importance_sampling_mode: IsMode,
    pub vllm_importance_sampling_clip_min: Option<f64>,
    pub vllm_importance_sampling_clip_max: Option<f64>,
    /// Tool calls in rollouts (`tools`, `max_tool_calling_iterations`: TRL's names).
    #[serde(flatten)]
    pub tools: ToolSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutDtype {
    /// The policy's own f32 weights.
    F32,
    /// The policy's weights rounded to bf16, widened to f32 as a decode step reads them.
    Bf16,
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
    /// TRL 1.16's GRPOConfig, everything but `max_prompt_length` (which TRL
    /// dropped; here a prompt's tokens beyond it are cut from its start).
    fn default() -> Self {
        GrpoConfig {
            training: TrainingConfig {
                learning_rate: 1e-6,
                lr_scheduler_type: Schedule::Linear,
                warmup_ratio: 0.0,
                adam_beta2: 0.999,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
                num_train_epochs: 3.0,
                ..TrainingConfig::default()
            },
            num_generations: 8,
            max_prompt_length: 512,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: None,
            repetition_penalty: 1.0,
            loss: LossParams::default(),
            scale_rewards: ScaleRewards::Group,
            multi_objective_aggregation: Aggregation::SumThenNormalize,
            reward_weights: None,
            num_iterations: 1,
            mask_truncated_completions: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            top_entropy_quantile: 1.0,
            entropy_coef: 0.0,
            use_adaptive_entropy: false,
            entropy_coef_min: 0.0,
            entropy_coef_max: 1.0,
            entropy_coef_delta: 0.005,
            entropy_target: 0.2,
            dynamic_sampling: false,
            dynamic_sampling_max_rounds: 4,
            eval_steps: None,
            eval_limit: None,
            num_generations_eval: None,
            per_device_eval_batch_size: 8,
            metric_for_best_model: None,
            greater_is_better: None,
            load_best_model_at_end: false,
            log_completions: 0,
            reference_dtype: ReferenceDtype::Bf16,
            rollout_dtype: RolloutDtype::F32,
            vllm_importance_sampling_correction: true,
            vllm_importance_sampling_mode: IsMode::SequenceMask,
            vllm_importance_sampling_clip_min: None,
            vllm_importance_sampling_clip_max: Some(3.0),
            tools: ToolSettings::default(),
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
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_completion_length,
            stop: Vec::new(),
            include_stop_str_in_output: false,
            tool_call: None,
            logprobs: false,
        }
    }

    /// The loss's settings for a step whose batch has `global_tokens` completion
    /// tokens in `micro_batches` micro-batches, with this step's entropy coefficient.
    pub fn loss_config(&self, micro_batches: usize, global_tokens: f64, entropy_coef: f64) -> LossConfig {
        LossConfig {
            params: self.loss,
            max_completion_length: self.max_completion_length,
            micro_batches,
            global_tokens,
            entropy_coef,
        }
    }

    /// Whether a step needs the policy's per-token entropy (beyond logging it).
    pub fn needs_entropy_gradient(&self) -> bool {
        self.entropy_coef != 0.0 || self.use_adaptive_entropy
    }

    /// Prompts per round: a step's completions are whole groups.
    pub fn prompts_per_round(&self) -> usize {
        self.training.per_step() / self.num_generations.max(1)
    }

    /// Every problem with the settings, in the YAML's field names.
    pub fn problems(&self) -> Vec<ParamError> {
        let mut errors = self.training.problems();
        errors.extend(self.tools.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
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
        if let Some(e) = batch_problem("num_generations", self.num_generations) {
            errors.push(e);
        } else if self.num_generations < 2 {
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
        errors.extend(self.loss.problems());
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            errors.push(ParamError::new("min_p", "must be in [0, 1]"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            errors.push(ParamError::new("repetition_penalty", "must be > 0 (1: none)"));
        }
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            errors.push(ParamError::new("top_entropy_quantile", "must be in [0, 1] (1: every token)"));
        }
        if !self.entropy_coef.is_finite() {
            errors.push(ParamError::new("entropy_coef", "must be a finite number"));
        }
        if self.use_adaptive_entropy
            && !(self.entropy_coef_min <= self.entropy_coef_max && self.entropy_coef_delta >= 0.0)
        {
            errors.push(ParamError::new(
                "entropy_coef_min",
                "needs entropy_coef_min ≤ entropy_coef_max and entropy_coef_delta ≥ 0",
            ));
        }
        // TRL's names are known so that a TRL config is answered precisely, but
        // these are not implemented here yet: refused rather than ignored.
        if self.sync_ref_model {
            // As in TRL: without β there is no reference, and with LoRA the reference is the adapter-free base.
            if self.loss.beta == 0.0 {
                errors.push(
                    ParamError::new("sync_ref_model", "needs a reference model, and β = 0 has none")
                        .hint("set `beta` > 0 (e.g. 0.04), or drop `sync_ref_model`"),
                );
            }
            if self.training.lora.is_some() {
                errors.push(
                    ParamError::new(
                        "sync_ref_model",
                        "does not work with LoRA: the reference is the base model with the adapters off",
                    )
                    .hint("drop `sync_ref_model`, or train without `lora:`"),
                );
            }
            if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
                errors.push(ParamError::new("ref_model_mixup_alpha", "must be in [0, 1]"));
            }
            if self.ref_model_sync_steps == 0 {
                errors.push(ParamError::new("ref_model_sync_steps", "must be at least 1"));
            }
        }
        if let Some(w) = &self.reward_weights {
            if w.iter().any(|x| !x.is_finite()) {
                errors.push(ParamError::new("reward_weights", "every weight must be a finite number"));
            }
        }
        if self.dynamic_sampling && self.dynamic_sampling_max_rounds == 0 {
            errors.push(ParamError::new("dynamic_sampling_max_rounds", "must be at least 1 with dynamic_sampling"));
        }
        errors.extend(self.evaluation_problems());
        errors
    }

    /// The evaluation settings' own problems (whether there is an `eval_dataset` is the stage's check).
    fn evaluation_problems(&self) -> Vec<ParamError> {
        let mut errors = Vec::new();
        for (k, v) in [("eval_steps", self.eval_steps), ("eval_limit", self.eval_limit.map(|x| x as u64))] {
            if v == Some(0) {
                errors.push(ParamError::new(k, "must be at least 1"));
            }
        }
        errors.extend(self.num_generations_eval.and_then(|n| batch_problem("num_generations_eval", n)));
        errors.extend(batch_problem("per_device_eval_batch_size", self.per_device_eval_batch_size));
        if self.metric_for_best_model.is_some() {
            if let Err(e) = self.best_metric() {
                errors.push(
                    ParamError::new("metric_for_best_model", e)
                        .hint(format!("one of: {}", crate::train::task_eval::METRICS.join(", "))),
                );
            }
        } else if self.load_best_model_at_end {
            errors.push(
                ParamError::new("load_best_model_at_end", "needs `metric_for_best_model` to say which step is best")
                    .hint("e.g. `metric_for_best_model: accuracy_strict`"),
            );
        }
        errors
    }

    /// Whether the stage evaluates while it trains (an `eval_dataset` must then be given).
    pub fn evaluates(&self) -> bool {
        self.eval_steps.is_some()
            || self.eval_limit.is_some()
            || self.num_generations_eval.is_some()
            || self.metric_for_best_model.is_some()
            || self.load_best_model_at_end
    }

    /// The metric that ranks evaluations and its direction (`eval/` or TRL's `eval_` prefix dropped).
    pub fn best_metric(&self) -> Result<Option<crate::train::trainer::BestMetric>, String> {
        let Some(raw) = &self.metric_for_best_model else { return Ok(None) };
        let metric = raw.strip_prefix("eval/").or_else(|| raw.strip_prefix("eval_")).unwrap_or(raw).to_string();
        if !crate::train::task_eval::METRICS.contains(&metric.as_str()) {
            return Err(format!("`{raw}` is not an evaluation metric"));
        }
        let greater_is_better = match (self.greater_is_better, metric.as_str()) {
            (Some(g), _) => g,
            (None, "truncation_rate") => false,
            (None, "mean_completion_tokens") => {
                return Err("`mean_completion_tokens` has no better direction: set `greater_is_better`".into())
            }
            (None, _) => true,
        };
        Ok(Some(crate::train::trainer::BestMetric { metric, greater_is_better }))
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

    #[test]
    fn the_best_metric_is_named_without_its_prefix_and_has_a_direction() {
        let best = |m: &str, g: Option<bool>| {
            GrpoConfig { metric_for_best_model: Some(m.into()), greater_is_better: g, ..Default::default() }
                .best_metric()
                .map(|b| b.map(|b| (b.metric, b.greater_is_better)))
        };
        assert_eq!(best("eval_reward", None), Ok(Some(("reward".into(), true))));
        assert_eq!(best("eval/truncation_rate", None), Ok(Some(("truncation_rate".into(), false))));
        assert_eq!(best("mean_completion_tokens", Some(false)), Ok(Some(("mean_completion_tokens".into(), false))));
        assert!(best("mean_completion_tokens", None).unwrap_err().contains("greater_is_better"));
        assert!(best("loss", None).unwrap_err().contains("not an evaluation metric"));
    }

    #[test]
    fn trl_1_16_options_are_checked_by_name_and_unimplemented_ones_refused() {
        let c = GrpoConfig {
            loss: LossParams {
                loss_type: super::super::loss::LossType::Luspo,
                delta: Some(1.1),
                sapo_temperature_neg: 0.0,
                ..LossParams::default()
            },
            min_p: Some(1.5),
            repetition_penalty: 0.0,
            top_entropy_quantile: 2.0,
            reward_weights: Some(vec![f32::NAN]),
            sync_ref_model: true,
            eval_steps: Some(0),
            load_best_model_at_end: true,
            ..Default::default()
        };
        let named: Vec<String> = c.problems().into_iter().map(|e| e.path).collect();
        for field in [
            "delta",
            "loss_type",
            "min_p",
            "repetition_penalty",
            "top_entropy_quantile",
            "reward_weights",
            "sapo_temperature_neg",
            "sync_ref_model",
            "eval_steps",
            "load_best_model_at_end",
        ] {
            assert!(named.iter().any(|n| n == field), "{field} not named in {named:?}");
        }
    }
}
