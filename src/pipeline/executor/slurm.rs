//! `executor: {kind: slurm, …}`: each stage an `sbatch` job. The job's
//! process is `r1pipe exec-job WORK` (the job protocol, `job.rs`); `squeue`
//! says whether it is still there, and its exit file how it ended, so no
//! accounting database is needed. A time limit or a preemption sends SIGTERM
//! `signal_grace_s` before (`--signal=B:TERM@…`): the job checkpoints and
//! ends as interrupted, and is resubmitted. The job's log is
//! `WORK/slurm-<id>.log`, or `/tmp/r1pipe-slurm-<id>.log` on its node when the
//! nodes do not share the head's filesystem.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cluster::{self, Ending, JobState, JobSystem};
use super::job::{log_tail, JobFile};
use crate::pipeline::resources::Resources;

/// `executor: { kind: slurm, … }` at the top of a pipeline (or `--executor slurm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `sbatch` options, passed as they are (`--constraint=a100`, …).
    #[serde(default)]
    pub extra: Vec<String>,
    /// Resubmissions of a job stopped by its time limit or a preemption.
    #[serde(default = "cluster::default_resubmits")]
    pub max_resubmits: u32,
    /// Seconds before the time limit that the job is told to checkpoint and stop.
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

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            qos: None,
            extra: Vec::new(),
            max_resubmits: cluster::default_resubmits(),
            signal_grace_s: cluster::default_grace(),
            poll_s: cluster::default_poll(),
            shared_filesystem: true,
        }
    }
}

impl SlurmConfig {
    /// Values sbatch would refuse later, or that cannot mean what they say, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        // Slurm's --signal takes at most 65535 seconds.
        cluster::following_problems(self.max_resubmits, self.signal_grace_s, 65_535, self.poll_s)
    }
}

pub(super) struct Slurm {
    cfg: SlurmConfig,
}

impl Slurm {
    pub fn new(cfg: SlurmConfig) -> Slurm {
        Slurm { cfg }
    }

    /// Where a job's log goes (`%j`: its id): its work folder when the nodes share
    /// the head's cache, else the node's own temporary folder.
    fn log_pattern(&self, work_dir: &Path) -> String {
        if self.cfg.shared_filesystem {
            work_dir.join("slurm-%j.log").display().to_string()
        } else {
            "/tmp/r1pipe-slurm-%j.log".to_string()
        }
    }
}

impl JobSystem for Slurm {
    fn noun(&self) -> &'static str {
        "Slurm job"
    }
    fn submit(&self, job: &JobFile, resources: &Resources, command: &str) -> Result<String> {
        submit(&self.cfg, resources, job, command, &self.log_pattern(&job.work_dir)).map(|id| id.to_string())
    }
    fn state(&self, id: &str) -> Result<JobState> {
        Ok(match queue_state(id)? {
            Some(state) => JobState::Live(state),
            // Without accounting, Slurm forgets a job once it leaves the queue.
            None => JobState::Ended(Ending::Unknown),
        })
    }
    fn stop(&self, id: &str) -> Result<()> {
        // `--batch`: the signal goes to the job's process (r1pipe), not to its steps.
        let status =
            Command::new("scancel").args(["--batch", "--signal=TERM", id]).status().context("running scancel")?;
        anyhow::ensure!(status.success(), "scancel exited with {status}");
        Ok(())
    }
    fn log_place(&self, work_dir: &Path, id: &str) -> String {
        let path = self.log_pattern(work_dir).replace("%j", id);
        if self.cfg.shared_filesystem {
            path
        } else {
            format!("{path} on the node that ran it")
        }
    }
    fn log_tail(&self, work_dir: &Path, id: &str) -> String {
        log_tail(Path::new(&self.log_pattern(work_dir).replace("%j", id)))
    }
    fn max_resubmits(&self) -> u32 {
        self.cfg.max_resubmits
    }
    fn poll_s(&self) -> f64 {
        self.cfg.poll_s
    }
}

fn submit(cfg: &SlurmConfig, resources: &Resources, job: &JobFile, command: &str, log: &str) -> Result<u64> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name=r1pipe-{}", job.stage))
        .arg(format!("--output={log}"))
        // The job sees paths as the head does (a relative cache or project path included).
        .arg(format!("--chdir={}", std::env::current_dir()?.display()))
        .arg(format!("--signal=B:TERM@{}", cfg.signal_grace_s));
    if let Some(p) = resources.partition.as_ref().or(cfg.partition.as_ref()) {
        cmd.arg(format!("--partition={p}"));
    }
    if let Some(a) = &cfg.account {
        cmd.arg(format!("--account={a}"));
    }
    if let Some(q) = &cfg.qos {
        cmd.arg(format!("--qos={q}"));
    }
    if let Some(g) = resources.gpus.filter(|g| *g > 0) {
        cmd.arg(format!("--gres=gpu:{g}"));
    }
    if let Some(c) = resources.cpus {
        cmd.arg(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &resources.mem {
        cmd.arg(format!("--mem={m}"));
    }
    if let Some(t) = &resources.time {
        cmd.arg(format!("--time={t}"));
    }
    cmd.args(&cfg.extra);
    cmd.arg(format!("--wrap={command}"));
    let out = cmd.output().context("running sbatch (is Slurm installed here? scripts/slurm-local.sh up starts one)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("sbatch refused the job of stage `{}`: {}", job.stage, String::from_utf8_lossy(&out.stderr).trim());
    }
    // `--parsable` prints `id` or `id;cluster`.
    stdout
        .trim()
        .split(';')
        .next()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("sbatch answered `{}`, not a job id", stdout.trim()))
}

/// Slurm's word for job `id`'s state (`PENDING`, `RUNNING`, …), or `None` once it has left the queue.
fn queue_state(id: &str) -> Result<Option<String>> {
    let out =
        Command::new("squeue").args(["-h", "-j", id, "-o", "%T"]).output().context("running squeue to follow a job")?;
    // An id the controller no longer knows is an error for squeue: the job is gone.
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((out.status.success() && !state.is_empty()).then_some(state))
}
