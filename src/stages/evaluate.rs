//! `evaluate`: one or several models side by side on the GSM8K test prompts:
//! strict and flexible accuracy with 95% intervals, format adherence,
//! completion length, truncation, and paired tests between the models. This
//! file is the stage's parameters and wiring; the loop is `eval::run` (which
//! keeps finished samples, so an interrupted evaluation continues) and the
//! numbers are `eval::metrics`. Optionally few-shot, with exemplars from the train split.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model_common::{check_model_ref, open_for_sampling, sampling_errors};
use super::rollout_param;
use crate::common::params::{checked, with_defaults};
use crate::common::ParamError;
use crate::data::jsonl;
use crate::data::PromptRow;
use crate::eval::metrics::EvalMetrics;
use crate::eval::run::{self, EvalSettings};
use crate::model::tool_call::CallFormat;
use crate::model::SamplingParams;
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::rollout::tools::ToolSettings;
use crate::rollout::ServerConfig;

/// The stage's parameters (every one with a default; the required ones are checked).
#[derive(Debug, Serialize, Deserialize)]
struct Params {
    /// Name → model reference, or `{model: REF, rollout: {url, model}}` for a
    /// model served elsewhere (REF gives the tokenizer). Evaluated and shown in name order.
    models: BTreeMap<String, ModelEntry>,
    /// The `test` output of a `format` stage (or JSONL of the same shape).
    test: String,
    limit: Option<usize>,
    batch_size: usize,
    /// Worked examples before each question (0: none), taken from `train`.
    num_fewshot: usize,
    /// Where few-shot exemplars come from: the `train` output of a `format` stage (never the test split).
    train: Option<String>,
    #[serde(flatten)]
    sampling: SamplingParams,
    /// Tools that answer the models' calls (inline or Hermes), as in training.
    #[serde(flatten)]
    tools: ToolSettings,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            models: BTreeMap::new(),
            test: String::new(),
            limit: None,
            batch_size: 8,
            num_fewshot: 0,
            train: None,
            sampling: SamplingParams::default(),
            tools: ToolSettings::default(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a model (a folder, a .gguf, a hub id or `${stage.model}`) or a served one ({model, rollout})"
)]
enum ModelEntry {
    Local(String),
    Served { model: String, rollout: ServerConfig },
}

impl ModelEntry {
    fn reference(&self) -> &str {
        match self {
            ModelEntry::Local(r) | ModelEntry::Served { model: r, .. } => r,
        }
    }
    fn rollout(&self) -> Option<&ServerConfig> {
        match self {
            ModelEntry::Local(_) => None,
            ModelEntry::Served { rollout, .. } => Some(rollout),
        }
    }
}

/// A served entry's keys and `rollout:` settings, checked with their paths
/// (serde's untagged enums only say that nothing matched).
fn check_served_entries(params: &Value) -> Vec<ParamError> {
    let mut errors = Vec::new();
    for (name, entry) in params.get("models").and_then(Value::as_object).into_iter().flatten() {
        let Some(obj) = entry.as_object() else { continue };
        let at = |k: &str| format!("models.{name}.{k}");
        for k in obj.keys().filter(|k| !["model", "rollout"].contains(&k.as_str())) {
            errors
                .push(ParamError::new(at(k), format!("unknown key `{k}`")).hint("a served model is {model, rollout}"));
        }
        if !obj.get("model").is_some_and(Value::is_string) {
            errors.push(
                ParamError::new(at("model"), "a served model needs `model`: where its tokenizer and chat template are")
                    .hint("the same model folder or hub id the server serves"),
            );
        }
        match rollout_param::check(entry, "rollout") {
            Ok(Some(_)) => {}
            Ok(None) => errors.push(ParamError::new(at("rollout"), "missing: the server to ask ({url, model})")),
            Err(es) => errors.extend(es.into_iter().map(|mut e| {
                e.path = format!("models.{name}.{}", e.path);
                e
            })),
        }
    }
    errors
}

pub struct Evaluate;

/// What `r1pipe exp show` shows of each evaluated run, in this order.
const EXP_METRICS: &[&str] = &["accuracy_strict", "accuracy_flexible", "strict_format", "tool_calls_per_completion"];

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec::file("metrics", "metrics.json", "per-model accuracy and format adherence"),
    OutputSpec::file("samples", "samples.jsonl", "every completion with its verdict"),
];

impl StageKind for Evaluate {
    fn info(&self) -> &'static KindInfo {
        &KindInfo {
            name: "evaluate",
            version: 3,
            description: "GSM8K accuracy and format adherence of one or several models",
            outputs: OUTPUTS,
        }
    }

    fn fingerprint_params(&self, params: &Value) -> Value {
        let mut p = params.clone();
        if let Some(Value::Object(models)) = p.get_mut("models") {
            for entry in models.values_mut() {
                *entry = rollout_param::fingerprint_params(entry, "rollout");
            }
        }
        rollout_param::mark_tool_sampler(&mut p, 0.0);
        p
    }

    fn parameters(&self) -> Value {
        serde_json::to_value(Params::default()).unwrap_or_default()
    }
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let served = check_served_entries(params);
        if !served.is_empty() {
            return Err(served);
        }
        let p: Params = with_defaults(params)?;
        let mut errors = sampling_errors(&p.sampling);
        errors.extend(p.tools.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
        let any_served = p.models.values().any(|m| m.rollout().is_some());
        if p.tools.enabled() && any_served && p.tools.tool_call_format == CallFormat::Inline {
            errors.push(ParamError::new("tools", "a server cannot stop at an inline call (`<<expr=` has no closing string to stop on)").hint("set `tool_call_format: hermes` (its calls end at `</tool_call>`, which the server stops on), or sample here without `rollout:`"));
        }
        let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
        if p.test.trim().is_empty() {
            errors.push(ParamError::new("test", "required parameter is missing").hint("test: ${prompts.test}"));
        }
        if p.models.is_empty() {
            errors.push(
                ParamError::new("models", "no models to evaluate")
                    .hint("e.g. models: { base: Qwen/Qwen2.5-0.5B-Instruct }"),
            );
        }
        for (name, r) in &p.models {
            let at = match r {
                ModelEntry::Local(_) => format!("models.{name}"),
                ModelEntry::Served { .. } => format!("models.{name}.model"),
            };
            match check_model_ref(&at, r.reference(), project) {
                Ok(Some(local)) => req.local_paths.push(local),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        if let Some(local) = project.local_path(&p.test) {
            req.local_paths.push(("test".into(), local));
        }
        errors.extend(crate::common::params::batch_problem("batch_size", p.batch_size));
        match (&p.train, p.num_fewshot) {
            (None, k) if k > 0 => errors.push(
                ParamError::new("num_fewshot", format!("{k}-shot needs exemplars: give `train`"))
                    .hint("train: ${prompts.train} (the train split; exemplars never come from the test split)"),
            ),
            (Some(t), _) => {
                if let Some(local) = project.local_path(t) {
                    req.local_paths.push(("train".into(), local));
                }
            }
            _ => {}
        }
        checked(req, errors)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params_with_defaults()?;
        let test_path = ctx.project.local_path(&p.test).unwrap_or_else(|| p.test.clone().into());
        let mut rows: Vec<PromptRow> = jsonl::read(&test_path)?.into_iter().map(|(_, r)| r).collect();
        if let Some(n) = p.limit {
            rows.truncate(n);
        }
        let shots = match (&p.train, p.num_fewshot) {
            (Some(t), k) if k > 0 => {
                run::fewshot(&ctx.project.local_path(t).unwrap_or_else(|| t.into()), k, ctx.env.seed)?
            }
            _ => Vec::new(),
        };
        let settings = EvalSettings {
            sampling: p.sampling.clone(),
            batch_size: p.batch_size,
            shots,
            seed: ctx.env.seed,
            tools: p.tools.clone(),
            tool_dir: ctx.project.root.clone(),
        };
        let mut all = Vec::new();
        let mut verdicts = BTreeMap::new();
        for (name, entry) in &p.models {
            let (mut done, todo) = run::resume(ctx, name, rows.len())?;
            if !done.is_empty() {
                eprintln!("{}: {name}: kept {} finished samples of an interrupted run", ctx.stage, done.len());
            }
            if !todo.is_empty() {
                let m = open_for_sampling(ctx, entry.reference(), entry.rollout())?;
                done.extend(run::evaluate(name, &m.sampler(), m.tokenizer(), &rows, &todo, &settings, ctx)?);
            }
            done.sort_by_key(|s| s.index);
            verdicts.insert(name.clone(), done.iter().map(|s| s.verdict()).collect::<Vec<_>>());
            all.extend(done);
        }
        jsonl::write(&ctx.output_path("samples"), &all)?;
        let metrics = EvalMetrics::of(rows.len(), p.num_fewshot, &verdicts, p.tools.enabled());
        let value = serde_json::to_value(&metrics)?;
        crate::common::fsutil::write_file(&ctx.output_path("metrics"), serde_json::to_string_pretty(&value)?)?;
        ctx.set_metrics(value);
        Ok(())
    }

    fn summary(&self, outputs: &BTreeMap<String, std::path::PathBuf>) -> Option<String> {
        let text = std::fs::read_to_string(outputs.get("metrics")?).ok()?;
        Some(EvalMetrics::from_json(&serde_json::from_str(&text).ok()?).ok()?.table())
    }

    /// Per model that is another stage's trained model (`${sft@a.model}`, or
    /// `{model: ${…}}` for a served one), what this stage measured of it.
    fn exp_view(&self, params: &Value, metrics: Option<&Value>) -> Option<crate::pipeline::kind::ExpView> {
        let measured = metrics?.get("models")?.as_object()?;
        let mut runs = BTreeMap::new();
        for (name, reference) in params.get("models")?.as_object()? {
            let text = reference.as_str().or_else(|| reference.get("model").and_then(Value::as_str)).unwrap_or("");
            let Some(stage) = text.strip_prefix("${").and_then(|t| t.strip_suffix(".model}")) else { continue };
            let Some(m) = measured.get(name) else { continue };
            let values: Vec<(String, f64)> =
                EXP_METRICS.iter().filter_map(|key| Some(((*key).to_string(), m.get(*key)?.as_f64()?))).collect();
            runs.insert(stage.to_string(), values);
        }
        Some(crate::pipeline::kind::ExpView::Measures(runs))
    }

    /// Per model, the current schema's numbers (files of any version read through
    /// it); the paired comparisons are left out.
    fn metrics_view(&self, metrics: &Value) -> Option<Value> {
        Some(match EvalMetrics::from_json(metrics) {
            Ok(e) => serde_json::json!({ "models": e.models }),
            Err(_) => metrics.clone(),
        })
    }
}
