//! `r1pipe exp show`: runs side by side, as `dvc exp show` shows experiments —
//! one row per training run (a stage, or each member of a matrix stage) of the
//! pipelines given, its parameters (those that differ across the rows) and its
//! final metrics as columns: the training's own (final loss, rewards, KL) and
//! what each `evaluate` stage measured of that run's model. `--sort`,
//! `--only`, and `--csv` / `--json` for other tools. (`metrics diff` keeps the
//! per-key form for two runs.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use r1pipe::common::table::render_table;
use r1pipe::pipeline::fingerprint::flatten;
use r1pipe::pipeline::spec::Override;
use r1pipe::pipeline::store::StageRecord;
use r1pipe::pipeline::Workspace;

#[derive(clap::Args)]
pub struct ExpShowArgs {
    /// The pipeline files whose runs to show
    #[arg(required = true)]
    pub pipelines: Vec<PathBuf>,
    /// Overrides the runs were made with (applied to every pipeline given)
    #[arg(short = 'S', long = "set", value_name = "STAGE.KEY=VALUE")]
    pub set: Vec<Override>,
    /// Sort the rows by this column (descending for metrics); e.g. eval.accuracy_strict
    #[arg(long, value_name = "COLUMN")]
    pub sort: Option<String>,
    /// Show only the columns whose names contain one of these (comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "TEXT")]
    pub only: Vec<String>,
    /// Every parameter, not only those that differ across the rows
    #[arg(long)]
    pub all_params: bool,
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    #[arg(long)]
    pub json: bool,
    /// Cache root [default: cache/ in each pipeline's project]
    #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// The kinds whose runs are rows; the others (data, evaluation) are not runs to compare.
const RUN_KINDS: &[&str] = &["grpo", "sft"];

/// The training metrics shown, in this order, when a run has them.
const TRAINING_METRICS: &[&str] =
    &["steps", "final_loss", "reward_first", "reward_last10_mean", "best_metric", "best_model_step"];

/// The evaluation metrics shown per evaluate stage.
const EVAL_METRICS: &[&str] = &["accuracy_strict", "accuracy_flexible", "strict_format", "tool_calls_per_completion"];

struct Row {
    pipeline: String,
    stage: String,
    params: BTreeMap<String, Value>,
    metrics: BTreeMap<String, f64>,
}

pub fn show(a: ExpShowArgs) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let mut rows = Vec::new();
    for file in &a.pipelines {
        let ws = Workspace::open(file, &a.set, a.cache.clone(), &registry)?;
        let records = ws.current_records()?;
        // What each evaluate stage measured, by the stage whose model it evaluated.
        let mut evaluated: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for (name, rec) in records.iter().filter(|(_, r)| r.inputs.kind == "evaluate") {
            add_evaluations(name, rec, &mut evaluated);
        }
        for (name, rec) in records.iter().filter(|(_, r)| RUN_KINDS.contains(&r.inputs.kind.as_str())) {
            let mut metrics = BTreeMap::new();
            let m = rec.metrics.clone().unwrap_or_default();
            for key in TRAINING_METRICS {
                if let Some(x) = m.get(*key).and_then(Value::as_f64) {
                    metrics.insert((*key).to_string(), x);
                }
            }
            metrics.extend(evaluated.remove(name).unwrap_or_default());
            let mut params = flatten(&rec.inputs.params);
            params.retain(|k, _| k != "train" && k != "model" && !k.starts_with("eval_dataset"));
            rows.push(Row { pipeline: ws.pipeline.name.clone(), stage: name.clone(), params, metrics });
        }
    }
    if rows.is_empty() {
        bail!("no training run of {} is up to date in the cache: run the pipeline first", names(&a.pipelines));
    }
    // Parameters that differ across the rows (all of them with --all-params).
    let keys: BTreeSet<&String> = rows.iter().flat_map(|r| r.params.keys()).collect();
    let params: Vec<String> = keys
        .into_iter()
        .filter(|k| a.all_params || rows.iter().map(|r| text(r.params.get(*k))).collect::<BTreeSet<_>>().len() > 1)
        .cloned()
        .collect();
    let metrics: Vec<String> = {
        let mut seen: Vec<String> = Vec::new();
        for k in TRAINING_METRICS.iter().map(|s| s.to_string()) {
            if rows.iter().any(|r| r.metrics.contains_key(&k)) {
                seen.push(k);
            }
        }
        let evals: BTreeSet<&String> =
            rows.iter().flat_map(|r| r.metrics.keys()).filter(|k| k.starts_with("eval.")).collect();
        seen.extend(evals.into_iter().cloned());
        seen
    };
    let keep = |c: &str| a.only.is_empty() || a.only.iter().any(|o| c.contains(o.as_str()));
    let params: Vec<String> = params.into_iter().filter(|c| keep(c)).collect();
    let metrics: Vec<String> = metrics.into_iter().filter(|c| keep(c)).collect();

    if let Some(col) = &a.sort {
        if !params.contains(col) && !metrics.contains(col) {
            let all: Vec<&str> = params.iter().chain(&metrics).map(String::as_str).collect();
            bail!("no column `{col}` to sort by: {}", r1pipe::common::diagnostic::suggest(col, &all, "columns"));
        }
        rows.sort_by(|x, y| match (x.metrics.get(col), y.metrics.get(col)) {
            (Some(a), Some(b)) => b.total_cmp(a),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => text(x.params.get(col)).cmp(&text(y.params.get(col))),
        });
    }

    let multi = a.pipelines.len() > 1;
    let mut header: Vec<String> = Vec::new();
    if multi {
        header.push("pipeline".into());
    }
    header.push("run".into());
    header.extend(params.iter().cloned());
    header.extend(metrics.iter().cloned());
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = Vec::new();
            if multi {
                cells.push(r.pipeline.clone());
            }
            cells.push(r.stage.clone());
            cells.extend(params.iter().map(|k| text(r.params.get(k))));
            cells.extend(metrics.iter().map(|k| r.metrics.get(k).map_or("-".to_string(), |x| number(*x))));
            cells
        })
        .collect();

    if a.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("pipeline".into(), r.pipeline.clone().into());
                o.insert("run".into(), r.stage.clone().into());
                o.insert(
                    "params".into(),
                    params
                        .iter()
                        .map(|k| (k.clone(), r.params.get(k).cloned().unwrap_or(Value::Null)))
                        .collect::<Map<_, _>>()
                        .into(),
                );
                o.insert(
                    "metrics".into(),
                    metrics
                        .iter()
                        .filter_map(|k| Some((k.clone(), Value::from(*r.metrics.get(k)?))))
                        .collect::<Map<_, _>>()
                        .into(),
                );
                Value::Object(o)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if a.csv {
        let mut w = String::new();
        for line in std::iter::once(&header).chain(&table) {
            w.push_str(&line.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
            w.push('\n');
        }
        print!("{w}");
    } else {
        let h: Vec<&str> = header.iter().map(String::as_str).collect();
        print!("{}", render_table(&h, &table));
    }
    Ok(0)
}

/// `eval.<metric>` (and `eval.<stage>.<metric>` when several evaluate stages
/// measured a run) for each stage whose model an evaluate stage evaluated.
fn add_evaluations(evaluate: &str, rec: &StageRecord, out: &mut BTreeMap<String, BTreeMap<String, f64>>) {
    let Some(models) = rec.inputs.params.get("models").and_then(Value::as_object) else { return };
    let measured = rec.metrics.as_ref().and_then(|m| m.get("models")).and_then(Value::as_object);
    for (name, reference) in models {
        // `${grpo@a.model}` (or `{model: …}` for a served one): the run it evaluated.
        let text = reference.as_str().or_else(|| reference.get("model").and_then(Value::as_str)).unwrap_or("");
        let Some(stage) = text.strip_prefix("${").and_then(|t| t.strip_suffix(".model}")) else { continue };
        let Some(m) = measured.and_then(|m| m.get(name)) else { continue };
        let row = out.entry(stage.to_string()).or_default();
        for key in EVAL_METRICS {
            if let Some(x) = m.get(*key).and_then(Value::as_f64) {
                let col = if evaluate == "evaluate" { format!("eval.{key}") } else { format!("eval.{evaluate}.{key}") };
                row.insert(col, x);
            }
        }
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn names(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}
