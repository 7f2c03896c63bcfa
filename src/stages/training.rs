//! What the training stages share: their inputs (the model and the data,
//! checked and entering the fingerprint), their outputs (one table), the run
//! (the training loop, then the model, adapter, log, plots and metrics
//! written) and the render hook of their curves. The algorithms' settings,
//! defaults and checks are theirs (`train::grpo::GrpoConfig`,
//! `train::sft::SftConfig`); a training stage kind is its wiring.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::Value;

use super::model_common::{check_model_ref, open_model};
use crate::common::ParamError;
use crate::model::lora::LoraConfig;
use crate::model::LoadedModel;
use crate::pipeline::kind::{ExpView, PlotOptions, PlotRun};
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext};
use crate::train::config::TrainingConfig;
use crate::train::plots::{RunLog, Style};
use crate::train::trainer::{self, Algorithm, Evaluation, Summary};

/// What a training stage writes: GRPO all of these, SFT all but `eval` (it does
/// not evaluate while it trains).
pub const OUTPUTS_WITH_EVAL: &[OutputSpec] = &[
    OutputSpec::dir("model", "the trained model, Hugging Face layout (LoRA adapters merged)"),
    OutputSpec::file("metrics", "metrics.json", "summary of the run: losses, steps, tokens, time"),
    OutputSpec::file("log", "log.jsonl", "per-step metrics with TRL's names"),
    OutputSpec::dir("plots", "SVG curves of the log and an index.html"),
    OutputSpec::dir("adapter", "LoRA runs: the adapters in PEFT layout (peft, vLLM, SGLang load it)"),
    OutputSpec::dir("eval", "evaluation during training (`eval_dataset`): each evaluated step's judged samples"),
];
pub const OUTPUTS: &[OutputSpec] = OUTPUTS_WITH_EVAL.split_at(5).0;

/// Outputs (of those `declared`) a training stage with these parameters does not write.
pub fn absent_outputs(declared: &[OutputSpec], params: &Value) -> Vec<(&'static str, &'static str)> {
    let given = |key: &str| params.get(key).is_some_and(|v| !v.is_null());
    let mut absent = Vec::new();
    if !given("lora") {
        absent.push(("adapter", "only LoRA runs (`lora:`) write an adapter; this run's result is `model`"));
    }
    if !given("eval_dataset") {
        absent.push(("eval", "only runs with an `eval_dataset` evaluate while they train"));
    }
    absent.retain(|(name, _)| declared.iter().any(|o| o.name == *name));
    absent
}

/// The checks of a training stage's inputs: the model and the data are given,
/// and local ones exist (they enter the fingerprint by content).
pub fn check_inputs(model: &str, train: &str, project: &Project) -> (Requirements, Vec<ParamError>) {
    let mut errors = Vec::new();
    let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
    for (key, value) in [("model", model), ("train", train)] {
        if value.trim().is_empty() {
            errors.push(
                ParamError::new(key, "required parameter is missing").hint(format!("add `{key}:` under `with:`")),
            );
        }
    }
    if !model.trim().is_empty() {
        match check_model_ref("model", model, project) {
            Ok(Some(local)) => req.local_paths.push(local),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if let Some(local) = project.local_path(train).filter(|_| !train.trim().is_empty()) {
        if let Some(problem) = jsonl_file_problem(&local) {
            errors.push(ParamError::new("train", problem));
        }
        req.local_paths.push(("train".into(), local));
    }
    (req, errors)
}

/// Why a local data file named by a parameter cannot be the JSONL it must be:
/// a folder, or a file whose first line is not JSON (a binary file, the wrong
/// file). `None` when it looks right or does not exist (that is said elsewhere).
pub fn jsonl_file_problem(path: &Path) -> Option<String> {
    use std::io::{BufRead, Read};
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        return Some(format!("{} is a folder; a JSONL file is expected here", path.display()));
    }
    if !meta.is_file() {
        return None; // devices and pipes are refused with every local input
    }
    let mut first = Vec::new();
    let file = std::fs::File::open(path).ok()?;
    std::io::BufReader::new(file.take(1 << 20)).read_until(b'\n', &mut first).ok()?;
    let text = String::from_utf8(first).ok();
    match text.as_deref().map(str::trim) {
        None => Some(format!("{} is not text: a JSONL file (one JSON object per line) is expected", path.display())),
        Some("") => None,
        Some(line) if serde_json::from_str::<serde_json::Value>(line).is_err() => {
            Some(format!("{}: line 1 is not JSON: a JSONL file (one JSON object per line) is expected", path.display()))
        }
        Some(_) => None,
    }
}

/// A training stage's data file: an artifact's bound path, or a local file.
pub fn data_path(train: &str, project: &Project) -> PathBuf {
    project.local_path(train).unwrap_or_else(|| train.into())
}

/// A stage's own `bf16:` and `seed:` (TRL's names) over the pipeline's `dtype:` and `seed:`.
pub fn apply_stage_settings(ctx: &mut StageContext, cfg: &TrainingConfig) {
    ctx.env.dtype = cfg.dtype(&ctx.env.dtype).to_string();
    if let Some(seed) = cfg.seed {
        ctx.env.seed = seed;
    }
}

/// A training stage's model, with LoRA adapters added when asked for.
pub fn open_trainable(ctx: &StageContext, model: &str, lora: Option<&LoraConfig>) -> Result<LoadedModel> {
    let mut loaded = open_model(ctx, model)?;
    if let Some(l) = lora {
        loaded.model.add_lora(l.clone(), ctx.env.seed)?;
    }
    Ok(loaded)
}

/// The training loop, its steps also reported where `report_to` says; the
/// tracking run ends `FINISHED`, `KILLED` (stopped, resumable) or `FAILED`.
fn train_reporting<A: Algorithm>(
    ctx: &StageContext,
    model: &mut crate::model::Transformer,
    algo: &mut A,
    cfg: &TrainingConfig,
    eval: Option<Evaluation>,
) -> Result<Summary> {
    let setup = crate::tracking::Setup {
        report_to: &cfg.report_to,
        pipeline: &ctx.pipeline,
        stage: &ctx.stage,
        params: &ctx.params,
        work_dir: &ctx.work_dir,
        tensorboard_dir: ctx.tensorboard_dir.clone(),
    };
    let say = |line: &str| crate::common::Host::say(ctx, line);
    let trackers = crate::tracking::Trackers::start(&setup, &say);
    if trackers.is_empty() {
        return trainer::train(model, algo, cfg, ctx, eval);
    }
    let host = crate::tracking::TrackingHost { inner: ctx, trackers: std::sync::Mutex::new(trackers) };
    let result = trainer::train(model, algo, cfg, &host, eval);
    let status = match &result {
        Ok(_) => "FINISHED",
        Err(e) if e.downcast_ref::<crate::common::Cancelled>().is_some() => "KILLED",
        Err(_) => "FAILED",
    };
    // Where the results are: the stage's fingerprint names them in the cache.
    let fingerprint = ctx.work_dir.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    let tags = [
        ("fingerprint".to_string(), fingerprint),
        ("pipeline".to_string(), ctx.pipeline.clone()),
        ("find_model".to_string(), format!("r1pipe show {}.model -p <the {} pipeline file>", ctx.stage, ctx.pipeline)),
    ];
    if let Ok(mut t) = host.trackers.into_inner() {
        t.end(status, &tags, &say);
    }
    result
}

/// Run `algo` on the loaded model through the loop, then write the stage's
/// outputs: the model (Hugging Face layout, adapters merged), the per-step
/// log and the summary metrics (with `extra` added); with LoRA also the
/// adapters in PEFT layout, naming `base_model` (the `model` parameter) as their base.
/// With `eval`, the model is evaluated as it trains (and may end as its best evaluation).
#[allow(clippy::too_many_arguments)]
pub fn run<A: Algorithm>(
    ctx: &mut StageContext,
    loaded: &mut LoadedModel,
    base_model: &str,
    algo: &mut A,
    cfg: &TrainingConfig,
    extra: Value,
    eval: Option<Evaluation>,
) -> Result<Summary> {
    let summary = train_reporting(ctx, &mut loaded.model, algo, cfg, eval)?;
    crate::model::load::save(&loaded.model, &loaded.files_dir, &ctx.output_path("model"))?;
    if loaded.model.lora.is_some() {
        crate::model::peft::save_adapter(&loaded.model, base_model, &ctx.output_path("adapter"))?;
    }
    std::fs::copy(trainer::log_path(ctx), ctx.output_path("log"))?;
    let evaluations = crate::common::Host::work_dir(ctx).join(trainer::EVAL_DIR);
    if evaluations.is_dir() {
        let out = ctx.output_path("eval");
        std::fs::create_dir_all(&out)?;
        for entry in std::fs::read_dir(&evaluations)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::copy(&path, out.join(path.file_name().unwrap_or_default()))?;
            }
        }
    }
    let run = RunLog {
        label: ctx.stage.clone(),
        log: ctx.output_path("log"),
        best_step: summary.best_model_step.map(|s| s as f64),
        config: None,
    };
    crate::train::plots::render(
        &[run],
        &ctx.output_path("plots"),
        &format!("{} ({})", ctx.stage, ctx.kind),
        Style::default(),
    )?;
    let mut metrics = serde_json::to_value(&summary)?;
    if let (Some(m), Value::Object(e)) = (metrics.as_object_mut(), extra) {
        m.extend(e);
    }
    crate::common::fsutil::write_file(&ctx.output_path("metrics"), serde_json::to_string_pretty(&metrics)?)?;
    if summary.resumed_from_step > 0 {
        eprintln!("{}: resumed at step {} of {}", ctx.stage, summary.resumed_from_step, summary.steps);
    }
    ctx.set_metrics(metrics);
    Ok(summary)
}

/// The parameters of a training stage as they enter its fingerprint: all but
/// `report_to`, which says where numbers are also sent, never what they are.
pub fn fingerprint_params(params: &Value) -> Value {
    let mut p = params.clone();
    if let Some(m) = p.as_object_mut() {
        m.remove("report_to");
    }
    p
}

/// The training metrics `r1pipe exp show` compares, in this order, when a run has them.
const EXP_METRICS: &[&str] =
    &["steps", "final_loss", "reward_first", "reward_last10_mean", "best_metric", "best_model_step"];

/// The exp-show hook of the training kinds: the run's settings without the
/// paths of its inputs (`model`, `train`, `eval_dataset`: what a run starts
/// from, not a choice that differs between members of a sweep), and its
/// final metrics.
pub fn exp_view(params: &Value, metrics: Option<&Value>) -> Option<ExpView> {
    let mut settings = crate::common::params::flatten(params);
    settings.retain(|k, _| k != "train" && k != "model" && !k.starts_with("eval_dataset"));
    let metrics =
        EXP_METRICS.iter().filter_map(|key| Some(((*key).to_string(), metrics?.get(*key)?.as_f64()?))).collect();
    Some(ExpView::Run { params: settings, metrics })
}

/// The render hook of the training kinds: each run's per-step log (the
/// finished `log` output, or the work folder's log of an unfinished run),
/// with the best step its `metrics` name.
pub fn render(runs: &[PlotRun], out: &Path, title: &str, options: PlotOptions) -> Result<PathBuf> {
    let mut logs = Vec::new();
    for run in runs {
        let log = match (run.artifacts.get("log"), &run.work_dir) {
            (Some(log), _) => log.clone(),
            (None, Some(dir)) => dir.join(trainer::LOG_FILE),
            (None, None) => anyhow::bail!("{}: no training log recorded", run.label),
        };
        if !log.exists() {
            anyhow::bail!("{}: no training step logged yet (no {})", run.label, log.display());
        }
        let best_step = run
            .artifacts
            .get("metrics")
            .and_then(|m| std::fs::read(m).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|m| m.get("best_model_step")?.as_f64());
        logs.push(RunLog { label: run.label.clone(), log, best_step, config: Some(run.params.clone()) });
    }
    let style = Style { smooth: options.smooth, wall_clock: options.wall_clock };
    crate::train::plots::render(&logs, out, title, style)
}
