//! The runner's façade (as DVC's `Repo`): a pipeline file opened against its
//! cache, and everything the command line asks of the two. The CLI goes
//! through here and names no stage kind, no output and no artifact file: what
//! a kind's artifacts mean to a person (its metrics, its curves) the kind says
//! through its hooks (`StageKind::metrics_view`, `StageKind::render`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::dag::Dag;
use super::gc::{self, GcReport, Keep};
use super::kind::{PlotOptions, PlotRun, Project, Registry};
use super::runner::{Decision, RunOptions, RunOutcome, Runner};
use super::spec::{self, Override, Pipeline};
use super::status::{self, StageStatus};
use super::store::remote::{Remote, RemoteSpec};
use super::store::{ArtifactStore, Cache, Check, LocalStore, StageRecord};
use crate::common::diagnostic::Diagnostics;
use crate::common::CancelToken;

/// The cache a command uses: the one it was given (`--cache`, `R1PIPE_CACHE`),
/// else `cache/` in the project root.
pub fn cache_root(explicit: Option<PathBuf>, project: &Project) -> PathBuf {
    explicit.unwrap_or_else(|| project.root.join("cache"))
}

/// The cache of a command that names no pipeline: the project around the current folder.
pub fn cache_root_here(explicit: Option<PathBuf>) -> PathBuf {
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    cache_root(explicit, &Project::of_dir(&here))
}

/// `gc --remote`: the remote `url` (else the first pipeline's `remote:`)
/// collected under `keep`'s rule; its name and what was (or would be) removed.
pub fn gc_remote(
    url: Option<&str>,
    first: Option<&Workspace>,
    keep: Option<&gc::Keep>,
    grace_minutes: u32,
    dry_run: bool,
) -> Result<(String, Vec<gc::Removed>)> {
    let remote = open_remote(url, first)?;
    let removed = remote.gc(keep, chrono::TimeDelta::minutes(i64::from(grace_minutes)), dry_run)?;
    Ok((remote.name.clone(), removed))
}

/// `--remote URL`, else the first pipeline's `remote:`.
fn open_remote(url: Option<&str>, first: Option<&Workspace>) -> Result<Remote> {
    let spec = match (url, first.and_then(|w| w.pipeline.remote.clone())) {
        (Some(u), _) => RemoteSpec { url: u.to_string(), endpoint: None },
        (None, Some(own)) => own,
        (None, None) => bail!("{}", no_remote()),
    };
    let root = first.map_or_else(|| std::env::current_dir().unwrap_or_default(), |w| w.pipeline.project.root.clone());
    Remote::open(&spec, &root)
}

fn no_remote() -> &'static str {
    "no remote: give `--remote URL` or write `remote: URL` in the pipeline file \
     (s3://BUCKET/PREFIX, https://HOST/PATH for WebDAV, file:///PATH)"
}

/// A pipeline, validated, against its cache.
pub struct Workspace<'r> {
    pub pipeline: Pipeline,
    pub dag: Dag,
    pub registry: &'r Registry,
    pub cache: Cache,
}

impl<'r> Workspace<'r> {
    /// Read and check the pipeline (every problem at once, with file and line),
    /// then its graph (cycles), against `cache` or the project's default.
    pub fn open(
        file: &Path,
        overrides: &[Override],
        cache: Option<PathBuf>,
        registry: &'r Registry,
    ) -> Result<Workspace<'r>> {
        let pipeline = spec::load(file, overrides, registry)?;
        let dag = Dag::build(&pipeline).map_err(|d| Diagnostics(vec![d]))?;
        let root = cache_root(cache, &pipeline.project);
        Ok(Workspace { pipeline, dag, registry, cache: Cache::new(&root) })
    }

    pub fn runner(&self) -> Result<Runner<'_>> {
        Runner::new(&self.pipeline, &self.dag, self.registry, self.cache.root.clone())
    }

    /// Plan and (unless a dry run) execute.
    pub fn run(&self, opts: &RunOptions, cancel: &CancelToken) -> Result<RunOutcome> {
        self.runner()?.run(opts, cancel)
    }

    /// A new file for this run's JSON log under the cache's `runs/`.
    pub fn new_run_log(&self) -> Result<PathBuf> {
        let dir = self.cache.runs_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!(
            "{}-{}-{}.jsonl",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            self.pipeline.name,
            std::process::id()
        )))
    }

    /// Each stage's state against the cache.
    pub fn status(&self) -> Result<Vec<StageStatus>> {
        status::status(&self.runner()?, None)
    }

    /// Each stage's state against the cache and the remote (`--remote URL`, or
    /// the pipeline's `remote:`): a stage the remote has is "in the remote".
    pub fn status_with_remote(&self, remote: Option<&str>) -> Result<Vec<StageStatus>> {
        let runner = self.runner()?;
        let remote = runner.open_remote(remote)?;
        status::status(&runner, remote.as_ref())
    }

    /// The stages a push or pull names (all when none: names, matrix stages, patterns).
    fn chosen(&self, stages: &[String]) -> Result<Vec<String>> {
        if stages.is_empty() {
            Ok(self.pipeline.stages.iter().map(|s| s.name.clone()).collect())
        } else {
            self.select(stages)
        }
    }

    /// `r1pipe push`: the stages' current results to the remote; those with none.
    pub fn push(&self, stages: &[String], remote: Option<&str>, quiet: bool) -> Result<Vec<String>> {
        let runner = self.runner()?;
        let remote = runner.open_remote(remote)?.with_context(no_remote)?;
        runner.push(&remote, &self.chosen(stages)?, quiet)
    }

    /// `r1pipe pull`: the stages' results from the remote; those it does not have.
    pub fn pull(&self, stages: &[String], remote: Option<&str>, quiet: bool) -> Result<Vec<String>> {
        let runner = self.runner()?;
        let remote = runner.open_remote(remote)?.with_context(no_remote)?;
        runner.pull(&remote, &self.chosen(stages)?, quiet)
    }

    fn stage_named(&self, stage: &str) -> Result<()> {
        if self.pipeline.stage(stage).is_none() {
            bail!("no stage `{stage}` in {}", self.pipeline.file.display());
        }
        Ok(())
    }

    /// Each up-to-date stage's record (stage → record): the pipeline's current results.
    pub fn current_records(&self) -> Result<BTreeMap<String, StageRecord>> {
        let mut out = BTreeMap::new();
        if self.cache.exists() {
            for (name, d) in self.runner()?.decide_all()? {
                if let Decision::Cached { record } = d {
                    out.insert(name, *record);
                }
            }
        }
        Ok(out)
    }

    /// The fingerprints this pipeline's current results and runs would use (what `gc` keeps).
    pub fn current_fingerprints(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        if self.cache.exists() {
            for (_, d) in self.runner()?.decide_all()? {
                match d {
                    Decision::Cached { record } => out.insert(record.fingerprint),
                    Decision::Run { fingerprint, .. } => out.insert(fingerprint),
                    Decision::Pending { .. } => false,
                };
            }
        }
        Ok(out)
    }

    /// The path of the current result `stage.output`.
    pub fn artifact(&self, stage: &str, output: &str) -> Result<PathBuf> {
        self.stage_named(stage)?;
        let Some(rec) = self.current_records()?.remove(stage) else {
            bail!("stage `{stage}` is not up to date; run `r1pipe run {}` first", self.pipeline.file.display());
        };
        record_artifact(&self.cache, &rec, output)
    }

    /// The stages `patterns` name, in the pipeline's order: a stage by its
    /// name, a matrix stage by its base name (all its members, as `run`
    /// takes it), or a pattern with `*` (`grpo@*`, `*@lr-1e-4`).
    pub fn select(&self, patterns: &[String]) -> Result<Vec<String>> {
        let names: Vec<&str> = self.pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        let mut chosen = BTreeSet::new();
        for pattern in patterns {
            let hits: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| {
                    *n == pattern
                        || (self.pipeline.stage(pattern).is_none() && super::matrix::base_name(n) == pattern)
                        || (pattern.contains('*') && wildcard(pattern, n))
                })
                .collect();
            if hits.is_empty() {
                bail!(
                    "no stage `{pattern}` in {}\n  hint: {}",
                    self.pipeline.file.display(),
                    crate::common::diagnostic::suggest(pattern, &names, "stages")
                );
            }
            chosen.extend(hits);
        }
        Ok(names.into_iter().filter(|n| chosen.contains(n)).map(str::to_string).collect())
    }

    /// The runs `r1pipe plot` draws of the stages `patterns` select: each one's
    /// finished record, or the work folder of one interrupted or running.
    /// `label_pipeline`: legends name the pipeline too (runs of several).
    pub fn plot_runs(&self, patterns: &[String], label_pipeline: bool) -> Result<Vec<(&'static str, PlotRun)>> {
        let selected = self.select(patterns)?;
        let with_curves: Vec<&str> =
            self.pipeline.stages.iter().filter(|s| s.kind.draws_curves()).map(|s| s.name.as_str()).collect();
        let decisions: BTreeMap<String, Decision> = self.runner()?.decide_all()?.into_iter().collect();
        let mut runs = Vec::new();
        for name in &selected {
            let stage = self.pipeline.stage(name).expect("selected names are stages");
            if !stage.kind.draws_curves() {
                if patterns.iter().any(|p| p == name) {
                    bail!(
                        "stage `{name}` ({}) has no curves to plot; stages with curves: {}",
                        stage.kind.name(),
                        if with_curves.is_empty() {
                            "none in this pipeline".to_string()
                        } else {
                            with_curves.join(", ")
                        }
                    );
                }
                continue;
            }
            let (artifacts, work_dir) = match decisions.get(name) {
                Some(Decision::Cached { record }) => {
                    (record.outputs.iter().map(|(k, o)| (k.clone(), self.cache.object_path(o))).collect(), None)
                }
                Some(Decision::Run { fingerprint, .. }) => (BTreeMap::new(), Some(self.cache.work_dir(fingerprint))),
                _ => bail!("stage `{name}` cannot have run yet: its inputs are not up to date"),
            };
            let label = if label_pipeline { format!("{}/{name}", self.pipeline.name) } else { name.clone() };
            runs.push((stage.kind.name(), PlotRun { label, artifacts, work_dir, params: stage.params.clone() }));
        }
        if runs.is_empty() {
            bail!(
                "none of {} has curves to plot; stages with curves: {}",
                patterns.join(", "),
                if with_curves.is_empty() { "none in this pipeline".to_string() } else { with_curves.join(", ") }
            );
        }
        Ok(runs)
    }

    /// What `metrics diff` compares of a record: the kind's metrics view, or with
    /// `all` its raw metrics where the kind has no view. `None`: nothing to compare.
    pub fn metrics_of(&self, rec: &StageRecord, all: bool) -> Option<Value> {
        let metrics = rec.metrics.as_ref()?;
        let view = self.registry.get(&rec.inputs.kind).and_then(|k| k.metrics_view(metrics));
        match view {
            Some(v) => Some(v),
            None if all => Some(metrics.clone()),
            None => None,
        }
    }

    /// For each stage that is up to date, the newest earlier record of it in this
    /// cache (a different fingerprint that finished before): `metrics diff`'s baseline.
    pub fn previous_records(&self) -> Result<BTreeMap<String, StageRecord>> {
        let now = self.current_records()?;
        let db = self.cache.db()?;
        let mut prev: BTreeMap<String, StageRecord> = BTreeMap::new();
        for rec in self.cache.all_records(&db)? {
            let Some(cur) = now.get(&rec.stage) else { continue };
            if rec.pipeline != self.pipeline.name
                || rec.fingerprint == cur.fingerprint
                || rec.finished_at > cur.finished_at
            {
                continue;
            }
            if prev.get(&rec.stage).is_none_or(|p| rec.finished_at > p.finished_at) {
                prev.insert(rec.stage.clone(), rec);
            }
        }
        Ok(prev)
    }
}

/// Render the curves of the stages `patterns` select in each of
/// `workspaces` (several runs are overlaid) into `out` (default: the first
/// cache's `plots/<stages>`) through their kind's render hook. Returns the
/// page to open.
pub fn plot(
    workspaces: &[Workspace],
    patterns: &[String],
    out: Option<PathBuf>,
    options: PlotOptions,
) -> Result<PathBuf> {
    let Some(first) = workspaces.first() else { bail!("no pipeline to plot") };
    let several = workspaces.len() > 1;
    let mut runs = Vec::new();
    for ws in workspaces {
        runs.extend(ws.plot_runs(patterns, several)?);
    }
    let out = match out {
        Some(o) => o,
        // A read-only cache has no room for plots: say where else, before drawing anything.
        None if first.cache.is_read_only() => bail!(
            "the cache {} is read-only, so the plots cannot go to its plots/ folder\n  hint: pass --out DIR",
            first.cache.root.display()
        ),
        None => {
            let name: String = patterns.join("+").chars().map(|c| if c == '*' || c == '/' { '_' } else { c }).collect();
            first.cache.root.join("plots").join(name)
        }
    };
    let labels: Vec<&str> = runs.iter().map(|(_, r)| r.label.as_str()).collect();
    let title = if several || runs.len() > 1 {
        labels.join(", ")
    } else {
        format!("{} / {}", first.pipeline.name, labels.join(", "))
    };
    let kind = first.registry.get(runs[0].0).with_context(|| format!("no stage kind `{}`", runs[0].0))?;
    let runs: Vec<PlotRun> = runs.into_iter().map(|(_, r)| r).collect();
    kind.render(&runs, &out, &title, options)
}

/// `*` matches any run of characters; everything else itself.
fn wildcard(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else { return false };
            (0..=rest.len()).filter(|i| rest.is_char_boundary(*i)).any(|i| wildcard(tail, &rest[i..]))
        }
    }
}

/// The path of a recorded output, checked to be whole (size and mtime of its files).
fn record_artifact(cache: &Cache, rec: &StageRecord, output: &str) -> Result<PathBuf> {
    let Some(obj) = rec.outputs.get(output) else {
        let outs: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
        bail!("stage `{}` has no output `{output}` (outputs: {})", rec.stage, outs.join(", "));
    };
    let db = cache.db()?;
    if let Some(problem) = cache.object_damage(&db, obj, Check::Cheap)? {
        bail!("`{}.{output}` is damaged: {problem}\n  hint: run the pipeline again: the stage is remade", rec.stage);
    }
    Ok(cache.object_path(obj))
}

/// `stage.output` of the newest record of `stage` in the cache at `root`, when
/// no pipeline is named (one pipeline's stage of that name, or an error naming them).
pub fn latest_artifact(root: &Path, stage: &str, output: &str) -> Result<PathBuf> {
    let cache = Cache::new(root);
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
    let rec = cache.record(&db, &fp)?.with_context(|| format!("the record of {pipeline}/{stage} is missing"))?;
    drop(db);
    record_artifact(&cache, &rec, output)
}

/// `gc`: remove what no kept record reaches (see [`gc::gc`] for what is kept).
pub fn gc(root: &Path, keep: Option<&Keep>, include_unfinished: bool, dry_run: bool) -> Result<GcReport> {
    let cache = Cache::new(root);
    if !cache.exists() {
        bail!("no cache at {}", root.display());
    }
    let _lock = if dry_run { None } else { Some(cache.lock(false)?) };
    gc::gc(&cache, keep, include_unfinished, dry_run)
}

/// One stored artifact `verify` re-hashed.
pub struct Verified {
    pub pipeline: String,
    pub stage: String,
    pub output: String,
    pub path: PathBuf,
    /// What is wrong with it (`None`: it hashes to its name).
    pub problem: Option<String>,
    /// The records dropped because they point to it (`pipeline/stage`, of
    /// any pipeline): those stages rerun.
    pub dropped: Vec<String>,
}

/// `verify`: re-read every artifact the records point to (only those of the
/// `current` fingerprints when given: a pipeline's plan, whoever recorded
/// each) and check it against its content hash. A damaged artifact is removed
/// with every record pointing to it, so the next run remakes it rather than
/// using what is there.
pub fn verify(root: &Path, current: Option<&BTreeSet<String>>) -> Result<Vec<Verified>> {
    let cache = Cache::new(root);
    if !cache.exists() {
        // An index deleted beside its record copies: say how to restore it.
        cache.db()?;
        bail!("no cache at {} (pass --cache DIR or run a pipeline first)", root.display());
    }
    // A read-only cache is checked all the same; what is damaged is named but stays.
    let writable = !cache.is_read_only();
    let _lock = if writable { Some(cache.lock(false)?) } else { None };
    let db = cache.db()?;
    verify_store(&LocalStore { cache: &cache, db: &db }, current, writable)
}

/// `verify --remote`: the same check on the remote cache (every file read back
/// and hashed); a damaged artifact goes from the remote with its records, so
/// the next run remakes it and pushes it whole.
pub fn verify_remote(
    url: Option<&str>,
    first: Option<&Workspace>,
    current: Option<&BTreeSet<String>>,
) -> Result<(String, Vec<Verified>)> {
    let remote = open_remote(url, first)?;
    Ok((remote.name.clone(), verify_store(&remote, current, true)?))
}

/// Every artifact `store`'s records point to (of the `current` fingerprints
/// when given), checked against its hash; `discard`: a damaged one goes with
/// the records naming it.
fn verify_store(store: &dyn ArtifactStore, current: Option<&BTreeSet<String>>, discard: bool) -> Result<Vec<Verified>> {
    let mut out = Vec::new();
    let mut records = store.records()?;
    records.retain(|r| current.is_none_or(|c| c.contains(&r.fingerprint)));
    records.sort_by(|a, b| (&a.pipeline, &a.stage, a.finished_at).cmp(&(&b.pipeline, &b.stage, b.finished_at)));
    for rec in records {
        for (output, oref) in &rec.outputs {
            // An artifact shared with a record verified before (and found damaged) is gone by now.
            let (problem, dropped) = match store.damage(oref)? {
                Some(p) if discard => (Some(p), store.discard(oref)?),
                Some(p) => (Some(p), Vec::new()),
                None => (None, Vec::new()),
            };
            out.push(Verified {
                pipeline: rec.pipeline.clone(),
                stage: rec.stage.clone(),
                output: output.clone(),
                path: PathBuf::from(store.place(oref)),
                problem,
                dropped,
            });
        }
    }
    Ok(out)
}

/// `gc --repair`: rebuild a damaged index from the record copies, holding the
/// lock. Returns (records restored, records skipped for missing artifacts).
pub fn repair(root: &Path) -> Result<(usize, usize)> {
    let cache = Cache::new(root);
    let _lock = cache.lock(false)?;
    cache.repair()
}
