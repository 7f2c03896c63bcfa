//! The remote as the only thing a cluster's job shares with its head (an
//! executor with `shared_filesystem: false`). Under `jobs/<fingerprint>/`:
//!
//! - `job.json`: the job file the head wrote (the same as in a shared work folder);
//! - `exit.json`: how the job ended, with the artifacts it pushed when it ended ok;
//! - `work.json`: the manifest of the job's work folder (its checkpoints) as it
//!   was when the job last stopped early, its files under `files/` like any
//!   artifact's, so that the next job resumes from it on whichever node.
//!
//! The job's outputs are ordinary artifacts (`objects/`, `files/`); the head
//! fetches them, commits them as the stage's outputs and writes the record, as
//! it does for a job on a shared filesystem.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{Manifest, ManifestFile, Remote, Transfer};
use crate::common::fsutil;
use crate::pipeline::store::Cache;

/// The work folder's manifest names this artifact (it is no artifact of the cache).
const WORK_NAME: &str = "work";

impl Remote {
    fn job_key(fingerprint: &str, name: &str) -> Result<String> {
        if !crate::pipeline::store::is_content_hash(fingerprint) {
            bail!("`{fingerprint}` is not a stage fingerprint");
        }
        Ok(format!("jobs/{fingerprint}/{name}"))
    }

    /// Write one of a job's small files (`job.json`, `exit.json`).
    pub fn put_job_file(&self, fingerprint: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.put(&Self::job_key(fingerprint, name)?, bytes)
    }

    /// One of a job's small files, or `None` when the remote has none.
    pub fn job_file(&self, fingerprint: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.get_small(&Self::job_key(fingerprint, name)?)
    }

    /// Remove one of a job's files; one that is not there is no error.
    pub fn remove_job_file(&self, fingerprint: &str, name: &str) -> Result<()> {
        let key = Self::job_key(fingerprint, name)?;
        match self.rt.block_on(self.store.delete(&self.key(&key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failure("deleting", &key, e)),
        }
    }

    /// Everything the remote keeps of a job (once its outputs are the stage's):
    /// the job's files; its checkpoint's files go with `gc --remote`.
    pub fn clear_job(&self, fingerprint: &str) -> Result<()> {
        for name in ["exit.json", "work.json", "job.json"] {
            self.remove_job_file(fingerprint, name)?;
        }
        Ok(())
    }

    /// Send a job's work folder (its checkpoints), the files `keep` accepts
    /// (paths relative to `dir`): files first, then the manifest, so that a job
    /// reading the manifest finds every file. Returns how many files it names.
    pub fn push_work(
        &self,
        fingerprint: &str,
        dir: &Path,
        keep: &dyn Fn(&str) -> bool,
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<usize> {
        let mut files = Vec::new();
        for p in fsutil::walk(dir)? {
            if !p.is_file() {
                continue;
            }
            let rel = p.strip_prefix(dir).expect("walk stays under its root").to_string_lossy().to_string();
            if keep(&rel) {
                let bytes_hash = fsutil::hash_file(&p)?;
                files.push(ManifestFile { path: rel, hash: bytes_hash, size: p.metadata()?.len() });
            }
        }
        bar.inc_length(files.iter().map(|f| f.size).sum());
        self.push_files(dir, &files, bar, moved)?;
        let n = files.len();
        let manifest = Manifest { file_name: WORK_NAME.into(), kind: "dir".into(), files };
        self.put(&Self::job_key(fingerprint, "work.json")?, serde_json::to_vec_pretty(&manifest)?)?;
        Ok(n)
    }

    /// Write the work folder a job last pushed into `dest` (each file checked
    /// against its hash); `false` when the remote has none.
    pub fn pull_work(
        &self,
        cache: &Cache,
        fingerprint: &str,
        dest: &Path,
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<bool> {
        let key = Self::job_key(fingerprint, "work.json")?;
        let Some(bytes) = self.get_small(&key)? else { return Ok(false) };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("remote {}: {key} is not a work folder's manifest", self.name))?;
        manifest.check_files().map_err(|e| anyhow::anyhow!("remote {}: {key}: {e:#}", self.name))?;
        if manifest.file_name != WORK_NAME || manifest.kind != "dir" {
            bail!("remote {}: {key} is not a work folder's manifest", self.name);
        }
        bar.inc_length(manifest.files.iter().map(|f| f.size).sum());
        let pulls = Self::pulls_dir(cache)?;
        self.materialize(&manifest, &pulls, dest, moved, bar)?;
        Self::forget_pulled(&pulls, &manifest.files);
        Ok(true)
    }
}
