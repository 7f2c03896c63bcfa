//! An MLflow run, through the tracking server's REST API (`/api/2.0/mlflow/…`,
//! as MLflow's own client calls it): the experiment (made when missing), a
//! run with the stage's parameters, each step's metrics, and at the end the
//! run's status and its artifacts' paths as tags. The server is
//! `MLFLOW_TRACKING_URI` (an `http(s)://` URL); `MLFLOW_EXPERIMENT_NAME`
//! overrides the experiment (the pipeline's name) as in TRL;
//! `MLFLOW_TRACKING_TOKEN` or `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`
//! authenticate.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// MLflow's limits per `log-batch` call (its REST API refuses more).
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAMS_PER_BATCH: usize = 100;
/// The longest parameter value MLflow stores (6000 characters since 2.x).
const MAX_PARAM_VALUE: usize = 6000;

pub struct MlflowRun {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
    pub run_id: String,
    pub experiment_id: String,
}

impl MlflowRun {
    /// Start (or, with `resume_run_id`, continue) the run `run_name` in
    /// `experiment`, logging `params` (flattened `a.b` keys) when it starts.
    pub fn start(
        uri: &str,
        experiment: &str,
        run_name: &str,
        resume_run_id: Option<&str>,
        params: &[(String, String)],
    ) -> Result<MlflowRun> {
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            bail!(
                "MLFLOW_TRACKING_URI `{}` is not an http(s) URL of an MLflow tracking server (e.g. http://127.0.0.1:5000)",
                crate::common::redact::url(uri)
            );
        }
        let agent =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(30)).build();
        let auth = match (
            std::env::var("MLFLOW_TRACKING_TOKEN").ok(),
            std::env::var("MLFLOW_TRACKING_USERNAME").ok(),
            std::env::var("MLFLOW_TRACKING_PASSWORD").ok(),
        ) {
            (Some(token), _, _) => Some(format!("Bearer {token}")),
            (None, Some(user), Some(password)) => {
                use base64::Engine;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                ))
            }
            _ => None,
        };
        let mut run = MlflowRun {
            base: uri.trim_end_matches('/').to_string(),
            agent,
            auth,
            run_id: String::new(),
            experiment_id: String::new(),
        };
        run.experiment_id = run.experiment(experiment)?;
        if let Some(id) = resume_run_id {
            // A resumed stage continues its run (its metrics before the resume are there).
            if run.call("runs/update", &json!({"run_id": id, "status": "RUNNING"})).is_ok() {
                run.run_id = id.to_string();
                return Ok(run);
            }
        }
        let created = run.call(
            "runs/create",
            &json!({"experiment_id": run.experiment_id, "run_name": run_name, "start_time": now_ms(),
                    "tags": [{"key": "mlflow.runName", "value": run_name}, {"key": "mlflow.source.name", "value": "r1pipe"}]}),
        )?;
        run.run_id = created
            .pointer("/run/info/run_id")
            .and_then(Value::as_str)
            .context("the server's runs/create reply has no run.info.run_id")?
            .to_string();
        let params: Vec<Value> = params
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v.chars().take(MAX_PARAM_VALUE).collect::<String>()}))
            .collect();
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            run.call("runs/log-batch", &json!({"run_id": run.run_id, "params": chunk}))?;
        }
        Ok(run)
    }

    /// One step's metrics.
    pub fn metrics(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let t = now_ms();
        let metrics: Vec<Value> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| json!({"key": k, "value": v, "timestamp": t, "step": step}))
            .collect();
        for chunk in metrics.chunks(MAX_METRICS_PER_BATCH) {
            self.call("runs/log-batch", &json!({"run_id": self.run_id, "metrics": chunk}))?;
        }
        Ok(())
    }

    /// End the run: `FINISHED`, `FAILED` or `KILLED`, with tags (the artifacts' paths).
    pub fn end(&mut self, status: &str, tags: &[(String, String)]) -> Result<()> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        if !tags.is_empty() {
            self.call("runs/log-batch", &json!({"run_id": self.run_id, "tags": tags}))?;
        }
        self.call("runs/update", &json!({"run_id": self.run_id, "status": status, "end_time": now_ms()}))?;
        Ok(())
    }

    /// The experiment's id, made when the server has none of that name.
    fn experiment(&self, name: &str) -> Result<String> {
        let url = format!("{}/api/2.0/mlflow/experiments/get-by-name", self.base);
        let mut req = self.agent.get(&url).query("experiment_name", name);
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        match req.call() {
            Ok(resp) => {
                let v: Value = resp.into_json().context("the server's experiments/get-by-name reply is not JSON")?;
                if let Some(id) = v.pointer("/experiment/experiment_id").and_then(Value::as_str) {
                    return Ok(id.to_string());
                }
            }
            Err(ureq::Error::Status(404, _)) => {}
            Err(e) => return Err(self.failure("experiments/get-by-name", e)),
        }
        let created = self.call("experiments/create", &json!({"name": name}))?;
        Ok(created
            .get("experiment_id")
            .and_then(Value::as_str)
            .context("the server's experiments/create reply has no experiment_id")?
            .to_string())
    }

    fn call(&self, endpoint: &str, body: &Value) -> Result<Value> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let mut req = self.agent.post(&url);
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        match req.send_json(body) {
            Ok(resp) => {
                let text = resp.into_string().with_context(|| format!("reading the server's {endpoint} reply"))?;
                Ok(serde_json::from_str(if text.trim().is_empty() { "{}" } else { &text })
                    .with_context(|| format!("the server's {endpoint} reply is not JSON"))?)
            }
            Err(e) => Err(self.failure(endpoint, e)),
        }
    }

    /// A failed call, named by the server (without credentials) and the
    /// endpoint; a reply's status and MLflow's error code, never its raw text.
    fn failure(&self, endpoint: &str, e: ureq::Error) -> anyhow::Error {
        let server = crate::common::redact::url(&self.base);
        match e {
            ureq::Error::Status(code, resp) => {
                let error_code = resp
                    .into_json::<Value>()
                    .ok()
                    .and_then(|v| v.get("error_code").and_then(Value::as_str).map(str::to_string))
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                anyhow::anyhow!("the MLflow server {server} answered {endpoint} with HTTP {code}{error_code}")
            }
            ureq::Error::Transport(t) => {
                anyhow::anyhow!("the MLflow server {server} could not be reached for {endpoint}: {}", t.kind())
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
