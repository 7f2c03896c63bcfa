//! Where a stage's work runs. The runner hands a started stage to an
//! [`Executor`] and gets back its result; it names no executor. `local` runs
//! the stage in this process; `slurm` and `ray` run it as a job of a cluster
//! through the job protocol (`job.rs`: the job file the head writes, the exit
//! file the job writes, `r1pipe exec-job`), following it with the same rules
//! (`cluster.rs`). A new engine is one file implementing [`cluster::JobSystem`]
//! and one variant of [`ExecutorConfig`].

mod cluster;
mod job;
mod local;
mod ray;
mod slurm;
mod through_remote;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use super::kind::{StageContext, StageKind};
use super::resources::Resources;
use crate::common::params::{typed, ParamError};

pub use job::{execute_job, JobSpec};
pub use through_remote::{execute_job_through_remote, SCRATCH_VAR};

/// The names `executor: {kind: …}` and `--executor` take.
pub const KINDS: &[&str] = &["local", "slurm", "ray"];

/// `executor:` at the top of a pipeline file.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ExecutorConfig {
    #[default]
    Local,
    Slurm(slurm::SlurmConfig),
    Ray(ray::RayConfig),
}

impl ExecutorConfig {
    /// `executor: {kind: K, …settings}` read from the pipeline file; problems as
    /// (path under `executor`, message, hint).
    pub fn parse(value: &Value) -> Result<ExecutorConfig, Vec<(String, String, Option<String>)>> {
        let one = |path: &str, msg: String| Err(vec![(path.to_string(), msg, None)]);
        let Value::Object(map) = value else {
            return one("", format!("`executor` must be a mapping with `kind:` one of {}", KINDS.join(", ")));
        };
        let mut settings = map.clone();
        let kind = settings.remove("kind");
        let problems = |e: ParamError| vec![(e.path.clone(), e.message.clone(), e.hint.clone())];
        let config = match kind.as_ref().and_then(Value::as_str) {
            Some("local") if settings.is_empty() => ExecutorConfig::Local,
            Some("local") => return one("", "`kind: local` takes no settings".into()),
            Some("slurm") => ExecutorConfig::Slurm(typed(&Value::Object(settings)).map_err(problems)?),
            Some("ray") => ExecutorConfig::Ray(typed(&Value::Object(settings)).map_err(problems)?),
            Some(other) => {
                return Err(vec![(
                    "kind".into(),
                    format!("no executor `{other}`"),
                    Some(format!("`kind:` is one of {}", KINDS.join(", "))),
                )])
            }
            None => return one("kind", format!("`executor` needs `kind:`, one of {}", KINDS.join(", "))),
        };
        let found: Vec<_> = config.problems().into_iter().map(|(k, m)| (k.to_string(), m, None)).collect();
        if found.is_empty() {
            Ok(config)
        } else {
            Err(found)
        }
    }

    /// The settings as the pipeline file writes them (`kind` included).
    pub fn to_value(&self) -> Value {
        let (kind, settings) = match self {
            ExecutorConfig::Local => ("local", Value::Object(Map::new())),
            ExecutorConfig::Slurm(c) => ("slurm", serde_json::to_value(c).unwrap_or_default()),
            ExecutorConfig::Ray(c) => ("ray", serde_json::to_value(c).unwrap_or_default()),
        };
        let mut map = match settings {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        map.insert("kind".into(), Value::String(kind.into()));
        Value::Object(map)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ExecutorConfig::Local => "local",
            ExecutorConfig::Slurm(_) => "slurm",
            ExecutorConfig::Ray(_) => "ray",
        }
    }

    /// What `--executor KIND` selects: this pipeline's settings when it names
    /// the same kind, the kind's defaults otherwise.
    pub fn with_flag(&self, flag: Option<&str>) -> Result<ExecutorConfig> {
        let Some(kind) = flag else { return Ok(self.clone()) };
        if kind == self.kind() {
            return Ok(self.clone());
        }
        Ok(match kind {
            "local" => ExecutorConfig::Local,
            "slurm" => ExecutorConfig::Slurm(Default::default()),
            "ray" => ExecutorConfig::Ray(ray::RayConfig::from_environment()),
            other => bail!("--executor: no executor `{other}` (one of {})", KINDS.join(", ")),
        })
    }

    fn problems(&self) -> Vec<(&'static str, String)> {
        match self {
            ExecutorConfig::Local => Vec::new(),
            ExecutorConfig::Slurm(c) => c.problems(),
            ExecutorConfig::Ray(c) => c.problems(),
        }
    }

    /// Whether the cluster's nodes see the head's cache (`local`: the head's own machine).
    pub fn shared_filesystem(&self) -> bool {
        match self {
            ExecutorConfig::Local => true,
            ExecutorConfig::Slurm(c) => c.shared_filesystem,
            ExecutorConfig::Ray(c) => c.shared_filesystem,
        }
    }

    /// Refuse, before anything runs, settings this run cannot meet: a cluster
    /// without a shared filesystem needs a remote cache.
    pub fn check_run(&self, has_remote: bool) -> Result<()> {
        if !self.shared_filesystem() && !has_remote {
            bail!("{}", cluster::needs_remote_message(self.kind()));
        }
        Ok(())
    }

    /// The executor these settings describe.
    pub fn executor(&self) -> Box<dyn Executor> {
        match self.system() {
            None => Box::new(local::Local),
            Some(system) => Box::new(cluster::ClusterExecutor::new(system, self.clone())),
        }
    }

    /// The cluster these settings name (`None` for `local`).
    fn system(&self) -> Option<Box<dyn cluster::JobSystem>> {
        match self {
            ExecutorConfig::Local => None,
            ExecutorConfig::Slurm(c) => Some(Box::new(slurm::Slurm::new(c.clone()))),
            ExecutorConfig::Ray(c) => Some(Box::new(ray::Ray::new(c.clone()))),
        }
    }
}

/// A started stage, as the runner hands it over.
pub struct StageRun<'a> {
    pub kind: &'a dyn StageKind,
    pub ctx: &'a mut StageContext,
    pub resources: &'a Resources,
    /// `[i/n] stage`: how the stage's lines begin.
    pub tag: &'a str,
    /// What the job file needs beyond the context (executors that run jobs elsewhere).
    pub spec: JobSpec,
    /// The run's remote cache, for jobs that reach artifacts through it.
    pub remote: Option<crate::pipeline::store::remote::RemoteSpec>,
}

/// Runs a started stage to its end: `Ok` with its metrics in the context, an
/// error that says why it failed, or `Cancelled` (its checkpoints kept).
pub trait Executor: Send + Sync {
    /// Whether stages run in this process (the local GPU pool then places them).
    fn runs_here(&self) -> bool {
        false
    }
    /// How many stages run at a time when `run --jobs` does not say.
    fn default_jobs(&self) -> usize;
    /// Whether its jobs reach artifacts through the remote cache (no shared
    /// filesystem): the runner pushes a stage's inputs there before it starts.
    fn needs_remote(&self) -> bool {
        false
    }
    fn run_stage(&self, run: StageRun<'_>) -> Result<()>;
}

/// A job an earlier head submitted for a stage, still queued or running (a
/// head that died leaves its jobs running).
#[derive(Debug, Clone)]
pub struct LiveJob {
    pub executor: ExecutorConfig,
    pub id: String,
    /// The cluster's word for its state (`PENDING`, `RUNNING`).
    pub state: String,
    /// `Slurm job 12`, `Ray job r1pipe-…`.
    pub name: String,
}

/// The live job of the stage whose work folder this is, whichever executor
/// submitted it (its record says which, and where).
pub fn live_job(work_dir: &std::path::Path) -> Option<LiveJob> {
    let submitted = job::Submitted::read(work_dir)?;
    cluster::live(&submitted)
}

/// Follows a job an earlier head left running, with the executor that submitted it.
pub fn follow_live(live: LiveJob, run: StageRun<'_>) -> Result<()> {
    match live.executor.system() {
        Some(system) => cluster::ClusterExecutor::new(system, live.executor.clone()).follow(run, live),
        None => bail!("a local stage has no job to follow"),
    }
}
