//! The runner's subcommands.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use r1pipe::common::table::render_table;
use r1pipe::common::CancelToken;
use r1pipe::pipeline::gc::Keep;
use r1pipe::pipeline::runner::{RunOptions, RunOutcome};
use r1pipe::pipeline::spec::Override;
use r1pipe::pipeline::workspace::{self, Workspace};

use super::{DagFormat, PipelineArgs};

fn open<'r>(args: &PipelineArgs, registry: &'r r1pipe::pipeline::Registry) -> Result<Workspace<'r>> {
    Workspace::open(&args.pipeline, &args.set, args.cache.clone(), registry)
}

/// stderr logs (RUST_LOG, default warnings) and, when `run_log` is given, every
/// r1pipe event as JSON lines in that file.
fn init_tracing(run_log: Option<&Path>) -> Result<()> {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal shows them, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

pub fn run(args: &PipelineArgs, opts: RunOptions) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let ws = open(args, &registry)?;
    let opts = &opts;
    if !opts.dry_run && ws.cache.is_read_only() {
        return run_on_read_only_cache(&ws, opts);
    }
    if opts.dry_run {
        init_tracing(None)?;
    } else {
        init_tracing(Some(&ws.new_run_log()?))?;
        tracing::info!(pipeline = %ws.pipeline.name, file = %ws.pipeline.file.display(), cache = %ws.cache.root.display(), "run started");
    }
    let cancel = CancelToken::default();
    install_ctrl_c(cancel.clone());
    println!("pipeline {} ({}), cache {}", ws.pipeline.name, ws.pipeline.file.display(), ws.cache.root.display());
    Ok(match ws.run(opts, &cancel)? {
        RunOutcome::Completed => 0,
        RunOutcome::Failed => 1,
        RunOutcome::Interrupted => 130,
    })
}

/// A run on a cache this process may not write: fine when every stage is
/// cached (nothing to write), else an error naming what would have to run.
fn run_on_read_only_cache(ws: &Workspace, opts: &RunOptions) -> Result<i32> {
    init_tracing(None)?;
    println!(
        "pipeline {} ({}), cache {} (read-only)",
        ws.pipeline.name,
        ws.pipeline.file.display(),
        ws.cache.root.display()
    );
    let forced: Vec<&String> = opts.force.iter().collect();
    let rows = ws.status()?;
    let pending: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let why = if opts.force_all || forced.contains(&&r.stage) {
                "forced".to_string()
            } else if r.state == "cached" {
                return None;
            } else if r.detail.is_empty() {
                r.state.clone()
            } else {
                r.detail.clone()
            };
            Some(format!("`{}` ({why})", r.stage))
        })
        .collect();
    if !pending.is_empty() {
        bail!(
            "the cache {} is read-only, and {} would have to run: {}\n  hint: run with --cache pointing at a \
             writable folder (a copy of this one keeps everything cached)",
            ws.cache.root.display(),
            pending.len(),
            pending.join(", ")
        );
    }
    let n = rows.len();
    for (i, r) in rows.iter().enumerate() {
        println!("[{}/{n}] {}: skip (cached)  {}", i + 1, r.stage, r.fingerprint);
    }
    Ok(0)
}

/// `exec-job WORK` (or `exec-job --remote URL --fingerprint FP` where the nodes
/// share no filesystem with the head): what a cluster's job runs. SIGTERM (a
/// time limit's signal, a preemption, a stop, the head's Ctrl-C) makes the
/// stage checkpoint and stop.
pub fn exec_job(
    work_dir: Option<&Path>,
    through: Option<(r1pipe::pipeline::store::remote::RemoteSpec, String)>,
) -> Result<i32> {
    init_tracing(None)?;
    let cancel = CancelToken::default();
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("r1pipe exec-job: asked to stop: checkpointing");
        c.cancel();
    });
    let registry = r1pipe::stages::registry();
    match (through, work_dir) {
        (Some((spec, fingerprint)), _) => {
            r1pipe::pipeline::executor::execute_job_through_remote(&spec, &fingerprint, &registry, cancel)
        }
        (None, Some(work_dir)) => r1pipe::pipeline::executor::execute_job(work_dir, &registry, cancel),
        _ => anyhow::bail!("exec-job takes a work folder, or --remote URL with --fingerprint FP"),
    }
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

pub fn status(args: &PipelineArgs, remote: Option<&str>) -> Result<i32> {
    init_tracing(None)?;
    let registry = r1pipe::stages::registry();
    let ws = open(args, &registry)?;
    let rows = ws.status_with_remote(remote)?;
    println!("pipeline {} ({}), cache {}", ws.pipeline.name, ws.pipeline.file.display(), ws.cache.root.display());
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

/// `push` and `pull`: exit 1 when a named stage had nothing to move.
pub fn push(args: &PipelineArgs, stages: &[String], remote: Option<&str>, quiet: bool) -> Result<i32> {
    init_tracing(None)?;
    let registry = r1pipe::stages::registry();
    let ws = open(args, &registry)?;
    let missing = ws.push(stages, remote, quiet)?;
    Ok(i32::from(!stages.is_empty() && !missing.is_empty()))
}

pub fn pull(args: &PipelineArgs, stages: &[String], remote: Option<&str>, quiet: bool) -> Result<i32> {
    init_tracing(None)?;
    let registry = r1pipe::stages::registry();
    let ws = open(args, &registry)?;
    let missing = ws.pull(stages, remote, quiet)?;
    Ok(i32::from(!stages.is_empty() && !missing.is_empty()))
}

pub fn dag(args: &PipelineArgs, format: DagFormat) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let ws = open(args, &registry)?;
    let p = &ws.pipeline;
    print!(
        "{}",
        match format {
            DagFormat::Text => ws.dag.render_text(p),
            DagFormat::Mermaid => ws.dag.render_mermaid(p),
            DagFormat::Dot => ws.dag.render_dot(p),
        }
    );
    Ok(0)
}

pub fn show(target: &str, pipeline_file: Option<&Path>, set: &[Override], cache: Option<PathBuf>) -> Result<i32> {
    let Some((stage, output)) = target.rsplit_once('.') else {
        bail!("`{target}`: expected STAGE.OUTPUT, e.g. sft.model");
    };
    let registry = r1pipe::stages::registry();
    let path = match pipeline_file {
        Some(file) => Workspace::open(file, set, cache, &registry)?.artifact(stage, output)?,
        None => workspace::latest_artifact(&workspace::cache_root_here(cache), stage, output)?,
    };
    println!("{}", path.display());
    Ok(0)
}

/// What `gc` keeps when pipelines are named (their current results, and every
/// other pipeline's newest unless `only_these`), with the named pipelines opened.
fn gc_keep<'r>(
    pipelines: &[PathBuf],
    cache: Option<PathBuf>,
    only_these: bool,
    registry: &'r r1pipe::pipeline::Registry,
) -> Result<(Option<Keep>, Vec<Workspace<'r>>)> {
    let mut keep: Option<Keep> = None;
    let mut opened = Vec::new();
    for file in pipelines {
        let ws = Workspace::open(file, &[], cache.clone(), registry)?;
        let k = keep.get_or_insert_with(|| Keep { only_these, ..Keep::default() });
        k.current.extend(ws.current_fingerprints()?);
        k.pipelines.insert(ws.pipeline.name.clone());
        opened.push(ws);
    }
    Ok((keep, opened))
}

/// `gc --remote`: the remote cache collected by the local rule.
pub fn gc_remote(
    pipelines: &[PathBuf],
    url: Option<&str>,
    cache: Option<PathBuf>,
    only_these: bool,
    grace_minutes: u32,
    dry_run: bool,
) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let (keep, opened) = gc_keep(pipelines, cache, only_these, &registry)?;
    let (name, removed) = workspace::gc_remote(url, opened.first(), keep.as_ref(), grace_minutes, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for r in &removed {
        println!("{verb} {:>10}  {}  {}", indicatif::HumanBytes(r.bytes).to_string(), r.what, r.path.display());
    }
    let bytes: u64 = removed.iter().map(|r| r.bytes).sum();
    println!("{verb} {} item(s), {} from {name}", removed.len(), indicatif::HumanBytes(bytes));
    Ok(0)
}

pub fn gc(
    pipelines: &[PathBuf],
    cache: Option<PathBuf>,
    only_these: bool,
    include_unfinished: bool,
    dry_run: bool,
) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let (keep, opened) = gc_keep(pipelines, cache.clone(), only_these, &registry)?;
    let root = cache
        .or_else(|| opened.first().map(|w| w.cache.root.clone()))
        .unwrap_or_else(|| workspace::cache_root_here(None));
    let report = workspace::gc(&root, keep.as_ref(), include_unfinished, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for r in &report.removed {
        println!("{verb} {:>10}  {}  {}", indicatif::HumanBytes(r.bytes).to_string(), r.what, r.path.display());
    }
    for (p, what) in &report.kept_unfinished {
        println!("kept {what}: interrupted, resumable ({}; --include-unfinished removes it)", p.display());
    }
    println!(
        "{verb} {} item(s), {}; {} artifact(s) kept",
        report.removed.len(),
        indicatif::HumanBytes(report.freed_bytes),
        report.kept_objects
    );
    Ok(0)
}

/// Render training stages' curves (several overlaid): from their current
/// records, or from the work folders of stages interrupted or still running.
pub fn plot(
    stages: &[String],
    files: &[PathBuf],
    set: &[Override],
    options: r1pipe::pipeline::kind::PlotOptions,
    out: Option<PathBuf>,
    open_it: bool,
    cache: Option<PathBuf>,
) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let workspaces: Vec<Workspace> =
        files.iter().map(|f| Workspace::open(f, set, cache.clone(), &registry)).collect::<Result<_>>()?;
    let index = workspace::plot(&workspaces, stages, out, options)?;
    println!("{}", index.display());
    if open_it {
        if let Err(e) = std::process::Command::new("xdg-open").arg(&index).status() {
            eprintln!("could not open it ({e}); open {} in a browser", index.display());
        }
    }
    Ok(0)
}

/// `gc --repair`: rebuild a damaged index from the record copies, holding the lock.
/// `verify [P.yaml]`: every stored artifact (of that pipeline) re-hashed; exit 1 when any is damaged.
/// `remote`: `Some(None)` for `--remote` alone (the pipeline's `remote:`), `Some(Some(URL))`.
pub fn verify(pipeline_file: Option<&Path>, cache: Option<PathBuf>, remote: Option<Option<String>>) -> Result<i32> {
    let registry = r1pipe::stages::registry();
    let (ws, root, name, current) = match pipeline_file {
        Some(file) => {
            let ws = Workspace::open(file, &[], cache, &registry)?;
            let (root, name, current) =
                (ws.cache.root.clone(), Some(ws.pipeline.name.clone()), Some(ws.current_fingerprints()?));
            (Some(ws), root, name, current)
        }
        None => (None, workspace::cache_root_here(cache), None, None),
    };
    let t = std::time::Instant::now();
    let (place, read_only, checked) = match remote {
        Some(url) => {
            let (remote_name, checked) = workspace::verify_remote(url.as_deref(), ws.as_ref(), current.as_ref())?;
            (format!("the remote {remote_name}"), false, checked)
        }
        None => {
            let read_only = r1pipe::pipeline::store::Cache::new(&root).is_read_only();
            (format!("the cache at {}", root.display()), read_only, workspace::verify(&root, current.as_ref())?)
        }
    };
    let damaged: Vec<_> = checked.iter().filter(|v| v.problem.is_some()).collect();
    if checked.is_empty() {
        // Not "0 damaged": nothing of it was there to check.
        match &name {
            Some(p) => println!("{place} holds no finished stage of the plan of pipeline `{p}`: nothing to verify"),
            None => println!("{place} holds no finished stage: nothing to verify"),
        }
        return Ok(0);
    }
    for v in &checked {
        match &v.problem {
            None => println!("ok       {}/{}.{}", v.pipeline, v.stage, v.output),
            Some(p) if v.dropped.is_empty() => println!("DAMAGED  {}/{}.{}: {p}", v.pipeline, v.stage, v.output),
            Some(p) => println!(
                "DAMAGED  {}/{}.{}: {p}; records dropped (these stages rerun): {}",
                v.pipeline,
                v.stage,
                v.output,
                v.dropped.join(", ")
            ),
        }
    }
    println!(
        "{} artifact(s) re-hashed in {:.1} s: {} damaged{}",
        checked.len(),
        t.elapsed().as_secs_f64(),
        damaged.len(),
        match (damaged.is_empty(), read_only) {
            (true, _) => "",
            (false, false) => "; they are removed with their records, and the next run remakes them",
            (false, true) => "; the cache is read-only, so they stay: remake them in a writable copy",
        }
    );
    Ok(if damaged.is_empty() { 0 } else { 1 })
}

pub fn repair(cache: Option<PathBuf>) -> Result<i32> {
    let root = workspace::cache_root_here(cache);
    let (restored, skipped) = workspace::repair(&root)?;
    println!(
        "rebuilt the index of {}: {restored} record(s) restored, {skipped} skipped (unreadable, or their artifacts missing; those stages rerun)",
        root.display()
    );
    Ok(0)
}
