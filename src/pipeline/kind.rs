//! The contract between the runner and the stage kinds: what a kind declares
//! (outputs, parameter checks, what its result depends on) and the context it runs in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::common::checkpoints::Checkpoints;
use crate::common::params::with_defaults;
use crate::common::{typed, CancelToken, Host, ParamError};

/// One named output of a stage kind. It lands in the cache as
/// `objects/<hash>/<file_name>` and is referenced as `${stage.<name>}`.
#[derive(Debug, Clone, Copy)]
pub struct OutputSpec {
    pub name: &'static str,
    pub file_name: &'static str,
    pub is_dir: bool,
    pub description: &'static str,
}

impl OutputSpec {
    /// A file output named `name`, stored as `file_name`.
    pub const fn file(name: &'static str, file_name: &'static str, description: &'static str) -> OutputSpec {
        OutputSpec { name, file_name, is_dir: false, description }
    }

    /// A folder output, stored under its own name.
    pub const fn dir(name: &'static str, description: &'static str) -> OutputSpec {
        OutputSpec { name, file_name: name, is_dir: true, description }
    }
}

/// What a kind's result depends on beyond its parameters and input artifacts.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    /// Local files or directories the stage reads, with the parameter that names
    /// them: checked to exist before anything runs, and hashed into the fingerprint.
    pub local_paths: Vec<(String, PathBuf)>,
    /// Values read from elsewhere that the result depends on (a reward set by
    /// name or file), with the parameter that names them and the hash of their
    /// parsed content: hashed into the fingerprint beside the files.
    pub content: Vec<(String, String)>,
    /// The result depends on the device class and dtype (model stages).
    pub uses_device: bool,
    /// The result depends on the pipeline's seed.
    pub uses_seed: bool,
}

/// Where relative paths in a pipeline are anchored: the project root.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
}

impl Project {
    /// The project root of a pipeline file: the nearest ancestor holding a
    /// `stages/` folder, `Cargo.toml` or `.git`; else the file's own folder.
    pub fn of_file(file: &Path) -> Project {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Project::of_dir(dir)
    }

    pub fn of_dir(dir: &Path) -> Project {
        // Absolute, so that printed artifact paths work from any directory.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        for anc in dir.ancestors() {
            if anc.join("stages").is_dir() || anc.join(".git").exists() || anc.join("Cargo.toml").is_file() {
                return Project { root: anc.to_path_buf() };
            }
        }
        Project { root: dir.to_path_buf() }
    }

    /// A parameter value read as a local path; `None` for an artifact reference
    /// (`${stage.output}`), which the runner supplies.
    pub fn local_path(&self, value: &str) -> Option<PathBuf> {
        if value.contains("${") {
            return None;
        }
        let p = expand_home(value);
        Some(if p.is_absolute() { p } else { self.root.join(p) })
    }
}

fn expand_home(s: &str) -> PathBuf {
    match (s.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(s),
    }
}

/// What a stage kind is: its name, its implementation version, what it does
/// and what it writes.
#[derive(Debug)]
pub struct KindInfo {
    pub name: &'static str,
    /// Bumped whenever the kind's results change meaning; part of every fingerprint.
    pub version: u32,
    pub description: &'static str,
    pub outputs: &'static [OutputSpec],
}

/// A stage kind: turns parameters and input artifacts into output artifacts.
pub trait StageKind: Send + Sync {
    fn info(&self) -> &'static KindInfo;
    fn name(&self) -> &'static str {
        self.info().name
    }
    fn version(&self) -> u32 {
        self.info().version
    }
    fn description(&self) -> &'static str {
        self.info().description
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        self.info().outputs
    }
    /// Every parameter the kind takes, with its default (`null`: none, or
    /// required): what docs/stages.md lists (tests/docs.rs keeps the two equal).
    fn parameters(&self) -> Value;
    /// Other spellings of the kind's parameters turned into its own, once, when
    /// the pipeline is read (so checks, runs and fingerprints see one form);
    /// what has no meaning here is an error. Default: none (the training kinds
    /// read TRL's config names and values).
    fn normalize(&self, _params: &mut serde_json::Map<String, Value>) -> Vec<ParamError> {
        Vec::new()
    }
    /// The parameters as they enter the fingerprint. Default: all of them; a kind
    /// leaves out settings that cannot change its results (timeouts, retries).
    fn fingerprint_params(&self, params: &Value) -> Value {
        params.clone()
    }
    /// Declared outputs that a stage with these parameters does not write, each
    /// with the reason (`adapter` without `lora:`). A reference to one is an
    /// error at validation; the runner does not expect it.
    fn absent_outputs(&self, _params: &Value) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
    /// Validate parameters (as resolved, with `${stage.output}` references still
    /// in place) and say what else the result depends on.
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>>;
    /// Do the work: read `ctx.params()`, write every output under `ctx.output_path(name)`.
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()>;
    /// What a finished stage produced, for a person: printed by `r1pipe run` for
    /// the pipeline's final stages. `outputs`: output name → artifact path.
    fn summary(&self, _outputs: &BTreeMap<String, PathBuf>) -> Option<String> {
        None
    }
    /// The metrics a person compares across runs (`r1pipe metrics diff`), from a
    /// record's metrics. `None` (the default): the kind's metrics are compared
    /// only when every stage's are asked for, as recorded.
    fn metrics_view(&self, _metrics: &Value) -> Option<Value> {
        None
    }
    /// What `r1pipe exp show` makes of a finished stage, from its recorded
    /// parameters and metrics: a run to compare (a row), measurements of
    /// other stages' runs (columns of theirs), or nothing (the default).
    fn exp_view(&self, _params: &Value, _metrics: Option<&Value>) -> Option<ExpView> {
        None
    }
    /// Whether the kind has curves for `r1pipe plot` to draw.
    fn draws_curves(&self) -> bool {
        false
    }
    /// Render the curves of `runs` (stages of this kind; several are overlaid)
    /// into `out` and return the page to open (`r1pipe plot`). Called only
    /// for kinds that [`draws_curves`](StageKind::draws_curves).
    fn render(&self, _runs: &[PlotRun], _out: &Path, _title: &str, _options: PlotOptions) -> anyhow::Result<PathBuf> {
        anyhow::bail!("stages of kind `{}` have no curves to plot", self.name())
    }
}

/// One run `r1pipe plot` draws: a stage, finished (its `artifacts`, output
/// name → path) or interrupted or still running (its `work_dir`).
#[derive(Debug, Clone)]
pub struct PlotRun {
    /// How legends name it: the stage, with its pipeline when runs of several are drawn.
    pub label: String,
    pub artifacts: BTreeMap<String, PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// The stage's parameters, shown on the page.
    pub params: Value,
}

/// How `r1pipe plot` draws curves.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlotOptions {
    /// TensorBoard's smoothing weight (0: none).
    pub smooth: f64,
    /// Against training time instead of the step.
    pub wall_clock: bool,
}

/// A finished stage as `r1pipe exp show` sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpView {
    /// A training run: its settings (flattened `a.b` keys, without the
    /// paths of its inputs, which differ per run without being a choice)
    /// and its final metrics, in the order they are best read.
    Run { params: BTreeMap<String, Value>, metrics: Vec<(String, f64)> },
    /// What this stage measured of other stages' runs: stage name → metrics.
    Measures(BTreeMap<String, Vec<(String, f64)>>),
}

/// Where and how the pipeline runs, as resolved for this run.
#[derive(Debug, Clone)]
pub struct RunEnv {
    /// As written in the pipeline: `auto`, `cpu`, `cuda`, `cuda:1`.
    pub device: String,
    /// `cpu` or `cuda`: what enters fingerprints of device-dependent stages.
    pub device_class: String,
    pub dtype: String,
    pub seed: u64,
}

/// Everything a stage gets from the runner.
pub struct StageContext {
    pub pipeline: String,
    pub stage: String,
    pub kind: &'static str,
    pub params: Value,
    pub project: Project,
    /// Survives interruption: checkpoints and partial results live here.
    pub work_dir: PathBuf,
    /// Emptied before each attempt; outputs are written here and moved into the cache on success.
    pub out_dir: PathBuf,
    /// Where this stage's TensorBoard files go (`report_to: tensorboard`):
    /// `cache/tensorboard/<pipeline>/<stage>`, outside the objects, so that
    /// `tensorboard --logdir cache/tensorboard` shows every run as it trains.
    pub tensorboard_dir: PathBuf,
    pub env: RunEnv,
    pub progress: indicatif::MultiProgress,
    /// `run -q`: no bars and no per-step lines (decisions and errors still show).
    pub quiet: bool,
    pub cancel: CancelToken,
    pub(crate) outputs: &'static [OutputSpec],
    pub(crate) metrics: Option<Value>,
}

impl StageContext {
    pub fn params<P: DeserializeOwned>(&self) -> anyhow::Result<P> {
        typed(&self.params).map_err(|e| anyhow::anyhow!("stage `{}`: {e}", self.stage))
    }

    /// The parameters as a type whose every field has a default (`common::params::with_defaults`).
    pub fn params_with_defaults<P: Default + Serialize + DeserializeOwned>(&self) -> anyhow::Result<P> {
        with_defaults(&self.params).map_err(|es| {
            let text: Vec<String> = es.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("stage `{}`: {}", self.stage, text.join("; "))
        })
    }

    /// Where to write the output `name` (a file or a directory, as the kind declared it).
    pub fn output_path(&self, name: &str) -> PathBuf {
        let spec = self
            .outputs
            .iter()
            .find(|o| o.name == name)
            .unwrap_or_else(|| panic!("kind `{}` declares no output `{name}`", self.kind));
        self.out_dir.join(spec.file_name)
    }

    /// Metrics recorded with the stage's record (shown by `status`, returned to later tooling).
    pub fn set_metrics(&mut self, metrics: Value) {
        self.metrics = Some(metrics);
    }

    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints::new(&self.work_dir)
    }
}

/// The stage context is the host of the ML core's long loops.
impl Host for StageContext {
    fn work_dir(&self) -> PathBuf {
        self.work_dir.clone()
    }
    fn cancel(&self) -> &CancelToken {
        &self.cancel
    }
    /// A bar in the runner's display: position, rate and ETA.
    fn progress(&self, len: u64, unit: &str) -> indicatif::ProgressBar {
        let bar = self.progress.add(indicatif::ProgressBar::new(len));
        let template =
            format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} · {{per_sec}} · ETA {{eta}} {{msg}}");
        bar.set_style(
            indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(self.stage.clone());
        bar
    }
    /// Prefixed by the stage (several run at once under `--jobs`); above the bars on
    /// a terminal, plain lines on stderr otherwise (a log file, a Slurm job's log).
    fn say(&self, line: &str) {
        if self.quiet {
            return;
        }
        let text = format!("{}: {line}", self.stage);
        if self.progress.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.progress.println(text);
        }
    }
}

/// What the runner needs to know of devices, from the ML side: which
/// `device:` and `dtype:` values exist, and the class of a device that enters
/// fingerprints.
pub trait Devices: Send + Sync {
    /// Why a pipeline's `device:` value is not one (with a hint), or `None`.
    fn check_device(&self, device: &str) -> Option<(String, String)>;
    /// Why a pipeline's `dtype:` value is not one (with a hint), or `None`.
    fn check_dtype(&self, dtype: &str) -> Option<(String, String)>;
    /// `cpu` or `cuda`: what enters the fingerprints of device-dependent stages.
    fn class(&self, device: &str) -> anyhow::Result<String>;
    /// The GPUs this process can use (0 without CUDA), for stages that ask for some.
    fn gpu_count(&self) -> usize {
        0
    }
}

/// The stage kinds a runner knows, and its device rules: the one place where
/// the ML side tells the runner anything.
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
    devices: Box<dyn Devices>,
}

impl Registry {
    pub fn new(devices: impl Devices + 'static) -> Self {
        Registry { kinds: BTreeMap::new(), devices: Box::new(devices) }
    }

    pub fn register(&mut self, kind: impl StageKind + 'static) {
        self.kinds.insert(kind.name(), Arc::new(kind));
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn StageKind>> {
        self.kinds.get(name).cloned()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    pub fn devices(&self) -> &dyn Devices {
        self.devices.as_ref()
    }
}
