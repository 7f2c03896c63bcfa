//! Running a stage as a job of a cluster, whichever cluster: submit the job
//! file, follow the job until it is gone and its exit file says how it ended,
//! resubmit a job stopped before the end (it resumes from its checkpoint),
//! ask the job to checkpoint and stop when the head is cancelled, and follow
//! a job an earlier head left running instead of submitting it again. A
//! cluster comes in through [`JobSystem`]: what is particular to Slurm or Ray
//! is how to submit, look at, stop and read the log of one job.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::job::{exec_command, read_exit, write_atomically, ExitFile, JobFile, Submitted, EXIT_FILE, JOB_FILE};
use super::through_remote;
use super::{Executor, ExecutorConfig, LiveJob, StageRun};
use crate::common::{CancelToken, Cancelled};
use crate::pipeline::resources::Resources;

/// One cluster's way of running jobs.
pub(super) trait JobSystem: Send + Sync {
    /// How one of its jobs is named in messages: `Slurm job`, `Ray job`.
    fn noun(&self) -> &'static str;
    /// Refuse, before submitting, what the cluster can never give.
    fn admits(&self, _stage: &str, _resources: &Resources) -> Result<()> {
        Ok(())
    }
    /// Submit the job (its file is written) to run `command`; its id.
    fn submit(&self, job: &JobFile, resources: &Resources, command: &str) -> Result<String>;
    fn state(&self, id: &str) -> Result<JobState>;
    /// Ask the job to checkpoint and stop (SIGTERM, with the grace its settings give).
    fn stop(&self, id: &str) -> Result<()>;
    /// Where the job's log is read, said when it is submitted.
    fn log_place(&self, work_dir: &Path, id: &str) -> String;
    /// The last lines of the job's log, for an error.
    fn log_tail(&self, work_dir: &Path, id: &str) -> String;
    fn max_resubmits(&self) -> u32;
    /// Seconds between looks at a running job.
    fn poll_s(&self) -> f64;
}

pub(super) enum JobState {
    /// Queued or running, in the cluster's words (`PENDING`, `RUNNING`).
    Live(String),
    /// No longer queued or running.
    Ended(Ending),
}

/// How the cluster says a job ended (the job's own exit file says more).
pub(super) enum Ending {
    /// It does not say (Slurm without accounting: the job left the queue).
    Unknown,
    Succeeded,
    /// Stopped on request: the head's, or someone's (`ray job stop`).
    Stopped,
    /// Failed, in the cluster's words.
    Failed(String),
}

/// The settings every cluster's executor has, with their defaults and limits:
/// resubmissions, the grace a stopped job has to checkpoint, how often a job is looked at.
pub(super) fn default_resubmits() -> u32 {
    3
}
pub(super) fn default_grace() -> u32 {
    120
}
pub(super) fn default_poll() -> f64 {
    2.0
}
pub(super) fn default_shared_filesystem() -> bool {
    true
}

/// Problems with those settings, as (key, message); `grace_max` is the cluster's own limit.
pub(super) fn following_problems(
    max_resubmits: u32,
    signal_grace_s: u32,
    grace_max: u32,
    poll_s: f64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if signal_grace_s == 0 || signal_grace_s > grace_max {
        out.push(("signal_grace_s", format!("{signal_grace_s} is not between 1 and {grace_max} seconds")));
    }
    if !(poll_s.is_finite() && (0.05..=60.0).contains(&poll_s)) {
        out.push(("poll_s", format!("{poll_s} is not between 0.05 and 60 seconds")));
    }
    if max_resubmits > 1000 {
        out.push(("max_resubmits", format!("{max_resubmits} is more than 1000")));
    }
    out
}

/// How long the cluster may not answer while a job is followed before the stage fails
/// (the job runs on; the next run follows it).
const UNANSWERED_LIMIT: Duration = Duration::from_secs(120);
/// How long an ended job's exit file may lag behind (a shared filesystem's caches).
const EXIT_FILE_LAG: Duration = Duration::from_secs(10);

pub(super) struct ClusterExecutor {
    system: Box<dyn JobSystem>,
    /// Recorded beside each job, so a later head (or `status`) finds the cluster again.
    config: ExecutorConfig,
}

impl ClusterExecutor {
    pub fn new(system: Box<dyn JobSystem>, config: ExecutorConfig) -> ClusterExecutor {
        ClusterExecutor { system, config }
    }

    /// Follow `live`, left running by an earlier head, to the stage's end.
    pub fn follow(&self, run: StageRun<'_>, live: LiveJob) -> Result<()> {
        self.run_jobs(run, Some(live.id))
    }

    fn run_jobs(&self, run: StageRun<'_>, mut following: Option<String>) -> Result<()> {
        let StageRun { ctx, resources, tag, spec, remote, .. } = run;
        let noun = self.system.noun();
        let job = JobFile::new(ctx, spec);
        let work = ctx.work_dir.clone();
        // Nodes without the head's filesystem: the job, its exit and its artifacts go
        // through the remote cache (the runner pushed the inputs).
        let through = match (self.config.shared_filesystem(), remote) {
            (true, _) => None,
            (false, Some(spec)) => Some(crate::pipeline::store::remote::Remote::open(&spec, &ctx.project.root)?),
            (false, None) => bail!("{}", needs_remote_message(self.config.kind())),
        };
        let command = match &through {
            Some(remote) => through_remote::exec_command(remote.spec(), &job.fingerprint)?,
            None => exec_command(&work)?,
        };
        let read_exit = || match &through {
            Some(remote) => through_remote::read_exit(remote, &job.fingerprint),
            None => read_exit(&work.join(EXIT_FILE)),
        };
        let mut resubmits = 0;
        loop {
            let id = match following.take() {
                Some(id) => {
                    println!("{tag}: following {noun} {id}, submitted by an earlier run");
                    id
                }
                None => {
                    self.system.admits(&ctx.stage, resources)?;
                    write_atomically(&work.join(JOB_FILE), &serde_json::to_vec_pretty(&job)?)?;
                    let _ = std::fs::remove_file(work.join(EXIT_FILE));
                    if let Some(remote) = &through {
                        through_remote::post_job(remote, &job)?;
                    }
                    let id = self.system.submit(&job, resources, &command)?;
                    Submitted { executor: self.config.clone(), id: id.clone() }.write(&work)?;
                    tracing::info!(target: "r1pipe::runlog", stage = %ctx.stage, executor = self.config.kind(), job = %id, "job submitted");
                    println!("{tag}: {noun} {id} (log {})", self.system.log_place(&work, &id));
                    id
                }
            };
            let (exit, ending, ran) = self.wait(&id, &read_exit, &ctx.cancel)?;
            let stopped_outside = matches!(ending, Ending::Stopped) && !ctx.cancel.is_cancelled();
            let tail = || self.system.log_tail(&work, &id);
            match exit {
                Some(exit) if exit.status == "ok" => {
                    if let Some(remote) = &through {
                        let moved = through_remote::fetch_outputs(remote, &exit, &work, &ctx.out_dir)?;
                        println!(
                            "{tag}: fetched its outputs from {} ({} in {} files)",
                            remote.name,
                            indicatif::HumanBytes(moved.bytes),
                            moved.files_sent
                        );
                        if let Err(e) = remote.clear_job(&job.fingerprint) {
                            tracing::warn!(
                                "{tag}: the job's files stay in the remote (`gc --remote` removes them): {e:#}"
                            );
                        }
                    }
                    ctx.metrics = exit.metrics;
                    return Ok(());
                }
                Some(exit) if exit.status == "failed" => {
                    bail!("{noun} {id} failed: {}\n{}", exit.error.unwrap_or_else(|| "no reason given".into()), tail())
                }
                _ if ctx.cancel.is_cancelled() => return Err(Cancelled.into()),
                _ if stopped_outside => bail!(
                    "{noun} {id} was stopped outside r1pipe; its checkpoint is kept: run again to resume\n{}",
                    tail()
                ),
                Some(exit) if exit.status == "interrupted" => {
                    println!("{tag}: {noun} {id} stopped before the end (time limit or preemption); resubmitting")
                }
                Some(exit) => {
                    bail!("{noun} {id} ended with `{}` in its {EXIT_FILE}, not ok, failed or interrupted", exit.status)
                }
                None => match ending {
                    Ending::Failed(why) if ran => {
                        println!("{tag}: {noun} {id} died without saying how ({why}); resubmitting from its checkpoint")
                    }
                    Ending::Failed(why) => bail!("the cluster did not run {noun} {id}: {why}\n{}", tail()),
                    _ => bail!(
                        "{noun} {id} ended without saying how (cancelled outside r1pipe, or killed before it could \
                         write {EXIT_FILE}); its checkpoint is kept\n{}",
                        tail()
                    ),
                },
            }
            resubmits += 1;
            if resubmits > self.system.max_resubmits() {
                bail!(
                    "{noun} {id} was stopped before the end {resubmits} times, more than max_resubmits = {}; its \
                     checkpoint is kept\n{}",
                    self.system.max_resubmits(),
                    tail()
                );
            }
        }
    }

    /// Wait for job `id` to end: its exit file (if it left one), how the cluster
    /// says it ended, and whether it was ever seen running. A cancelled head asks
    /// the job to checkpoint and stop, and waits for it.
    fn wait(
        &self,
        id: &str,
        read_exit: &dyn Fn() -> Result<Option<ExitFile>>,
        cancel: &CancelToken,
    ) -> Result<(Option<ExitFile>, Ending, bool)> {
        let noun = self.system.noun();
        let (mut told_to_stop, mut ran) = (false, false);
        let mut gone_since: Option<Instant> = None;
        let mut answered = Instant::now();
        loop {
            match self.system.state(id) {
                Ok(JobState::Live(state)) => {
                    answered = Instant::now();
                    gone_since = None;
                    ran |= state == "RUNNING";
                }
                Ok(JobState::Ended(ending)) => {
                    answered = Instant::now();
                    // The exit file is written last; on a shared filesystem it may lag a little.
                    if let Some(exit) = read_exit()? {
                        return Ok((Some(exit), ending, true));
                    }
                    if gone_since.get_or_insert_with(Instant::now).elapsed() > EXIT_FILE_LAG {
                        return Ok((None, ending, ran));
                    }
                }
                Err(e) if answered.elapsed() > UNANSWERED_LIMIT => {
                    bail!(
                        "{noun} {id} could not be followed for {} s: {e:#}; it may still run: the next run follows it",
                        UNANSWERED_LIMIT.as_secs()
                    )
                }
                Err(e) => tracing::warn!("{noun} {id}: {e:#}; asking again"),
            }
            if cancel.is_cancelled() && !told_to_stop {
                told_to_stop = true;
                if let Err(e) = self.system.stop(id) {
                    tracing::warn!("asking {noun} {id} to stop: {e:#}");
                }
            }
            std::thread::sleep(Duration::from_secs_f64(self.system.poll_s().clamp(0.05, 60.0)));
        }
    }
}

impl Executor for ClusterExecutor {
    fn default_jobs(&self) -> usize {
        64
    }
    fn needs_remote(&self) -> bool {
        !self.config.shared_filesystem()
    }
    fn run_stage(&self, run: StageRun<'_>) -> Result<()> {
        self.run_jobs(run, None)
    }
}

/// The job `submitted` names, if its cluster says it is still queued or running.
pub(super) fn live(submitted: &Submitted) -> Option<LiveJob> {
    let system = submitted.executor.system()?;
    match system.state(&submitted.id).ok()? {
        JobState::Live(state) => Some(LiveJob {
            executor: submitted.executor.clone(),
            id: submitted.id.clone(),
            name: format!("{} {}", system.noun(), submitted.id),
            state,
        }),
        JobState::Ended(_) => None,
    }
}

/// Why a cluster without a shared filesystem cannot run a pipeline without a remote.
pub(super) fn needs_remote_message(kind: &str) -> String {
    format!(
        "`executor: {{kind: {kind}, shared_filesystem: false}}` sends artifacts through the remote cache, and this \
         run has none: add `remote:` to the pipeline (s3://…, https://…, file:///…) or pass --remote URL"
    )
}
