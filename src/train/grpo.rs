//! GRPO as an algorithm of the training loop. Per round: sample
//! `num_generations` completions for each of
//! per_device_train_batch_size × gradient_accumulation_steps / num_generations
//! prompts (one prefill per prompt), score them with the reward set, compute
//! group-relative advantages, then `num_iterations` optimizer steps on the
//! clipped surrogate. The pieces: [`GrpoAlgorithm::rollout`] (sampling and
//! scoring), [`build_rows`] (each completion's tokens and loss mask; pure),
//! [`Rows::pack`] (a micro-batch as the model takes it: each prompt once,
//! followed by its completions, which attend to it and to themselves; pure),
//! [`GrpoAlgorithm::score`] (old and reference log-probabilities, no graph),
//! and the policy step in [`Algorithm::step`].

use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grpo_loss::{advantages, importance_weights, loss, IsMode, LossConfig, LossType, ScaleRewards};
use super::rollout_sync::RolloutServer;
use super::trainer::{Algorithm, Hyper, StepReport};
use crate::model::{Batch, ChatTokenizer, Completion, Pass, SamplingParams, Transformer};
use crate::rewards::set::{mean, std};
use crate::rewards::{RewardSet, Sample, Scores};
use crate::rollout::Sampler;

/// GRPO's own settings (TRL's names); the shared ones are in [`Hyper`].
/// Defaults are TRL's GRPOConfig's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
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
    /// The starting weights rounded to bf16, computed in the policy's dtype (see README: memory).
    Bf16,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
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
    pub const KEYS: &'static [&'static str] = &[
        "num_generations",
        "max_prompt_length",
        "max_completion_length",
        "temperature",
        "top_p",
        "top_k",
        "beta",
        "epsilon",
        "epsilon_high",
        "loss_type",
        "scale_rewards",
        "num_iterations",
        "mask_truncated_completions",
        "log_completions",
        "reference_dtype",
        "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max",
    ];

    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_completion_length,
            stop: Vec::new(),
        }
    }
}

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
    /// Rollouts from a server: |log πold − log πsampler| over completion tokens.
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completions: Option<Vec<LoggedCompletion>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoggedCompletion {
    pub prompt: String,
    pub completion: String,
    pub reward: f32,
}

/// One round's completions as training data: each completion's tokens (EOS
/// appended when it ended on it) after its prompt, and its loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// Per completion: its prompt's ids.
    pub prompts: Vec<Vec<u32>>,
    /// Per completion: its tokens, EOS included when it ended on it.
    pub completions: Vec<Vec<u32>>,
    /// [completions][completion_len]: 1 for completion tokens the loss counts.
    pub masks: Vec<Vec<f32>>,
    /// The longest completion (with EOS): the width of log-probability matrices.
    pub completion_len: usize,
}

/// What [`build_rows`] needs to know of a sampled completion.
#[derive(Debug, Clone)]
pub struct RowSpec<'a> {
    pub prompt: &'a [u32],
    pub tokens: &'a [u32],
    /// Ended by EOS (which training appends back, so the model learns to stop).
    pub eos: bool,
}

/// The training rows and loss masks of a round. A completion cut off at
/// `max_completion_length` is masked out entirely when `mask_truncated`.
pub fn build_rows(specs: &[RowSpec], eos_id: u32, max_completion_length: usize, mask_truncated: bool) -> Rows {
    let completions: Vec<Vec<u32>> =
        specs.iter().map(|s| s.tokens.iter().copied().chain(s.eos.then_some(eos_id)).collect()).collect();
    let clen = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let masks = specs
        .iter()
        .zip(&completions)
        .map(|(s, comp)| {
            let truncated = !s.eos && s.tokens.len() >= max_completion_length;
            let keep = !(mask_truncated && truncated);
            (0..clen).map(|j| if keep && j < comp.len() { 1.0 } else { 0.0 }).collect()
        })
        .collect();
    Rows { prompts: specs.iter().map(|s| s.prompt.to_vec()).collect(), completions, masks, completion_len: clen }
}

/// A packed row takes further completions of its prompt while it stays within
/// this many tokens; past it the prompt starts a new row. The attention mask
/// is [rows, T, T], so unbounded rows (16 completions of 1,024 tokens) would
/// cost more in the mask than the shared prompt saves.
pub const PACKED_ROW_TOKENS: usize = 2048;

/// Completions of a micro-batch as the model takes them: each prompt once,
/// followed by its completions in the micro-batch (a [`Batch::shared_prefix`]
/// row), and where to read each completion token's log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// (prompt, its completions), one row each.
    pub rows: Vec<(Vec<u32>, Vec<Vec<u32>>)>,
    /// Per completion and completion position (row-major, `completion_len` per
    /// completion): the flat position (row × T + t) whose output predicts the
    /// token. The prompt's last position predicts every completion's first token.
    pub at: Vec<u32>,
    /// The predicted tokens (0 past a completion's end, where the mask is 0).
    pub targets: Vec<u32>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// Prompt + completion tokens of completions `r`, counted per completion
    /// (as TRL counts trained tokens), whatever the layout computes once.
    pub fn tokens(&self, r: &Range<usize>) -> usize {
        r.clone().map(|i| self.prompts[i].len() + self.completions[i].len()).sum()
    }

    /// Completions `r` packed: consecutive completions of one prompt share one
    /// row, so the prompt goes through the model once per group instead of
    /// once per completion. Each completion attends to its prompt and itself
    /// only, at the positions it would have alone: the same computation as
    /// one row per completion, in a different float order.
    pub fn pack(&self, r: Range<usize>) -> Packed {
        let mut rows: Vec<(Vec<u32>, Vec<Vec<u32>>)> = Vec::new();
        // Per completion: (row, offset of its first token in the row).
        let mut place = Vec::with_capacity(r.len());
        for i in r.clone() {
            let n = rows.len();
            match rows.last_mut() {
                Some((p, cs))
                    if *p == self.prompts[i]
                        && p.len() + cs.iter().map(Vec::len).sum::<usize>() + self.completions[i].len()
                            <= PACKED_ROW_TOKENS =>
                {
                    place.push((n - 1, p.len() + cs.iter().map(Vec::len).sum::<usize>()));
                    cs.push(self.completions[i].clone());
                }
                _ => {
                    place.push((rows.len(), self.prompts[i].len()));
                    rows.push((self.prompts[i].clone(), vec![self.completions[i].clone()]));
                }
            }
        }
        let t = rows.iter().map(|(p, cs)| p.len() + cs.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
        let clen = self.completion_len;
        let (mut at, mut targets) = (Vec::with_capacity(r.len() * clen), Vec::with_capacity(r.len() * clen));
        for (i, &(row, offset)) in r.zip(&place) {
            let comp = &self.completions[i];
            let base = row * t;
            let prompt_last = self.prompts[i].len().saturating_sub(1);
            for j in 0..clen {
                if j < comp.len() {
                    at.push((base + if j == 0 { prompt_last } else { offset + j - 1 }) as u32);
                    targets.push(comp[j]);
                } else {
                    at.push(base as u32);
                    targets.push(0);
                }
            }
        }
        Packed { rows, at, targets }
    }
}

/// A round's samples, scores and advantages, reused by its `num_iterations` updates.
struct Round {
    picked: Vec<usize>,
    completions: Vec<Completion>,
    scores: Scores,
    advantages: Vec<f32>,
    rows: Rows,
    /// The sampler's log-probabilities aligned with `rows.masks` (a server's rollouts).
    sampling: Option<SamplingLogprobs>,
    /// πold per micro-batch (μ > 1) and πref per micro-batch (β > 0).
    old: Vec<Tensor>,
    refs: Vec<Tensor>,
    iteration: usize,
    t_generation: f64,
    t_scoring: f64,
    t_reference: f64,
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
        let v: Vec<Vec<f32>> = values.to_dtype(DType::F32)?.to_vec2()?;
        let m: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
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
    hp: Hyper,
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
}

impl<'a> GrpoAlgorithm<'a> {
    pub fn new(
        cfg: GrpoConfig,
        hp: Hyper,
        policy: &Transformer,
        tok: &'a ChatTokenizer,
        rewards: &'a RewardSet,
        prompts: Vec<GrpoPrompt>,
        seed: u64,
    ) -> Result<Self> {
        let reference = if cfg.beta != 0.0 && policy.lora.is_none() {
            let storage = match cfg.reference_dtype {
                ReferenceDtype::F32 => DType::F32,
                ReferenceDtype::Bf16 => DType::BF16,
            };
            Some(policy.frozen_copy(storage, policy.compute_dtype)?)
        } else {
            None
        };
        let state = GrpoState { data_pos: 0, rng: ChaCha8Rng::seed_from_u64(seed) };
        Ok(GrpoAlgorithm {
            cfg,
            hp,
            tok,
            rewards,
            prompts,
            reference,
            seed,
            state,
            round: None,
            rewards_seen: vec![],
            server: None,
        })
    }

    /// Take rollouts from an inference server (the policy must have LoRA adapters
    /// once it has been updated: they are how the server gets the new weights).
    pub fn with_server(mut self, server: RolloutServer) -> Self {
        self.server = Some(server);
        self
    }

    fn prompts_per_round(&self) -> usize {
        self.hp.per_step() / self.cfg.num_generations
    }

    /// The prompt at global position `pos`: epochs are seeded shuffles of the data.
    fn prompt_at(&self, pos: u64) -> usize {
        let n = self.prompts.len() as u64;
        let mut order: Vec<usize> = (0..n as usize).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(pos / n)));
        order[(pos % n) as usize]
    }

    /// Sample the round's completions, score them, compute advantages and the training rows.
    fn rollout(&mut self, policy: &Transformer, step: u64) -> Result<Round> {
        let picked: Vec<usize> =
            (0..self.prompts_per_round() as u64).map(|i| self.prompt_at(self.state.data_pos + i)).collect();
        let prompt_ids: Vec<Vec<u32>> = picked.iter().map(|&i| self.prompts[i].ids.clone()).collect();
        let t = Instant::now();
        let (sampler, from_server) = match self.server.as_mut() {
            Some(server) => (server.sampler(policy, step)?, true),
            None => (Sampler::Local(policy), false),
        };
        // A server's log-probabilities of its samples show how far off-policy they are.
        let completions = sampler.sample(
            self.tok,
            &prompt_ids,
            self.cfg.num_generations,
            &self.cfg.sampling(),
            &mut self.state.rng,
            from_server,
        )?;
        let t_generation = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let samples: Vec<Sample> = completions
            .iter()
            .map(|c| {
                let p = &self.prompts[picked[c.prompt_index]];
                Sample { prompt: &p.question, completion: &c.text, answer: &p.answer, tokens: c.tokens.len() }
            })
            .collect();
        let scores = self.rewards.score(&samples);
        let advantages = advantages(&scores.total, self.cfg.num_generations, self.cfg.scale_rewards);
        let t_scoring = t.elapsed().as_secs_f64();
        let specs: Vec<RowSpec> = completions
            .iter()
            .map(|c| RowSpec { prompt: &prompt_ids[c.prompt_index], tokens: &c.tokens, eos: c.eos })
            .collect();
        let rows = build_rows(
            &specs,
            self.tok.eos_ids[0],
            self.cfg.max_completion_length,
            self.cfg.mask_truncated_completions,
        );
        let sampling = SamplingLogprobs::of(&completions, rows.completion_len).filter(|_| from_server);
        if self.cfg.vllm_importance_sampling_correction && sampling.is_none() {
            anyhow::bail!(
                "vllm_importance_sampling_correction needs the sampler's log-probabilities, and {} \
                 returned none (vLLM does, with its token ids)",
                self.server.as_ref().map_or("local generation", |s| s.client.url())
            );
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
        })
    }

    /// The micro-batches of a round: ranges of rows.
    fn micro_batches(&self, rows: usize) -> Vec<Range<usize>> {
        let micro = self.hp.per_device_train_batch_size;
        (0..rows).step_by(micro).map(|s| s..(s + micro).min(rows)).collect()
    }

    /// Log-probabilities [completions, completion_len] of completions `r` under `pass` (f32).
    fn completion_logprobs(&self, model: &Transformer, rows: &Rows, r: &Range<usize>, pass: Pass) -> Result<Tensor> {
        let packed = rows.pack(r.clone());
        let batch = Batch::shared_prefix(&packed.rows, self.tok.pad_id, &model.device)?;
        let lp = model.logprobs_at(&batch, &packed.at, &packed.targets, self.cfg.temperature as f64, pass)?;
        Ok(lp.reshape((r.len(), rows.completion_len))?.to_dtype(DType::F32)?)
    }

    /// πold (μ > 1, from the policy before this round's updates) and πref (β > 0), without a graph.
    fn score(&self, policy: &Transformer, round: &mut Round) -> Result<()> {
        let t = Instant::now();
        for r in self.micro_batches(round.rows.len()) {
            if self.cfg.num_iterations > 1 {
                round.old.push(self.completion_logprobs(policy, &round.rows, &r, Pass::SCORE)?);
            }
            if self.cfg.beta != 0.0 {
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
        let rounds = self.hp.total_steps(self.prompts.len(), self.prompts_per_round());
        match self.hp.max_steps {
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
        let loss_cfg = LossConfig {
            loss_type: cfg.loss_type,
            epsilon_low: cfg.epsilon,
            epsilon_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
            beta: cfg.beta,
            max_completion_length: cfg.max_completion_length,
            micro_batches: chunks.len(),
            global_tokens,
        };
        let (mut loss_sum, mut kl_sum, mut clip_sum, mut tok_sum) = (0.0, 0.0, 0.0, 0.0);
        let mut trained_tokens = 0;
        let (mut logp_diff, mut is_ratio) = (Extent::default(), Extent::default());
        for (ci, r) in chunks.iter().enumerate() {
            trained_tokens += round.rows.tokens(r);
            let mask = Tensor::new(round.rows.masks[r.clone()].to_vec(), &policy.device)?;
            let adv = Tensor::new(&round.advantages[r.clone()], &policy.device)?;
            let logp = self.completion_logprobs(policy, &round.rows, r, Pass::TRAIN)?;
            let old = if cfg.num_iterations > 1 { round.old[ci].clone() } else { logp.detach() };
            let mut is_weight = None;
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
            }
            let (l, s) = loss(&logp, &old, round.refs.get(ci), &adv, &mask, is_weight.as_ref(), &loss_cfg)?;
            loss_sum += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            kl_sum += s.kl * s.tokens;
            clip_sum += s.clip_region * s.tokens;
            tok_sum += s.tokens;
            policy.backward(&l)?;
        }
        let t_policy = t.elapsed().as_secs_f64();

        let scores = &round.scores;
        let comps = &round.completions;
        let group_stds: Vec<f32> = scores.total.chunks(cfg.num_generations).map(std).collect();
        let gen_tokens: usize = comps.iter().map(|c| c.tokens.len()).sum();
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
        let log = GrpoLog {
            reward,
            reward_std: mean(&group_stds) as f64,
            frac_reward_zero_std: group_stds.iter().filter(|s| **s == 0.0).count() as f64 / group_stds.len() as f64,
            mean_length: gen_tokens as f64 / comps.len() as f64,
            clipped_ratio: comps.iter().filter(|c| !c.eos).count() as f64 / comps.len() as f64,
            kl: kl_sum / tok_sum.max(1.0),
            clip_region: clip_sum / tok_sum.max(1.0),
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
            completions,
        };
        if first {
            self.rewards_seen.push(reward);
        }
        round.iteration += 1;
        if round.iteration < cfg.num_iterations && step + 1 < self.total_steps() {
            self.round = Some(round);
        } else {
            self.state.data_pos += self.prompts_per_round() as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_append_eos_and_mask_past_each_completion() {
        let (p1, p2) = (vec![10u32, 11, 12], vec![20u32]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2], eos: true },
            RowSpec { prompt: &p2, tokens: &[3, 4, 5, 6], eos: false },
        ];
        let r = build_rows(&specs, 99, 4, false);
        assert_eq!(r.completion_len, 4);
        assert_eq!(r.completions, vec![vec![1, 2, 99], vec![3, 4, 5, 6]]);
        assert_eq!(r.prompts, vec![p1, p2]);
        assert_eq!(r.masks, vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0; 4]]);
        assert_eq!(r.tokens(&(0..2)), 6 + 5, "prompt + completion per completion");
    }

    #[test]
    fn truncated_completions_are_masked_out_only_when_asked() {
        let p = vec![7u32];
        let specs = [
            RowSpec { prompt: &p, tokens: &[1, 2, 3], eos: false }, // hit max_completion_length = 3
            RowSpec { prompt: &p, tokens: &[1], eos: false },       // stopped by a stop string: not truncated
            RowSpec { prompt: &p, tokens: &[1, 2], eos: true },
        ];
        let kept = build_rows(&specs, 99, 3, false);
        assert_eq!(kept.masks[0], vec![1.0, 1.0, 1.0]);
        let masked = build_rows(&specs, 99, 3, true);
        assert_eq!(masked.masks[0], vec![0.0, 0.0, 0.0]);
        assert_eq!(masked.masks[1], vec![1.0, 0.0, 0.0]);
        assert_eq!(masked.masks[2], vec![1.0, 1.0, 1.0]);
        assert_eq!(masked.completions, kept.completions, "masking changes the loss, not the rows");
    }

    #[test]
    fn a_group_shares_one_row_and_each_token_is_read_where_it_is_predicted() {
        let (p1, p2) = (vec![10u32, 11, 12], vec![20u32]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2], eos: true },
            RowSpec { prompt: &p1, tokens: &[3], eos: true },
            RowSpec { prompt: &p2, tokens: &[4, 5, 6, 7], eos: false },
        ];
        let rows = build_rows(&specs, 99, 8, false);
        let p = rows.pack(0..3);
        assert_eq!(p.rows, vec![(p1.clone(), vec![vec![1, 2, 99], vec![3, 99]]), (p2, vec![vec![4, 5, 6, 7]])]);
        // Rows are 8 long (3 + 3 + 2; 1 + 4 padded). Completion 0 starts at 3, completion 1 at 6,
        // and both first tokens are predicted by the prompt's last position (2).
        assert_eq!(p.at, vec![2, 3, 4, 0, 2, 6, 0, 0, 8, 9, 10, 11]);
        assert_eq!(p.targets, vec![1, 2, 99, 0, 3, 99, 0, 0, 4, 5, 6, 7]);
        // A micro-batch that splits a group packs its part of it.
        let p = rows.pack(1..3);
        assert_eq!(p.rows[0], (p1.clone(), vec![vec![3, 99]]));
        assert_eq!(&p.at[..4], &[2, 3, 0, 0]);
        // A row stops growing at PACKED_ROW_TOKENS: the prompt starts another.
        let long = vec![1u32; PACKED_ROW_TOKENS / 2 - 2];
        let specs = vec![RowSpec { prompt: &p1, tokens: &long, eos: false }; 3];
        let p = build_rows(&specs, 99, 8, false).pack(0..3);
        let members: Vec<usize> = p.rows.iter().map(|(_, cs)| cs.len()).collect();
        assert_eq!(members, [2, 1], "3 + 2 × 1022 = 2047 fits in a row, a third completion does not");
        assert_eq!(p.at[2 * (PACKED_ROW_TOKENS / 2 - 2)], 2047 + 2, "the third completion reads from row 1's prompt");
    }

    /// The packed layout computes what one row per completion computes: the same
    /// log-probabilities and the same gradients, up to float order.
    #[test]
    fn packed_groups_give_the_per_completion_values_and_gradients() {
        use crate::model::{Config, Transformer};
        use candle_core::Device;
        let cfg = Config::from_json(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "max_position_embeddings": 128
        }))
        .unwrap();
        let mut m = Transformer::random(cfg, 3, &Device::Cpu).unwrap();
        m.gradient_checkpointing = true;
        let (p1, p2) = (vec![5u32, 9, 13, 2, 40], vec![7u32, 8]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2, 3], eos: true },
            RowSpec { prompt: &p1, tokens: &[4], eos: false },
            RowSpec { prompt: &p1, tokens: &[6, 6, 6, 6, 6], eos: false },
            RowSpec { prompt: &p2, tokens: &[11, 12], eos: true },
        ];
        let rows = build_rows(&specs, 0, 8, false);
        let n = rows.len();
        let clen = rows.completion_len;
        let mask = Tensor::new(rows.masks.clone(), &Device::Cpu).unwrap();
        // Packed: the layout GRPO trains on.
        let packed = rows.pack(0..n);
        let b = Batch::shared_prefix(&packed.rows, 0, &Device::Cpu).unwrap();
        let lp = m.logprobs_at(&b, &packed.at, &packed.targets, 0.7, Pass::TRAIN).unwrap().reshape((n, clen)).unwrap();
        m.backward(&(&lp * &mask).unwrap().sum_all().unwrap()).unwrap();
        let (packed_lp, packed_g): (Vec<Vec<f32>>, _) = ((&lp * &mask).unwrap().to_vec2().unwrap(), m.take_grads());
        // One left-padded row per completion.
        let plen = rows.prompts.iter().map(Vec::len).max().unwrap();
        let seqs: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                let mut s = vec![0; plen - rows.prompts[i].len()];
                s.extend(&rows.prompts[i]);
                s.extend(&rows.completions[i]);
                s.extend(std::iter::repeat_n(0, clen - rows.completions[i].len()));
                s
            })
            .collect();
        let valid: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                let pad = plen - rows.prompts[i].len();
                let len = pad + rows.prompts[i].len() + rows.completions[i].len();
                (0..plen + clen).map(|j| j >= pad && j < len).collect()
            })
            .collect();
        let b = Batch::from_rows(seqs, valid, &Device::Cpu).unwrap();
        let lp = m.next_token_logprobs_range(&b, plen - 1, clen, 0.7, Pass::TRAIN).unwrap();
        m.backward(&(&lp * &mask).unwrap().sum_all().unwrap()).unwrap();
        let (row_lp, row_g): (Vec<Vec<f32>>, _) = ((&lp * &mask).unwrap().to_vec2().unwrap(), m.take_grads());
        for (a, b) in packed_lp.iter().flatten().zip(row_lp.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "log-probability {a} packed vs {b} per row");
        }
        assert!(packed_lp.iter().flatten().any(|x| *x != 0.0));
        assert_eq!(packed_g.len(), row_g.len());
        for (name, g) in &packed_g {
            let d = (g - &row_g[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * scale.max(1e-3), "{name}: max |Δ grad| {d} (scale {scale})");
        }
    }

    #[test]
    fn the_key_list_names_every_field() {
        let v = serde_json::to_value(GrpoConfig::default()).unwrap();
        let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut keys = GrpoConfig::KEYS.to_vec();
        fields.sort();
        keys.sort();
        assert_eq!(fields, keys);
    }

    #[test]
    fn long_prompts_keep_their_end() {
        assert_eq!(truncate_prompt(vec![1, 2, 3, 4, 5], 3), vec![3, 4, 5]);
        assert_eq!(truncate_prompt(vec![1, 2], 3), vec![1, 2]);
    }
}
