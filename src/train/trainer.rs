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

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::checkpoint;
use super::config::TrainingConfig;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::progress::{step_line, Watch};
use super::schedule::learning_rate;
use crate::common::checkpoints::Checkpoints;
use crate::common::host::SubfolderHost;
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
    /// After the optimizer applied step `step` (1-based: the steps done so far).
    fn after_update(&mut self, _model: &Transformer, _step: u64) -> Result<()> {
        Ok(())
    }
    /// Tensors besides the trained weights a checkpoint must hold to resume bitwise.
    fn checkpoint_tensors(&self) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
        Ok(Default::default())
    }
    /// Take back what [`Algorithm::checkpoint_tensors`] gave (empty: the checkpoint had none).
    fn restore_tensors(&mut self, _tensors: std::collections::HashMap<String, candle_core::Tensor>) -> Result<()> {
        Ok(())
    }
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

/// Evaluation during training: the metrics of the weights as they are now
/// (TRL's `eval_steps`), logged as `eval/<name>` in the step's log line.
pub trait Evaluator {
    /// `host`'s work folder is the evaluation's own, for partial results.
    fn evaluate(&mut self, model: &Transformer, step: u64, host: &dyn Host) -> Result<BTreeMap<String, f64>>;
}

/// When to evaluate, and which evaluation is the best (transformers' names).
pub struct Evaluation<'e> {
    /// Every this many steps, and always after the last step.
    pub every: Option<u64>,
    /// The metric that ranks evaluations (without the `eval/` prefix), and its direction.
    pub best: Option<BestMetric>,
    /// End with the best evaluation's weights instead of the last step's.
    pub load_best_at_end: bool,
    pub evaluator: &'e mut dyn Evaluator,
}

#[derive(Debug, Clone)]
pub struct BestMetric {
    pub metric: String,
    pub greater_is_better: bool,
}

/// The best evaluation so far: its step and value (its weights are in `best/`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Best {
    pub step: u64,
    pub value: f64,
}

/// Whether an evaluation scoring `value` is the new best. A NaN or infinite score
/// never is: kept as the best, it would win against every later step forever.
fn improves(value: f64, best: Option<Best>, greater_is_better: bool) -> bool {
    value.is_finite()
        && match best {
            None => true,
            Some(old) if greater_is_better => value > old.value,
            Some(old) => value < old.value,
        }
}

impl Evaluation<'_> {
    fn due(&self, step: u64, total: u64) -> bool {
        step == total || self.every.is_some_and(|e| step.is_multiple_of(e))
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
    /// `eval/<metric>` on the steps that were evaluated.
    #[serde(flatten)]
    eval: BTreeMap<String, f64>,
}

#[derive(Serialize, Deserialize)]
struct Saved<S> {
    step: u64,
    algorithm: S,
    #[serde(default)]
    best: Option<Best>,
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
    /// The best evaluation (with `metric_for_best_model`): its step and value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_model_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_metric: Option<f64>,
    /// Whether `model` holds the best evaluation's weights (`load_best_model_at_end`).
    pub loaded_best_model: bool,
    #[serde(flatten)]
    pub algorithm: Value,
}

/// The per-step log's file name in a host's work folder.
pub const LOG_FILE: &str = "log.jsonl";

/// The per-step log in a host's work folder.
pub fn log_path(host: &dyn Host) -> PathBuf {
    host.work_dir().join(LOG_FILE)
}

/// The folder of evaluation samples in a host's work folder.
pub const EVAL_DIR: &str = "eval";

/// Train `model` with `algo` to the end (or to cancellation, which checkpoints
/// and returns [`Cancelled`]), evaluating it as `eval` says.
pub fn train<A: Algorithm>(
    model: &mut Transformer,
    algo: &mut A,
    hp: &TrainingConfig,
    host: &dyn Host,
    mut eval: Option<Evaluation>,
) -> Result<Summary> {
    model.gradient_checkpointing = hp.gradient_checkpointing;
    let mut opt = AdamW::new(
        model.trainable(),
        AdamWConfig { beta1: hp.adam_beta1, beta2: hp.adam_beta2, eps: hp.adam_epsilon, weight_decay: hp.weight_decay },
    )?;
    let total = algo.total_steps();
    let warmup = hp.warmup(total);
    let cps = Checkpoints::new(&host.work_dir());
    // The best evaluation's trainable weights: one checkpoint-like folder, replaced atomically.
    let best_cps = Checkpoints::new(&host.work_dir().join("best"));
    let eval_host = SubfolderHost { host, dir: host.work_dir().join(EVAL_DIR) };
    let log_path = log_path(host);
    let mut step = 0;
    let mut best: Option<Best> = None;
    match checkpoint::restore::<Saved<A::State>>(&cps, &mut opt, &model.device)? {
        Some((_, saved, tensors)) => {
            step = saved.step;
            best = saved.best;
            algo.restore(saved.algorithm);
            algo.restore_tensors(tensors)?;
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
    let save = |step: u64, opt: &AdamW, algo: &A, best: Option<Best>| {
        let state = Saved { step, algorithm: algo.state(), best };
        checkpoint::save(&cps, step, hp.save_total_limit, opt, &state, &algo.checkpoint_tensors()?)
    };
    let t_run = Instant::now();
    let mut watch = Watch::default();
    let (mut first_loss, mut final_loss) = (None, None);
    model.take_grads(); // nothing left over from an earlier use of the model
    while step < total {
        if algo.at_boundary() && host.cancel().is_cancelled() {
            if step > last_saved {
                save(step, &opt, algo, best)?;
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
        let lr = learning_rate(hp.learning_rate, hp.lr_scheduler_type, &hp.lr_scheduler_kwargs, step, warmup, total);
        opt.step(&grads, lr)?;
        drop(grads);
        model.refresh_compute_weights()?;
        let optimizer_time = t_opt.elapsed().as_secs_f64();
        step += 1;
        algo.after_update(model, step)?;
        let step_time = t.elapsed().as_secs_f64();
        first_loss.get_or_insert(report.loss);
        final_loss = Some(report.loss);
        let mut evaluated = BTreeMap::new();
        if let Some(ev) = eval.as_mut().filter(|e| e.due(step, total)) {
            fs::create_dir_all(&eval_host.dir).with_context(|| format!("creating {}", eval_host.dir.display()))?;
            let metrics = ev.evaluator.evaluate(model, step, &eval_host)?;
            if let Some(b) = &ev.best {
                let value = *metrics.get(&b.metric).with_context(|| format!("no `{}` in the evaluation", b.metric))?;
                let better = improves(value, best, b.greater_is_better);
                if !value.is_finite() {
                    host.say(&format!(
                        "warning: step {step}: eval/{} is {value}; not a candidate for the best model",
                        b.metric
                    ));
                }
                if better {
                    checkpoint::save_weights(&best_cps, step, &opt)?;
                    best = Some(Best { step, value });
                }
            }
            let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            tracing::info!(step, metrics = %shown.join(", "), "evaluated");
            evaluated = metrics.into_iter().map(|(k, v)| (format!("eval/{k}"), v)).collect();
        }
        let line = StepLine {
            step,
            loss: report.loss,
            grad_norm,
            learning_rate: lr,
            step_time,
            tokens_per_second: report.tokens as f64 / step_time.max(1e-9),
            optimizer_time,
            algo: &report.log,
            eval: evaluated,
        };
        log.append(&line).context("writing the training log")?;
        let logged = serde_json::to_value(&line).context("the step's log line")?;
        host.logged(step, &logged);
        for warning in watch.observe(&logged, step) {
            // Said to the person watching; the run log (JSON) keeps it as an event too.
            tracing::info!(step, %warning, "training warning");
            host.say(&format!("warning: {warning}"));
        }
        if step == 1 || step == total || step.is_multiple_of(hp.logging_steps) {
            let per_step = t_run.elapsed().as_secs_f64() / (step - resumed_from_step) as f64;
            host.say(&step_line(&logged, step, total, per_step));
        }
        bar.set_message(report.message);
        bar.set_position(step);
        let crossed = step / hp.save_steps > last_saved / hp.save_steps;
        if algo.at_boundary() && (crossed || step >= total) {
            save(step, &opt, algo, best)?;
            last_saved = step;
            crate::common::fault::point(&format!("after-checkpoint-{step}"));
        }
    }
    bar.finish_and_clear();
    for warning in watch.finish() {
        tracing::info!(%warning, "training warning");
        host.say(&format!("warning: {warning}"));
    }
    let load_best = eval.as_ref().is_some_and(|e| e.load_best_at_end);
    if let (true, Some(b)) = (load_best, best) {
        checkpoint::load_weights(&best_cps, b.step, &opt, &model.device)?;
        model.refresh_compute_weights()?;
        let metric = eval.as_ref().and_then(|e| e.best.as_ref()).map_or("", |m| m.metric.as_str());
        eprintln!("best model: step {} of {step} (eval/{metric} {:.4}); it is the stage's model", b.step, b.value);
        tracing::info!(step = b.step, value = b.value, "loaded the best evaluated weights");
    }
    Ok(Summary {
        steps: step,
        resumed_from_step,
        steps_run: step - resumed_from_step,
        first_loss,
        final_loss,
        train_seconds_this_run: t_run.elapsed().as_secs_f64(),
        best_model_step: best.map(|b| b.step),
        best_metric: best.map(|b| b.value),
        loaded_best_model: load_best && best.is_some(),
        algorithm: algo.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_evaluation_is_never_the_best() {
        assert!(!improves(f64::NAN, None, true));
        assert!(!improves(f64::INFINITY, None, true) && !improves(f64::NEG_INFINITY, None, false));
        let best = Some(Best { step: 1, value: 0.2 });
        assert!(improves(0.3, best, true) && !improves(0.1, best, true));
        assert!(improves(0.1, best, false));
        // The earliest of equal evaluations wins.
        assert!(!improves(0.2, best, true));
    }
}
