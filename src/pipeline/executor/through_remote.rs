//! Jobs on nodes that share no filesystem with the head (`shared_filesystem:
//! false` in a Slurm or Ray executor's settings): the remote cache is what
//! they share. The head pushes the stage's input artifacts and its job file
//! (`jobs/<fingerprint>/job.json`, remote/jobs.rs) and submits `r1pipe
//! exec-job --remote URL --fingerprint FP`. The job builds a cache of its own
//! in node-local scratch (`R1PIPE_JOB_SCRATCH`, else the temporary folder),
//! pulls the inputs into it (each byte checked), and the work folder an
//! earlier job of the stage pushed when it stopped early (its checkpoints),
//! runs the stage, and then pushes either its outputs (as artifacts) or, when
//! it stopped early or failed, its work folder, and last its exit file. The
//! head fetches the outputs into the stage's `out` and commits them and the
//! record as for any job. The scratch cache goes when the job ends: the
//! remote holds everything the next job needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::job::{run_job, shell_quote, ExitFile, JobFile, EXIT_FILE, JOB_FILE};
use crate::common::CancelToken;
use crate::pipeline::kind::Registry;
use crate::pipeline::store::remote::{Remote, RemoteSpec, Transfer};
use crate::pipeline::store::{remove_path, Cache, ObjectRef};

/// Where a job keeps its own cache when the environment does not say.
pub const SCRATCH_VAR: &str = "R1PIPE_JOB_SCRATCH";

/// The command a job runs: this r1pipe's `exec-job` on the stage's job in the
/// remote. The URL goes on the command line (a cluster shows it), so one that
/// carries a password is refused: the job's credentials come from its
/// environment (`AWS_*`, `~/.aws/credentials`) as the head's do.
pub(super) fn exec_command(spec: &RemoteSpec, fingerprint: &str) -> Result<String> {
    let (_, credentials) = crate::common::redact::split_credentials(&spec.url);
    if credentials.is_some() {
        bail!(
            "the remote {} carries a user and password in its URL, which a job's command line would show to \
             everyone on the cluster; with `shared_filesystem: false` use a remote whose credentials come from \
             the environment (S3's AWS_* or ~/.aws/credentials), or a WebDAV server the cluster's network \
             protects",
            crate::common::redact::url(&spec.url)
        );
    }
    let mut cmd = format!("{} --remote {}", super::job::exec_job_prefix()?, shell_quote(&spec.url));
    if let Some(endpoint) = &spec.endpoint {
        cmd.push_str(&format!(" --endpoint {}", shell_quote(endpoint)));
    }
    cmd.push_str(&format!(" --fingerprint {}", shell_quote(fingerprint)));
    Ok(cmd)
}

/// The head's side, before submitting: the job file in the remote, and no exit
/// file of an earlier job.
pub(super) fn post_job(remote: &Remote, job: &JobFile) -> Result<()> {
    remote.put_job_file(&job.fingerprint, JOB_FILE, serde_json::to_vec_pretty(job)?)?;
    remote.remove_job_file(&job.fingerprint, EXIT_FILE)
}

/// The job's exit file in the remote, once it has written one.
pub(super) fn read_exit(remote: &Remote, fingerprint: &str) -> Result<Option<ExitFile>> {
    match remote.job_file(fingerprint, EXIT_FILE)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("remote {}: jobs/{fingerprint}/{EXIT_FILE} is not a job's exit file", remote.name)
        })?)),
    }
}

/// The head's side, after a job ended ok: its outputs, fetched from the remote
/// (each byte checked) into the stage's `out`, where the runner commits them.
pub(super) fn fetch_outputs(remote: &Remote, exit: &ExitFile, work_dir: &Path, out_dir: &Path) -> Result<Transfer> {
    let Some(outputs) = &exit.outputs else {
        bail!("the job ended ok without naming the artifacts it pushed to remote {}", remote.name)
    };
    // The work folder is `<cache>/work/<fingerprint>`: fetched files wait in that cache's `pulls/`.
    let cache = Cache::new(work_dir.parent().and_then(Path::parent).unwrap_or(work_dir));
    let bar = indicatif::ProgressBar::hidden();
    let mut moved = Transfer::default();
    for oref in outputs.values() {
        remote.fetch_object(&cache, oref, &out_dir.join(&oref.file_name), &bar, &mut moved)?;
    }
    Ok(moved)
}

/// The job's side (`r1pipe exec-job --remote URL --fingerprint FP`). Returns the
/// process's exit code (0 ok, 1 failed, 130 interrupted).
pub fn execute_job_through_remote(
    spec: &RemoteSpec,
    fingerprint: &str,
    registry: &Registry,
    cancel: CancelToken,
) -> Result<i32> {
    let cwd = std::env::current_dir().context("finding the job's working folder")?;
    let remote = Remote::open(spec, &cwd)?;
    let source = format!("remote {}: jobs/{fingerprint}/{JOB_FILE}", remote.name);
    let bytes = remote.job_file(fingerprint, JOB_FILE)?.with_context(|| format!("{source} is missing"))?;
    let job: JobFile = serde_json::from_slice(&bytes).with_context(|| format!("{source} is not a job file"))?;
    if job.fingerprint != fingerprint {
        bail!("{source} is the job of fingerprint {}, not {fingerprint}", job.fingerprint);
    }
    let scratch = scratch_folder(fingerprint)?;
    let result = run_in_scratch(&remote, job, &source, &scratch, registry, cancel);
    let exit = match result {
        Ok(exit) => exit,
        // A transfer that failed: said in the exit file too, so the head names it.
        Err(e) => ExitFile::failed(crate::common::diagnostic::error_text(&e)),
    };
    if let Err(e) = remove_path(&scratch) {
        eprintln!("r1pipe exec-job: could not remove its scratch cache {}: {e:#}", scratch.display());
    }
    if let Some(error) = &exit.error {
        eprintln!("r1pipe exec-job: failed: {error}");
    }
    remote.put_job_file(fingerprint, EXIT_FILE, serde_json::to_vec_pretty(&exit)?)?;
    Ok(exit.code())
}

/// A folder of this job's own under the node's scratch space (the process id in
/// its name: two heads' jobs of one stage on one node never share it).
fn scratch_folder(fingerprint: &str) -> Result<PathBuf> {
    let base = std::env::var_os(SCRATCH_VAR).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let short = &fingerprint[..fingerprint.len().min(12)];
    let dir = base.join(format!("r1pipe-job-{short}-{}", std::process::id()));
    remove_path(&dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the job's scratch cache {}", dir.display()))?;
    Ok(dir)
}

fn run_in_scratch(
    remote: &Remote,
    mut job: JobFile,
    source: &str,
    scratch: &Path,
    registry: &Registry,
    cancel: CancelToken,
) -> Result<ExitFile> {
    let cache = Cache::new(scratch);
    cache.create_dirs()?;
    let db = cache.db()?;
    let fingerprint = job.fingerprint.clone();
    let work_dir = cache.work_dir(&fingerprint);
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let bar = indicatif::ProgressBar::hidden();

    // The inputs, as the head bound them (`<cache>/objects/<hash>/<name>` on the head).
    let mut inputs = BTreeMap::new();
    for (key, path) in &job.bindings {
        inputs
            .insert(key.clone(), ObjectRef::of_stored_path(path).with_context(|| format!("{source}: input `{key}`"))?);
    }
    let mut moved = Transfer::default();
    let refs: Vec<&ObjectRef> = inputs.values().collect();
    remote.pull_objects(&cache, &db, &refs, &bar, &mut moved)?;
    eprintln!(
        "r1pipe exec-job: {} inputs from remote {} ({} in {} files) into the scratch cache {}",
        inputs.len(),
        remote.name,
        indicatif::HumanBytes(moved.bytes),
        moved.files_sent,
        scratch.display()
    );
    job.bindings = inputs.iter().map(|(k, o)| (k.clone(), cache.object_path(o))).collect();
    job.work_dir = work_dir.clone();

    let mut moved = Transfer::default();
    if remote.pull_work(&cache, &fingerprint, &work_dir, &bar, &mut moved)? {
        eprintln!(
            "r1pipe exec-job: resuming from the work folder an earlier job pushed ({} in {} files)",
            indicatif::HumanBytes(moved.bytes),
            moved.files_sent + moved.files_there
        );
    }

    let kind = registry.get(&job.kind).with_context(|| format!("{source}: no stage kind `{}` here", job.kind))?;
    let mut exit = run_job(job, source, &work_dir, registry, cancel)?;
    let mut moved = Transfer::default();
    if exit.status == "ok" {
        // Committed to the scratch cache (hashed as the head's cache hashes), then pushed.
        let mut outputs = BTreeMap::new();
        for spec in kind.outputs() {
            let p = work_dir.join("out").join(spec.file_name);
            if p.exists() {
                outputs.insert(spec.name.to_string(), cache.commit_output(&db, &p, spec.file_name)?);
            }
        }
        let refs: Vec<&ObjectRef> = outputs.values().collect();
        remote.push_objects(&cache, &db, &refs, &bar, &mut moved)?;
        eprintln!(
            "r1pipe exec-job: pushed {} outputs to remote {} ({} in {} files)",
            outputs.len(),
            remote.name,
            indicatif::HumanBytes(moved.bytes),
            moved.files_sent
        );
        exit.outputs = Some(outputs);
    } else {
        // Stopped early or failed: its checkpoints go to the remote for the next job.
        let keep = |rel: &str| !(rel.starts_with("out/") || rel == JOB_FILE || rel == EXIT_FILE);
        let n = remote.push_work(&fingerprint, &work_dir, &keep, &bar, &mut moved)?;
        eprintln!(
            "r1pipe exec-job: pushed its work folder to remote {} ({n} files, {} sent)",
            remote.name,
            indicatif::HumanBytes(moved.bytes)
        );
    }
    Ok(exit)
}
