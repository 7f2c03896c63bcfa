//! `r1pipe gc`: remove artifacts no kept record reaches and work folders that
//! are no longer needed, saying of each what it was (pipeline, stage, output)
//! and how large.
//!
//! One cache is shared by many pipelines, so what `gc P.yaml` keeps is, as
//! DVC's `gc --workspace` does for a repository's branches: P's current
//! results, and the newest result of every stage of every other pipeline
//! recorded in the cache (`--only-this-pipeline` drops those too).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::store::{ArtifactStore, Cache, LocalStore, StageRecord, StoredArtifact};

/// What to keep when pipelines are named on the command line.
#[derive(Debug, Default)]
pub struct Keep {
    /// The named pipelines' current fingerprints (their plans as they stand).
    pub current: BTreeSet<String>,
    /// The named pipelines.
    pub pipelines: BTreeSet<String>,
    /// Keep nothing of the pipelines not named (`--only-this-pipeline`).
    pub only_these: bool,
}

impl Keep {
    /// Whether a record survives `gc` under this rule; `newest`: it is the newest
    /// result of its pipeline's stage (kept for pipelines not named).
    pub fn keeps(&self, record: &StageRecord, newest: bool) -> bool {
        self.current.contains(&record.fingerprint)
            || (!self.only_these && newest && !self.pipelines.contains(&record.pipeline))
    }
}

/// One thing removed (or that a dry run would remove).
#[derive(Debug)]
pub struct Removed {
    pub path: PathBuf,
    /// What it is, for a person: `p/sft.model (an older run, …)`.
    pub what: String,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<Removed>,
    pub kept_objects: usize,
    pub kept_unfinished: Vec<(PathBuf, String)>,
    pub freed_bytes: u64,
}

/// What [`collect`] did to a store (or would do, in a dry run).
pub struct Collected {
    /// Every record the store held.
    pub all: Vec<StageRecord>,
    /// The records the rule kept.
    pub kept: Vec<StageRecord>,
    /// The records the rule dropped.
    pub dropped: Vec<StageRecord>,
    /// The artifacts no kept record reaches, each with what it was.
    pub removed: Vec<(StoredArtifact, String)>,
    /// The artifacts that stay.
    pub kept_artifacts: Vec<StoredArtifact>,
}

/// The keep rule on any store, local or remote: drop the records `keep` does
/// not keep (with no `keep`, every record stays), then remove the artifacts no
/// kept record reaches that were written at least `grace` ago (a push may be
/// writing one now, its record still to come). Records go first, so no record
/// is ever left naming a removed artifact.
pub fn collect(
    store: &dyn ArtifactStore,
    keep: Option<&Keep>,
    grace: chrono::TimeDelta,
    dry_run: bool,
) -> Result<Collected> {
    let all = store.records()?;
    let (kept, dropped): (Vec<_>, Vec<_>) = match keep {
        Some(keep) => {
            let newest = store.newest(&all)?;
            all.iter().cloned().partition(|r| keep.keeps(r, newest.contains(&r.fingerprint)))
        }
        None => (all.clone(), Vec::new()),
    };
    if !dry_run {
        for r in &dropped {
            store.delete_record(&r.fingerprint)?;
        }
    }
    let referenced: BTreeSet<&String> = kept.iter().flat_map(|r| r.outputs.values().map(|o| &o.hash)).collect();
    let owners = object_owners(&all);
    let now = chrono::Utc::now();
    let (mut removed, mut kept_artifacts) = (Vec::new(), Vec::new());
    for artifact in store.artifacts()? {
        if referenced.contains(&artifact.hash) || now - artifact.written < grace {
            kept_artifacts.push(artifact);
            continue;
        }
        let what = owners.get(&artifact.hash).map_or_else(
            || "an artifact no record refers to".to_string(),
            |o| o.iter().map(|(r, output)| describe(r, output)).collect::<Vec<_>>().join("; "),
        );
        if !dry_run {
            store.delete_artifact(&artifact)?;
        }
        removed.push((artifact, what));
    }
    Ok(Collected { all, kept, dropped, removed, kept_artifacts })
}

/// `keep`: when `Some`, the records it does not keep are dropped first (see
/// the module's rule). `include_unfinished`: also remove the work folders of
/// interrupted stages (they hold resumable checkpoints).
pub fn gc(cache: &Cache, keep: Option<&Keep>, include_unfinished: bool, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    let db = cache.db()?;
    // One writer holds the cache while gc runs: nothing is being written, no grace needed.
    let collected = collect(&LocalStore { cache, db: &db }, keep, chrono::TimeDelta::zero(), dry_run)?;
    drop(db);
    report.kept_objects = collected.kept_artifacts.len();
    for (artifact, what) in collected.removed {
        report.freed_bytes += artifact.bytes;
        report.removed.push(Removed { path: PathBuf::from(artifact.place), what, bytes: artifact.bytes });
    }
    let completed: BTreeSet<String> = collected.all.iter().map(|r| r.fingerprint.clone()).collect();
    let kept_fps: BTreeSet<&String> = collected.kept.iter().map(|r| &r.fingerprint).collect();

    if let Ok(rd) = fs::read_dir(cache.work_root()) {
        for e in rd.flatten() {
            let fp = e.file_name().to_string_lossy().to_string();
            let owner = work_owner(&e.path());
            let label = owner.as_ref().map_or_else(|| "a stage".to_string(), |(p, s)| format!("{p}/{s}"));
            if completed.contains(&fp) {
                // A finished stage's leftovers (its checkpoints), or those of a record dropped now.
                let why = if kept_fps.contains(&fp) { "checkpoints of a finished run" } else { "an older run" };
                remove(&e.path(), format!("{label}: {why}"), dry_run, &mut report)?;
                continue;
            }
            let wanted = match keep {
                None => true,
                Some(k) if k.current.contains(&fp) => true,
                // Another pipeline's interrupted stage is that pipeline's to resume.
                Some(k) => !k.only_these && owner.as_ref().is_none_or(|(p, _)| !k.pipelines.contains(p)),
            };
            if wanted && !include_unfinished {
                report.kept_unfinished.push((e.path(), label));
            } else {
                remove(&e.path(), format!("{label}: interrupted, with its checkpoints"), dry_run, &mut report)?;
            }
        }
    }
    Ok(report)
}

/// Object hash → the records (and output names) that point to it.
fn object_owners(records: &[StageRecord]) -> BTreeMap<String, Vec<(&StageRecord, String)>> {
    let mut out: BTreeMap<String, Vec<(&StageRecord, String)>> = BTreeMap::new();
    for r in records {
        for (output, o) in &r.outputs {
            out.entry(o.hash.clone()).or_default().push((r, output.clone()));
        }
    }
    out
}

pub fn describe(r: &StageRecord, output: &str) -> String {
    format!("{}/{}.{output} (a run finished {})", r.pipeline, r.stage, r.finished_at.format("%Y-%m-%d %H:%M"))
}

/// The pipeline and stage a work folder belongs to, from the `stage.json` the
/// runner writes when the stage starts.
fn work_owner(dir: &Path) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("stage.json")).ok()?).ok()?;
    Some((v.get("pipeline")?.as_str()?.to_string(), v.get("stage")?.as_str()?.to_string()))
}

fn remove(p: &Path, what: String, dry_run: bool, report: &mut GcReport) -> Result<()> {
    let bytes = super::store::size_of(p);
    report.freed_bytes += bytes;
    if !dry_run {
        super::store::remove_path(p)?;
    }
    report.removed.push(Removed { path: p.to_path_buf(), what, bytes });
    Ok(())
}
