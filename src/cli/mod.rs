//! Subcommands: run · status · dag · show · gc (and, from the ML side, rewards · infer).

mod bench_cmd;
mod exp_cmd;
mod fetch_cmd;
mod infer_cmd;
mod metrics_cmd;
mod pipeline_cmds;
mod presets_cmd;
mod rewards_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use r1pipe::pipeline::spec::Override;

#[derive(Parser)]
#[command(
    name = "r1pipe",
    version,
    about = "The DeepSeek-R1 recipe (GRPO, SFT, evaluation, inference) as one cached, resumable pipeline",
    arg_required_else_help = true,
    after_help = "First steps: `scripts/quickstart.sh` in a clone of r1pipe builds it and runs \
pipelines/quickstart.yaml (about ten minutes on a CPU); `r1pipe run P.yaml --dry-run` shows what a \
pipeline would do; `r1pipe presets` lists the built-in presets and reward sets.\n\
Manual: README.md and docs/ (pipelines.md: pipeline files and every command; stages.md: every parameter)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file, e.g. pipelines/quickstart.yaml
    pub pipeline: PathBuf,
    /// Override a parameter: -S grpo.learning_rate=1e-6 (repeatable; part of the fingerprint)
    #[arg(short = 'S', long = "set", value_name = "STAGE.KEY=VALUE")]
    pub set: Vec<Override>,
    /// Cache root [default: cache/ in the pipeline's project]
    #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// What `push` and `pull` take.
#[derive(clap::Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub args: PipelineArgs,
    /// Only these stages (names, matrix stages, patterns) [default: all]
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,
    /// The remote cache [default: the pipeline's `remote:`]
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// No progress bars
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate, plan and execute a pipeline: skip what is cached, resume what was interrupted
    Run {
        #[command(flatten)]
        args: PipelineArgs,
        /// Print the plan and touch nothing
        #[arg(long)]
        dry_run: bool,
        /// Rerun this stage even if cached (repeatable)
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Rerun every selected stage
        #[arg(long)]
        force_all: bool,
        /// Run only this stage (repeatable); its inputs must already be cached
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Run this stage and everything it needs
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// Wait for another run holding the cache instead of failing
        #[arg(long)]
        wait: bool,
        /// Run up to N stages at the same time when their inputs are ready (locally their
        /// threads share the machine's cores) [default: 1 here, 64 as jobs of a cluster]
        #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
        jobs: Option<u16>,
        /// Where stages run: here, or as jobs of a cluster (the pipeline's `executor:` gives
        /// the settings of its kind)
        #[arg(long, value_name = "KIND", value_parser = clap::builder::PossibleValuesParser::new(r1pipe::pipeline::executor::KINDS))]
        executor: Option<String>,
        /// A remote cache: stages it has are pulled instead of run, finished ones pushed
        /// (s3://BUCKET/PREFIX, https://HOST/PATH, file:///PATH) [default: the pipeline's `remote:`]
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
        /// Do not push finished stages to the remote
        #[arg(long)]
        no_push: bool,
        /// No progress bars and no per-step training lines (decisions, results and errors still show)
        #[arg(short, long)]
        quiet: bool,
    },
    /// Send stages' current results (artifacts, then records) to the remote cache
    Push(TransferArgs),
    /// Bring stages' results from the remote cache into this one, each byte checked
    Pull(TransferArgs),
    /// Run one stage's job as the head wrote it (what a cluster's job runs)
    #[command(hide = true)]
    ExecJob {
        /// The stage's work folder, holding job.json (a job on the head's filesystem)
        #[arg(required_unless_present = "remote", conflicts_with = "remote")]
        work_dir: Option<PathBuf>,
        /// The remote cache the job reaches artifacts through (no shared filesystem)
        #[arg(long, value_name = "URL", requires = "fingerprint")]
        remote: Option<String>,
        /// The remote's S3-compatible endpoint, as the pipeline's `remote.endpoint`
        #[arg(long, requires = "remote")]
        endpoint: Option<String>,
        /// The stage's fingerprint: its job is `jobs/FP/job.json` in the remote
        #[arg(long, value_name = "FP", requires = "remote")]
        fingerprint: Option<String>,
    },
    /// Each stage's state: cached, stale (why), never run, interrupted
    Status {
        #[command(flatten)]
        args: PipelineArgs,
        /// Also say which stages a remote cache has [default: the pipeline's `remote:`]
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
    },
    /// The stage graph
    Dag {
        #[command(flatten)]
        args: PipelineArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// The path of a finished artifact, for scripts: $(r1pipe show sft.model)
    Show {
        /// STAGE.OUTPUT, e.g. sft.model
        target: String,
        /// Resolve against this pipeline's current fingerprints (else: the newest record of that stage)
        #[arg(short, long)]
        pipeline: Option<PathBuf>,
        /// The overrides the run was made with: -S grpo.learning_rate=1e-6 (repeatable; needs --pipeline)
        #[arg(short = 'S', long = "set", value_name = "STAGE.KEY=VALUE", requires = "pipeline")]
        set: Vec<Override>,
        /// Cache root [default: cache/ in the current project]
        #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Re-hash every stored artifact (of a pipeline's records) against its content hash; drop the records of damaged ones
    Verify {
        /// Only this pipeline's records
        pipeline: Option<PathBuf>,
        /// Cache root [default: cache/ in the current project]
        #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Verify the remote cache instead (URL, or the pipeline's `remote:`): every file
        /// read back and hashed; a damaged artifact goes from it with its records
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
        remote: Option<String>,
    },
    /// Remove artifacts and work folders that no record reaches
    Gc {
        /// Drop the older results of these pipelines, keeping their current ones and
        /// every other pipeline's newest
        #[arg(value_name = "PIPELINE")]
        keep: Vec<PathBuf>,
        /// Keep nothing of the pipelines not named (not even their newest results)
        #[arg(long, requires = "keep")]
        only_this_pipeline: bool,
        /// Cache root [default: cache/ in the current project]
        #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Also remove interrupted stages' checkpoints
        #[arg(long)]
        include_unfinished: bool,
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Rebuild a damaged index from the record copies in cache/records
        #[arg(long)]
        repair: bool,
        /// Collect the remote cache instead (URL, or the first pipeline's `remote:`), by the
        /// same rule; nothing is deleted from a remote without this
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
        remote: Option<String>,
        /// With --remote: leave files and manifests no record names alone for this long
        /// (a push may be writing them)
        #[arg(long, value_name = "MINUTES", default_value_t = 60, requires = "remote")]
        grace_minutes: u32,
    },
    /// Ask a model a question; the answer streams as it is generated
    Infer(infer_cmd::InferArgs),
    /// The presets and reward sets built into r1pipe (`use: grpo`, `rewards: r1-gsm8k`), or one's text
    Presets {
        /// Print this one's YAML
        name: Option<String>,
    },
    /// Download a model or a data set from the Hugging Face Hub ahead of a run (HF_ENDPOINT, HF_HOME, HF_TOKEN)
    Fetch {
        #[command(subcommand)]
        what: fetch_cmd::FetchCommand,
    },
    /// Write a model (a .gguf, a folder, a hub id) as a Hugging Face folder (f32 safetensors, config, tokenizer)
    Convert {
        /// The model to convert: a .gguf, a model folder or a hub id
        #[arg(long, required_unless_present = "config")]
        model: Option<String>,
        /// Instead of --model: random weights of this config.json's shape …
        #[arg(long, conflicts_with = "model", requires = "tokenizer")]
        config: Option<PathBuf>,
        /// … with the tokenizer files of this model folder
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The folder to write
        #[arg(long)]
        out: PathBuf,
    },
    /// Prefill/decode tokens/s with the decode roofline, and a training step, on any device
    Bench(bench_cmd::BenchArgs),
    /// Curves of a training stage (reward, KL, length, loss, …) as SVG with an index.html
    Plot {
        /// The training stages: names, a matrix stage (all its members) or patterns (grpo@*)
        #[arg(required = true, value_name = "STAGE")]
        stages: Vec<String>,
        /// The pipeline file (repeatable: runs of several pipelines are overlaid)
        #[arg(short, long, required = true)]
        pipeline: Vec<PathBuf>,
        /// The overrides the runs were made with (applied to every pipeline given)
        #[arg(short = 'S', long = "set", value_name = "STAGE.KEY=VALUE")]
        set: Vec<Override>,
        /// Smooth the curves as TensorBoard does (exponential moving average weight, 0 to <1; 0.6 is its default)
        #[arg(long, default_value_t = 0.0, value_parser = smoothing_weight)]
        smooth: f64,
        /// Against training time (seconds) instead of the step
        #[arg(long)]
        wall_clock: bool,
        /// Where to write [default: cache/plots/STAGES]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Open index.html with xdg-open
        #[arg(long)]
        open: bool,
        /// Cache root [default: cache/ in the current project]
        #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Runs side by side: one row per training run (and matrix member), its differing parameters and metrics
    Exp {
        #[command(subcommand)]
        command: ExpCommand,
    },
    /// Compare metrics between runs (like `dvc metrics diff`)
    Metrics {
        #[command(subcommand)]
        command: MetricsCommand,
    },
    /// Score completions with a reward set (debug rewards before spending GPU hours), or list the functions
    Rewards {
        /// The reward set: a built-in's name (r1-gsm8k) or a file
        #[arg(long, value_name = "NAME|FILE.yaml", required_unless_present = "list")]
        set: Option<PathBuf>,
        /// JSONL of {prompt?, completion, answer, tokens?}
        #[arg(required_unless_present = "list")]
        completions: Option<PathBuf>,
        /// One JSON object per completion, then a summary
        #[arg(long)]
        json: bool,
        /// List the reward functions with their parameters and defaults
        #[arg(long)]
        list: bool,
    },
}

#[derive(Subcommand)]
pub enum ExpCommand {
    /// A table of runs: parameters that differ, final training metrics, what evaluate measured of each
    Show(exp_cmd::ExpShowArgs),
}

#[derive(Subcommand)]
pub enum MetricsCommand {
    /// Two evaluations of the same questions, question by question: accuracies and McNemar's exact test
    ///
    /// Each side is an evaluate stage's samples.jsonl, from any pipeline, cache or stage:
    /// `r1pipe metrics paired $(r1pipe show -p a.yaml evaluate.samples) $(r1pipe show -p b.yaml evaluate.samples) --model sft`.
    /// Questions are matched by their text and reference answer.
    Paired {
        /// The baseline's samples (an evaluate stage's samples.jsonl)
        a: PathBuf,
        /// The compared samples
        b: PathBuf,
        /// The model compared on both sides (needed when a file holds several)
        #[arg(long, value_name = "NAME")]
        model: Option<String>,
        /// The model of A, when it differs from B's
        #[arg(long, value_name = "NAME", conflicts_with = "model")]
        model_a: Option<String>,
        /// The model of B, when it differs from A's
        #[arg(long, value_name = "NAME", conflicts_with = "model")]
        model_b: Option<String>,
    },
    /// The pipeline's current evaluation metrics against a baseline: old, new, delta
    Diff {
        /// The pipeline file
        pipeline: PathBuf,
        /// Compare with this pipeline file's current results
        #[arg(long, value_name = "PIPELINE.yaml", conflicts_with = "against_cache")]
        against: Option<PathBuf>,
        /// Compare with the same pipeline's current results in another cache
        #[arg(long, value_name = "DIR")]
        against_cache: Option<PathBuf>,
        /// The overrides the compared run was made with: -S grpo.learning_rate=1e-6 (repeatable)
        #[arg(short = 'S', long = "set", value_name = "STAGE.KEY=VALUE")]
        set: Vec<Override>,
        /// The overrides the baseline (--against, --against-cache) was made with
        #[arg(long, value_name = "STAGE.KEY=VALUE")]
        against_set: Vec<Override>,
        /// Only these stages: names, a matrix stage (all its members) or patterns (grpo@*), as `run --only`
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Every stage's numeric metrics, not only evaluations
        #[arg(long)]
        all: bool,
        /// Cache root [default: cache/ in the current project]
        #[arg(long, env = "R1PIPE_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum DagFormat {
    Text,
    Mermaid,
    Dot,
}

/// Exit codes: 0 ok, 1 failure, 2 invalid pipeline or usage, 130 interrupted.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { args, dry_run, force, force_all, only, until, wait, jobs, executor, remote, no_push, quiet } => {
            let opts = r1pipe::pipeline::runner::RunOptions {
                dry_run,
                force,
                force_all,
                only,
                until,
                wait,
                jobs: jobs.map_or(0, usize::from),
                executor,
                remote,
                no_push,
                quiet,
            };
            pipeline_cmds::run(&args, opts)
        }
        Command::ExecJob { work_dir, remote, endpoint, fingerprint } => {
            // clap makes --remote and --fingerprint come together.
            let through = remote
                .zip(fingerprint)
                .map(|(url, fp)| (r1pipe::pipeline::store::remote::RemoteSpec { url, endpoint }, fp));
            pipeline_cmds::exec_job(work_dir.as_deref(), through)
        }
        Command::Status { args, remote } => pipeline_cmds::status(&args, remote.as_deref()),
        Command::Push(t) => pipeline_cmds::push(&t.args, &t.stages, t.remote.as_deref(), t.quiet),
        Command::Pull(t) => pipeline_cmds::pull(&t.args, &t.stages, t.remote.as_deref(), t.quiet),
        Command::Dag { args, format } => pipeline_cmds::dag(&args, format),
        Command::Show { target, pipeline, set, cache } => {
            pipeline_cmds::show(&target, pipeline.as_deref(), &set, cache)
        }
        Command::Infer(args) => infer_cmd::run(args),
        Command::Fetch { what } => fetch_cmd::run(what),
        Command::Presets { name } => presets_cmd::run(name.as_deref()),
        Command::Exp { command: ExpCommand::Show(args) } => exp_cmd::show(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Convert { model, config, tokenizer, out } => (|| -> anyhow::Result<i32> {
            match (model, config, tokenizer) {
                (Some(model), _, _) => {
                    let m = r1pipe::model::open(&model, &std::env::current_dir()?, "cpu", "f32")?;
                    r1pipe::model::load::save(&m.model, &m.files_dir, &out)?;
                }
                (None, Some(config), Some(tokenizer)) => {
                    let text = std::fs::read_to_string(&config)?;
                    let cfg = r1pipe::model::Config::from_json(serde_json::from_str(&text)?)?;
                    let m = r1pipe::model::Transformer::random(cfg, 0, &candle_core::Device::Cpu)?;
                    r1pipe::model::load::save(&m, &tokenizer, &out)?;
                }
                _ => anyhow::bail!("give --model REF, or --config CONFIG.json with --tokenizer DIR"),
            }
            println!("{}", out.display());
            Ok(0)
        })(),
        Command::Plot { stages, pipeline, set, smooth, wall_clock, out, open, cache } => {
            let options = r1pipe::pipeline::kind::PlotOptions { smooth, wall_clock };
            pipeline_cmds::plot(&stages, &pipeline, &set, options, out, open, cache)
        }
        Command::Metrics {
            command: MetricsCommand::Diff { pipeline, against, against_cache, set, against_set, only, all, cache },
        } => {
            let baseline = match (against, against_cache) {
                (Some(p), _) => metrics_cmd::Baseline::Pipeline(p),
                (None, Some(c)) => metrics_cmd::Baseline::Cache(c),
                (None, None) => metrics_cmd::Baseline::Previous,
            };
            metrics_cmd::diff(&pipeline, &set, &only, &against_set, cache, baseline, all)
        }
        Command::Metrics { command: MetricsCommand::Paired { a, b, model, model_a, model_b } } => {
            let (ma, mb) = (model_a.or(model.clone()), model_b.or(model));
            metrics_cmd::paired(&a, ma.as_deref(), &b, mb.as_deref())
        }
        Command::Rewards { list: true, .. } => rewards_cmd::list(),
        Command::Rewards { set, completions, json, .. } => rewards_cmd::score(
            set.as_deref().expect("clap requires --set"),
            completions.as_deref().expect("clap requires the completions file"),
            json,
        ),
        Command::Verify { pipeline, cache, remote } => {
            let remote = remote.map(|url| Some(url).filter(|u| !u.is_empty()));
            pipeline_cmds::verify(pipeline.as_deref(), cache, remote)
        }
        Command::Gc { repair: true, cache, .. } => pipeline_cmds::repair(cache),
        Command::Gc { keep, cache, only_this_pipeline, dry_run, remote: Some(url), grace_minutes, .. } => {
            let url = Some(url.as_str()).filter(|u| !u.is_empty());
            pipeline_cmds::gc_remote(&keep, url, cache, only_this_pipeline, grace_minutes, dry_run)
        }
        Command::Gc { keep, cache, only_this_pipeline, include_unfinished, dry_run, .. } => {
            pipeline_cmds::gc(&keep, cache, only_this_pipeline, include_unfinished, dry_run)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(d) = e.downcast_ref::<r1pipe::common::diagnostic::Diagnostics>() {
                eprintln!("{d}");
                return 2;
            }
            eprintln!("error: {}", r1pipe::common::diagnostic::error_text(&e));
            1
        }
    }
}

/// A smoothing weight: a number in [0, 1).
fn smoothing_weight(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(w) if (0.0..1.0).contains(&w) => Ok(w),
        _ => Err(format!("`{text}` is not a weight in [0, 1) (0: no smoothing, 0.6: TensorBoard's default)")),
    }
}
