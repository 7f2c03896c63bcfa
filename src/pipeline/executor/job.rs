//! The job protocol, the same for every executor that runs stages elsewhere.
//! The head (the `r1pipe run` process, the cache's one writer) writes the
//! resolved stage into its work folder as `job.json` (kind, parameters with
//! their input artifacts' paths, run settings, what the fingerprint was
//! computed from) and records which executor took the job in
//! `submitted.json`. The job runs `r1pipe exec-job WORK`: it checks the job
//! file against its fingerprint, runs the stage into `WORK/out`, and writes
//! `exit.json` (ok, failed or interrupted, with the stage's metrics) before
//! it ends. The head commits the outputs itself. SIGTERM makes the job
//! checkpoint and end as interrupted.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ExecutorConfig;
use crate::common::{CancelToken, Cancelled};
use crate::pipeline::fingerprint::FingerprintInputs;
use crate::pipeline::kind::{Project, Registry, RunEnv, StageContext};

pub(super) const JOB_FILE: &str = "job.json";
pub(super) const EXIT_FILE: &str = "exit.json";
/// Which executor took the stage's current job, and its id there (a restarted head reads it).
const SUBMITTED_FILE: &str = "submitted.json";

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
    /// The job of a started stage.
    pub(super) fn new(ctx: &StageContext, spec: JobSpec) -> JobFile {
        JobFile {
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
        }
    }

    /// Refuse a job that is not what its fingerprint says: run from another folder,
    /// with other parameters or inputs than were fingerprinted, or bound to other
    /// artifacts. Only then do its parameters (bound here, not taken from the file)
    /// and its output folder (the work folder's `out`) mean what the head will record.
    fn check(&self, work_dir: &Path, kind: &dyn crate::pipeline::kind::StageKind) -> Result<Value> {
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
        crate::pipeline::bind::bind_artifacts(&mut params, &self.bindings);
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
    /// A job with no shared filesystem: the artifacts it pushed to the remote, by output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<std::collections::BTreeMap<String, crate::pipeline::store::ObjectRef>>,
}

impl ExitFile {
    pub(super) fn failed(error: String) -> ExitFile {
        ExitFile { status: "failed".into(), error: Some(error), metrics: None, outputs: None }
    }

    /// The job process's exit code: 0 ok, 1 failed, 130 interrupted.
    pub(super) fn code(&self) -> i32 {
        match self.status.as_str() {
            "ok" => 0,
            "interrupted" => 130,
            _ => 1,
        }
    }
}

/// The stage's current job: which executor (with its settings: a Ray
/// address, say) and the job's id there.
pub(super) struct Submitted {
    pub executor: ExecutorConfig,
    pub id: String,
}

impl Submitted {
    pub fn write(&self, work_dir: &Path) -> Result<()> {
        let value = serde_json::json!({ "executor": self.executor.to_value(), "id": self.id });
        write_atomically(&work_dir.join(SUBMITTED_FILE), &serde_json::to_vec_pretty(&value)?)
    }

    /// The record in `work_dir`; `None` when there is none or it does not read
    /// as one (it is in a shared folder: an unreadable record follows nothing).
    pub fn read(work_dir: &Path) -> Option<Submitted> {
        let text = crate::common::fsutil::read_text_capped(&work_dir.join(SUBMITTED_FILE), 1 << 20).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        Some(Submitted {
            executor: ExecutorConfig::parse(value.get("executor")?).ok()?,
            id: value.get("id")?.as_str()?.to_string(),
        })
    }
}

/// `s` quoted for a POSIX shell.
pub(super) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The shell command a job runs: this r1pipe binary's `exec-job` on the work
/// folder.
pub(super) fn exec_command(work_dir: &Path) -> Result<String> {
    Ok(format!("{} {}", exec_job_prefix()?, shell_quote(&work_dir.display().to_string())))
}

/// `exec R1PIPE exec-job`: `exec`, so that the job's process is r1pipe itself
/// and the cluster's signals reach it.
pub(super) fn exec_job_prefix() -> Result<String> {
    let exe = std::env::current_exe().context("finding the r1pipe binary to run in the job")?;
    // Rebuilt while this head runs: Linux names the old file `… (deleted)`. The job runs
    // the binary now at that path (its job-file check refuses it if its stage kinds differ).
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) if Path::new(path).is_file() => PathBuf::from(path),
        _ => exe,
    };
    Ok(format!("exec {} exec-job", shell_quote(&exe.display().to_string())))
}

/// The most an exit file may be (its metrics included): read with a cap, as every
/// file a job writes into the shared folder.
const EXIT_FILE_CAP: u64 = 16 << 20;

pub(super) fn read_exit(path: &Path) -> Result<Option<ExitFile>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::common::fsutil::read_text_capped(path, EXIT_FILE_CAP)
        .with_context(|| format!("reading the job's exit file {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?))
}

/// The last lines of a job's log, for an error message; `source` names where the whole log is.
pub(super) fn last_lines(text: &str, source: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    if tail.is_empty() {
        format!("({source} is empty or missing)")
    } else {
        format!("last lines of {source}:\n  {tail}")
    }
}

/// The last lines of a job's log file (its last 256 KiB read).
pub(super) fn log_tail(log: &Path) -> String {
    last_lines(&tail_of_file(log, 256 << 10), &format!("the job's log {}", log.display()))
}

pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
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
    let exit = run_job(job, &job_path.display().to_string(), work_dir, registry, cancel)?;
    write_atomically(&work_dir.join(EXIT_FILE), &serde_json::to_vec_pretty(&exit)?)?;
    Ok(exit.code())
}

/// Run `job` in `work_dir` (its outputs in `work_dir/out`); `source` names
/// where the job file came from, for messages.
pub(super) fn run_job(
    job: JobFile,
    source: &str,
    work_dir: &Path,
    registry: &Registry,
    cancel: CancelToken,
) -> Result<ExitFile> {
    let kind =
        registry.get(&job.kind).with_context(|| format!("{source}: no stage kind `{}` in this r1pipe", job.kind))?;
    let params = match job.check(work_dir, kind.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            let error = format!("{source} is refused: {e:#}; nothing was run");
            eprintln!("r1pipe exec-job: {error}");
            return Ok(ExitFile::failed(error));
        }
    };
    // The outputs go to the work folder's `out`, whatever the file says; those of an
    // earlier attempt of this job are never trusted, its checkpoints are.
    let out_dir = work_dir.join("out");
    crate::pipeline::store::remove_path(&out_dir)?;
    fs::create_dir_all(&out_dir)?;
    eprintln!("r1pipe exec-job: stage `{}` ({}), work {}", job.stage, job.kind, work_dir.display());
    // The work folder is `<cache>/work/<fingerprint>` (checked above).
    let cache = crate::pipeline::store::Cache::new(work_dir.parent().and_then(Path::parent).unwrap_or(work_dir));
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
    Ok(match kind.run(&mut ctx) {
        Ok(()) => ExitFile { status: "ok".into(), error: None, metrics: ctx.metrics.take(), outputs: None },
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
            eprintln!("r1pipe exec-job: stopped (its checkpoint is kept)");
            ExitFile { status: "interrupted".into(), error: None, metrics: None, outputs: None }
        }
        Err(e) => {
            let text = crate::common::diagnostic::error_text(&e);
            eprintln!("r1pipe exec-job: failed: {text}");
            ExitFile::failed(text)
        }
    })
}

/// The last `cap` bytes of a file, as text (lossy).
pub(super) fn tail_of_file(path: &Path, cap: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(cap)));
    let mut bytes = Vec::new();
    let _ = f.take(cap).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
