//! Where finished results live: the local cache (`local.rs`: a folder and its
//! sled index, one per machine or shared filesystem) and a remote cache
//! (`remote/`: object storage shared by machines and people). Both hold the
//! same two things, records (which fingerprint made which artifacts) and
//! content-addressed artifacts, named by the one set of hashing rules in
//! `hashing.rs`; [`ArtifactStore`] is what `gc` and `verify` ask of either,
//! so the keep rule and the check are written once. Moving results between them (push, pull, a job's
//! inputs and outputs) is the remote's side (`remote/`), each byte checked.

mod files;
mod hashing;
mod local;
pub mod remote;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use chrono::{DateTime, Utc};

pub use files::{remove_path, size_of};
pub(crate) use hashing::{folder_hash, is_content_hash, object_hash};
pub use local::{Cache, CacheLock, Check, LocalStore, ObjectRef, StageRecord};

/// An artifact a store holds, as its listing gives it.
#[derive(Debug, Clone)]
pub struct StoredArtifact {
    pub hash: String,
    /// Where it is, for a person: a folder, or a key under the remote's prefix.
    pub place: String,
    pub bytes: u64,
    /// When it was written (a remote's upload time; a folder's mtime).
    pub written: DateTime<Utc>,
}

/// What `gc` asks of a store of records and artifacts, whichever it is.
pub trait ArtifactStore {
    /// How messages name it: the cache's folder, the remote's URL without credentials.
    fn name(&self) -> String;
    /// Every record it holds that reads as one (others are left alone, with a warning).
    fn records(&self) -> Result<Vec<StageRecord>>;
    fn delete_record(&self, fingerprint: &str) -> Result<()>;
    /// The fingerprints of the newest result of each pipeline's stage.
    fn newest(&self, records: &[StageRecord]) -> Result<BTreeSet<String>> {
        Ok(newest_by_finish(records))
    }
    /// Every artifact it holds.
    fn artifacts(&self) -> Result<Vec<StoredArtifact>>;
    fn delete_artifact(&self, artifact: &StoredArtifact) -> Result<()>;
    /// Where an artifact is, for a person.
    fn place(&self, oref: &ObjectRef) -> String;
    /// What is wrong with a stored artifact (missing, or bytes that no longer
    /// hash to its name), every byte read; `None` when it is whole.
    fn damage(&self, oref: &ObjectRef) -> Result<Option<String>>;
    /// Remove a damaged artifact and every record naming it, so that the stages
    /// that made it run (or are pushed) again; the records dropped, as `pipeline/stage`.
    fn discard(&self, oref: &ObjectRef) -> Result<Vec<String>>;
}

/// The newest record of each (pipeline, stage), by when it finished.
pub fn newest_by_finish(records: &[StageRecord]) -> BTreeSet<String> {
    let mut newest: BTreeMap<(&str, &str), &StageRecord> = BTreeMap::new();
    for r in records {
        let at = newest.entry((r.pipeline.as_str(), r.stage.as_str())).or_insert(r);
        if r.finished_at > at.finished_at {
            *at = r;
        }
    }
    newest.values().map(|r| r.fingerprint.clone()).collect()
}
