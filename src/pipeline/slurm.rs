//! The Slurm executor. The `r1pipe run` process (the head) stays where it was
//! started and stays the cache's one writer: for each stage it writes the
//! resolved job (kind, parameters with their input artifacts' paths, run
//! settings) into the stage's work folder as `job.json`, submits
//! `sbatch --parsable … --wrap "r1pipe exec-job WORK"`, and follows the job:
//! the job writes `exit.json` (ok, failed or interrupted, with the stage's
//! metrics) before it ends, so no accounting database is needed; `squeue`
//! only says whether it is still there. The head then commits the outputs
//! itself. A job stopped by its time limit or a preemption (SIGTERM, sent
//! `signal_grace_s` before, as `--signal=B:TERM@…` asks) checkpoints and
//! exits as interrupted; the head resubmits it (up to `max_resubmits`) and it
//! resumes from its checkpoint. Ctrl-C on the head sends the jobs SIGTERM, so
//! they checkpoint too. The job's log is `WORK/slurm-<id>.log`; its last
//! lines are shown when it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fingerprint::FingerprintInputs;
use super::kind::{Project, Registry, RunEnv, StageContext};
use crate::common::{CancelToken, Cancelled};

/// `executor: { kind: slurm, … }` at the top of a pipeline (or `--executor slurm`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `sbatch` options, passed as they are (`--constraint=a100`, …).
    #[serde(default)]
    pub extra: Vec<String>,
    /// Resubmissions of a job stopped by its time limit or a preemption.
    #[serde(default = "default_resubmits")]
    pub max_resubmits: u32,
    /// Seconds before the time limit that the job is told to checkpoint and stop.
    #[serde(default = "default_grace")]
    pub signal_grace_s: u32,
    /// Seconds between looks at a running job.
    #[serde(default = "default_poll")]
    pub poll_s: f64,
}

fn default_resubmits() -> u32 {
    3
}
fn default_grace() -> u32 {
    120
}
fn default_poll() -> f64 {
    2.0
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            qos: None,
            extra: Vec::new(),
            max_resubmits: default_resubmits(),
            signal_grace_s: default_grace(),
            poll_s: default_poll(),
        }
    }
}

/// A stage's `resources:`: what its Slurm job asks for; locally, `gpus` is what
/// the GPU pool of `run --jobs` gives it (the rest applies to Slurm only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    /// As Slurm writes it: `32G`, `500M`.
    pub mem: Option<String>,
    /// As Slurm writes it: `4:00:00`, `1-00:00:00`.
    pub time: Option<String>,
    pub partition: Option<String>,
}

impl SlurmConfig {
    /// Values sbatch would refuse later, or that cannot mean what they say, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        // Slurm's --signal takes at most 65535 seconds.
        if self.signal_grace_s == 0 || self.signal_grace_s > 65_535 {
            out.push(("signal_grace_s", format!("{} is not between 1 and 65535 seconds", self.signal_grace_s)));
        }
        if !(self.poll_s.is_finite() && (0.05..=60.0).contains(&self.poll_s)) {
            out.push(("poll_s", format!("{} is not between 0.05 and 60 seconds", self.poll_s)));
        }
        if self.max_resubmits > 1000 {
            out.push(("max_resubmits", format!("{} is more than 1000", self.max_resubmits)));
        }
        out
    }
}

impl Resources {
    /// Values sbatch would refuse (or a local GPU pool could never give), as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.cpus.is_some_and(|c| c == 0 || c > 65_536) {
            out.push(("cpus", format!("{} is not between 1 and 65536", self.cpus.unwrap_or(0))));
        }
        if self.gpus.is_some_and(|g| g > 1024) {
            out.push(("gpus", format!("{} is more than 1024", self.gpus.unwrap_or(0))));
        }
        let mem_ok = |m: &str| {
            let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
            !digits.is_empty()
                && digits.len() <= 12
                && digits.chars().all(|c| c.is_ascii_digit())
                && m.len() - digits.len() <= 1
        };
        if let Some(m) = self.mem.as_deref().filter(|m| !mem_ok(m)) {
            out.push(("mem", format!("`{m}` is not a size as Slurm writes it (`32G`, `500M`, `4096`)")));
        }
        // minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
        let time_ok = |t: &str| {
            let (days, rest) = t.split_once('-').map_or((None, t), |(d, r)| (Some(d), r));
            let parts: Vec<&str> = rest.split(':').collect();
            let numeric = |s: &str| !s.is_empty() && s.len() <= 6 && s.chars().all(|c| c.is_ascii_digit());
            days.is_none_or(numeric) && !parts.is_empty() && parts.len() <= 3 && parts.iter().all(|p| numeric(p))
        };
        if let Some(t) = self.time.as_deref().filter(|t| !time_ok(t)) {
            out.push(("time", format!("`{t}` is not a time as Slurm writes it (`90`, `4:00:00`, `1-00:00:00`)")));
        }
        out
    }
}

/// What a job runs, as the head resolved it.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobFile {
    /// The stage's fingerprint (its work folder's name): what the job's result is recorded under.
    pub fingerprint: String,
    /// The pipeline's name (where its TensorBoard files go); absent in job files of older versions.
    #[serde(default)]
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    /// The stage's parameters with their `${stage.output}` references in place …
    pub params: Value,
    /// … and the stored artifact each reference is bound to.
    pub bindings: std::collections::BTreeMap<String, PathBuf>,
    /// What the fingerprint was computed from: the job is checked against it
    /// before it runs (a job file is in a shared folder, and may be edited).
    pub inputs: FingerprintInputs,
    pub project_root: PathBuf,
    pub device: String,
    pub device_class: String,
    pub dtype: String,
    pub seed: u64,
    pub work_dir: PathBuf,
}

/// What a job file needs from the head beyond the stage's context.
pub struct JobSpec {
    pub params: Value,
    pub bindings: std::collections::BTreeMap<String, PathBuf>,
    pub inputs: FingerprintInputs,
}

impl JobFile {
    /// Refuse a job that is not what its fingerprint says: run from another folder,
    /// with other parameters or inputs than were fingerprinted, or bound to other
    /// artifacts. Only then do its parameters (bound here, not taken from the file)
    /// and its output folder (the work folder's `out`) mean what the head will record.
    fn check(&self, work_dir: &Path, kind: &dyn super::kind::StageKind) -> Result<Value> {
        let named = fs::canonicalize(work_dir)?;
        let claimed = fs::canonicalize(&self.work_dir).unwrap_or_default();
        if named != claimed
            || named.file_name().map(|n| n.to_string_lossy().to_string()) != Some(self.fingerprint.clone())
        {
            bail!(
                "its work folder is {}, not {} (the folder it was started in)",
                self.work_dir.display(),
                named.display()
            );
        }
        if self.inputs.fingerprint() != self.fingerprint {
            bail!("what it was fingerprinted from no longer gives its fingerprint {}", self.fingerprint);
        }
        if self.inputs.kind != kind.name() || self.inputs.kind_version != kind.version() {
            bail!(
                "it is a `{}` v{} job, and this r1pipe's `{}` is v{}",
                self.inputs.kind,
                self.inputs.kind_version,
                kind.name(),
                kind.version()
            );
        }
        if kind.fingerprint_params(&self.params) != self.inputs.params {
            bail!("its parameters are not the ones its fingerprint was computed from");
        }
        let bound: Vec<&String> = self.bindings.keys().collect();
        let fingerprinted: Vec<&String> = self.inputs.inputs.keys().collect();
        if bound != fingerprinted {
            bail!("its input artifacts are not the ones its fingerprint names");
        }
        for (key, path) in &self.bindings {
            let stored_as = path.parent().and_then(Path::file_name).map(|h| h.to_string_lossy().to_string());
            if stored_as.as_deref() != self.inputs.inputs.get(key).map(String::as_str) {
                bail!("its input `{key}` is bound to {}, not to the artifact its fingerprint names", path.display());
            }
        }
        for (k, v) in [
            ("seed", self.seed.to_string()),
            ("dtype", self.dtype.clone()),
            ("device_class", self.device_class.clone()),
        ] {
            if self.inputs.env.get(k).is_some_and(|f| *f != v) {
                bail!("its {k} is {v}, not the fingerprint's {}", self.inputs.env[k]);
            }
        }
        let mut params = self.params.clone();
        super::bind::bind_artifacts(&mut params, &self.bindings);
        Ok(params)
    }
}

/// How a job ended, written by the job itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExitFile {
    /// `ok`, `failed` or `interrupted`.
    pub status: String,
    pub error: Option<String>,
    pub metrics: Option<Value>,
}

const JOB_FILE: &str = "job.json";
const EXIT_FILE: &str = "exit.json";
/// The id of the stage's current job (a restarted head reads it).
const JOB_ID_FILE: &str = "slurm-job";

/// The job an earlier head submitted for the stage in `work_dir` that is
/// still queued or running (a head that died leaves its jobs running).
pub fn live_job(work_dir: &Path) -> Option<u64> {
    job_state(work_dir).map(|(id, _)| id)
}

/// The stage's job in `work_dir` and Slurm's word for its state, while it is in the queue.
pub fn job_state(work_dir: &Path) -> Option<(u64, String)> {
    let id: u64 = fs::read_to_string(work_dir.join(JOB_ID_FILE)).ok()?.trim().parse().ok()?;
    Some((id, queue_state(id).ok()??))
}

/// Run a started stage as Slurm jobs until it finishes, fails, or the head is
/// cancelled; on success the stage's metrics are in `ctx`. `live`: a job an
/// earlier head submitted for it, followed instead of submitting again.
pub fn run_stage(
    cfg: &SlurmConfig,
    resources: &Resources,
    ctx: &mut StageContext,
    tag: &str,
    live: Option<u64>,
    spec: JobSpec,
) -> Result<()> {
    let job = JobFile {
        fingerprint: ctx.work_dir.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        pipeline: ctx.pipeline.clone(),
        stage: ctx.stage.clone(),
        kind: ctx.kind.to_string(),
        params: spec.params,
        bindings: spec.bindings,
        inputs: spec.inputs,
        project_root: ctx.project.root.clone(),
        device: ctx.env.device.clone(),
        device_class: ctx.env.device_class.clone(),
        dtype: ctx.env.dtype.clone(),
        seed: ctx.env.seed,
        work_dir: ctx.work_dir.clone(),
    };
    let mut resubmits = 0;
    let mut following = live;
    loop {
        let id = match following.take() {
            Some(id) => {
                println!("{tag}: following Slurm job {id}, submitted by an earlier run");
                id
            }
            None => {
                write_atomically(&ctx.work_dir.join(JOB_FILE), &serde_json::to_vec_pretty(&job)?)?;
                let _ = fs::remove_file(ctx.work_dir.join(EXIT_FILE));
                let id = submit(cfg, resources, &job)?;
                fs::write(ctx.work_dir.join(JOB_ID_FILE), id.to_string())?;
                tracing::info!(target: "r1pipe::runlog", stage = %ctx.stage, job = id, "submitted to Slurm");
                println!("{tag}: Slurm job {id} (log {})", ctx.work_dir.join(format!("slurm-{id}.log")).display());
                id
            }
        };
        let log = ctx.work_dir.join(format!("slurm-{id}.log"));
        match follow(id, &ctx.work_dir, &ctx.cancel, cfg.poll_s)? {
            Some(exit) if exit.status == "ok" => {
                ctx.metrics = exit.metrics;
                return Ok(());
            }
            Some(exit) if exit.status == "interrupted" => {
                if ctx.cancel.is_cancelled() {
                    return Err(Cancelled.into());
                }
                resubmits += 1;
                if resubmits > cfg.max_resubmits {
                    bail!(
                        "Slurm job {id} was stopped (time limit or preemption) {resubmits} times, more than \
                         max_resubmits = {}; its checkpoint is kept\n{}",
                        cfg.max_resubmits,
                        log_tail(&log)
                    );
                }
                println!("{tag}: Slurm job {id} stopped before the end (time limit or preemption); resubmitting");
            }
            Some(exit) => bail!(
                "Slurm job {id} failed: {}\n{}",
                exit.error.unwrap_or_else(|| "no reason given".into()),
                log_tail(&log)
            ),
            None if ctx.cancel.is_cancelled() => return Err(Cancelled.into()),
            None => bail!(
                "Slurm job {id} ended without saying how (cancelled outside r1pipe, or killed before it could \
                 write {EXIT_FILE}); its checkpoint is kept\n{}",
                log_tail(&log)
            ),
        }
    }
}

fn submit(cfg: &SlurmConfig, resources: &Resources, job: &JobFile) -> Result<u64> {
    let exe = std::env::current_exe().context("finding the r1pipe binary to run in the job")?;
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name=r1pipe-{}", job.stage))
        .arg(format!("--output={}", job.work_dir.join("slurm-%j.log").display()))
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
    // `exec`: the job's process is r1pipe itself, so the signal reaches it.
    let quoted = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    cmd.arg(format!("--wrap=exec {} exec-job {}", quoted(&exe), quoted(&job.work_dir)));
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

/// Wait for job `id` to end; its exit file, or `None` if it left none. A
/// cancelled head asks the job to checkpoint and stop, and waits for it.
fn follow(id: u64, work_dir: &Path, cancel: &CancelToken, poll_s: f64) -> Result<Option<ExitFile>> {
    let exit_path = work_dir.join(EXIT_FILE);
    let mut told_to_stop = false;
    let mut gone_since: Option<Instant> = None;
    loop {
        if queue_state(id)?.is_some() {
            gone_since = None;
        } else {
            // The exit file is written last; on a shared filesystem it may lag a little.
            if let Some(exit) = read_exit(&exit_path)? {
                return Ok(Some(exit));
            }
            if gone_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(10) {
                return Ok(None);
            }
        }
        if cancel.is_cancelled() && !told_to_stop {
            told_to_stop = true;
            let _ = Command::new("scancel").args(["--batch", "--signal=TERM", &id.to_string()]).status();
        }
        std::thread::sleep(Duration::from_secs_f64(poll_s.clamp(0.05, 60.0)));
    }
}

/// Slurm's word for job `id`'s state (`PENDING`, `RUNNING`, …), or `None` once it has left the queue.
fn queue_state(id: u64) -> Result<Option<String>> {
    let out = Command::new("squeue")
        .args(["-h", "-j", &id.to_string(), "-o", "%T"])
        .output()
        .context("running squeue to follow a job")?;
    // An id the controller no longer knows is an error for squeue: the job is gone.
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((out.status.success() && !state.is_empty()).then_some(state))
}

/// The most an exit file may be (its metrics included): read with a cap, as every
/// file a job writes into the shared folder.
const EXIT_FILE_CAP: u64 = 16 << 20;

fn read_exit(path: &Path) -> Result<Option<ExitFile>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::common::fsutil::read_text_capped(path, EXIT_FILE_CAP)
        .with_context(|| format!("reading the job's exit file {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?))
}

/// The last lines of a job's log, for an error message (its last 256 KiB read).
fn log_tail(log: &Path) -> String {
    let text = tail_of_file(log, 256 << 10);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    if tail.is_empty() {
        format!("(the job's log {} is empty or missing)", log.display())
    } else {
        format!("last lines of {}:\n  {tail}", log.display())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The job's side (`r1pipe exec-job WORK`): run the stage written in
/// `WORK/job.json` and say how it ended in `WORK/exit.json`. Returns the
/// process's exit code (0 ok, 1 failed, 130 interrupted).
pub fn execute_job(work_dir: &Path, registry: &Registry, cancel: CancelToken) -> Result<i32> {
    let job_path = work_dir.join(JOB_FILE);
    let job: JobFile =
        serde_json::from_slice(&fs::read(&job_path).with_context(|| format!("reading {}", job_path.display()))?)
            .with_context(|| format!("{} is not a job file", job_path.display()))?;
    let kind = registry
        .get(&job.kind)
        .with_context(|| format!("{}: no stage kind `{}` in this r1pipe", job_path.display(), job.kind))?;
    let params = match job.check(work_dir, kind.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            let error = format!("{} is refused: {e:#}; nothing was run", job_path.display());
            eprintln!("r1pipe exec-job: {error}");
            let exit = ExitFile { status: "failed".into(), error: Some(error), metrics: None };
            write_atomically(&work_dir.join(EXIT_FILE), &serde_json::to_vec_pretty(&exit)?)?;
            return Ok(1);
        }
    };
    // The outputs go to the work folder's `out`, whatever the file says; those of an
    // earlier attempt of this job are never trusted, its checkpoints are.
    let out_dir = work_dir.join("out");
    super::store::remove_path(&out_dir)?;
    fs::create_dir_all(&out_dir)?;
    eprintln!("r1pipe exec-job: stage `{}` ({}), work {}", job.stage, job.kind, work_dir.display());
    // The work folder is `<cache>/work/<fingerprint>` (checked above).
    let cache = super::store::Cache::new(work_dir.parent().and_then(Path::parent).unwrap_or(work_dir));
    let mut ctx = StageContext {
        pipeline: job.pipeline.clone(),
        tensorboard_dir: cache.tensorboard_dir(&job.pipeline, &job.stage),
        stage: job.stage.clone(),
        kind: kind.name(),
        params,
        project: Project { root: job.project_root },
        work_dir: work_dir.to_path_buf(),
        out_dir,
        env: RunEnv { device: job.device, device_class: job.device_class, dtype: job.dtype, seed: job.seed },
        progress: indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden()),
        quiet: false,
        cancel,
        outputs: kind.outputs(),
        metrics: None,
    };
    let result = kind.run(&mut ctx);
    let (exit, code) = match result {
        Ok(()) => (ExitFile { status: "ok".into(), error: None, metrics: ctx.metrics.take() }, 0),
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
            eprintln!("r1pipe exec-job: stopped (its checkpoint is kept)");
            (ExitFile { status: "interrupted".into(), error: None, metrics: None }, 130)
        }
        Err(e) => {
            let text = crate::common::diagnostic::error_text(&e);
            eprintln!("r1pipe exec-job: failed: {text}");
            (ExitFile { status: "failed".into(), error: Some(text), metrics: None }, 1)
        }
    };
    write_atomically(&work_dir.join(EXIT_FILE), &serde_json::to_vec_pretty(&exit)?)?;
    Ok(code)
}

/// The last `cap` bytes of a file, as text (lossy).
fn tail_of_file(path: &Path, cap: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(cap)));
    let mut bytes = Vec::new();
    let _ = f.take(cap).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
