//! `report_to` (TRL's name): a training stage's per-step numbers also go to
//! the tools a team already watches. `tensorboard`: event files under
//! `cache/tensorboard/<pipeline>/<stage>/`, written as each step ends, with
//! the tags TRL's TensorBoard callback writes (`train/loss`,
//! `train/reward`, `eval/…`); `mlflow`: a run on the MLflow tracking server
//! `MLFLOW_TRACKING_URI` names. Tracking never decides a stage's result: it
//! is not part of the fingerprint, and a tracker that fails (a server that is
//! down, a full disk) is a warning, and training goes on without it.

pub mod mlflow;
pub mod tensorboard;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use crate::common::{CancelToken, Host, ParamError};

/// The tools `report_to` may name.
pub const REPORTERS: &[&str] = &["tensorboard", "mlflow", "none"];

/// What is wrong with a `report_to` list, each with what to do instead.
pub fn problems(report_to: &[String]) -> Vec<ParamError> {
    let mut out = Vec::new();
    for r in report_to {
        if REPORTERS.contains(&r.as_str()) {
            continue;
        }
        let hint = match r.as_str() {
            "wandb" => "W&B reads TensorBoard's files: `report_to: tensorboard`, then `wandb sync cache/tensorboard/PIPELINE/STAGE`",
            "all" => "name the tools: [tensorboard, mlflow]",
            _ => "one or more of tensorboard, mlflow, none",
        };
        out.push(ParamError::new("report_to", format!("`{r}` is not a tool r1pipe reports to")).hint(hint));
    }
    out
}

/// Where and as what a stage reports.
pub struct Setup<'a> {
    pub report_to: &'a [String],
    pub pipeline: &'a str,
    pub stage: &'a str,
    /// The stage's settings, logged as the run's parameters.
    pub params: &'a Value,
    /// The stage's work folder (an MLflow run's id is kept there, so a resumed stage continues its run).
    pub work_dir: &'a Path,
    /// `cache/tensorboard/<pipeline>/<stage>`.
    pub tensorboard_dir: PathBuf,
}

/// The open trackers of a training run.
#[derive(Default)]
pub struct Trackers {
    tensorboard: Option<tensorboard::EventWriter>,
    mlflow: Option<mlflow::MlflowRun>,
}

const MLFLOW_RUN_FILE: &str = "mlflow_run_id";

impl Trackers {
    /// Open what `report_to` names; what cannot be opened is said and left out.
    pub fn start(setup: &Setup, say: &dyn Fn(&str)) -> Trackers {
        let mut t = Trackers::default();
        let wants = |name: &str| setup.report_to.iter().any(|r| r == name);
        if wants("tensorboard") {
            match tensorboard::EventWriter::create(&setup.tensorboard_dir) {
                Ok(w) => t.tensorboard = Some(w),
                Err(e) => warn(say, &format!("warning: report_to tensorboard: {e:#}; training goes on without it")),
            }
        }
        if wants("mlflow") {
            match std::env::var("MLFLOW_TRACKING_URI") {
                Err(_) => warn(
                    say,
                    "warning: report_to mlflow: MLFLOW_TRACKING_URI is not set (the URL of an MLflow tracking server, e.g. \
                     http://127.0.0.1:5000); training goes on without it",
                ),
                Ok(uri) => {
                    let experiment = std::env::var("MLFLOW_EXPERIMENT_NAME").unwrap_or_else(|_| setup.pipeline.to_string());
                    let run_file = setup.work_dir.join(MLFLOW_RUN_FILE);
                    let resume = std::fs::read_to_string(&run_file).ok();
                    let params = flat_params(setup.params);
                    match mlflow::MlflowRun::start(&uri, &experiment, setup.stage, resume.as_deref().map(str::trim), &params) {
                        Ok(run) => {
                            if let Err(e) = crate::common::fsutil::write_file(&run_file, &run.run_id) {
                                tracing::warn!(error = %format!("{e:#}"), "the MLflow run id is not kept; a resume starts a new run");
                            }
                            t.mlflow = Some(run);
                        }
                        Err(e) => warn(say, &format!("warning: report_to mlflow: {e:#}; training goes on without it")),
                    }
                }
            }
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.tensorboard.is_none() && self.mlflow.is_none()
    }

    /// One step's log line: every number, under TRL's tag names.
    pub fn step(&mut self, step: u64, line: &Value, say: &dyn Fn(&str)) {
        let values = tags(line);
        if let Some(w) = &mut self.tensorboard {
            if let Err(e) = w.scalars(step, &values) {
                warn(say, &format!("warning: report_to tensorboard: {e:#}; training goes on without it"));
                self.tensorboard = None;
            }
        }
        if let Some(run) = &mut self.mlflow {
            if let Err(e) = run.metrics(step, &values) {
                warn(say, &format!("warning: report_to mlflow: {e:#}; training goes on without it"));
                self.mlflow = None;
            }
        }
    }

    /// The run ended (`FINISHED`, `FAILED`, `KILLED`); `about`: where its
    /// results are, tagged `r1pipe.<key>`.
    pub fn end(&mut self, status: &str, about: &[(String, String)], say: &dyn Fn(&str)) {
        if let Some(run) = &mut self.mlflow {
            let tags: Vec<(String, String)> = about.iter().map(|(k, v)| (format!("r1pipe.{k}"), v.clone())).collect();
            if let Err(e) = run.end(status, &tags) {
                warn(say, &format!("warning: report_to mlflow: {e:#}"));
            }
        }
        self.tensorboard = None;
        self.mlflow = None;
    }
}

/// A tracker's warning: said to whoever watches, and kept in the run's
/// machine-readable log.
fn warn(say: &dyn Fn(&str), text: &str) {
    tracing::info!(target: "r1pipe::runlog", warning = %text, "tracking");
    say(text);
}

/// A log line's numbers as TRL's callbacks tag them: `eval/…` as it is,
/// everything else under `train/` (`loss` → `train/loss`).
pub fn tags(line: &Value) -> Vec<(String, f64)> {
    let Some(map) = line.as_object() else { return Vec::new() };
    map.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let v = v.as_f64()?;
            Some((if k.starts_with("eval/") { k.clone() } else { format!("train/{k}") }, v))
        })
        .collect()
}

/// Settings as MLflow parameters: flattened `a.b` keys, values as text.
fn flat_params(params: &Value) -> Vec<(String, String)> {
    crate::common::params::flatten(params)
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect()
}

/// A host that also hands each logged step to the trackers.
pub struct TrackingHost<'a> {
    pub inner: &'a dyn Host,
    pub trackers: Mutex<Trackers>,
}

impl Host for TrackingHost<'_> {
    fn work_dir(&self) -> PathBuf {
        self.inner.work_dir()
    }
    fn cancel(&self) -> &CancelToken {
        self.inner.cancel()
    }
    fn progress(&self, len: u64, unit: &str) -> indicatif::ProgressBar {
        self.inner.progress(len, unit)
    }
    fn say(&self, line: &str) {
        self.inner.say(line)
    }
    fn logged(&self, step: u64, line: &Value) {
        if let Ok(mut t) = self.trackers.lock() {
            t.step(step, line, &|w| self.inner.say(w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_become_trls_tags() {
        let line = serde_json::json!({"step": 3, "loss": 0.5, "rewards/correctness/mean": 1.0,
                                      "eval/accuracy_strict": 0.25, "note": "text"});
        let mut t = tags(&line);
        t.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            t,
            vec![
                ("eval/accuracy_strict".to_string(), 0.25),
                ("train/loss".to_string(), 0.5),
                ("train/rewards/correctness/mean".to_string(), 1.0)
            ]
        );
        assert!(problems(&["tensorboard".into(), "mlflow".into()]).is_empty());
        let wandb = problems(&["wandb".into()]);
        assert!(wandb[0].hint.as_deref().unwrap().contains("wandb sync"));
    }
}
