//! `grpo`: group relative policy optimization of a model against a reward set.
//! Per round: sample `num_generations` completions for each of
//! per_device_train_batch_size × gradient_accumulation_steps / num_generations
//! prompts (one prefill per prompt), score them, compute group-relative
//! advantages, then `num_iterations` optimizer steps on the clipped surrogate.
//! Checkpoints (weights, optimizer moments, step, RNG, data position) make a
//! killed run resume to the same weights as an uninterrupted one.

use std::collections::HashMap;
use std::fs;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::format::PromptRow;
use super::model_common::{check_training, open_trainable, write_training_outputs};
use crate::data::jsonl::{self, Appender};
use crate::model::{generate, Batch, Message, SamplingParams, Transformer};
use crate::pipeline::{typed, Cancelled, OutputSpec, ParamError, Project, Requirements, StageContext, StageKind};
use crate::rewards::set::{mean, std};
use crate::rewards::{RewardSet, Sample};
use crate::train::checkpoint;
use crate::train::grpo::{advantages, loss, LossConfig, LossType, ScaleRewards};
use crate::train::optim::{accumulate, clip_grad_norm, learning_rate, AdamW, AdamWConfig, Schedule};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub model: String,
    /// Prompts: the `train` output of a `format` stage.
    pub train: String,
    /// A reward-set file or an inline list of {name, weight, params}.
    pub rewards: Value,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_schedule")]
    pub lr_scheduler_type: Schedule,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_gens")]
    pub num_generations: usize,
    #[serde(default = "d_prompt_len")]
    pub max_prompt_length: usize,
    #[serde(default = "d_completion_len")]
    pub max_completion_length: usize,
    #[serde(default = "d_temperature")]
    pub temperature: f32,
    #[serde(default = "d_top_p")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub beta: f64,
    #[serde(default = "d_epsilon")]
    pub epsilon: f64,
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    #[serde(default = "d_loss")]
    pub loss_type: LossType,
    #[serde(default = "d_scale")]
    pub scale_rewards: ScaleRewards,
    #[serde(default = "d_one")]
    pub num_iterations: usize,
    #[serde(default)]
    pub mask_truncated_completions: bool,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    /// LoRA adapters instead of full fine-tuning: `{r, alpha, dropout, target_modules}`.
    #[serde(default)]
    pub lora: Option<crate::model::lora::LoraConfig>,
    #[serde(default = "d_save")]
    pub save_steps: u64,
    #[serde(default = "d_keep")]
    pub save_total_limit: usize,
    /// Every this many steps, a few prompt/completion/reward samples go into the log (0: never).
    #[serde(default)]
    pub log_completions: u64,
}

fn d_lr() -> f64 {
    1e-6
}
fn d_schedule() -> Schedule {
    Schedule::Cosine
}
fn d_warmup() -> f64 {
    0.1
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.99
}
fn d_wd() -> f64 {
    0.1
}
fn d_clip() -> f64 {
    0.1
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_gens() -> usize {
    8
}
fn d_prompt_len() -> usize {
    512
}
fn d_completion_len() -> usize {
    256
}
fn d_temperature() -> f32 {
    1.0
}
fn d_top_p() -> f32 {
    1.0
}
fn d_epsilon() -> f64 {
    0.2
}
fn d_loss() -> LossType {
    LossType::Dapo
}
fn d_scale() -> ScaleRewards {
    ScaleRewards::Group
}
fn d_epochs() -> f64 {
    1.0
}
fn d_save() -> u64 {
    500
}
fn d_keep() -> usize {
    2
}

impl Params {
    fn completions_per_step(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }
    fn prompts_per_round(&self) -> usize {
        self.completions_per_step() / self.num_generations
    }
}

/// What a checkpoint holds besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    data_pos: u64,
    rng: ChaCha8Rng,
}

pub struct Grpo;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "model",
        file_name: "model",
        is_dir: true,
        description: "the trained model, Hugging Face layout",
    },
    OutputSpec { name: "metrics", file_name: "metrics.json", is_dir: false, description: "summary of the run" },
    OutputSpec { name: "log", file_name: "log.jsonl", is_dir: false, description: "per-step metrics with TRL's names" },
];

impl StageKind for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }
    fn version(&self) -> u32 {
        1
    }
    fn description(&self) -> &'static str {
        "group relative policy optimization against a reward set"
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        OUTPUTS
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let (mut req, mut errors) = check_training(
            &p.model,
            &p.train,
            &[
                ("per_device_train_batch_size", p.per_device_train_batch_size),
                ("gradient_accumulation_steps", p.gradient_accumulation_steps),
                ("num_iterations", p.num_iterations),
                ("max_completion_length", p.max_completion_length),
                ("max_prompt_length", p.max_prompt_length),
            ],
            p.save_steps,
            p.lora.as_ref(),
            project,
        );
        match RewardSet::from_param(&p.rewards, project) {
            Ok((_, Some(file))) => req.local_paths.push(("rewards".into(), file)),
            Ok((_, None)) => {}
            Err(es) => errors.extend(es.into_iter().map(|mut e| {
                e.path = if e.path.is_empty() { "rewards".into() } else { format!("rewards.{}", e.path) };
                e
            })),
        }
        if p.num_generations < 2 {
            errors.push(ParamError::new(
                "num_generations",
                "must be at least 2: advantages compare completions of one prompt",
            ));
        } else if !p.completions_per_step().is_multiple_of(p.num_generations) {
            errors.push(
                ParamError::new(
                    "num_generations",
                    format!(
                        "per_device_train_batch_size × gradient_accumulation_steps = {} is not a multiple of num_generations = {}",
                        p.completions_per_step(),
                        p.num_generations
                    ),
                )
                .hint("each optimizer step takes whole groups of completions"),
            );
        }
        if p.temperature <= 0.0 {
            errors.push(ParamError::new("temperature", "GRPO samples: temperature must be > 0"));
        }
        if errors.is_empty() {
            Ok(req)
        } else {
            Err(errors)
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let (rewards, _) = RewardSet::from_param(&p.rewards, &ctx.project).map_err(|e| {
            anyhow::anyhow!("rewards: {}", e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; "))
        })?;
        let loaded = open_trainable(ctx, &p.model, p.lora.as_ref())?;
        let train_path = ctx.project.local_path(&p.train).unwrap_or_else(|| p.train.clone().into());
        let rows: Vec<PromptRow> = jsonl::read(&train_path)?.into_iter().map(|(_, r)| r).collect();
        if rows.is_empty() {
            bail!("{} has no prompts", train_path.display());
        }
        let trainer = GrpoTrainer::new(&p, &loaded.model, &loaded.tokenizer, &rewards, &rows, ctx.env.seed)?;
        let summary = trainer.train(ctx)?;
        write_training_outputs(ctx, &loaded, summary)
    }
}

/// The GRPO loop over a loaded model; usable without the runner (tests drive it directly).
pub struct GrpoTrainer<'a> {
    p: &'a Params,
    policy: &'a Transformer,
    reference: Option<Transformer>,
    tok: &'a crate::model::ChatTokenizer,
    rewards: &'a RewardSet,
    prompts: Vec<(Vec<u32>, &'a PromptRow)>,
    seed: u64,
}

impl<'a> GrpoTrainer<'a> {
    pub fn new(
        p: &'a Params,
        policy: &'a Transformer,
        tok: &'a crate::model::ChatTokenizer,
        rewards: &'a RewardSet,
        rows: &'a [PromptRow],
        seed: u64,
    ) -> Result<Self> {
        let prompts = rows
            .iter()
            .map(|r| {
                let msgs: Vec<Message> = r.prompt.iter().map(|m| Message::new(&m.role, &m.content)).collect();
                let mut ids = tok.encode(&tok.apply_chat_template(&msgs, true)?)?;
                if ids.len() > p.max_prompt_length {
                    // Keep the end of the prompt, where the question and the generation prompt are.
                    ids.drain(..ids.len() - p.max_prompt_length);
                }
                Ok((ids, r))
            })
            .collect::<Result<Vec<_>>>()?;
        // β > 0: a frozen copy of the starting weights is the reference policy;
        // with LoRA the base model (adapters off) is, and no copy is made.
        let reference = if p.beta != 0.0 && policy.lora.is_none() {
            let copy = policy.tensors().into_iter().map(|(k, t)| Ok((k, t.copy()?))).collect::<Result<_>>()?;
            Some(Transformer::new(policy.cfg.clone(), copy, &policy.device, policy.compute_dtype)?)
        } else {
            None
        };
        Ok(GrpoTrainer { p, policy, reference, tok, rewards, prompts, seed })
    }

    pub fn total_steps(&self) -> u64 {
        let mu = self.p.num_iterations as u64;
        match self.p.max_steps {
            Some(s) => s,
            None => {
                let rounds = (self.p.num_train_epochs * self.prompts.len() as f64 / self.p.prompts_per_round() as f64)
                    .ceil() as u64;
                rounds.max(1) * mu
            }
        }
    }

    /// The prompt at global position `pos`: epochs are seeded shuffles of the data.
    fn prompt_at(&self, pos: u64) -> usize {
        let n = self.prompts.len() as u64;
        let epoch = pos / n;
        let mut order: Vec<usize> = (0..n as usize).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(epoch)));
        order[(pos % n) as usize]
    }

    pub fn train(&self, ctx: &StageContext) -> Result<Value> {
        let p = self.p;
        let params = self.policy.trainable();
        let mut opt = AdamW::new(
            params,
            AdamWConfig {
                lr: p.learning_rate,
                beta1: p.adam_beta1,
                beta2: p.adam_beta2,
                eps: 1e-8,
                weight_decay: p.weight_decay,
            },
        )?;
        let total = self.total_steps();
        let warmup = (p.warmup_ratio * total as f64).ceil() as u64;
        let checkpoints = ctx.checkpoints();
        let log_path = ctx.work_dir.join("log.jsonl");
        let mut state = TrainState { step: 0, data_pos: 0, rng: ChaCha8Rng::seed_from_u64(self.seed) };
        if let Some((step, restored)) = checkpoint::restore::<TrainState>(&checkpoints, &mut opt, &self.policy.device)?
        {
            state = restored;
            checkpoint::truncate_log(&log_path, state.step)?;
            tracing::info!(step, "resumed from checkpoint");
        } else if log_path.exists() {
            fs::remove_file(&log_path)?;
        }
        let mut log = Appender::open(&log_path)?;
        let bar = ctx.progress_bar(total, "steps");
        bar.set_position(state.step);
        let save = |state: &TrainState, opt: &AdamW| {
            checkpoint::save(&checkpoints, state.step, p.save_total_limit, opt, state)
        };
        let mut recent_rewards = Vec::new();
        while state.step < total {
            if ctx.cancel.is_cancelled() {
                if checkpoints.latest().map(|(s, _)| s) != Some(state.step) && state.step > 0 {
                    save(&state, &opt)?;
                }
                bar.abandon();
                return Err(Cancelled.into());
            }
            let before = state.step;
            let lines = self.round(&mut state, &mut opt, total, warmup)?;
            for l in &lines {
                recent_rewards.push(l["reward"].as_f64().unwrap_or(0.0));
                log.append(l)?;
            }
            if let Some(l) = lines.last() {
                bar.set_message(format!("reward {:.3}", l["reward"].as_f64().unwrap_or(0.0)));
            }
            bar.set_position(state.step);
            if state.step / p.save_steps > before / p.save_steps || state.step >= total {
                save(&state, &opt)?;
            }
        }
        bar.finish_and_clear();
        let tail = &recent_rewards[recent_rewards.len().saturating_sub(10)..];
        Ok(json!({
            "steps": state.step,
            "prompts_seen": state.data_pos,
            "reward_first": recent_rewards.first(),
            "reward_last10_mean": tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        }))
    }

    /// One generation round: sample, score, then `num_iterations` optimizer steps. Returns the log lines.
    fn round(&self, state: &mut TrainState, opt: &mut AdamW, total: u64, warmup: u64) -> Result<Vec<Value>> {
        let p = self.p;
        let t_round = Instant::now();
        let picked: Vec<usize> =
            (0..p.prompts_per_round() as u64).map(|i| self.prompt_at(state.data_pos + i)).collect();
        let prompt_ids: Vec<Vec<u32>> = picked.iter().map(|&i| self.prompts[i].0.clone()).collect();
        let sampling = SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            max_new_tokens: p.max_completion_length,
            stop: Vec::new(),
        };
        let t = Instant::now();
        let comps = generate(self.policy, self.tok, &prompt_ids, p.num_generations, &sampling, &mut state.rng, None)?;
        let t_generate = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let samples: Vec<Sample> = comps
            .iter()
            .map(|c| {
                let row = self.prompts[picked[c.prompt_index]].1;
                Sample { prompt: &row.question, completion: &c.text, answer: &row.answer, tokens: c.tokens.len() }
            })
            .collect();
        let scores = self.rewards.score(&samples);
        let adv = advantages(&scores.total, p.num_generations, p.scale_rewards);
        let t_score = t.elapsed().as_secs_f64();

        // Training rows: [left-padded prompt | completion (+EOS) | right padding].
        let plen = prompt_ids.iter().map(Vec::len).max().unwrap_or(0);
        let completions: Vec<Vec<u32>> = comps
            .iter()
            .map(|c| {
                let mut t = c.tokens.clone();
                if c.eos {
                    t.push(self.tok.eos_ids[0]);
                }
                t
            })
            .collect();
        let clen = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut rows_ids = Vec::new();
        let mut rows_valid = Vec::new();
        let mut masks = Vec::new();
        for (c, comp) in comps.iter().zip(&completions) {
            let pr = &prompt_ids[c.prompt_index];
            let mut ids = vec![self.tok.pad_id; plen - pr.len()];
            let mut valid = vec![false; plen - pr.len()];
            ids.extend(pr);
            valid.extend(std::iter::repeat_n(true, pr.len()));
            ids.extend(comp);
            valid.extend(std::iter::repeat_n(true, comp.len()));
            ids.extend(std::iter::repeat_n(self.tok.pad_id, clen - comp.len()));
            valid.extend(std::iter::repeat_n(false, clen - comp.len()));
            let keep = !(p.mask_truncated_completions && !c.eos && c.tokens.len() >= p.max_completion_length);
            masks.push((0..clen).map(|j| if keep && j < comp.len() { 1f32 } else { 0.0 }).collect::<Vec<f32>>());
            rows_ids.push(ids);
            rows_valid.push(valid);
        }
        tracing::debug!(rows = rows_ids.len(), prompt_len = plen, completion_len = clen, "grpo training rows");
        let dev = &self.policy.device;
        let global_tokens: f64 = masks.iter().map(|m| m.iter().sum::<f32>() as f64).sum();
        let micro = p.per_device_train_batch_size;
        let chunks: Vec<std::ops::Range<usize>> =
            (0..comps.len()).step_by(micro).map(|s| s..(s + micro).min(comps.len())).collect();
        let batch_of = |r: &std::ops::Range<usize>| -> Result<(Batch, Tensor, Tensor)> {
            let b = Batch::from_rows(rows_ids[r.clone()].to_vec(), rows_valid[r.clone()].to_vec(), dev)?;
            let mask = Tensor::new(masks[r.clone()].to_vec(), dev)?;
            let a = Tensor::new(&adv[r.clone()], dev)?;
            Ok((b, mask, a))
        };
        let completion_logp = |m: &Transformer, b: &Batch| -> Result<Tensor> {
            Ok(m.next_token_logprobs_range(b, plen - 1, clen, p.temperature as f64)?.to_dtype(DType::F32)?)
        };

        // πold (μ > 1) and πref, without gradients.
        let t = Instant::now();
        let mut old = Vec::new();
        if p.num_iterations > 1 {
            for r in &chunks {
                old.push(completion_logp(self.policy, &batch_of(r)?.0)?.detach());
            }
        }
        let mut refs = Vec::new();
        if p.beta != 0.0 {
            for r in &chunks {
                let b = batch_of(r)?.0;
                let lp = match &self.reference {
                    Some(reference) => completion_logp(reference, &b)?,
                    None => self.policy.without_adapters(|| completion_logp(self.policy, &b))?,
                };
                refs.push(lp.detach());
            }
        }
        let t_reference = t.elapsed().as_secs_f64();

        let mut lines = Vec::new();
        let gen_tokens: usize = comps.iter().map(|c| c.tokens.len()).sum();
        for it in 0..p.num_iterations {
            let t = Instant::now();
            let mut grads = HashMap::new();
            let (mut loss_sum, mut kl_sum, mut clip_sum, mut tok_sum) = (0.0, 0.0, 0.0, 0.0);
            for (ci, r) in chunks.iter().enumerate() {
                let (b, mask, a) = batch_of(r)?;
                let logp = completion_logp(self.policy, &b)?;
                let old_lp = if p.num_iterations > 1 { old[ci].clone() } else { logp.detach() };
                let cfg = LossConfig {
                    loss_type: p.loss_type,
                    epsilon_low: p.epsilon,
                    epsilon_high: p.epsilon_high.unwrap_or(p.epsilon),
                    beta: p.beta,
                    max_completion_length: p.max_completion_length,
                    micro_batches: chunks.len(),
                    global_tokens,
                };
                let (l, s) = loss(&logp, &old_lp, refs.get(ci), &a, &mask, &cfg)?;
                loss_sum += l.to_scalar::<f32>()? as f64;
                kl_sum += s.kl * s.tokens;
                clip_sum += s.clip_region * s.tokens;
                tok_sum += s.tokens;
                accumulate(&mut grads, &l.backward()?, opt.params())?;
            }
            let t_policy = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grad_norm = clip_grad_norm(&mut grads, p.max_grad_norm)?;
            let lr = learning_rate(p.learning_rate, p.lr_scheduler_type, state.step, warmup, total);
            opt.step(&grads, lr)?;
            let t_opt = t.elapsed().as_secs_f64();
            state.step += 1;

            let group_stds: Vec<f32> = scores.total.chunks(p.num_generations).map(std).collect();
            let mut line = json!({
                "step": state.step,
                "reward": mean(&scores.total),
                "reward_std": mean(&group_stds),
                "frac_reward_zero_std": group_stds.iter().filter(|s| **s == 0.0).count() as f64 / group_stds.len() as f64,
                "completions/mean_length": gen_tokens as f64 / comps.len() as f64,
                "completions/clipped_ratio": comps.iter().filter(|c| !c.eos).count() as f64 / comps.len() as f64,
                "kl": kl_sum / tok_sum.max(1.0),
                "clip_ratio/region_mean": clip_sum / tok_sum.max(1.0),
                "loss": loss_sum,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "step_time": if it == 0 { t_round.elapsed().as_secs_f64() } else { t_policy + t_opt },
                "tokens_per_second": if it == 0 { gen_tokens as f64 / t_generate.max(1e-9) } else { 0.0 },
                "timing/generation": if it == 0 { t_generate } else { 0.0 },
                "timing/scoring": if it == 0 { t_score } else { 0.0 },
                "timing/reference": if it == 0 { t_reference } else { 0.0 },
                "timing/policy_forward_backward": t_policy,
                "timing/optimizer": t_opt,
            });
            for (name, m, s) in scores.stats() {
                line[format!("rewards/{name}/mean")] = json!(m);
                line[format!("rewards/{name}/std")] = json!(s);
            }
            if it == 0 && p.log_completions > 0 && state.step.is_multiple_of(p.log_completions) {
                let shown: Vec<Value> = comps
                    .iter()
                    .zip(&scores.total)
                    .take(p.num_generations.min(4))
                    .map(|(c, r)| json!({"prompt": self.prompts[picked[c.prompt_index]].1.question, "completion": c.text, "reward": r}))
                    .collect();
                line["completions"] = json!(shown);
            }
            tracing::debug!(target: "r1pipe::runlog", step = state.step, line = %line, "grpo step");
            lines.push(line);
            if state.step >= total {
                break;
            }
        }
        state.data_pos += p.prompts_per_round() as u64;
        Ok(lines)
    }
}
