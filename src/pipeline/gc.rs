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

use super::store::{Cache, StageRecord};

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

/// `keep`: when `Some`, the records it does not keep are dropped first (see
/// the module's rule). `include_unfinished`: also remove the work folders of
/// interrupted stages (they hold resumable checkpoints).
pub fn gc(cache: &Cache, keep: Option<&Keep>, include_unfinished: bool, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    let db = cache.db()?;
    let all = cache.all_records(&db)?;
    let mut records = all.clone();
    if let Some(keep) = keep {
        let newest: BTreeSet<String> = cache.latest_pointers(&db)?.into_iter().map(|(_, _, fp)| fp).collect();
        let (kept, dropped): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|r| keep.keeps(r, newest.contains(&r.fingerprint)));
        for r in dropped {
            if !dry_run {
                cache.remove_record(&db, &r.fingerprint)?;
            }
        }
        records = kept;
    }
    let referenced: BTreeSet<String> =
        records.iter().flat_map(|r| r.outputs.values().map(|o| o.hash.clone())).collect();
    let completed: BTreeSet<String> = all.iter().map(|r| r.fingerprint.clone()).collect();
    let kept_fps: BTreeSet<&String> = records.iter().map(|r| &r.fingerprint).collect();
    let owners = object_owners(&all);
    drop(db);

    if let Ok(rd) = fs::read_dir(cache.objects_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if referenced.contains(&name) {
                report.kept_objects += 1;
            } else {
                let what = owners.get(&name).map_or_else(
                    || "an artifact no record refers to".to_string(),
                    |o| o.iter().map(|(r, output)| describe(r, output)).collect::<Vec<_>>().join("; "),
                );
                remove(&e.path(), what, dry_run, &mut report)?;
            }
        }
    }
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
    let bytes = size_of(p);
    report.freed_bytes += bytes;
    if !dry_run {
        super::store::remove_path(p)?;
    }
    report.removed.push(Removed { path: p.to_path_buf(), what, bytes });
    Ok(())
}

fn size_of(p: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(p) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    crate::common::fsutil::walk(p)
        .map(|v| v.iter().filter_map(|f| fs::symlink_metadata(f).ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
