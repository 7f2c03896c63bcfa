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
mod rows;

pub use config::{GrpoConfig, ReferenceDtype};
pub use rows::{build_rows, Packed, RowSpec, Rows, PACKED_ROW_TOKENS};

use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grpo_loss::{advantages, importance_weights, loss, LossConfig};
use super::rollout_sync::RolloutServer;
use super::trainer::{Algorithm, StepReport};
use crate::kernels::transfer;
use crate::model::{Batch, ChatTokenizer, Completion, Pass, Transformer};
use crate::rewards::set::{mean, std};
use crate::rewards::{RewardSet, Sample, Scores};
use crate::rollout::Sampler;

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
        self.cfg.prompts_per_round()
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
        let scores = self.rewards.score(&samples)?;
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
            loss_sum += transfer::to_scalar::<f64>(&l.to_dtype(DType::F64)?)?;
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
    fn long_prompts_keep_their_end() {
        assert_eq!(truncate_prompt(vec![1, 2, 3, 4, 5], 3), vec![3, 4, 5]);
        assert_eq!(truncate_prompt(vec![1, 2], 3), vec![1, 2]);
    }
}
