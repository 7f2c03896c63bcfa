//! `sft`: supervised fine-tuning on chat examples, training on the assistant's
//! tokens only, on the same machinery as GRPO (AdamW, schedule, accumulation,
//! clipping, checkpoints, bitwise resume, JSONL log).

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

use super::model_common::{check_training, open_trainable, write_training_outputs};
use crate::data::jsonl::{self, Appender};
use crate::model::{Batch, ChatTokenizer, Transformer};
use crate::pipeline::{typed, Cancelled, OutputSpec, ParamError, Project, Requirements, StageContext, StageKind};
use crate::train::checkpoint;
use crate::train::optim::{accumulate, clip_grad_norm, learning_rate, AdamW, AdamWConfig, Schedule};
use crate::train::sft::{self, Example};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub model: String,
    /// JSONL of `{messages}` or `{prompt, completion}`: by default the `sft` output of `format`.
    pub train: String,
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
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_len")]
    pub max_seq_length: usize,
    /// Pack several examples per sequence; attention never crosses examples.
    #[serde(default)]
    pub packing: bool,
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
}

fn d_lr() -> f64 {
    2e-5
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
    0.999
}
fn d_clip() -> f64 {
    1.0
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_len() -> usize {
    1024
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    /// Examples consumed so far (position in the seeded epoch order).
    data_pos: u64,
    tokens_seen: u64,
}

pub struct Sft;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "model",
        file_name: "model",
        is_dir: true,
        description: "the fine-tuned model, Hugging Face layout",
    },
    OutputSpec {
        name: "metrics",
        file_name: "metrics.json",
        is_dir: false,
        description: "final loss, tokens seen, time",
    },
    OutputSpec {
        name: "log",
        file_name: "log.jsonl",
        is_dir: false,
        description: "per-step loss, learning rate, grad norm",
    },
];

impl StageKind for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        1
    }
    fn description(&self) -> &'static str {
        "supervised fine-tuning on the assistant turns of chat examples"
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        OUTPUTS
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let (req, errors) = check_training(
            &p.model,
            &p.train,
            &[
                ("per_device_train_batch_size", p.per_device_train_batch_size),
                ("gradient_accumulation_steps", p.gradient_accumulation_steps),
                ("max_seq_length", p.max_seq_length),
            ],
            p.save_steps,
            p.lora.as_ref(),
            project,
        );
        if errors.is_empty() {
            Ok(req)
        } else {
            Err(errors)
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let loaded = open_trainable(ctx, &p.model, p.lora.as_ref())?;
        let path = ctx.project.local_path(&p.train).unwrap_or_else(|| p.train.clone().into());
        let mut examples = Vec::new();
        for (line, row) in jsonl::read::<Value>(&path)? {
            let messages = sft::messages_of(&row).map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
            examples.push(
                sft::tokenize(&loaded.tokenizer, &messages, p.max_seq_length)
                    .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?,
            );
        }
        if examples.is_empty() {
            bail!("{} has no examples", path.display());
        }
        let truncated = examples.iter().filter(|e| e.truncated).count();
        if truncated > 0 {
            eprintln!(
                "sft: {truncated} of {} examples were longer than max_seq_length = {} and were truncated",
                examples.len(),
                p.max_seq_length
            );
        }
        let trainer =
            SftTrainer { p: &p, model: &loaded.model, tok: &loaded.tokenizer, examples: &examples, seed: ctx.env.seed };
        let mut summary = trainer.train(ctx)?;
        summary["truncated_examples"] = json!(truncated);
        write_training_outputs(ctx, &loaded, summary)
    }
}

pub struct SftTrainer<'a> {
    pub p: &'a Params,
    pub model: &'a Transformer,
    pub tok: &'a ChatTokenizer,
    pub examples: &'a [Example],
    pub seed: u64,
}

impl SftTrainer<'_> {
    fn per_step(&self) -> usize {
        self.p.per_device_train_batch_size * self.p.gradient_accumulation_steps
    }

    pub fn total_steps(&self) -> u64 {
        self.p.max_steps.unwrap_or_else(|| {
            ((self.p.num_train_epochs * self.examples.len() as f64 / self.per_step() as f64).ceil() as u64).max(1)
        })
    }

    fn example_at(&self, pos: u64) -> &Example {
        let n = self.examples.len() as u64;
        let mut order: Vec<usize> = (0..n as usize).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(pos / n)));
        &self.examples[order[(pos % n) as usize]]
    }

    /// A micro-batch as a model batch and its target mask over next-token positions.
    fn batch(&self, exs: &[&Example]) -> Result<(Batch, Tensor)> {
        let dev = &self.model.device;
        let (batch, targets): (Batch, Vec<Vec<bool>>) = if self.p.packing {
            // Greedy packing into rows of at most max_seq_length tokens.
            let mut rows: Vec<Vec<&Example>> = Vec::new();
            let mut lens: Vec<usize> = Vec::new();
            for e in exs {
                match lens.iter().position(|l| l + e.ids.len() <= self.p.max_seq_length) {
                    Some(i) => {
                        rows[i].push(e);
                        lens[i] += e.ids.len();
                    }
                    None => {
                        rows.push(vec![e]);
                        lens.push(e.ids.len());
                    }
                }
            }
            let ids: Vec<Vec<Vec<u32>>> = rows.iter().map(|r| r.iter().map(|e| e.ids.clone()).collect()).collect();
            let b = Batch::packed(&ids, self.tok.pad_id, dev)?;
            let t = b.ids.dim(1)?;
            let targets = rows
                .iter()
                .map(|r| {
                    let mut v: Vec<bool> = Vec::with_capacity(t);
                    for e in r {
                        // A segment's first token is never a target of the previous segment.
                        v.extend(e.targets.iter().enumerate().map(|(i, &x)| x && i > 0));
                    }
                    v.resize(t, false);
                    v
                })
                .collect();
            (b, targets)
        } else {
            let t = exs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
            let ids = exs
                .iter()
                .map(|e| e.ids.iter().copied().chain(std::iter::repeat_n(self.tok.pad_id, t - e.ids.len())).collect())
                .collect();
            let valid = exs.iter().map(|e| (0..t).map(|i| i < e.ids.len()).collect()).collect();
            let targets = exs.iter().map(|e| (0..t).map(|i| i < e.ids.len() && e.targets[i]).collect()).collect();
            (Batch::from_rows(ids, valid, dev)?, targets)
        };
        // Position i of the log-probs predicts token i + 1.
        let mask: Vec<Vec<f32>> = targets
            .iter()
            .map(|r: &Vec<bool>| r.iter().skip(1).map(|&x| if x { 1.0 } else { 0.0 }).collect())
            .collect();
        Ok((batch, Tensor::new(mask, dev)?))
    }

    pub fn train(&self, ctx: &StageContext) -> Result<Value> {
        let p = self.p;
        let params = self.model.trainable();
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
        let cps = ctx.checkpoints();
        let log_path = ctx.work_dir.join("log.jsonl");
        let mut state = TrainState { step: 0, data_pos: 0, tokens_seen: 0 };
        if let Some((_, s)) = checkpoint::restore::<TrainState>(&cps, &mut opt, &self.model.device)? {
            state = s;
            checkpoint::truncate_log(&log_path, state.step)?;
        } else if log_path.exists() {
            fs::remove_file(&log_path)?;
        }
        let mut log = Appender::open(&log_path)?;
        let bar = ctx.progress_bar(total, "steps");
        bar.set_position(state.step);
        let t_start = Instant::now();
        let (mut first_loss, mut last_loss) = (None, 0.0);
        while state.step < total {
            if ctx.cancel.is_cancelled() {
                if cps.latest().map(|(s, _)| s) != Some(state.step) && state.step > 0 {
                    checkpoint::save(&cps, state.step, p.save_total_limit, &opt, &state)?;
                }
                bar.abandon();
                return Err(Cancelled.into());
            }
            let t = Instant::now();
            let exs: Vec<&Example> = (0..self.per_step() as u64).map(|i| self.example_at(state.data_pos + i)).collect();
            let normalizer: f64 = exs.iter().map(|e| e.targets.iter().skip(1).filter(|x| **x).count() as f64).sum();
            let tokens: usize = exs.iter().map(|e| e.ids.len()).sum();
            let mut grads = HashMap::new();
            let mut loss_sum = 0.0;
            for chunk in exs.chunks(p.per_device_train_batch_size) {
                let (b, mask) = self.batch(chunk)?;
                let lp = self.model.next_token_logprobs(&b)?.to_dtype(DType::F32)?;
                let l = sft::loss(&lp, &mask, normalizer)?;
                loss_sum += l.to_scalar::<f32>()? as f64;
                accumulate(&mut grads, &l.backward()?, opt.params())?;
            }
            let grad_norm = clip_grad_norm(&mut grads, p.max_grad_norm)?;
            let lr = learning_rate(p.learning_rate, p.lr_scheduler_type, state.step, warmup, total);
            opt.step(&grads, lr)?;
            state.step += 1;
            state.data_pos += exs.len() as u64;
            state.tokens_seen += tokens as u64;
            let secs = t.elapsed().as_secs_f64();
            first_loss.get_or_insert(loss_sum);
            last_loss = loss_sum;
            log.append(&json!({
                "step": state.step,
                "loss": loss_sum,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "epoch": state.data_pos as f64 / self.examples.len() as f64,
                "tokens_per_second": tokens as f64 / secs,
                "step_time": secs,
            }))?;
            bar.set_message(format!("loss {loss_sum:.3}"));
            bar.set_position(state.step);
            if state.step.is_multiple_of(p.save_steps) || state.step >= total {
                checkpoint::save(&cps, state.step, p.save_total_limit, &opt, &state)?;
            }
        }
        bar.finish_and_clear();
        Ok(json!({
            "steps": state.step,
            "final_loss": last_loss,
            "first_loss": first_loss,
            "tokens_seen": state.tokens_seen,
            "train_seconds_this_run": t_start.elapsed().as_secs_f64(),
        }))
    }
}
