//! `r1pipe status`: each stage's state against the cache, without running anything.

use anyhow::Result;

use super::runner::{human_duration, Decision, Runner};
use crate::common::checkpoints::Checkpoints;

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

pub fn status(runner: &Runner, remote: Option<&super::store::remote::Remote>) -> Result<Vec<StageStatus>> {
    if !runner.cache.exists() {
        // An index deleted beside its record copies is not "never run": say how to restore it.
        runner.cache.db()?;
    }
    let mut in_remote = std::collections::BTreeSet::new();
    let decisions: Vec<(String, Option<Decision>)> = if let Some(remote) = remote {
        let all = runner.decide_all_with_remote(remote)?;
        in_remote.extend(all.iter().filter(|(_, _, r)| *r).map(|(n, _, _)| n.clone()));
        all.into_iter().map(|(n, d, _)| (n, Some(d))).collect()
    } else if runner.cache.exists() {
        runner.decide_all()?.into_iter().map(|(n, d)| (n, Some(d))).collect()
    } else {
        runner.dag.order(runner.pipeline).into_iter().map(|n| (n, None)).collect()
    };
    // A stage with a work folder while another process holds the cache is running, not interrupted.
    let running = runner.cache.holder();
    let mut rows = Vec::new();
    for (name, decision) in decisions {
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
        rows.push(match decision {
            None => row("never run", "no cache yet".into(), "", String::new(), String::new()),
            // Cached, and being made again right now (`run --force`).
            Some(Decision::Cached { record })
                if running.is_some() && runner.cache.work_dir(&record.fingerprint).join("stage.json").exists() =>
            {
                let who = running.as_deref().unwrap_or_default();
                let who = who.split(" (started").next().unwrap_or(who);
                row(
                    "running",
                    format!("forced rerun of a cached result: {who}"),
                    &record.fingerprint,
                    String::new(),
                    String::new(),
                )
            }
            Some(Decision::Cached { record }) => row(
                "cached",
                String::new(),
                &record.fingerprint,
                record.finished_at.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M").to_string(),
                human_duration(record.duration_s),
            ),
            Some(Decision::Pending { upstream }) => row(
                "stale",
                format!("upstream {} not up to date", upstream.join(", ")),
                "",
                String::new(),
                String::new(),
            ),
            Some(Decision::Run { fingerprint, reasons, .. }) => {
                let work = runner.cache.work_dir(&fingerprint);
                let checkpoint = Checkpoints::new(&work).latest();
                if let Some(job) = super::executor::live_job(&work) {
                    // A cluster's job runs it (its head may have died: the next run follows it).
                    let at = checkpoint.map(|(s, _)| format!(", last checkpoint at step {s}")).unwrap_or_default();
                    row(
                        "running",
                        format!("{} {}{at}", job.name, job.state),
                        &fingerprint,
                        String::new(),
                        String::new(),
                    )
                } else if let (Some(holder), true) = (&running, work.join("stage.json").exists()) {
                    let at = checkpoint.map(|(s, _)| format!(", last checkpoint at step {s}")).unwrap_or_default();
                    let who = holder.split(" (started").next().unwrap_or(holder);
                    row("running", format!("{who}{at}"), &fingerprint, String::new(), String::new())
                } else if let Some((step, _)) = checkpoint {
                    row(
                        "interrupted",
                        format!("last checkpoint at step {step}"),
                        &fingerprint,
                        String::new(),
                        String::new(),
                    )
                } else if work.join("stage.json").exists() {
                    row(
                        "interrupted",
                        "no checkpoint yet; will restart".into(),
                        &fingerprint,
                        String::new(),
                        String::new(),
                    )
                } else if let (Some(remote), true) = (remote, in_remote.contains(&name)) {
                    row("in the remote", remote.name.clone(), &fingerprint, String::new(), String::new())
                } else if reasons == ["never run"] {
                    row("never run", String::new(), &fingerprint, String::new(), String::new())
                } else {
                    row("stale", reasons.join("; "), &fingerprint, String::new(), String::new())
                }
            }
        });
    }
    Ok(rows)
}
