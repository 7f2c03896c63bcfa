//! `r1pipe exp show`: runs side by side, as `dvc exp show` shows experiments —
//! one row per training run (a stage, or each member of a matrix stage) of the
//! pipelines given, its parameters (those that differ across the rows) and its
//! final metrics as columns: the training's own (final loss, rewards, KL) and
//! what each `evaluate` stage measured of that run's model. `--sort`,
//! `--only` runs (as `run --only` selects stages), `--keep` columns, and
//! `--csv` / `--json` for other tools. (`metrics diff` keeps the
//! per-key form for two runs.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::Value;

use r1pipe::common::table::render_table;
use r1pipe::pipeline::kind::ExpView;
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
    /// Only these runs: stage names, a matrix stage (all its members) or patterns
    /// (`grpo@*`), as `run --only` takes them (repeatable)
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Keep only the columns whose names contain one of these (comma-separated; DVC's `--keep`)
    #[arg(long, value_delimiter = ',', value_name = "TEXT")]
    pub keep: Vec<String>,
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

/// Metrics by the run they are of: what a measuring stage's view holds.
type RunMetrics = BTreeMap<String, Vec<(String, f64)>>;

/// A row of `--json`: the shown columns only, parameters and metrics apart.
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    pipeline: &'a str,
    run: &'a str,
    params: BTreeMap<&'a str, &'a Value>,
    metrics: BTreeMap<&'a str, f64>,
}

struct Row {
    pipeline: String,
    stage: String,
    params: BTreeMap<String, Value>,
    metrics: BTreeMap<String, f64>,
}

pub fn show(a: ExpShowArgs) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let mut rows = Vec::new();
    // Metric columns in first-seen order: the training kinds' own order first.
    let mut metric_order: Vec<String> = Vec::new();
    let mut measured_order: Vec<String> = Vec::new();
    for file in &a.pipelines {
        let ws = Workspace::open(file, &a.set, a.cache.clone(), &registry)?;
        let mut records = ws.current_records()?;
        if !a.only.is_empty() {
            let chosen = ws.select(&a.only)?;
            records.retain(|name, _| chosen.contains(name));
        }
        let view = |rec: &StageRecord| {
            let kind = registry.get(&rec.inputs.kind)?;
            kind.exp_view(&rec.inputs.params, rec.metrics.as_ref())
        };
        // What the measuring stages (evaluate) measured, by the run measured.
        let mut measures: Vec<(String, RunMetrics)> = Vec::new();
        for (name, rec) in &records {
            if let Some(ExpView::Measures(m)) = view(rec) {
                measures.push((name.clone(), m));
            }
        }
        // One measuring stage: `eval.<metric>`; several: `eval.<stage>.<metric>`.
        let several = measures.iter().filter(|(_, m)| !m.is_empty()).count() > 1;
        for (name, rec) in &records {
            let Some(ExpView::Run { params, metrics: own }) = view(rec) else { continue };
            let mut metrics = BTreeMap::new();
            for (key, x) in own {
                remember(&mut metric_order, &key);
                metrics.insert(key, x);
            }
            for (by, measured) in &measures {
                for (key, x) in measured.get(name).into_iter().flatten() {
                    let col = if several { format!("eval.{by}.{key}") } else { format!("eval.{key}") };
                    remember(&mut measured_order, &col);
                    metrics.insert(col, *x);
                }
            }
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
    let metrics: Vec<String> = metric_order.into_iter().chain(measured_order).collect();
    let keep = |c: &str| a.keep.is_empty() || a.keep.iter().any(|o| c.contains(o.as_str()));
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
        let out: Vec<JsonRow> = rows
            .iter()
            .map(|r| JsonRow {
                pipeline: &r.pipeline,
                run: &r.stage,
                params: params.iter().map(|k| (k.as_str(), r.params.get(k).unwrap_or(&Value::Null))).collect(),
                metrics: metrics.iter().filter_map(|k| Some((k.as_str(), *r.metrics.get(k)?))).collect(),
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

fn remember(order: &mut Vec<String>, key: &str) {
    if !order.iter().any(|k| k == key) {
        order.push(key.to_string());
    }
}

/// A parameter's value in a cell. Small and large floats in exponent form,
/// so a column of learning rates reads `1e-5`, `1e-6` (JSON would write
/// `0.00001` beside `1e-6`).
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_f64() => match n.as_f64() {
            Some(x) if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e6) => format!("{x:e}"),
            Some(x) => x.to_string(),
            None => n.to_string(),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_cells_write_small_and_large_floats_alike() {
        let cell = |v: Value| text(Some(&v));
        assert_eq!(cell(serde_json::json!(1e-5)), "1e-5");
        assert_eq!(cell(serde_json::json!(1e-6)), "1e-6");
        assert_eq!(cell(serde_json::json!(3.5e-6)), "3.5e-6");
        assert_eq!(cell(serde_json::json!(0.0003)), "0.0003");
        assert_eq!(cell(serde_json::json!(0.5)), "0.5");
        assert_eq!(cell(serde_json::json!(4)), "4");
        assert_eq!(cell(serde_json::json!("r1-gsm8k")), "r1-gsm8k");
    }
}
