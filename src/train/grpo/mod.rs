//! GRPO as an algorithm of the training loop. Per round: sample
//! `num_generations` completions for each of
//! per_device_train_batch_size × gradient_accumulation_steps / num_generations
//! prompts (one prefill per prompt), score them with the reward set, compute
//! group-relative advantages, then `num_iterations` optimizer steps on the
//! clipped surrogate. The pieces: `config` (TRL's GRPOConfig: names, defaults,
//! checks), [`GrpoAlgorithm::rollout`] (sampling and scoring), `rows` (each
//! completion's tokens and loss mask, and a micro-batch packed as the model
//! takes it; pure), [`GrpoAlgorithm::score`] (old and reference
//! log-probabilities, no graph), and the policy step in [`Algorithm::step`].

mod config;
pub mod loss;
mod rows;

pub use config::{GrpoConfig, ReferenceDtype, RolloutDtype};
pub use rows::{build_rows, Packed, RowSpec, Rows, PACKED_ROW_TOKENS};

use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::rollout_sync::RolloutServer;
use super::trainer::{Algorithm, StepReport};
use crate::kernels::packed::Precision;
use crate::kernels::transfer;
use crate::model::{Batch, ChatTokenizer, Completion, Pass, Transformer};
use crate::rewards::set::{mean, std};
use crate::rewards::{RewardSet, Sample, Scores};
use crate::rollout::tools::Toolbox;
use crate::rollout::Sampler;
use loss::{
    advantages, advantages_normalize_then_sum, high_entropy_mask, importance_weights, loss, Aggregation, LossInputs,
    LossStats, LossType,
};

/// A training prompt, tokenized.
#[derive(Debug, Clone)]
pub struct GrpoPrompt {
    pub ids: Vec<u32>,
    pub question: String,
    pub answer: String,
}

/// Keep the end of a prompt longer than `max` tokens, where the question and the generation prompt are.
pub fn truncate_prompt(mut ids: Vec<u32>, max: usize) -> Vec<u32> {
    if ids.len() > max {
        ids.drain(..ids.len() - max);
    }
    ids
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrpoState {
    /// Prompts consumed so far (position in the seeded epoch order).
    pub data_pos: u64,
    pub rng: ChaCha8Rng,
    /// The adaptive entropy controller: its coefficient, and the entropy of the
    /// last step (`None`: no step yet, which TRL writes as +∞).
    #[serde(default)]
    pub entropy_coef: f64,
    #[serde(default)]
    pub last_world_entropy: Option<f64>,
    /// `sync_ref_model`: the reference has moved from the starting weights (so
    /// checkpoints hold it).
    #[serde(default)]
    pub reference_synced: bool,
}

/// The per-step log fields of GRPO (TRL's names).
#[derive(Debug, Clone, Serialize)]
pub struct GrpoLog {
    pub reward: f64,
    pub reward_std: f64,
    pub frac_reward_zero_std: f64,
    #[serde(rename = "completions/mean_length")]
    pub mean_length: f64,
    #[serde(rename = "completions/clipped_ratio")]
    pub clipped_ratio: f64,
    pub kl: f64,
    #[serde(rename = "clip_ratio/region_mean")]
    pub clip_region: f64,
    #[serde(rename = "clip_ratio/low_mean")]
    pub clip_low: f64,
    #[serde(rename = "clip_ratio/high_mean")]
    pub clip_high: f64,
    /// The policy's mean entropy over completion tokens.
    pub entropy: f64,
    #[serde(rename = "cispo_clip_ratio", skip_serializing_if = "Option::is_none")]
    pub cispo_clip: Option<f64>,
    #[serde(rename = "vespo/phi_seq_mean", skip_serializing_if = "Option::is_none")]
    pub vespo_phi: Option<f64>,
    /// The entropy bonus's coefficient this step (when there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy_coef: Option<f64>,
    /// Dynamic sampling: the fraction of sampled groups dropped for tying, and the rounds of generation.
    #[serde(rename = "dynamic_sampling/dropped_fraction", skip_serializing_if = "Option::is_none")]
    pub dropped_fraction: Option<f64>,
    #[serde(rename = "dynamic_sampling/rounds", skip_serializing_if = "Option::is_none")]
    pub sampling_rounds: Option<u64>,
    /// Generated tokens per second of this round's sampling (0 on later iterations).
    #[serde(rename = "generation_tokens_per_second")]
    pub generation_tps: f64,
    #[serde(rename = "timing/generation")]
    pub t_generation: f64,
    #[serde(rename = "timing/scoring")]
    pub t_scoring: f64,
    #[serde(rename = "timing/reference")]
    pub t_reference: f64,
    #[serde(rename = "timing/policy_forward_backward")]
    pub t_policy: f64,
    /// Rollouts from a server or in bf16: |log πold − log πsampler| over completion tokens.
    #[serde(rename = "sampling/sampling_logp_difference/mean", skip_serializing_if = "Option::is_none")]
    pub sampling_logp_difference_mean: Option<f64>,
    #[serde(rename = "sampling/sampling_logp_difference/max", skip_serializing_if = "Option::is_none")]
    pub sampling_logp_difference_max: Option<f64>,
    /// With the correction on: the importance weights applied.
    #[serde(rename = "sampling/importance_sampling_ratio/min", skip_serializing_if = "Option::is_none")]
    pub is_ratio_min: Option<f64>,
    #[serde(rename = "sampling/importance_sampling_ratio/mean", skip_serializing_if = "Option::is_none")]
    pub is_ratio_mean: Option<f64>,
    #[serde(rename = "sampling/importance_sampling_ratio/max", skip_serializing_if = "Option::is_none")]
    pub is_ratio_max: Option<f64>,
    /// `rewards/<name>/mean` and `rewards/<name>/std` per reward function.
    #[serde(flatten)]
    pub per_function: std::collections::BTreeMap<String, f64>,
    /// With `tools`: calls per completion, and the share of calls that failed (TRL's names).
    #[serde(rename = "tools/call_frequency", skip_serializing_if = "Option::is_none")]
    pub tool_call_frequency: Option<f64>,
    #[serde(rename = "tools/failure_frequency", skip_serializing_if = "Option::is_none")]
    pub tool_failure_frequency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completions: Option<Vec<LoggedCompletion>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoggedCompletion {
    pub prompt: String,
    pub completion: String,
    pub reward: f32,
}

/// A round's samples, scores and advantages, reused by its `num_iterations` updates.
struct Round {
    picked: Vec<usize>,
    completions: Vec<Completion>,
    scores: Scores,
    advantages: Vec<f32>,
    rows: Rows,
    /// The sampler's log-probabilities aligned with `rows.masks` (a server's or bf16 rollouts).
    sampling: Option<SamplingLogprobs>,
    /// πold per micro-batch (μ > 1) and πref per micro-batch (β > 0).
    old: Vec<Tensor>,
    refs: Vec<Tensor>,
    iteration: usize,
    t_generation: f64,
    t_scoring: f64,
    t_reference: f64,
    /// Prompts this round consumed (more than it trains on when dynamic sampling dropped groups).
    consumed: u64,
    /// Dynamic sampling: groups sampled, groups dropped, rounds of generation.
    sampled_groups: usize,
    dropped_groups: usize,
    rounds: u64,
}

/// [rows][completion_len] log-probabilities of the sampled tokens, and 1 where known.
struct SamplingLogprobs {
    values: Vec<Vec<f32>>,
    known: Vec<Vec<f32>>,
}

impl SamplingLogprobs {
    /// From completions that all carry their sampler's log-probabilities (EOS included).
    fn of(completions: &[Completion], completion_len: usize) -> Option<SamplingLogprobs> {
        let mut values = Vec::with_capacity(completions.len());
        let mut known = Vec::with_capacity(completions.len());
        for c in completions {
            let lp = c.sampling_logprobs.as_ref()?;
            let row = |f: &dyn Fn(f32) -> f32| -> Vec<f32> {
                (0..completion_len).map(|j| lp.get(j).map_or(0.0, |&x| f(x))).collect()
            };
            values.push(row(&|x| if x.is_finite() { x } else { 0.0 }));
            known.push(row(&|x| if x.is_finite() { 1.0 } else { 0.0 }));
        }
        Some(SamplingLogprobs { values, known })
    }
}

/// Running min / sum / max over masked values, for the log.
#[derive(Default)]
struct Extent {
    min: f64,
    max: f64,
    sum: f64,
    n: f64,
}

impl Extent {
    fn add(&mut self, values: &Tensor, mask: &Tensor) -> Result<()> {
        let v: Vec<Vec<f32>> = transfer::to_vec2(&values.to_dtype(DType::F32)?)?;
        let m: Vec<Vec<f32>> = transfer::to_vec2(&mask.to_dtype(DType::F32)?)?;
        for (x, k) in v.iter().flatten().zip(m.iter().flatten()) {
            if *k > 0.0 {
                let x = *x as f64;
                (self.min, self.max) = if self.n == 0.0 { (x, x) } else { (self.min.min(x), self.max.max(x)) };
                self.sum += x;
                self.n += 1.0;
            }
        }
        Ok(())
    }
    fn mean(&self) -> f64 {
        self.sum / self.n.max(1.0)
    }
}

pub struct GrpoAlgorithm<'a> {
    cfg: GrpoConfig,
    tok: &'a ChatTokenizer,
    rewards: &'a RewardSet,
    prompts: Vec<GrpoPrompt>,
    /// A frozen copy of the starting weights (β > 0, full fine-tuning); with
    /// LoRA the base model (adapters off) is the reference and no copy is made.
    reference: Option<Transformer>,
    seed: u64,
    state: GrpoState,
    round: Option<Round>,
    rewards_seen: Vec<f64>,
    /// Rollouts on an inference server instead of the local model.
    server: Option<RolloutServer>,
    /// Said once that the server's replies carry no log-probabilities to correct with.
    said_no_sampler_logprobs: bool,
    /// Said once that `rollout_dtype: bf16` cannot pack here and rollouts decode in f32.
    said_no_bf16_rollouts: bool,
    /// What answers the model's inline tool calls (`tools:`), started in the stage's folder.
    tool: Option<Toolbox>,
}

impl<'a> GrpoAlgorithm<'a> {
    pub fn new(
        cfg: GrpoConfig,
        policy: &Transformer,
        tok: &'a ChatTokenizer,
        rewards: &'a RewardSet,
        prompts: Vec<GrpoPrompt>,
        seed: u64,
    ) -> Result<Self> {
        let reference = if cfg.loss.beta != 0.0 && policy.lora.is_none() {
            let storage = match cfg.reference_dtype {
                ReferenceDtype::F32 => DType::F32,
                ReferenceDtype::Bf16 => DType::BF16,
            };
            Some(policy.frozen_copy(storage, policy.compute_dtype)?)
        } else {
            None
        };
        let state = GrpoState {
            data_pos: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            entropy_coef: cfg.entropy_coef,
            last_world_entropy: None,
            reference_synced: false,
        };
        Ok(GrpoAlgorithm {
            cfg,
            tok,
            rewards,
            prompts,
            reference,
            seed,
            state,
            round: None,
            rewards_seen: vec![],
            server: None,
            said_no_sampler_logprobs: false,
            said_no_bf16_rollouts: false,
            tool: None,
        })
    }

    /// Answer the model's tool calls with `cfg.tools`' tool, run in `dir` (the project root).
    pub fn with_tools(mut self, dir: &std::path::Path) -> Self {
        self.tool = Toolbox::new(&self.cfg.tools, dir);
        self
    }

    /// Take rollouts from an inference server (the policy must have LoRA adapters
    /// once it has been updated: they are how the server gets the new weights).
    pub fn with_server(mut self, server: RolloutServer) -> Self {
        self.server = Some(server);
        self
    }

    fn prompts_per_round(&self) -> usize {
        self.cfg.prompts_per_round()
    }

    /// The prompt at global position `pos`: epochs are seeded shuffles of the data.
    fn prompt_at(&self, pos: u64) -> usize {
        let n = self.prompts.len() as u64;
        let mut order: Vec<usize> = (0..n as usize).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(pos / n)));
        order[(pos % n) as usize]
    }

    /// Sample the round's completions, score them, compute advantages and the
    /// training rows. With dynamic sampling, groups whose rewards all tie (no
    /// gradient) are dropped and fresh prompts sampled in their place, for up
    /// to `dynamic_sampling_max_rounds` extra rounds; the last round keeps its
    /// groups tied or not, so the batch is always full.
    fn rollout(&mut self, policy: &Transformer, step: u64) -> Result<Round> {
        let g = self.cfg.num_generations;
        let need = self.prompts_per_round();
        let (mut picked, mut completions, mut per_function, mut total) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut consumed, mut rounds, mut sampled_groups, mut dropped_groups) = (0u64, 0u64, 0usize, 0usize);
        let (mut t_generation, mut t_scoring, mut from_server) = (0.0, 0.0, false);
        let mut names = Vec::new();
        let t = Instant::now();
        let view = self.rollout_view(policy)?;
        t_generation += t.elapsed().as_secs_f64();
        // Local rollouts from a bf16 view keep their own log-probabilities, for the correction.
        let local_logprobs = view.is_some();
        while picked.len() < need {
            let want = need - picked.len();
            let batch: Vec<usize> =
                (0..want as u64).map(|i| self.prompt_at(self.state.data_pos + consumed + i)).collect();
            consumed += want as u64;
            rounds += 1;
            let prompt_ids: Vec<Vec<u32>> = batch.iter().map(|&i| self.prompts[i].ids.clone()).collect();
            let t = Instant::now();
            let (sampler, server) = match self.server.as_mut() {
                Some(server) => (server.sampler(policy, step)?, true),
                None => (Sampler::Local(view.as_ref().unwrap_or(policy)), false),
            };
            from_server = server;
            // The sampler's log-probabilities of its samples (a server's, or a bf16
            // view's) show how far off-policy they are, and correct for it.
            let logprobs = server || local_logprobs;
            let params = self.cfg.sampling();
            let comps = match self.tool.as_mut() {
                Some(tool) => sampler.sample_with_tools(
                    self.tok,
                    &prompt_ids,
                    g,
                    &params,
                    &mut self.state.rng,
                    logprobs,
                    &self.cfg.tools,
                    tool,
                )?,
                None => sampler.sample(self.tok, &prompt_ids, g, &params, &mut self.state.rng, logprobs)?,
            };
            t_generation += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let samples: Vec<Sample> = comps
                .iter()
                .map(|c| {
                    let p = &self.prompts[batch[c.prompt_index]];
                    Sample {
                        prompt: &p.question,
                        completion: &c.text,
                        answer: &p.answer,
                        tokens: model_tokens(c),
                        tool_results: self
                            .tool
                            .is_some()
                            .then(|| c.tool_calls.iter().map(|t| t.result.as_str()).collect()),
                    }
                })
                .collect();
            let scores = self.rewards.score(&samples)?;
            t_scoring += t.elapsed().as_secs_f64();
            names = scores.names.clone();
            for (k, &prompt) in batch.iter().enumerate() {
                let range = k * g..(k + 1) * g;
                let group: Vec<Completion> = comps[range.clone()].to_vec();
                let funcs: Vec<Vec<f32>> = scores.per_function.iter().map(|f| f[range.clone()].to_vec()).collect();
                let totals = scores.total[range].to_vec();
                sampled_groups += 1;
                let ties = totals.iter().all(|&x| x == totals[0]);
                // The last allowed round keeps every group, tied or not, so the batch is full.
                if self.cfg.dynamic_sampling && ties && rounds <= self.cfg.dynamic_sampling_max_rounds as u64 {
                    dropped_groups += 1;
                    continue;
                }
                picked.push(prompt);
                completions.extend(group);
                per_function.push(funcs);
                total.extend(totals);
            }
            if !self.cfg.dynamic_sampling {
                break;
            }
        }
        // Completions refer to their prompt's place in `picked`.
        for (k, c) in completions.iter_mut().enumerate() {
            c.prompt_index = k / g;
        }
        let per_function: Vec<Vec<f32>> = (0..names.len())
            .map(|f| per_function.iter().flat_map(|group| group[f].iter().copied()).collect())
            .collect();
        let scores = Scores { names, per_function, total };
        let advantages = match self.cfg.multi_objective_aggregation {
            Aggregation::SumThenNormalize => advantages(&scores.total, g, self.cfg.scale_rewards),
            Aggregation::NormalizeThenSum => {
                let weights: Vec<f32> = self.rewards.terms.iter().map(|t| t.weight).collect();
                advantages_normalize_then_sum(&scores.per_function, &weights, g)
            }
        };
        let prompt_ids: Vec<Vec<u32>> = picked.iter().map(|&i| self.prompts[i].ids.clone()).collect();
        let specs: Vec<RowSpec> = completions
            .iter()
            .map(|c| RowSpec {
                prompt: &prompt_ids[c.prompt_index],
                tokens: &c.tokens,
                eos: c.eos,
                tool_spans: &c.tool_spans,
            })
            .collect();
        let rows = build_rows(
            &specs,
            self.tok.eos_ids[0],
            self.cfg.max_completion_length,
            self.cfg.mask_truncated_completions,
        );
        let sampling =
            SamplingLogprobs::of(&completions, rows.completion_len).filter(|_| from_server || local_logprobs);
        if from_server
            && self.cfg.vllm_importance_sampling_correction
            && sampling.is_none()
            && !self.said_no_sampler_logprobs
        {
            // TRL's default is on; a server that returns text only cannot be corrected for.
            self.said_no_sampler_logprobs = true;
            let url = self.server.as_ref().map_or("the server", |s| s.client.url());
            eprintln!(
                "warning: vllm_importance_sampling_correction is skipped: {url} returns no log-probabilities \
                 (vLLM does, with its token ids); training goes on without the correction"
            );
            tracing::warn!(url, "no sampler log-probabilities: importance-sampling correction skipped");
        }
        tracing::debug!(completions = rows.len(), completion_len = rows.completion_len, "grpo training rows");
        Ok(Round {
            picked,
            completions,
            scores,
            advantages,
            rows,
            sampling,
            old: vec![],
            refs: vec![],
            iteration: 0,
            t_generation,
            t_scoring,
            t_reference: 0.0,
            consumed,
            sampled_groups,
            dropped_groups,
            rounds,
        })
    }

    /// The model local rollouts decode with under `rollout_dtype: bf16`: the
    /// policy's weights packed in bf16 for this round (`None`: the policy itself,
    /// for f32, a rollout server, or a machine where nothing packs, said once).
    fn rollout_view(&mut self, policy: &Transformer) -> Result<Option<Transformer>> {
        if self.cfg.rollout_dtype != RolloutDtype::Bf16 || self.server.is_some() {
            return Ok(None);
        }
        let view = policy.rollout_view(Precision::Bf16)?;
        if view.is_none() && !self.said_no_bf16_rollouts {
            self.said_no_bf16_rollouts = true;
            eprintln!(
                "warning: rollout_dtype: bf16 needs the CPU kernels on an AVX-512 CPU and an f32 model on the CPU; \
                 rollouts decode with the policy's f32 weights here"
            );
            tracing::warn!("rollout_dtype bf16 unavailable here: rollouts in f32");
        }
        Ok(view)
    }

    /// The micro-batches of a round: ranges of rows.
    fn micro_batches(&self, rows: usize) -> Vec<Range<usize>> {
        let micro = self.cfg.training.per_device_train_batch_size;
        (0..rows).step_by(micro).map(|s| s..(s + micro).min(rows)).collect()
    }

    /// Log-probabilities [completions, completion_len] of completions `r` under `pass` (f32).
    fn completion_logprobs(&self, model: &Transformer, rows: &Rows, r: &Range<usize>, pass: Pass) -> Result<Tensor> {
        let packed = rows.pack(r.clone());
        let batch = Batch::shared_prefix(&packed.rows, self.tok.pad_id, &model.device)?;
        let lp = model.logprobs_at(&batch, &packed.at, &packed.targets, self.cfg.temperature as f64, pass)?;
        Ok(lp.reshape((r.len(), rows.completion_len))?.to_dtype(DType::F32)?)
    }

    /// The policy's log-probabilities and entropies [completions, completion_len]
    /// of completions `r` under the training pass; the entropy keeps its graph
    /// only when the loss has an entropy term.
    fn policy_logprobs_and_entropy(
        &self,
        model: &Transformer,
        rows: &Rows,
        r: &Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let packed = rows.pack(r.clone());
        let batch = Batch::shared_prefix(&packed.rows, self.tok.pad_id, &model.device)?;
        let (lp, h) = model.logprobs_and_entropy_at(
            &batch,
            &packed.at,
            &packed.targets,
            self.cfg.temperature as f64,
            Pass::TRAIN,
        )?;
        let shape = (r.len(), rows.completion_len);
        let h = h.reshape(shape)?.to_dtype(DType::F32)?;
        let h = if self.cfg.needs_entropy_gradient() { h } else { h.detach() };
        Ok((lp.reshape(shape)?.to_dtype(DType::F32)?, h))
    }

    /// πold (μ > 1, from the policy before this round's updates) and πref (β > 0), without a graph.
    fn score(&self, policy: &Transformer, round: &mut Round) -> Result<()> {
        let t = Instant::now();
        for r in self.micro_batches(round.rows.len()) {
            if self.cfg.num_iterations > 1 {
                round.old.push(self.completion_logprobs(policy, &round.rows, &r, Pass::SCORE)?);
            }
            if self.cfg.loss.beta != 0.0 {
                round.refs.push(match &self.reference {
                    Some(reference) => self.completion_logprobs(reference, &round.rows, &r, Pass::SCORE)?,
                    None => {
                        self.completion_logprobs(policy, &round.rows, &r, Pass { adapters: false, ..Pass::SCORE })?
                    }
                });
            }
        }
        round.t_reference = t.elapsed().as_secs_f64();
        Ok(())
    }
}

impl Algorithm for GrpoAlgorithm<'_> {
    type State = GrpoState;
    type Log = GrpoLog;

    fn total_steps(&self) -> u64 {
        let rounds = self.cfg.training.total_steps(self.prompts.len(), self.prompts_per_round());
        match self.cfg.training.max_steps {
            Some(s) => s,
            None => rounds * self.cfg.num_iterations as u64,
        }
    }

    fn state(&self) -> GrpoState {
        self.state.clone()
    }

    fn restore(&mut self, state: GrpoState) {
        self.state = state;
        self.round = None;
    }

    fn at_boundary(&self) -> bool {
        self.round.is_none()
    }

    /// `sync_ref_model`: every `ref_model_sync_steps` optimizer steps the
    /// reference moves toward the policy (TRL's SyncRefModelCallback, on step end).
    fn after_update(&mut self, policy: &Transformer, step: u64) -> Result<()> {
        if !self.cfg.sync_ref_model || !step.is_multiple_of(self.cfg.ref_model_sync_steps) {
            return Ok(());
        }
        if let Some(reference) = self.reference.as_mut() {
            reference.blend_weights(&policy.tensors(), self.cfg.ref_model_mixup_alpha)?;
            self.state.reference_synced = true;
            tracing::debug!(step, alpha = self.cfg.ref_model_mixup_alpha, "reference synced toward the policy");
        }
        Ok(())
    }

    fn checkpoint_tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(match (&self.reference, self.state.reference_synced) {
            (Some(reference), true) => reference.tensors().into_iter().collect(),
            _ => Default::default(),
        })
    }

    fn restore_tensors(&mut self, tensors: std::collections::HashMap<String, Tensor>) -> Result<()> {
        if !self.state.reference_synced {
            return Ok(());
        }
        let reference = self.reference.as_mut().ok_or_else(|| anyhow::anyhow!("a synced reference needs β > 0"))?;
        if tensors.is_empty() {
            anyhow::bail!("the checkpoint lacks the synced reference model (sync_ref_model) it needs to resume");
        }
        reference.blend_weights(&tensors.into_iter().collect(), 1.0)
    }

    fn step(&mut self, policy: &Transformer, step: u64) -> Result<StepReport<GrpoLog>> {
        let mut round = match self.round.take() {
            Some(r) => r,
            None => {
                let mut r = self.rollout(policy, step)?;
                self.score(policy, &mut r)?;
                r
            }
        };
        let first = round.iteration == 0;
        let t = Instant::now();
        let cfg = &self.cfg;
        let global_tokens: f64 = round.rows.masks.iter().map(|m| m.iter().sum::<f32>() as f64).sum();
        let chunks = self.micro_batches(round.rows.len());
        // The entropy bonus this step: the static coefficient, or the adaptive
        // controller's, applied while the last step's entropy is at or below the target.
        let entropy_coef = if cfg.use_adaptive_entropy {
            let last = self.state.last_world_entropy.unwrap_or(f64::INFINITY);
            if last <= cfg.entropy_target {
                self.state.entropy_coef
            } else {
                0.0
            }
        } else {
            cfg.entropy_coef
        };
        let loss_cfg = cfg.loss_config(chunks.len(), global_tokens, entropy_coef);
        let (mut loss_sum, mut stats) = (0.0, LossStats::default());
        // The entropy over the tokens the policy term acts on, for the adaptive controller.
        let (mut window_entropy, mut window_tokens) = (0.0, 0.0);
        let mut trained_tokens = 0;
        let (mut logp_diff, mut is_ratio) = (Extent::default(), Extent::default());
        for (ci, r) in chunks.iter().enumerate() {
            trained_tokens += round.rows.tokens(r);
            let mask = Tensor::new(round.rows.masks[r.clone()].to_vec(), &policy.device)?;
            let adv = Tensor::new(&round.advantages[r.clone()], &policy.device)?;
            let (logp, entropy) = self.policy_logprobs_and_entropy(policy, &round.rows, r)?;
            let old = if cfg.num_iterations > 1 { round.old[ci].clone() } else { logp.detach() };
            let entropy_mask = if cfg.top_entropy_quantile < 1.0 {
                Some(high_entropy_mask(&entropy, &mask, 1.0 - cfg.top_entropy_quantile)?)
            } else {
                None
            };
            let mut is_weight = None;
            let mut sampling_logp = None;
            if let Some(sp) = &round.sampling {
                let dev = &policy.device;
                let values = Tensor::new(sp.values[r.clone()].to_vec(), dev)?;
                let known = Tensor::new(sp.known[r.clone()].to_vec(), dev)?;
                logp_diff.add(&(old.detach() - &values)?.abs()?, &(&mask * &known)?)?;
                if cfg.vllm_importance_sampling_correction {
                    let w = importance_weights(
                        &old,
                        &values,
                        &known,
                        &mask,
                        cfg.vllm_importance_sampling_mode,
                        cfg.vllm_importance_sampling_clip_min,
                        cfg.vllm_importance_sampling_clip_max,
                    )?;
                    is_ratio.add(&w, &mask)?;
                    is_weight = Some(w);
                }
                // Tokens the server did not score keep πold (no drift evidence), as TRL's NaN → 0.
                sampling_logp = Some(((&values * &known)? + (old.detach() * known.affine(-1.0, 1.0)?)?)?);
            }
            let inputs = LossInputs {
                logp: &logp,
                old_logp: &old,
                ref_logp: round.refs.get(ci),
                sampling_logp: sampling_logp.as_ref(),
                adv: &adv,
                mask: &mask,
                is_weight: is_weight.as_ref(),
                entropy: Some(&entropy),
                entropy_mask: entropy_mask.as_ref(),
            };
            let (l, s) = loss(&inputs, &loss_cfg)?;
            loss_sum += transfer::to_scalar::<f64>(&l.to_dtype(DType::F64)?)?;
            stats.add_weighted(&s);
            if cfg.use_adaptive_entropy {
                let (h, n) = match &entropy_mask {
                    Some(m) => {
                        let eff = (&mask * m)?;
                        let sums = transfer::to_vec1::<f32>(&Tensor::stack(
                            &[(entropy.detach() * &eff)?.sum_all()?, eff.sum_all()?],
                            0,
                        )?)?;
                        (sums[0] as f64, sums[1] as f64)
                    }
                    None => (s.entropy * s.tokens, s.tokens),
                };
                window_entropy += h;
                window_tokens += n;
            }
            policy.backward(&l)?;
        }
        if cfg.use_adaptive_entropy {
            let world = window_entropy / window_tokens.max(1.0);
            let c = self.state.entropy_coef;
            self.state.entropy_coef = if world <= cfg.entropy_target {
                (c + cfg.entropy_coef_delta).min(cfg.entropy_coef_max)
            } else {
                (c - cfg.entropy_coef_delta).max(cfg.entropy_coef_min)
            };
            self.state.last_world_entropy = Some(world);
        }
        let t_policy = t.elapsed().as_secs_f64();

        let scores = &round.scores;
        let comps = &round.completions;
        let group_stds: Vec<f32> = scores.total.chunks(cfg.num_generations).map(std).collect();
        // As TRL counts: the model's tokens, not the tools' results.
        let gen_tokens: usize = comps.iter().map(model_tokens).sum();
        let calls: usize = comps.iter().map(|c| c.tool_calls.len()).sum();
        let failures: usize = comps.iter().flat_map(|c| &c.tool_calls).filter(|t| t.error).count();
        let mut per_function = std::collections::BTreeMap::new();
        for (name, m, s) in scores.stats() {
            per_function.insert(format!("rewards/{name}/mean"), m as f64);
            per_function.insert(format!("rewards/{name}/std"), s as f64);
        }
        let completions =
            (first && cfg.log_completions > 0 && (step + 1).is_multiple_of(cfg.log_completions)).then(|| {
                comps
                    .iter()
                    .zip(&scores.total)
                    .take(cfg.num_generations.min(4))
                    .map(|(c, r)| LoggedCompletion {
                        prompt: self.prompts[round.picked[c.prompt_index]].question.clone(),
                        completion: c.text.clone(),
                        reward: *r,
                    })
                    .collect()
            });
        let reward = mean(&scores.total) as f64;
        let stats = stats.weighted_mean();
        let loss_type = cfg.loss.loss_type;
        let log = GrpoLog {
            reward,
            reward_std: mean(&group_stds) as f64,
            frac_reward_zero_std: group_stds.iter().filter(|s| **s == 0.0).count() as f64 / group_stds.len() as f64,
            mean_length: gen_tokens as f64 / comps.len() as f64,
            clipped_ratio: comps.iter().filter(|c| !c.eos).count() as f64 / comps.len() as f64,
            kl: stats.kl,
            clip_region: stats.clip_region,
            clip_low: stats.clip_low,
            clip_high: stats.clip_high,
            entropy: stats.entropy,
            cispo_clip: (loss_type == LossType::Cispo).then_some(stats.cispo_clip),
            vespo_phi: (loss_type == LossType::Vespo).then_some(stats.vespo_phi),
            entropy_coef: (cfg.entropy_coef != 0.0 || cfg.use_adaptive_entropy).then_some(entropy_coef),
            dropped_fraction: (cfg.dynamic_sampling && first)
                .then(|| round.dropped_groups as f64 / round.sampled_groups.max(1) as f64),
            sampling_rounds: (cfg.dynamic_sampling && first).then_some(round.rounds),
            generation_tps: if first { gen_tokens as f64 / round.t_generation.max(1e-9) } else { 0.0 },
            t_generation: if first { round.t_generation } else { 0.0 },
            t_scoring: if first { round.t_scoring } else { 0.0 },
            t_reference: if first { round.t_reference } else { 0.0 },
            t_policy,
            sampling_logp_difference_mean: (logp_diff.n > 0.0).then(|| logp_diff.mean()),
            sampling_logp_difference_max: (logp_diff.n > 0.0).then_some(logp_diff.max),
            is_ratio_min: (is_ratio.n > 0.0).then_some(is_ratio.min),
            is_ratio_mean: (is_ratio.n > 0.0).then(|| is_ratio.mean()),
            is_ratio_max: (is_ratio.n > 0.0).then_some(is_ratio.max),
            per_function,
            tool_call_frequency: self.tool.is_some().then(|| calls as f64 / comps.len().max(1) as f64),
            tool_failure_frequency: self.tool.is_some().then(|| failures as f64 / calls.max(1) as f64),
            completions,
        };
        if first {
            self.rewards_seen.push(reward);
        }
        round.iteration += 1;
        if round.iteration < cfg.num_iterations && step + 1 < self.total_steps() {
            self.round = Some(round);
        } else {
            self.state.data_pos += round.consumed;
        }
        Ok(StepReport { loss: loss_sum, log, tokens: trained_tokens, message: format!("reward {reward:.3}") })
    }

    fn summary(&self) -> serde_json::Value {
        let r = &self.rewards_seen;
        let tail = &r[r.len().saturating_sub(10)..];
        serde_json::json!({
            "prompts_seen": self.state.data_pos,
            "reward_first": r.first(),
            "reward_last10_mean": tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        })
    }
}

/// The tokens the model wrote (a completion's tools' results left out).
fn model_tokens(c: &Completion) -> usize {
    c.tokens.len() - c.tool_spans.iter().map(|r| r.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_keep_their_end() {
        assert_eq!(truncate_prompt(vec![1, 2, 3, 4, 5], 3), vec![3, 4, 5]);
        assert_eq!(truncate_prompt(vec![1, 2], 3), vec![1, 2]);
    }
}
