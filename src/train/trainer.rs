//! The training loop, written once: optimizer construction, learning-rate
//! schedule, gradient accumulation (in the model's gradient sink), global-norm
//! clipping, non-finite checks, checkpoint save and restore (with the log
//! truncated to the checkpoint), cancellation and progress. An algorithm
//! (GRPO, SFT, later DPO or GSPO) supplies only its step: the gradients of one
//! optimizer step, and what to log about it.
//!
//! The loop knows nothing of the runner: what it needs from its host (a work
//! folder, a cancel token, a progress bar) comes through `common::Host`, which
//! the runner's stage context implements, and `common::FolderHost` for tests.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::checkpoint;
use super::config::TrainingConfig;
use super::optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig};
use crate::common::checkpoints::Checkpoints;
use crate::common::{Cancelled, Host};
use crate::data::jsonl::Appender;
use crate::model::Transformer;

/// One optimizer step's worth of an algorithm's work.
pub struct StepReport<L> {
    /// The loss summed over the step's micro-batches (what was differentiated).
    pub loss: f64,
    /// The algorithm's own log fields for this step.
    pub log: L,
    /// Tokens the step trained on (for tokens/s).
    pub tokens: usize,
    /// Shown beside the progress bar.
    pub message: String,
}

/// A training algorithm: the gradients of one optimizer step at a time.
pub trait Algorithm {
    /// Loop state a checkpoint must hold besides weights and optimizer moments
    /// (data position, RNG), so that a resumed run ends with bitwise the same weights.
    type State: Serialize + DeserializeOwned;
    /// The algorithm's per-step log fields (flattened into the log line).
    type Log: Serialize;

    fn total_steps(&self) -> u64;
    fn state(&self) -> Self::State;
    fn restore(&mut self, state: Self::State);
    /// Compute one optimizer step's gradients into the model (`model.backward` per
    /// micro-batch). `step` is the 0-based index of the step.
    fn step(&mut self, model: &Transformer, step: u64) -> Result<StepReport<Self::Log>>;
    /// Whether the loop may checkpoint or stop before the next step (GRPO: not
    /// between the updates of one round, whose samples live only in memory).
    fn at_boundary(&self) -> bool {
        true
    }
    /// The algorithm's own lines for the summary metrics.
    fn summary(&self) -> Value {
        Value::Object(Default::default())
    }
}

/// One line of the per-step log: the loop's fields and the algorithm's.
#[derive(Serialize)]
struct StepLine<'a, L: Serialize> {
    step: u64,
    loss: f64,
    grad_norm: f64,
    learning_rate: f64,
    step_time: f64,
    tokens_per_second: f64,
    #[serde(rename = "timing/optimizer")]
    optimizer_time: f64,
    #[serde(flatten)]
    algo: &'a L,
}

#[derive(Serialize, Deserialize)]
struct Saved<S> {
    step: u64,
    algorithm: S,
}

/// What a finished run reports (the stage's metrics).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    /// The step this run resumed from (0: a fresh start).
    pub resumed_from_step: u64,
    pub steps_run: u64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub train_seconds_this_run: f64,
    #[serde(flatten)]
    pub algorithm: Value,
}

/// The per-step log's file name in a host's work folder.
pub const LOG_FILE: &str = "log.jsonl";

/// The per-step log in a host's work folder.
pub fn log_path(host: &dyn Host) -> PathBuf {
    host.work_dir().join(LOG_FILE)
}

/// Train `model` with `algo` to the end (or to cancellation, which checkpoints
/// and returns [`Cancelled`]).
pub fn train<A: Algorithm>(
    model: &mut Transformer,
    algo: &mut A,
    hp: &TrainingConfig,
    host: &dyn Host,
) -> Result<Summary> {
    model.gradient_checkpointing = hp.gradient_checkpointing;
    let mut opt = AdamW::new(
        model.trainable(),
        AdamWConfig { beta1: hp.adam_beta1, beta2: hp.adam_beta2, eps: 1e-8, weight_decay: hp.weight_decay },
    )?;
    let total = algo.total_steps();
    let warmup = (hp.warmup_ratio * total as f64).ceil() as u64;
    let cps = Checkpoints::new(&host.work_dir());
    let log_path = log_path(host);
    let mut step = 0;
    match checkpoint::restore::<Saved<A::State>>(&cps, &mut opt, &model.device)? {
        Some((_, saved)) => {
            step = saved.step;
            algo.restore(saved.algorithm);
            model.refresh_compute_weights()?;
            checkpoint::truncate_log(&log_path, step)?;
            tracing::info!(step, "resumed from checkpoint");
        }
        None if log_path.exists() => fs::remove_file(&log_path)?,
        None => {}
    }
    let resumed_from_step = step;
    let mut log = Appender::open(&log_path)?;
    let bar = host.progress(total, "steps");
    bar.set_position(step);
    if step > 0 {
        bar.set_message(format!("resumed at step {step}"));
    }
    let mut last_saved = step;
    let save = |step: u64, opt: &AdamW, algo: &A| {
        checkpoint::save(&cps, step, hp.save_total_limit, opt, &Saved { step, algorithm: algo.state() })
    };
    let t_run = Instant::now();
    let (mut first_loss, mut final_loss) = (None, None);
    model.take_grads(); // nothing left over from an earlier use of the model
    while step < total {
        if algo.at_boundary() && host.cancel().is_cancelled() {
            if step > last_saved {
                save(step, &opt, algo)?;
            }
            bar.abandon();
            return Err(Cancelled.into());
        }
        let t = Instant::now();
        let report = algo.step(model, step)?;
        let mut grads = model.take_grads();
        if !report.loss.is_finite() {
            bail!(
                "step {}: the loss is {} (the last good checkpoint is at step {last_saved}); \
                 lower learning_rate or max_grad_norm",
                step + 1,
                report.loss
            );
        }
        let t_opt = Instant::now();
        let grad_norm = clip_grad_norm(&mut grads, hp.max_grad_norm)?;
        if !grad_norm.is_finite() {
            bail!(
                "step {}: the gradient norm is {grad_norm} (the last good checkpoint is at step {last_saved}); \
                 lower learning_rate or max_grad_norm",
                step + 1
            );
        }
        let lr = learning_rate(hp.learning_rate, hp.lr_scheduler_type, step, warmup, total);
        opt.step(&grads, lr)?;
        drop(grads);
        model.refresh_compute_weights()?;
        let optimizer_time = t_opt.elapsed().as_secs_f64();
        step += 1;
        let step_time = t.elapsed().as_secs_f64();
        first_loss.get_or_insert(report.loss);
        final_loss = Some(report.loss);
        log.append(&StepLine {
            step,
            loss: report.loss,
            grad_norm,
            learning_rate: lr,
            step_time,
            tokens_per_second: report.tokens as f64 / step_time.max(1e-9),
            optimizer_time,
            algo: &report.log,
        })
        .context("writing the training log")?;
        bar.set_message(report.message);
        bar.set_position(step);
        let crossed = step / hp.save_steps > last_saved / hp.save_steps;
        if algo.at_boundary() && (crossed || step >= total) {
            save(step, &opt, algo)?;
            last_saved = step;
        }
    }
    bar.finish_and_clear();
    Ok(Summary {
        steps: step,
        resumed_from_step,
        steps_run: step - resumed_from_step,
        first_loss,
        final_loss,
        train_seconds_this_run: t_run.elapsed().as_secs_f64(),
        algorithm: algo.summary(),
    })
}
