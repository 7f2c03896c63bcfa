//! Deciding and executing: for each stage in dependency order, compute its
//! fingerprint from what it depends on, skip it when a complete record exists,
//! otherwise say why it must run and run it (resuming from its checkpoints).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chrono::Utc;

use super::bind::bind_artifacts;
use super::dag::Dag;
use super::fingerprint::FingerprintInputs;
use super::kind::{Registry, RunEnv, StageContext};
use super::spec::{Pipeline, Stage};
use super::store::{remove_path, Cache, Check, ObjectRef, StageRecord};
use crate::common::checkpoints::Checkpoints;
use crate::common::{CancelToken, Cancelled};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub force: Vec<String>,
    pub force_all: bool,
    /// Run only these stages; their inputs must already be in the cache.
    pub only: Vec<String>,
    /// Run this stage and everything it needs.
    pub until: Option<String>,
    pub wait: bool,
    /// Stages that may run at the same time (their inputs ready); 1 runs one after another.
    pub jobs: usize,
    /// `--executor KIND`: where stages run, instead of the pipeline's `executor:` kind.
    pub executor: Option<String>,
    /// `--remote URL`: the remote cache, instead of the pipeline's `remote:`.
    pub remote: Option<String>,
    /// Do not push finished stages to the remote.
    pub no_push: bool,
    /// No progress bars and no per-step lines.
    pub quiet: bool,
}

/// The GPUs of this machine, handed to running stages one set at a time.
struct GpuPool {
    total: usize,
    free: Vec<usize>,
}

impl GpuPool {
    fn new(total: usize) -> GpuPool {
        GpuPool { total, free: (0..total).rev().collect() }
    }
    fn total(&self) -> usize {
        self.total
    }
    fn free(&self) -> usize {
        self.free.len()
    }
    /// `n` devices no running stage holds, lowest first; `None` if fewer are free.
    fn take(&mut self, n: usize) -> Option<Vec<usize>> {
        if n > self.free.len() {
            return None;
        }
        let mut ids: Vec<usize> = (0..n).filter_map(|_| self.free.pop()).collect();
        ids.sort_unstable();
        Some(ids)
    }
    fn give(&mut self, ids: Vec<usize>) {
        self.free.extend(ids);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// A stage between its start and its finish.
struct Started {
    ctx: StageContext,
    started_at: chrono::DateTime<Utc>,
    t0: Instant,
    work_dir: PathBuf,
    out_dir: PathBuf,
}

/// What the runner decided for one stage.
#[derive(Debug, Clone)]
pub enum Decision {
    Cached {
        record: Box<StageRecord>,
    },
    Run {
        fingerprint: String,
        inputs: Box<FingerprintInputs>,
        reasons: Vec<String>,
        resume_step: Option<u64>,
    },
    /// Its inputs are not known until these upstream stages run.
    Pending {
        upstream: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Interrupted,
    Failed,
}

pub struct Runner<'a> {
    pub pipeline: &'a Pipeline,
    pub registry: &'a Registry,
    pub cache: Cache,
    pub dag: &'a Dag,
    pub env: RunEnv,
}

impl<'a> Runner<'a> {
    pub fn new(pipeline: &'a Pipeline, dag: &'a Dag, registry: &'a Registry, cache_root: PathBuf) -> Result<Self> {
        let device_class = registry.devices().class(&pipeline.device)?;
        let env = RunEnv {
            device: pipeline.device.clone(),
            device_class,
            dtype: pipeline.dtype.clone(),
            seed: pipeline.seed,
        };
        Ok(Runner { pipeline, registry, cache: Cache::new(&cache_root), dag, env })
    }

    /// The inputs to a stage's fingerprint, or the upstream stages whose outputs are not yet known.
    pub fn fingerprint_inputs(
        &self,
        db: &sled::Db,
        stage: &Stage,
        available: &BTreeMap<String, ObjectRef>,
    ) -> Result<Result<FingerprintInputs, Vec<String>>> {
        let missing: BTreeSet<String> =
            stage.refs.iter().filter(|r| !available.contains_key(&r.key())).map(|r| r.stage.clone()).collect();
        if !missing.is_empty() {
            return Ok(Err(missing.into_iter().collect()));
        }
        let inputs = stage.refs.iter().map(|r| (r.key(), available[&r.key()].hash.clone())).collect();
        let mut files = BTreeMap::new();
        for (param, path) in &stage.requirements.local_paths {
            let h = self
                .cache
                .hash_path(db, path)
                .with_context(|| format!("hashing `{param}` of stage `{}`", stage.name))?;
            files.insert(param.clone(), h);
        }
        for (param, hash) in &stage.requirements.content {
            files.insert(param.clone(), hash.clone());
        }
        let mut env = BTreeMap::new();
        if stage.requirements.uses_device {
            env.insert("device_class".into(), self.env.device_class.clone());
            env.insert("dtype".into(), self.env.dtype.clone());
        }
        if stage.requirements.uses_seed {
            env.insert("seed".into(), self.env.seed.to_string());
        }
        Ok(Ok(FingerprintInputs {
            kind: stage.kind.name().to_string(),
            kind_version: stage.kind.version(),
            params: stage.kind.fingerprint_params(&stage.params),
            inputs,
            files,
            env,
        }))
    }

    /// Decide one stage given the artifacts known so far.
    pub fn decide(&self, stage: &Stage, available: &BTreeMap<String, ObjectRef>, forced: bool) -> Result<Decision> {
        let db = self.cache.db()?;
        let inputs = match self.fingerprint_inputs(&db, stage, available)? {
            Ok(i) => i,
            Err(upstream) => return Ok(Decision::Pending { upstream }),
        };
        let fingerprint = inputs.fingerprint();
        let record = self.cache.record(&db, &fingerprint)?;
        let had_record = record.is_some();
        let mut reasons = Vec::new();
        match record {
            Some(_) if forced => reasons.push("forced".into()),
            Some(rec) => {
                // Size and mtime against what was hashed; what changed is re-hashed.
                let damaged = self.cache.damaged_outputs(&db, &rec, Check::Cheap)?;
                if damaged.is_empty() {
                    return Ok(Decision::Cached { record: Box::new(rec) });
                }
                for (name, problem) in damaged {
                    reasons.push(format!("its cached output `{name}` is damaged: {problem}; remaking it"));
                }
            }
            None => {
                if forced {
                    reasons.push("forced".into());
                }
                match self.cache.nearest(&db, &self.pipeline.name, &stage.name, &inputs)? {
                    // Said against the closest cached variant, not the newest run of the stage.
                    Some(old) => reasons.extend(inputs.diff(&old.inputs)),
                    None if !forced => reasons.push("never run".into()),
                    None => {}
                }
            }
        }
        let resume_step = Checkpoints::new(&self.cache.work_dir(&fingerprint)).latest().map(|(s, _)| s);
        match (resume_step, had_record, forced) {
            (Some(step), false, false) => {
                // Not "never run": an earlier run of exactly this stage stopped at a checkpoint.
                reasons.retain(|r| r != "never run");
                reasons.insert(0, format!("interrupted earlier; its checkpoint at step {step} is resumed"));
            }
            (Some(step), _, true) => {
                // A forced run that was interrupted is continued by forcing again: say so, and how to start over.
                reasons.retain(|r| r != "forced");
                reasons.insert(
                    0,
                    format!(
                        "forced; continuing the forced run interrupted at step {step} (to start over, remove {})",
                        self.cache.work_dir(&fingerprint).display()
                    ),
                );
            }
            _ => {}
        }
        Ok(Decision::Run { fingerprint, inputs: Box::new(inputs), reasons, resume_step })
    }

    /// Every stage's decision against the cache, in order, without running
    /// anything: a stage downstream of one that would run is `Pending`.
    pub fn decide_all(&self) -> Result<Vec<(String, Decision)>> {
        let mut available = BTreeMap::new();
        let mut out = Vec::new();
        for name in self.dag.order(self.pipeline) {
            let stage = self.pipeline.stage(&name).expect("dag names are stages");
            let d = self.decide(stage, &available, false)?;
            if let Decision::Cached { record } = &d {
                for (o, r) in &record.outputs {
                    available.insert(format!("{name}.{o}"), r.clone());
                }
            }
            out.push((name, d));
        }
        Ok(out)
    }

    /// The stages this run covers, in order.
    /// `--force`, `--only` and `--until` naming a matrix stage mean all its members
    /// (as `-S` on it does).
    fn with_members(&self, opts: &RunOptions) -> RunOptions {
        let expand = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .flat_map(|n| {
                    let members: Vec<String> = self
                        .pipeline
                        .stages
                        .iter()
                        .filter(|s| s.name != *n && super::matrix::base_name(&s.name) == n)
                        .map(|s| s.name.clone())
                        .collect();
                    if self.pipeline.stage(n).is_none() && !members.is_empty() {
                        members
                    } else {
                        vec![n.clone()]
                    }
                })
                .collect()
        };
        let mut out = opts.clone();
        out.force = expand(&opts.force);
        out.only = expand(&opts.only);
        // `--until` a matrix stage: everything its members need, and the members.
        if let Some(u) = &opts.until {
            let members = expand(std::slice::from_ref(u));
            if members.len() > 1 || members[0] != *u {
                out.only = self.dag.with_ancestors(&members).into_iter().collect();
                out.until = None;
            }
        }
        out
    }

    pub fn selection(&self, opts: &RunOptions) -> Result<Vec<String>> {
        for name in opts.only.iter().chain(opts.force.iter()).chain(opts.until.iter()) {
            if self.pipeline.stage(name).is_none() {
                let names: Vec<&str> = self.pipeline.stages.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "no stage `{name}` in {}\n  hint: {}",
                    self.pipeline.file.display(),
                    crate::common::diagnostic::suggest(name, &names, "stages")
                );
            }
        }
        let order = self.dag.order(self.pipeline);
        let chosen: BTreeSet<String> = if !opts.only.is_empty() {
            opts.only.iter().cloned().collect()
        } else if let Some(u) = &opts.until {
            self.dag.with_ancestors(std::slice::from_ref(u))
        } else {
            order.iter().cloned().collect()
        };
        Ok(order.into_iter().filter(|n| chosen.contains(n)).collect())
    }

    /// Artifacts of the stages outside the selection that the selection reads
    /// (for --only): taken from their cached records at their current fingerprints.
    fn preload_outside(&self, selected: &[String], available: &mut BTreeMap<String, ObjectRef>) -> Result<()> {
        let sel: BTreeSet<&String> = selected.iter().collect();
        for name in self.dag.order(self.pipeline) {
            if sel.contains(&name) {
                continue;
            }
            let stage = self.pipeline.stage(&name).expect("dag names are stages");
            if let Decision::Cached { record } = self.decide(stage, available, false)? {
                for (o, r) in &record.outputs {
                    available.insert(format!("{name}.{o}"), r.clone());
                }
            }
        }
        Ok(())
    }

    /// Plan and (unless dry-run) execute. Prints one line per stage decision.
    pub fn run(&self, opts: &RunOptions, cancel: &CancelToken) -> Result<RunOutcome> {
        let opts = &self.with_members(opts);
        let selected = self.selection(opts)?;
        let _lock = if opts.dry_run { None } else { Some(self.cache.lock(opts.wait)?) };
        if !opts.dry_run {
            self.cache.create_dirs()?;
            for p in self.cache.sweep_temporaries()? {
                tracing::info!(path = %p.display(), "removed the leftover of an interrupted commit");
            }
        } else if !self.cache.exists() {
            // A dry run must not create the cache; plan against an empty temporary index.
            return self.dry_run_without_cache(&selected, opts);
        }
        let mut available = BTreeMap::new();
        if !opts.only.is_empty() {
            self.preload_outside(&selected, &mut available)?;
            for name in &selected {
                let stage = self.pipeline.stage(name).expect("selected names are stages");
                let outside: Vec<String> = stage.upstream().into_iter().filter(|u| !selected.contains(u)).collect();
                let missing: Vec<&String> = outside
                    .iter()
                    .filter(|u| stage.refs.iter().any(|r| &&r.stage == u && !available.contains_key(&r.key())))
                    .collect();
                if !missing.is_empty() {
                    bail!(
                        "--only {name}: its input from {} is not in the cache\n  hint: use --until {name} to run it with what it needs",
                        missing.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
        self.execute(&selected, opts, cancel, &mut available)
    }

    fn dry_run_without_cache(&self, selected: &[String], opts: &RunOptions) -> Result<RunOutcome> {
        let tmp = tempfile_dir()?;
        let runner = Runner {
            pipeline: self.pipeline,
            registry: self.registry,
            cache: Cache::new(&tmp),
            dag: self.dag,
            env: self.env.clone(),
        };
        let mut available = BTreeMap::new();
        let r = runner.execute(selected, opts, &CancelToken::default(), &mut available);
        let _ = fs::remove_dir_all(&tmp);
        r
    }

    fn execute(
        &self,
        selected: &[String],
        opts: &RunOptions,
        cancel: &CancelToken,
        available: &mut BTreeMap<String, ObjectRef>,
    ) -> Result<RunOutcome> {
        if opts.dry_run {
            return self.plan(selected, opts, available);
        }
        let total = selected.len();
        let executor_config = self.pipeline.executor.with_flag(opts.executor.as_deref())?;
        let executor = executor_config.executor();
        let jobs = if opts.jobs == 0 { executor.default_jobs() } else { opts.jobs };
        // Stages the remote has are pulled instead of run; finished ones are pushed.
        let remote = self.open_remote(opts.remote.as_deref())?;
        executor_config.check_run(remote.is_some())?;
        let progress = if opts.quiet {
            indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        } else {
            indicatif::MultiProgress::new()
        };
        let tag = |name: &str| {
            let i = selected.iter().position(|s| s == name).unwrap_or(0);
            format!("[{}/{}] {name}", i + 1, total)
        };
        // Stages not decided yet, in selection order; stages running, with what their finish needs.
        let mut waiting: Vec<&String> = selected.iter().collect();
        let mut running: BTreeMap<String, (String, Box<FingerprintInputs>)> = BTreeMap::new();
        // Stages run here that ask for GPUs (`resources.gpus`) get their own; counted only when one asks.
        let wants_gpus = executor.runs_here()
            && self.env.device_class == "cuda"
            && selected.iter().any(|n| self.pipeline.stage(n).is_some_and(|s| s.resources.gpus.unwrap_or(0) > 0));
        let mut gpus = GpuPool::new(if wants_gpus { self.registry.devices().gpu_count() } else { 0 });
        let mut held: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let (mut ran, mut failed, mut interrupted) = (0, false, false);
        std::thread::scope(|scope| -> Result<()> {
            let (done_tx, done_rx) = std::sync::mpsc::channel::<(String, Started, Result<()>)>();
            loop {
                // Start, in selection order, every stage whose upstream stages have finished,
                // while fewer than `jobs` run.
                let mut i = 0;
                while !failed && !interrupted && running.len() < jobs && i < waiting.len() {
                    let name = waiting[i];
                    let stage = self.pipeline.stage(name).expect("selected names are stages");
                    let blocked = stage.upstream().iter().any(|u| running.contains_key(u) || waiting.contains(&u));
                    let asks = if wants_gpus { stage.resources.gpus.unwrap_or(0) as usize } else { 0 };
                    if asks > gpus.total() {
                        anyhow::bail!(
                            "stage `{name}` asks for {asks} GPUs (resources.gpus), and this machine has {}",
                            gpus.total()
                        );
                    }
                    if blocked || asks > gpus.free() {
                        i += 1;
                        continue;
                    }
                    let forced = opts.force_all || opts.force.contains(name);
                    let decision = match self.decide(stage, available, forced) {
                        Ok(d) => d,
                        Err(e) => {
                            // This stage's failure: the running ones finish and are kept.
                            waiting.remove(i);
                            self.report_failure(&tag(name), name, &e);
                            failed = true;
                            break;
                        }
                    };
                    // A stage identical to one running now (the same fingerprint: the same work
                    // folder) waits for it, and then finds its result cached.
                    if let Decision::Run { fingerprint, .. } = &decision {
                        if running.values().any(|(fp, _)| fp == fingerprint) {
                            i += 1;
                            continue;
                        }
                    }
                    let mut pulled = false;
                    let decision = match (&remote, &decision) {
                        (Some(remote), Decision::Run { fingerprint, .. }) if !forced => {
                            match self.pull_stage(remote, fingerprint, &tag(name), opts.quiet) {
                                Ok(Some(record)) => {
                                    pulled = true;
                                    Decision::Cached { record: Box::new(record) }
                                }
                                Ok(None) => decision,
                                Err(e) => {
                                    waiting.remove(i);
                                    self.report_failure(&tag(name), name, &e);
                                    failed = true;
                                    break;
                                }
                            }
                        }
                        _ => decision,
                    };
                    waiting.remove(i);
                    if !pulled {
                        self.announce(&tag(name), name, &decision, false);
                    }
                    match decision {
                        Decision::Cached { record } => {
                            for (o, r) in &record.outputs {
                                available.insert(format!("{name}.{o}"), r.clone());
                            }
                        }
                        Decision::Pending { .. } => {}
                        Decision::Run { fingerprint, inputs, .. } => {
                            if cancel.is_cancelled() {
                                println!("{}: not started: interrupted", tag(name));
                                interrupted = true;
                                break;
                            }
                            ran += 1;
                            // A job a head that died left running is followed (wherever it runs),
                            // its outputs untouched.
                            let live = super::executor::live_job(&self.cache.work_dir(&fingerprint));
                            let started = match self.start_stage(
                                stage,
                                &fingerprint,
                                available,
                                &progress,
                                cancel,
                                live.is_some(),
                            ) {
                                Ok(mut s) => {
                                    s.ctx.quiet = opts.quiet;
                                    if asks > 0 {
                                        // Its own devices: no other running stage is given them.
                                        let ids = gpus.take(asks).expect("checked free above");
                                        s.ctx.env.device = format!("cuda:{}", ids[0]);
                                        println!("{}: on GPU {}", tag(name), ids[0]);
                                        held.insert(name.clone(), ids);
                                    }
                                    s
                                }
                                Err(e) => {
                                    self.report_failure(&tag(name), name, &e);
                                    failed = true;
                                    break;
                                }
                            };
                            let job_spec = super::executor::JobSpec {
                                params: stage.params.clone(),
                                bindings: stage
                                    .refs
                                    .iter()
                                    .map(|r| (r.key(), self.cache.object_path(&available[&r.key()])))
                                    .collect(),
                                inputs: (*inputs).clone(),
                            };
                            if let (true, Some(remote)) = (executor.needs_remote(), &remote) {
                                // The job's node sees only the remote: the inputs go there first.
                                let inputs: Vec<&ObjectRef> = stage.refs.iter().map(|r| &available[&r.key()]).collect();
                                if let Err(e) = self.push_inputs(remote, &inputs, &tag(name), opts.quiet) {
                                    self.report_failure(&tag(name), name, &e);
                                    failed = true;
                                    break;
                                }
                            }
                            running.insert(name.clone(), (fingerprint, inputs));
                            let done = done_tx.clone();
                            let (name, kind, resources) = (name.clone(), stage.kind.clone(), stage.resources.clone());
                            let (executor, job_tag) = (&executor, tag(&name));
                            let remote_spec = remote.as_ref().map(|r| r.spec().clone());
                            // The work runs beside the scheduler; what it writes to the cache
                            // (outputs, the record) waits for the scheduler. A training step
                            // recurses deeply through the graph: the thread gets a main thread's stack.
                            std::thread::Builder::new()
                                .name(format!("stage {name}"))
                                .stack_size(64 << 20)
                                .spawn_scoped(scope, move || {
                                    let mut started = started;
                                    let ctx = &mut started.ctx;
                                    // A panic (a bug) ends this stage as a failure the scheduler reports,
                                    // not the run with the other stages' work half done.
                                    let run = super::executor::StageRun {
                                        kind: kind.as_ref(),
                                        ctx,
                                        resources: &resources,
                                        tag: &job_tag,
                                        spec: job_spec,
                                        remote: remote_spec,
                                    };
                                    let result =
                                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match live {
                                            Some(live) => super::executor::follow_live(live, run),
                                            None => executor.run_stage(run),
                                        }))
                                        .unwrap_or_else(|_| {
                                            Err(anyhow::anyhow!(
                                                "the stage panicked (a bug in r1pipe); its checkpoints are kept"
                                            ))
                                        });
                                    let _ = done.send((name, started, result));
                                })
                                .context("starting a stage's thread")?;
                        }
                    }
                }
                if running.is_empty() {
                    return Ok(());
                }
                let (name, started, result) = done_rx.recv().expect("a running stage reports back");
                let (fingerprint, inputs) = running.remove(&name).expect("it was running");
                gpus.give(held.remove(&name).unwrap_or_default());
                let stage = self.pipeline.stage(&name).expect("selected names are stages");
                let tag = tag(&name);
                match self.finish_stage(stage, &fingerprint, &inputs, started, result) {
                    Ok(record) => {
                        tracing::info!(
                            target: "r1pipe::runlog",
                            stage = %name,
                            fingerprint = %record.fingerprint,
                            duration_s = record.duration_s,
                            metrics = %record.metrics.clone().unwrap_or_default(),
                            "stage finished"
                        );
                        println!("{tag}: done in {}  {}", human_duration(record.duration_s), &record.fingerprint[..12]);
                        if let (Some(remote), false) = (&remote, opts.no_push) {
                            // The result is safe in the local cache whatever happens to the push.
                            if let Err(e) = self.push_record(remote, &record, &tag, opts.quiet) {
                                eprintln!(
                                    "{tag}: not pushed: {}\n  hint: `r1pipe push` sends it later",
                                    crate::common::diagnostic::error_text(&e)
                                );
                            }
                        }
                        for (o, r) in &record.outputs {
                            available.insert(format!("{name}.{o}"), r.clone());
                        }
                    }
                    Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
                        let at = Checkpoints::new(&self.cache.work_dir(&fingerprint)).latest().map(|(s, _)| s);
                        match at {
                            Some(step) => {
                                println!("{tag}: interrupted; checkpoint at step {step}. Run again to resume.")
                            }
                            None => {
                                println!("{tag}: interrupted before its first checkpoint. Run again to restart it.")
                            }
                        }
                        tracing::warn!(target: "r1pipe::runlog", stage = %name, "stage interrupted");
                        interrupted = true;
                    }
                    Err(e) => {
                        self.report_failure(&tag, &name, &e);
                        failed = true;
                    }
                }
            }
        })?;
        if failed {
            return Ok(RunOutcome::Failed);
        }
        if interrupted {
            return Ok(RunOutcome::Interrupted);
        }
        if ran == 0 {
            println!("everything is up to date");
        }
        self.print_summaries(selected, available);
        Ok(RunOutcome::Completed)
    }

    /// A dry run: every decision, nothing executed.
    fn plan(
        &self,
        selected: &[String],
        opts: &RunOptions,
        available: &mut BTreeMap<String, ObjectRef>,
    ) -> Result<RunOutcome> {
        for (i, name) in selected.iter().enumerate() {
            let stage = self.pipeline.stage(name).expect("selected names are stages");
            let forced = opts.force_all || opts.force.contains(name);
            let decision = self.decide(stage, available, forced)?;
            self.announce(&format!("[{}/{}] {name}", i + 1, selected.len()), name, &decision, true);
            if let Decision::Cached { record } = &decision {
                for (o, r) in &record.outputs {
                    available.insert(format!("{name}.{o}"), r.clone());
                }
            }
        }
        println!("dry run: nothing was executed");
        Ok(RunOutcome::Completed)
    }

    /// The line (and run-log event) that says what will happen to a stage.
    fn announce(&self, tag: &str, name: &str, decision: &Decision, dry_run: bool) {
        match decision {
            Decision::Cached { record } => {
                println!("{tag}: skip (cached)  {}", &record.fingerprint[..12]);
                tracing::info!(target: "r1pipe::runlog", stage = %name, fingerprint = %record.fingerprint, decision = "skip", "stage decided");
            }
            Decision::Pending { upstream } => {
                let ups = upstream.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", ");
                if dry_run {
                    println!("{tag}: run after {ups} (if their outputs change)");
                } else {
                    println!("{tag}: not run: {ups} did not complete");
                }
            }
            Decision::Run { fingerprint, reasons, resume_step, .. } => {
                let verb = match resume_step {
                    Some(step) => format!("resume from step {step}"),
                    None => "run".to_string(),
                };
                println!("{tag}: {verb}  {}  ({})", &fingerprint[..12], reasons.join("; "));
                tracing::info!(target: "r1pipe::runlog", stage = %name, fingerprint = %fingerprint, decision = %verb, reasons = ?reasons, "stage decided");
            }
        }
    }

    fn report_failure(&self, tag: &str, name: &str, e: &anyhow::Error) {
        let text = crate::common::diagnostic::error_text(e);
        eprintln!("{tag}: failed: {text}");
        if out_of_space(e) {
            eprintln!(
                "  hint: no space left to write (the disk, or a file-size limit, is full): free some \
                 and run again; the last checkpoint and the cache are intact"
            );
        }
        tracing::error!(target: "r1pipe::runlog", stage = %name, error = %text, "stage failed");
    }

    /// What the pipeline's final stages (those no other stage reads) produced,
    /// as each kind summarizes it: the evaluation table, the answers, …
    fn print_summaries(&self, selected: &[String], available: &BTreeMap<String, ObjectRef>) {
        let read: BTreeSet<String> = self.pipeline.stages.iter().flat_map(|s| s.upstream()).collect();
        for name in selected.iter().filter(|n| !read.contains(*n)) {
            let stage = self.pipeline.stage(name).expect("selected names are stages");
            let outputs: BTreeMap<String, PathBuf> = stage
                .kind
                .outputs()
                .iter()
                .filter_map(|o| {
                    available
                        .get(&format!("{name}.{}", o.name))
                        .map(|r| (o.name.to_string(), self.cache.object_path(r)))
                })
                .collect();
            if outputs.is_empty() {
                continue;
            }
            if let Some(text) = stage.kind.summary(&outputs) {
                println!("\n── {name} ──\n{}", text.trim_end());
            }
        }
    }

    /// Every artifact `stage` reads, re-hashed in full: a damaged one is never
    /// used. It is discarded with the record of the stage that made it (so the
    /// next run remakes it) and this stage fails, naming both.
    fn verify_inputs(&self, stage: &Stage, available: &BTreeMap<String, ObjectRef>) -> Result<()> {
        let db = self.cache.db()?;
        for r in &stage.refs {
            let oref = &available[&r.key()];
            if let Some(problem) = self.cache.object_damage(&db, oref, Check::Full)? {
                self.cache.discard_object(&db, oref)?;
                bail!(
                    "`{}` reads `{}`, which is damaged: {problem}\n  hint: its record is dropped; run again and \
                     `{}` is remade before `{}` reads it",
                    stage.name,
                    r.key(),
                    r.stage,
                    stage.name
                );
            }
        }
        Ok(())
    }

    /// Everything before a stage's own work: its work folder, its inputs checked
    /// and bound, its context.
    fn start_stage(
        &self,
        stage: &Stage,
        fingerprint: &str,
        available: &BTreeMap<String, ObjectRef>,
        progress: &indicatif::MultiProgress,
        cancel: &CancelToken,
        job_still_running: bool,
    ) -> Result<Started> {
        let started_at = Utc::now();
        let t0 = Instant::now();
        let work_dir = self.cache.work_dir(fingerprint);
        let out_dir = work_dir.join("out");
        // Partial outputs of an earlier attempt are never trusted; checkpoints are
        // (a job still running writes its own, and is left to).
        if !job_still_running {
            remove_path(&out_dir).with_context(|| format!("clearing {}", out_dir.display()))?;
        }
        fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let stage_file = work_dir.join("stage.json");
        fs::write(
            &stage_file,
            serde_json::to_vec_pretty(&serde_json::json!({
                "pipeline": self.pipeline.name, "stage": stage.name, "fingerprint": fingerprint,
                "started_at": started_at,
            }))?,
        )
        .with_context(|| format!("writing {}", stage_file.display()))?;
        self.verify_inputs(stage, available)?;
        let paths: BTreeMap<String, PathBuf> =
            stage.refs.iter().map(|r| (r.key(), self.cache.object_path(&available[&r.key()]))).collect();
        let mut params = stage.params.clone();
        bind_artifacts(&mut params, &paths);
        let ctx = StageContext {
            pipeline: self.pipeline.name.clone(),
            tensorboard_dir: self.cache.tensorboard_dir(&self.pipeline.name, &stage.name),
            stage: stage.name.clone(),
            kind: stage.kind.name(),
            params,
            project: self.pipeline.project.clone(),
            work_dir: work_dir.clone(),
            out_dir: out_dir.clone(),
            env: self.env.clone(),
            progress: progress.clone(),
            quiet: false,
            cancel: cancel.clone(),
            outputs: stage.kind.outputs(),
            metrics: None,
        };
        Ok(Started { ctx, started_at, t0, work_dir, out_dir })
    }

    /// Everything after a stage's own work (`result`): its outputs moved into the
    /// cache and its record written. Only the scheduling thread calls this: it is
    /// the cache's one writer.
    fn finish_stage(
        &self,
        stage: &Stage,
        fingerprint: &str,
        inputs: &FingerprintInputs,
        started: Started,
        result: Result<()>,
    ) -> Result<StageRecord> {
        let Started { mut ctx, started_at, t0, work_dir, out_dir } = started;
        // The stage's memory is free now: give it back before the next stage (or the
        // commit) runs, whatever the stage's outcome.
        crate::common::memory::release_free_memory();
        tracing::info!(
            target: "r1pipe::runlog",
            stage = %stage.name,
            rss_mib = crate::common::memory::rss_bytes() >> 20,
            peak_rss_mib = crate::common::memory::peak_rss_bytes() >> 20,
            "memory after stage"
        );
        result?;

        let db = self.cache.db()?;
        let mut outputs = BTreeMap::new();
        let absent = stage.kind.absent_outputs(&stage.params);
        for spec in stage.kind.outputs().iter().filter(|o| !absent.iter().any(|(a, _)| *a == o.name)) {
            let p = out_dir.join(spec.file_name);
            if !p.exists() {
                bail!("stage `{}` finished without writing its output `{}` ({})", stage.name, spec.name, p.display());
            }
            if spec.is_dir != p.is_dir() {
                bail!(
                    "stage `{}`: output `{}` should be a {}",
                    stage.name,
                    spec.name,
                    if spec.is_dir { "folder" } else { "file" }
                );
            }
            outputs.insert(spec.name.to_string(), self.cache.commit_output(&db, &p, spec.file_name)?);
            crate::common::fault::point("between-outputs");
        }
        // The outputs are in objects/, the record not yet written: a kill here must leave
        // a cache the next run trusts (it reruns the stage and finds the objects there).
        crate::common::fault::point("before-record");
        let record = StageRecord {
            fingerprint: fingerprint.to_string(),
            pipeline: self.pipeline.name.clone(),
            stage: stage.name.clone(),
            inputs: inputs.clone(),
            outputs,
            metrics: ctx.metrics.take(),
            started_at,
            finished_at: Utc::now(),
            duration_s: t0.elapsed().as_secs_f64(),
        };
        self.cache.put_record(&db, &record)?;
        drop(db);
        // The record is durable; the work folder (checkpoints) has served its purpose.
        let _ = remove_path(&work_dir);
        Ok(record)
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("r1pipe-dry-run-{}", std::process::id()));
    fs::create_dir_all(&p)?;
    Ok(p)
}

/// Whether an error comes from a full disk (ENOSPC) or a file-size limit (EFBIG),
/// whichever library's error wraps the I/O error (some forward only its message).
fn out_of_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = c.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
        matches!(kind, Some(std::io::ErrorKind::StorageFull | std::io::ErrorKind::FileTooLarge)) || {
            let text = c.to_string();
            text.contains("(os error 28)") || text.contains("(os error 27)")
        }
    })
}

pub fn human_duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else if s < 7200.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_stages_never_share_a_gpu_and_a_finished_one_gives_its_back() {
        let mut pool = GpuPool::new(3);
        let a = pool.take(1).unwrap();
        let b = pool.take(2).unwrap();
        assert_eq!((a.clone(), b.clone()), (vec![0], vec![1, 2]));
        assert_eq!(pool.take(1), None, "a third stage waits");
        pool.give(a);
        assert_eq!(pool.take(1), Some(vec![0]));
        pool.give(b);
        assert_eq!(pool.free(), 2);
        assert_eq!(GpuPool::new(0).take(1), None);
    }
}
