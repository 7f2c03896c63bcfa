//! `r1pipe metrics diff`: a pipeline's current metrics against another
//! cache, another pipeline file, or the previous record of each stage
//! (as `dvc metrics diff`): old, new, delta per metric; `r1pipe metrics
//! paired`: two evaluations' samples compared question by question.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use r1pipe::common::table::render_table;
use r1pipe::pipeline::spec::Override;
use r1pipe::pipeline::store::StageRecord;
use r1pipe::pipeline::Workspace;

/// What the current metrics are compared with.
pub enum Baseline {
    /// The newest earlier record of the same stage in the same cache.
    Previous,
    /// The same pipeline's current records in another cache.
    Cache(PathBuf),
    /// Another pipeline file's current records (in its own cache, or `--cache`).
    Pipeline(PathBuf),
}

/// The numbers of a record to compare, as flat `path → number` (its kind's
/// metrics view; with `all`, the raw metrics of kinds that have none).
fn flat_metrics(ws: &Workspace, rec: &StageRecord, all: bool) -> BTreeMap<String, f64> {
    let Some(m) = ws.metrics_of(rec, all) else { return BTreeMap::new() };
    r1pipe::common::params::flatten(&m).into_iter().filter_map(|(k, v)| Some((k, v.as_f64()?))).collect()
}

/// `set`: the overrides the compared run was made with; `against_set`: those
/// of the baseline (`--against`, `--against-cache`); `only`: the stages
/// compared, selected as `run --only` selects them (all when empty).
pub fn diff(
    file: &Path,
    set: &[Override],
    only: &[String],
    against_set: &[Override],
    cache: Option<PathBuf>,
    baseline: Baseline,
    all: bool,
) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let ws = Workspace::open(file, set, cache.clone(), &registry)?;
    let mut now = ws.current_records()?;
    if !only.is_empty() {
        let chosen = ws.select(only)?;
        now.retain(|name, _| chosen.contains(name));
    }
    if now.is_empty() {
        bail!("no stage of {} is up to date in {}; run it first", file.display(), ws.cache.root.display());
    }
    let before: BTreeMap<String, StageRecord> = match &baseline {
        Baseline::Cache(dir) => Workspace::open(file, against_set, Some(dir.clone()), &registry)?.current_records()?,
        Baseline::Pipeline(other) => Workspace::open(other, against_set, cache, &registry)?.current_records()?,
        Baseline::Previous => ws.previous_records()?,
    };
    let mut rows = Vec::new();
    for (stage, rec) in &now {
        let new = flat_metrics(&ws, rec, all);
        if new.is_empty() {
            continue;
        }
        let old = before.get(stage).map(|r| flat_metrics(&ws, r, all)).unwrap_or_default();
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
    println!("{} (cache {}) against {against}", file.display(), ws.cache.root.display());
    if rows.is_empty() {
        println!("no metrics to compare (no stage with headline metrics, such as an evaluation, is up to date; --all compares every stage)");
        return Ok(0);
    }
    print!("{}", render_table(&["STAGE", "METRIC", "OLD", "NEW", "DELTA"], &rows));
    Ok(0)
}

/// `r1pipe metrics paired A B`: model `model_a` of samples file `a` against
/// `model_b` of `b`, on the questions both answered.
pub fn paired(a: &Path, model_a: Option<&str>, b: &Path, model_b: Option<&str>) -> Result<i32> {
    use r1pipe::eval::metrics::ALPHA;
    use r1pipe::eval::paired::{compare_models, read_model};
    let (ea, eb) = (read_model(a, model_a)?, read_model(b, model_b)?);
    let (shared, metrics) = compare_models(&ea, &eb, "A", "B");
    println!("A: {} (model {}, {} questions)", a.display(), ea.model, ea.samples.len());
    println!("B: {} (model {}, {} questions)", b.display(), eb.model, eb.samples.len());
    if shared == 0 {
        bail!("A and B have no question in common (questions are matched by their text and reference answer)");
    }
    println!("{shared} questions in both; McNemar's exact test on them (* significant at {ALPHA})");
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let rows: Vec<Vec<String>> = metrics
        .iter()
        .map(|m| {
            let c = &m.comparison;
            vec![
                c.metric.clone(),
                pct(m.accuracy_a),
                pct(m.accuracy_b),
                format!("{:+.1} points", 100.0 * c.delta),
                c.a_only.to_string(),
                c.b_only.to_string(),
                format!("{:.3}{}", c.p_value, if c.significant { " *" } else { "" }),
            ]
        })
        .collect();
    print!("{}", render_table(&["METRIC", "A", "B", "B − A", "ONLY A RIGHT", "ONLY B RIGHT", "P"], &rows));
    Ok(0)
}
