//! The runner's subcommands.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use r1pipe::common::table::render_table;
use r1pipe::common::CancelToken;
use r1pipe::pipeline::kind::Project;
use r1pipe::pipeline::runner::{Decision, RunOptions, RunOutcome, Runner};
use r1pipe::pipeline::spec::{self, Pipeline};
use r1pipe::pipeline::status::status as stage_status;
use r1pipe::pipeline::store::Cache;
use r1pipe::pipeline::{gc as gc_mod, Registry};

use super::{DagFormat, PipelineArgs};

fn load(args: &PipelineArgs, registry: &Registry) -> Result<Pipeline> {
    Ok(spec::load(&args.pipeline, &args.set, registry)?)
}

fn cache_root(explicit: Option<PathBuf>, project: &Project) -> PathBuf {
    explicit.unwrap_or_else(|| project.root.join("cache"))
}

/// stderr logs (RUST_LOG, default warnings) and, when `run_log` is given, every
/// r1pipe event as JSON lines in that file.
fn init_tracing(run_log: Option<&Path>) -> Result<()> {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,r1pipe::runlog=off")));
    let file = match run_log {
        Some(p) => {
            let f = std::fs::File::create(p).with_context(|| format!("creating run log {}", p.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(Mutex::new(f))
                    .with_filter(EnvFilter::new("r1pipe=debug")),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry().with(stderr).with(file).try_init();
    Ok(())
}

pub fn run(args: &PipelineArgs, opts: &RunOptions) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let pipeline = load(args, &registry)?;
    let root = cache_root(args.cache.clone(), &pipeline.project);
    let runner = Runner::new(&pipeline, &registry, root.clone())?;
    if opts.dry_run {
        init_tracing(None)?;
    } else {
        std::fs::create_dir_all(runner.cache.runs_dir())?;
        let log = runner.cache.runs_dir().join(format!(
            "{}-{}-{}.jsonl",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            pipeline.name,
            std::process::id()
        ));
        init_tracing(Some(&log))?;
        tracing::info!(pipeline = %pipeline.name, file = %pipeline.file.display(), cache = %root.display(), "run started");
    }
    let cancel = CancelToken::default();
    install_ctrl_c(cancel.clone());
    println!("pipeline {} ({}), cache {}", pipeline.name, pipeline.file.display(), root.display());
    Ok(match runner.run(opts, &cancel)? {
        RunOutcome::Completed => 0,
        RunOutcome::Failed => 1,
        RunOutcome::Interrupted => 130,
    })
}

/// First Ctrl-C: stages finish their current step, checkpoint and stop. Second: exit now.
fn install_ctrl_c(cancel: CancelToken) {
    let _ = ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            eprintln!("\nexiting now");
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current step (Ctrl-C again to exit now)");
        cancel.cancel();
    });
}

pub fn status(args: &PipelineArgs) -> Result<i32> {
    init_tracing(None)?;
    let registry = r1pipe::stages::registry();
    let pipeline = load(args, &registry)?;
    let root = cache_root(args.cache.clone(), &pipeline.project);
    let runner = Runner::new(&pipeline, &registry, root.clone())?;
    let rows = stage_status(&runner)?;
    println!("pipeline {} ({}), cache {}", pipeline.name, pipeline.file.display(), root.display());
    let table: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            let state = if r.detail.is_empty() { r.state } else { format!("{} ({})", r.state, r.detail) };
            vec![r.stage, r.kind, state, r.fingerprint, r.finished, r.took]
        })
        .collect();
    print!("{}", render_table(&["STAGE", "KIND", "STATE", "FINGERPRINT", "FINISHED", "TOOK"], &table));
    Ok(0)
}

pub fn dag(args: &PipelineArgs, format: DagFormat) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let pipeline = load(args, &registry)?;
    let dag = r1pipe::pipeline::dag::Dag::build(&pipeline).map_err(|d| anyhow::anyhow!("{d}"))?;
    print!(
        "{}",
        match format {
            DagFormat::Text => dag.render_text(&pipeline),
            DagFormat::Mermaid => dag.render_mermaid(&pipeline),
            DagFormat::Dot => dag.render_dot(&pipeline),
        }
    );
    Ok(0)
}

pub fn show(target: &str, pipeline_file: Option<&Path>, cache: Option<PathBuf>) -> Result<i32> {
    let Some((stage, output)) = target.split_once('.') else {
        bail!("`{target}`: expected STAGE.OUTPUT, e.g. sft.model");
    };
    let registry = r1pipe::stages::registry();
    let record = match pipeline_file {
        Some(file) => {
            let pipeline = spec::load(file, &[], &registry)?;
            let root = cache_root(cache, &pipeline.project);
            let runner = Runner::new(&pipeline, &registry, root)?;
            if pipeline.stage(stage).is_none() {
                bail!("no stage `{stage}` in {}", file.display());
            }
            let found = runner.decide_all()?.into_iter().find(|(name, _)| name == stage);
            let rec = match found {
                Some((_, Decision::Cached { record })) => *record,
                _ => bail!("stage `{stage}` is not up to date; run `r1pipe run {}` first", file.display()),
            };
            (Cache::new(&runner.cache.root), rec)
        }
        None => {
            let root = cache
                .unwrap_or_else(|| Project::of_dir(&std::env::current_dir().unwrap_or_default()).root.join("cache"));
            let cache = Cache::new(&root);
            if !cache.exists() {
                bail!("no cache at {} (pass --cache DIR or run a pipeline first)", root.display());
            }
            let db = cache.db()?;
            let matches: Vec<(String, String, String)> =
                cache.latest_pointers(&db)?.into_iter().filter(|(_, s, _)| s == stage).collect();
            let (pipeline, _, fp) = match matches.as_slice() {
                [] => bail!("no finished stage `{stage}` in the cache {}", root.display()),
                [one] => one.clone(),
                many => bail!(
                    "stage `{stage}` exists in several pipelines ({}); pass --pipeline FILE",
                    many.iter().map(|m| m.0.clone()).collect::<Vec<_>>().join(", ")
                ),
            };
            let rec =
                cache.record(&db, &fp)?.with_context(|| format!("the record of {pipeline}/{stage} is missing"))?;
            drop(db);
            (cache, rec)
        }
    };
    let (cache, rec) = record;
    let Some(obj) = rec.outputs.get(output) else {
        let outs: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
        bail!("stage `{stage}` has no output `{output}` (outputs: {})", outs.join(", "));
    };
    let path = cache.object_path(obj);
    if !path.exists() {
        bail!("{} is recorded but missing on disk; run the pipeline again to repair it", path.display());
    }
    println!("{}", path.display());
    Ok(0)
}

pub fn gc(keep: &[PathBuf], cache: Option<PathBuf>, include_unfinished: bool, dry_run: bool) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let mut keep_fps: Option<BTreeSet<String>> = None;
    let mut root = cache.clone();
    for file in keep {
        let pipeline = spec::load(file, &[], &registry)?;
        let r = cache_root(cache.clone(), &pipeline.project);
        root.get_or_insert(r.clone());
        let runner = Runner::new(&pipeline, &registry, r)?;
        let set = keep_fps.get_or_insert_with(BTreeSet::new);
        for (_, decision) in runner.decide_all()? {
            match decision {
                Decision::Cached { record } => {
                    set.insert(record.fingerprint);
                }
                Decision::Run { fingerprint, .. } => {
                    set.insert(fingerprint);
                }
                Decision::Pending { .. } => {}
            }
        }
    }
    let root = root.unwrap_or_else(|| Project::of_dir(&std::env::current_dir().unwrap_or_default()).root.join("cache"));
    let cache = Cache::new(&root);
    if !cache.exists() {
        bail!("no cache at {}", root.display());
    }
    let _lock = if dry_run { None } else { Some(cache.lock(false)?) };
    let report = gc_mod::gc(&cache, keep_fps.as_ref(), include_unfinished, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for p in &report.removed {
        println!("{verb} {}", p.display());
    }
    for p in &report.kept_unfinished {
        println!("kept {} (interrupted stage; --include-unfinished removes it)", p.display());
    }
    println!(
        "{verb} {} item(s), {:.1} MiB; {} artifact(s) kept",
        report.removed.len(),
        report.freed_bytes as f64 / (1 << 20) as f64,
        report.kept_objects
    );
    Ok(0)
}

/// Render a training stage's curves: from its current record's log, or from
/// the work folder's log of a stage that is interrupted or still running.
pub fn plot(stage: &str, file: &Path, out: Option<PathBuf>, open: bool, cache: Option<PathBuf>) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let pipeline = spec::load(file, &[], &registry)?;
    let root = cache_root(cache, &pipeline.project);
    let runner = Runner::new(&pipeline, &registry, root.clone())?;
    if pipeline.stage(stage).is_none() {
        bail!("no stage `{stage}` in {}", file.display());
    }
    let decision = runner.decide_all()?.into_iter().find(|(n, _)| n == stage).map(|(_, d)| d);
    let (log, state) = match decision {
        Some(Decision::Cached { record }) => match record.outputs.get("log") {
            Some(o) => (runner.cache.object_path(o), "finished"),
            None => bail!("stage `{stage}` has no training log (only training stages have curves)"),
        },
        Some(Decision::Run { fingerprint, .. }) => {
            let log = runner.cache.work_dir(&fingerprint).join("log.jsonl");
            if !log.exists() {
                bail!("stage `{stage}` has not logged a step yet (no {})", log.display());
            }
            (log, "unfinished")
        }
        _ => bail!("stage `{stage}` cannot have run yet: its inputs are not up to date"),
    };
    let out = out.unwrap_or_else(|| root.join("plots").join(stage));
    let index = r1pipe::train::plots::render(&log, &out, &format!("{} / {stage} ({state})", pipeline.name))?;
    println!("{}", index.display());
    if open {
        if let Err(e) = std::process::Command::new("xdg-open").arg(&index).status() {
            eprintln!("could not open it ({e}); open {} in a browser", index.display());
        }
    }
    Ok(0)
}

/// `gc --repair`: rebuild a damaged index from the record copies, holding the lock.
pub fn repair(cache: Option<PathBuf>) -> Result<i32> {
    let root =
        cache.unwrap_or_else(|| Project::of_dir(&std::env::current_dir().unwrap_or_default()).root.join("cache"));
    let cache = Cache::new(&root);
    let _lock = cache.lock(false)?;
    let (restored, skipped) = cache.repair()?;
    println!(
        "rebuilt the index of {}: {restored} record(s) restored, {skipped} skipped (artifacts missing; those stages rerun)",
        root.display()
    );
    Ok(0)
}
