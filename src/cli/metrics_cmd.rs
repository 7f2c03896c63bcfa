//! `r1pipe metrics diff`: a pipeline's current metrics against another
//! cache, another pipeline file, or the previous record of each stage
//! (as `dvc metrics diff`): old, new, delta per metric.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value;

use r1pipe::common::table::render_table;
use r1pipe::eval::metrics::EvalMetrics;
use r1pipe::pipeline::runner::{Decision, Runner};
use r1pipe::pipeline::spec;
use r1pipe::pipeline::store::StageRecord;

/// What the current metrics are compared with.
pub enum Baseline {
    /// The newest earlier record of the same stage in the same cache.
    Previous,
    /// The same pipeline's current records in another cache.
    Cache(PathBuf),
    /// Another pipeline file's current records (in its own cache, or `--cache`).
    Pipeline(PathBuf),
}

/// Current records (stage → record) of a pipeline against a cache.
fn current(file: &Path, cache: Option<PathBuf>) -> Result<(String, BTreeMap<String, StageRecord>, PathBuf)> {
    let registry = r1pipe::stages::registry();
    let pipeline = spec::load(file, &[], &registry)?;
    let root = cache.unwrap_or_else(|| pipeline.project.root.join("cache"));
    let runner = Runner::new(&pipeline, &registry, root.clone())?;
    let mut out = BTreeMap::new();
    if runner.cache.exists() {
        for (name, d) in runner.decide_all()? {
            if let Decision::Cached { record } = d {
                out.insert(name, *record);
            }
        }
    }
    Ok((pipeline.name.clone(), out, root))
}

/// A record's metrics as flat `path → number` (evaluation metrics of any
/// version read through the current schema first, comparisons left out).
fn flat_metrics(rec: &StageRecord) -> BTreeMap<String, f64> {
    let Some(m) = &rec.metrics else { return BTreeMap::new() };
    let m = if rec.inputs.kind == "evaluate" {
        match EvalMetrics::from_json(m) {
            Ok(e) => serde_json::to_value(&e.models)
                .map(|models| serde_json::json!({ "models": models }))
                .unwrap_or_default(),
            Err(_) => m.clone(),
        }
    } else {
        m.clone()
    };
    let mut out = BTreeMap::new();
    flatten("", &m, &mut out);
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, x, out);
            }
        }
        _ => {}
    }
}

pub fn diff(file: &Path, cache: Option<PathBuf>, baseline: Baseline, all: bool) -> Result<i32> {
    let (name, now, root) = current(file, cache.clone())?;
    if now.is_empty() {
        bail!("no stage of {} is up to date in {}; run it first", file.display(), root.display());
    }
    let before: BTreeMap<String, StageRecord> = match &baseline {
        Baseline::Cache(dir) => current(file, Some(dir.clone()))?.1,
        Baseline::Pipeline(other) => current(other, cache)?.1,
        Baseline::Previous => {
            let c = r1pipe::pipeline::store::Cache::new(&root);
            let db = c.db()?;
            let mut prev: BTreeMap<String, StageRecord> = BTreeMap::new();
            for rec in c.all_records(&db)? {
                let Some(cur) = now.get(&rec.stage) else { continue };
                if rec.pipeline != name || rec.fingerprint == cur.fingerprint || rec.finished_at > cur.finished_at {
                    continue;
                }
                if prev.get(&rec.stage).is_none_or(|p| rec.finished_at > p.finished_at) {
                    prev.insert(rec.stage.clone(), rec);
                }
            }
            prev
        }
    };
    let mut rows = Vec::new();
    for (stage, rec) in &now {
        // Evaluations by default (what people compare); every stage's numbers with --all.
        if !all && rec.inputs.kind != "evaluate" {
            continue;
        }
        let new = flat_metrics(rec);
        let old = before.get(stage).map(flat_metrics).unwrap_or_default();
        let keys: std::collections::BTreeSet<&String> = new.keys().chain(old.keys()).collect();
        for k in keys {
            if k.ends_with("ci95") || k.contains(".ci95") {
                continue;
            }
            let (o, n) = (old.get(k), new.get(k));
            let fmt = |x: Option<&f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            let delta = match (o, n) {
                (Some(a), Some(b)) => format!("{:+.4}", b - a),
                _ => "-".into(),
            };
            rows.push(vec![stage.clone(), k.clone(), fmt(o), fmt(n), delta]);
        }
    }
    let against = match &baseline {
        Baseline::Previous => "the previous record of each stage".to_string(),
        Baseline::Cache(d) => format!("cache {}", d.display()),
        Baseline::Pipeline(p) => format!("pipeline {}", p.display()),
    };
    println!("{} (cache {}) against {against}", file.display(), root.display());
    if rows.is_empty() {
        println!("no metrics to compare (no evaluate stage is up to date; --all compares every stage)");
        return Ok(0);
    }
    print!("{}", render_table(&["STAGE", "METRIC", "OLD", "NEW", "DELTA"], &rows));
    Ok(0)
}
