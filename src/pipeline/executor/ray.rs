//! `executor: {kind: ray, address, …}`: each stage a job of a Ray cluster,
//! submitted through the Jobs API of its dashboard (plain HTTP: no Python in
//! r1pipe). The job's entrypoint is `r1pipe exec-job WORK` (the job protocol,
//! `job.rs`) started in the head's working folder, so the cluster's nodes need
//! the project and the binary at the same paths, and the cache too unless
//! `shared_filesystem: false` sends artifacts through the remote cache. `resources:` becomes the entrypoint's CPUs, GPUs and memory.
//! Stopping a job (the head's Ctrl-C) sends SIGTERM and waits
//! `signal_grace_s` before SIGKILL (Ray's `RAY_JOB_STOP_WAIT_TIME_S`, set for
//! each job), so the stage checkpoints first.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::cluster::{self, Ending, JobState, JobSystem};
use super::job::{last_lines, shell_quote, JobFile};
use crate::common::redact;
use crate::pipeline::resources::Resources;

/// Where the Jobs API is when neither the pipeline nor `RAY_ADDRESS` says.
const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8265";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RayConfig {
    /// The dashboard's HTTP address, where the Jobs API answers (`http://HEAD:8265`).
    #[serde(default = "default_address")]
    pub address: String,
    /// Ray's `runtime_env` for each job (`env_vars`, `conda`, `container`, …), passed as it is.
    #[serde(default)]
    pub runtime_env: Option<Map<String, Value>>,
    /// The cluster adds nodes when jobs ask (KubeRay's autoscaler): a stage asking for
    /// more than today's nodes have waits for them instead of being refused.
    #[serde(default)]
    pub autoscaling: bool,
    /// Resubmissions of a job stopped or lost before the end.
    #[serde(default = "cluster::default_resubmits")]
    pub max_resubmits: u32,
    /// Seconds a stopped job has to checkpoint before it is killed.
    #[serde(default = "cluster::default_grace")]
    pub signal_grace_s: u32,
    /// Seconds between looks at a running job.
    #[serde(default = "cluster::default_poll")]
    pub poll_s: f64,
    /// Whether the nodes see the head's cache at its path; `false`: jobs reach
    /// artifacts through the remote cache (`through_remote.rs`).
    #[serde(default = "cluster::default_shared_filesystem")]
    pub shared_filesystem: bool,
}

/// `RAY_ADDRESS` when it is the dashboard's HTTP address (as `ray job submit` reads it).
fn default_address() -> String {
    std::env::var("RAY_ADDRESS")
        .ok()
        .filter(|a| a.starts_with("http://") || a.starts_with("https://"))
        .unwrap_or_else(|| DEFAULT_ADDRESS.to_string())
}
impl RayConfig {
    /// `--executor ray` on a pipeline that names no Ray settings.
    pub fn from_environment() -> RayConfig {
        RayConfig {
            address: default_address(),
            runtime_env: None,
            autoscaling: false,
            max_resubmits: cluster::default_resubmits(),
            signal_grace_s: cluster::default_grace(),
            poll_s: cluster::default_poll(),
            shared_filesystem: true,
        }
    }

    /// Values that cannot mean what they say, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let scheme_ok = self.address.starts_with("http://") || self.address.starts_with("https://");
        if !scheme_ok {
            out.push((
                "address",
                format!(
                    "`{}` is not the dashboard's HTTP address: the Jobs API answers at `http://HEAD:8265` \
                     (not `ray://…:10001`, the client port)",
                    redact::url(&self.address)
                ),
            ));
        }
        out.extend(cluster::following_problems(self.max_resubmits, self.signal_grace_s, 86_400, self.poll_s));
        if let Some(env) = self.runtime_env.as_ref().and_then(|r| r.get("env_vars")) {
            if !env.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
                out.push(("runtime_env.env_vars", "must map names to strings (quote numbers)".into()));
            }
        }
        out
    }
}

pub(super) struct Ray {
    cfg: RayConfig,
    base: String,
    agent: ureq::Agent,
}

/// The most a reply of the Jobs API is read (a job's whole log included).
const REPLY_CAP: u64 = 32 << 20;

impl Ray {
    pub fn new(cfg: RayConfig) -> Ray {
        let agent =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(30)).build();
        Ray { base: cfg.address.trim_end_matches('/').to_string(), cfg, agent }
    }

    /// A call to the Jobs API, its reply as JSON; errors name the cluster (without
    /// credentials) and what was asked, and a reply by its status, never its raw text.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let cluster = redact::url(&self.base);
        let req = self.agent.request(method, &url);
        let reply = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let (code, resp) = match reply {
            Ok(resp) => (resp.status(), resp),
            Err(ureq::Error::Status(code, resp)) => (code, resp),
            Err(ureq::Error::Transport(t)) => {
                bail!("the Ray cluster at {cluster} does not answer ({}); is `address` its dashboard?", t.kind())
            }
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(resp.into_reader(), REPLY_CAP + 1), &mut bytes)
            .with_context(|| format!("reading the Ray cluster's reply to {method} {path}"))?;
        if bytes.len() as u64 > REPLY_CAP {
            bail!("the Ray cluster at {cluster} answered {method} {path} with more than {} MiB", REPLY_CAP >> 20);
        }
        if !(200..300).contains(&code) {
            return Ok((code, Value::Null));
        }
        let value = serde_json::from_slice(&bytes).with_context(|| {
            format!("the Ray cluster at {cluster} answered {method} {path} with something that is not JSON")
        })?;
        Ok((code, value))
    }

    /// The Jobs API path of job `id`; an id r1pipe would not have made (the
    /// record is in a shared folder) is refused rather than put in a URL.
    fn job_path(id: &str) -> Result<String> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("`{id}` is not a Ray job id r1pipe submitted");
        }
        Ok(format!("/api/jobs/{id}"))
    }

    /// The resources of each node that is alive: (CPUs, GPUs, memory bytes).
    fn nodes(&self) -> Result<Vec<(f64, f64, f64)>> {
        let (code, reply) = self.call("GET", "/nodes?view=summary", None)?;
        let cluster = redact::url(&self.base);
        if code != 200 {
            bail!("the Ray cluster at {cluster} answered its node list with HTTP {code}");
        }
        let nodes = reply
            .pointer("/data/summary")
            .and_then(Value::as_array)
            .with_context(|| format!("the Ray cluster at {cluster} sent a node list without `data.summary`"))?;
        Ok(nodes
            .iter()
            .filter_map(|n| n.pointer("/raylet/resourcesTotal"))
            .map(|r| {
                let get = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                (get("CPU"), get("GPU"), get("memory"))
            })
            .collect())
    }
}

impl JobSystem for Ray {
    fn noun(&self) -> &'static str {
        "Ray job"
    }

    fn admits(&self, stage: &str, resources: &Resources) -> Result<()> {
        if resources.time.is_some() || resources.partition.is_some() {
            tracing::warn!(
                "stage `{stage}`: resources.time and resources.partition are Slurm's; a Ray job has neither"
            );
        }
        if self.cfg.autoscaling {
            return Ok(());
        }
        let nodes = self.nodes().with_context(|| format!("stage `{stage}`: asking the Ray cluster what it has"))?;
        let (cpus, gpus, mem) = asked(resources);
        let fits = |n: &(f64, f64, f64)| n.0 >= cpus && n.1 >= gpus && n.2 >= mem as f64;
        if !nodes.iter().any(fits) {
            let have: Vec<String> = nodes
                .iter()
                .map(|n| format!("{} CPUs, {} GPUs, {:.1} GiB", n.0, n.1, n.2 / f64::from(1u32 << 30)))
                .collect();
            bail!(
                "stage `{stage}` asks for {cpus} CPUs, {gpus} GPUs and {:.1} GiB (resources:), and no node of the \
                 Ray cluster at {} has that ({}); lower `resources:`, or set `executor.autoscaling: true` if the \
                 cluster adds nodes on demand",
                mem as f64 / f64::from(1u32 << 30),
                redact::url(&self.base),
                if have.is_empty() { "no node is alive".to_string() } else { have.join("; ") }
            );
        }
        Ok(())
    }

    fn submit(&self, job: &JobFile, resources: &Resources, command: &str) -> Result<String> {
        let cwd = std::env::current_dir().context("finding the working folder the job runs in")?;
        // The job runs where the head does, so relative cache and project paths mean the same.
        let entrypoint = format!("cd {} && {command}", shell_quote(&cwd.display().to_string()));
        let mut runtime_env = self.cfg.runtime_env.clone().unwrap_or_default();
        let env_vars = runtime_env.entry("env_vars").or_insert_with(|| json!({}));
        if let Value::Object(vars) = env_vars {
            // r1pipe's own settings travel with the job, as sbatch passes the head's environment.
            for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("R1PIPE_") || k == "RUST_LOG") {
                vars.entry(k).or_insert(Value::String(v));
            }
            vars.entry("RAY_JOB_STOP_WAIT_TIME_S").or_insert(Value::String(self.cfg.signal_grace_s.to_string()));
        }
        let (cpus, gpus, mem) = asked(resources);
        let id = submission_id(&job.stage, &job.fingerprint);
        let mut body = json!({
            "entrypoint": entrypoint,
            "submission_id": id,
            "runtime_env": runtime_env,
            "metadata": { "r1pipe_pipeline": job.pipeline, "r1pipe_stage": job.stage, "r1pipe_fingerprint": job.fingerprint },
            "entrypoint_num_cpus": cpus,
            "entrypoint_num_gpus": gpus,
        });
        if mem > 0 {
            body["entrypoint_memory"] = json!(mem);
        }
        let (code, reply) = self.call("POST", "/api/jobs/", Some(&body))?;
        if code != 200 {
            bail!(
                "the Ray cluster at {} refused the job of stage `{}` (HTTP {code}); `ray job submit` with the same \
                 runtime_env says why",
                redact::url(&self.base),
                job.stage
            );
        }
        match reply.get("submission_id").and_then(Value::as_str) {
            Some(given) if given == id => Ok(id),
            _ => bail!(
                "the Ray cluster at {} answered the job of stage `{}` without its submission id",
                redact::url(&self.base),
                job.stage
            ),
        }
    }

    fn state(&self, id: &str) -> Result<JobState> {
        let (code, reply) = self.call("GET", &Self::job_path(id)?, None)?;
        let cluster = redact::url(&self.base);
        if code == 404 {
            // A cluster restarted without its job table forgets its jobs.
            return Ok(JobState::Ended(Ending::Failed(format!("the cluster at {cluster} no longer knows it"))));
        }
        if code != 200 {
            bail!("the Ray cluster at {cluster} answered about job {id} with HTTP {code}");
        }
        let status = reply
            .get("status")
            .and_then(Value::as_str)
            .with_context(|| format!("the Ray cluster at {cluster} answered about job {id} without a status"))?;
        let message =
            || reply.get("message").and_then(Value::as_str).unwrap_or("no message").chars().take(500).collect();
        Ok(match status {
            "PENDING" | "RUNNING" => JobState::Live(status.to_string()),
            "SUCCEEDED" => JobState::Ended(Ending::Succeeded),
            "STOPPED" => JobState::Ended(Ending::Stopped),
            "FAILED" => JobState::Ended(Ending::Failed(message())),
            other => bail!("the Ray cluster at {cluster} says job {id} is `{other}`, which r1pipe does not know"),
        })
    }

    fn stop(&self, id: &str) -> Result<()> {
        let (code, _) = self.call("POST", &format!("{}/stop", Self::job_path(id)?), None)?;
        anyhow::ensure!(code == 200, "the Ray cluster answered the stop of job {id} with HTTP {code}");
        Ok(())
    }

    fn log_place(&self, _work_dir: &Path, id: &str) -> String {
        format!("ray job logs {id} --address {}", redact::url(&self.base))
    }

    fn log_tail(&self, work_dir: &Path, id: &str) -> String {
        let logs = match Self::job_path(id).and_then(|p| self.call("GET", &format!("{p}/logs"), None)) {
            Ok((200, reply)) => reply.get("logs").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let source = format!("its log (`{}`)", self.log_place(work_dir, id));
        match logs {
            Some(text) => last_lines(&text, &source),
            None => format!("({source} could not be read)"),
        }
    }

    fn max_resubmits(&self) -> u32 {
        self.cfg.max_resubmits
    }
    fn poll_s(&self) -> f64 {
        self.cfg.poll_s
    }
}

/// What the stage's `resources:` asks of one node: CPUs (1 unless it says), GPUs, memory bytes.
fn asked(resources: &Resources) -> (f64, f64, u64) {
    (f64::from(resources.cpus.unwrap_or(1)), f64::from(resources.gpus.unwrap_or(0)), resources.mem_bytes().unwrap_or(0))
}

/// A submission id that names the stage and fingerprint (as `ray job list` shows
/// it), unique per submission, in characters a URL path keeps as they are.
fn submission_id(stage: &str, fingerprint: &str) -> String {
    let safe: String =
        stage.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("r1pipe-{safe}-{}-{nanos:x}", &fingerprint[..fingerprint.len().min(12)])
}
