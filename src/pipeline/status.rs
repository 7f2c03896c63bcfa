//! `r1pipe status`: each stage's state against the cache, without running anything.

use std::collections::BTreeMap;

use anyhow::Result;

use super::checkpoint::Checkpoints;
use super::runner::{human_duration, Decision, Runner};
use super::store::ObjectRef;

#[derive(Debug, Clone)]
pub struct StageStatus {
    pub stage: String,
    pub kind: String,
    pub state: String,
    pub detail: String,
    pub fingerprint: String,
    pub finished: String,
    pub took: String,
}

pub fn status(runner: &Runner) -> Result<Vec<StageStatus>> {
    let mut available: BTreeMap<String, ObjectRef> = BTreeMap::new();
    let mut rows = Vec::new();
    for name in runner.dag.order(runner.pipeline) {
        let stage = runner.pipeline.stage(&name).expect("dag names are stages");
        let row = |state: &str, detail: String, fp: &str, finished: String, took: String| StageStatus {
            stage: name.clone(),
            kind: stage.kind.name().to_string(),
            state: state.to_string(),
            detail,
            fingerprint: fp.chars().take(12).collect(),
            finished,
            took,
        };
        let r = if !runner.cache.exists() {
            row("never run", "no cache yet".into(), "", String::new(), String::new())
        } else {
            match runner.decide(stage, &available, false)? {
                Decision::Cached { record } => {
                    for (o, r) in &record.outputs {
                        available.insert(format!("{name}.{o}"), r.clone());
                    }
                    row(
                        "cached",
                        String::new(),
                        &record.fingerprint,
                        record.finished_at.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M").to_string(),
                        human_duration(record.duration_s),
                    )
                }
                Decision::Pending { upstream } => row(
                    "stale",
                    format!("upstream {} not up to date", upstream.join(", ")),
                    "",
                    String::new(),
                    String::new(),
                ),
                Decision::Run { fingerprint, reasons, .. } => {
                    let cp = Checkpoints::new(&runner.cache.work_dir(&fingerprint)).latest();
                    let started = runner.cache.work_dir(&fingerprint).join("stage.json").exists();
                    if let Some((step, _)) = cp {
                        row(
                            "interrupted",
                            format!("last checkpoint at step {step}"),
                            &fingerprint,
                            String::new(),
                            String::new(),
                        )
                    } else if started {
                        row(
                            "interrupted",
                            "no checkpoint yet; will restart".into(),
                            &fingerprint,
                            String::new(),
                            String::new(),
                        )
                    } else if reasons == ["never run"] {
                        row("never run", String::new(), &fingerprint, String::new(), String::new())
                    } else {
                        row("stale", reasons.join("; "), &fingerprint, String::new(), String::new())
                    }
                }
            }
        };
        rows.push(r);
    }
    Ok(rows)
}

/// A plain aligned table.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}
