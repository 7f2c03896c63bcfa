//! `r1pipe gc`: remove artifacts no record reaches and work folders that are
//! no longer needed.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use anyhow::Result;

use super::store::Cache;

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<PathBuf>,
    pub kept_objects: usize,
    pub kept_unfinished: Vec<PathBuf>,
    pub freed_bytes: u64,
}

/// `keep_records`: when `Some`, only these fingerprints stay recorded (the
/// current results of the pipelines named on the command line); the rest of
/// the records are dropped first. `include_unfinished`: also remove the work
/// folders of interrupted stages (they hold resumable checkpoints).
pub fn gc(
    cache: &Cache,
    keep_records: Option<&BTreeSet<String>>,
    include_unfinished: bool,
    dry_run: bool,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    let db = cache.db()?;
    let mut records = cache.all_records(&db)?;
    if let Some(keep) = keep_records {
        let (kept, dropped): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| keep.contains(&r.fingerprint));
        for r in dropped {
            if !dry_run {
                cache.remove_record(&db, &r.fingerprint)?;
            }
        }
        records = kept;
    }
    let referenced: BTreeSet<String> =
        records.iter().flat_map(|r| r.outputs.values().map(|o| o.hash.clone())).collect();
    let completed: BTreeSet<String> = records.iter().map(|r| r.fingerprint.clone()).collect();
    drop(db);

    if let Ok(rd) = fs::read_dir(cache.objects_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if referenced.contains(&name) {
                report.kept_objects += 1;
            } else {
                remove(&e.path(), dry_run, &mut report)?;
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cache.work_root()) {
        for e in rd.flatten() {
            let fp = e.file_name().to_string_lossy().to_string();
            let unfinished = !completed.contains(&fp);
            let current = keep_records.is_none_or(|k| k.contains(&fp));
            if unfinished && current && !include_unfinished {
                report.kept_unfinished.push(e.path());
            } else {
                remove(&e.path(), dry_run, &mut report)?;
            }
        }
    }
    Ok(report)
}

fn remove(p: &PathBuf, dry_run: bool, report: &mut GcReport) -> Result<()> {
    report.freed_bytes += size_of(p);
    if !dry_run {
        super::store::remove_path(p)?;
    }
    report.removed.push(p.clone());
    Ok(())
}

fn size_of(p: &PathBuf) -> u64 {
    if p.is_file() {
        return fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    }
    crate::common::fsutil::walk(p)
        .map(|v| v.iter().filter(|f| f.is_file()).filter_map(|f| fs::metadata(f).ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
