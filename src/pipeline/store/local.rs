//! The local store, the cache on disk:
//!
//! ```text
//! cache/LOCK                       one writer at a time (holder's pid inside)
//! cache/index/                     sled: fingerprint → completed record, file-hash memo
//! cache/objects/<hash>/<name>      immutable, content-addressed artifacts
//! cache/work/<fingerprint>/        an unfinished stage: checkpoints/, out/
//! cache/runs/<time>-<pipeline>.log machine-readable log of each run
//! cache/tensorboard/<pipeline>/<stage>/  `report_to: tensorboard` (not artifacts)
//! ```
//!
//! Outputs are moved into `objects/` by rename and the record is written last,
//! so a record never points at something incomplete.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::files::{make_read_only, make_writable_file, remove_path};
use super::hashing::{content_hash, hash_file_memo, hash_path_uncached, object_hash, remember_at, remembered_files};
use crate::common::fsutil::{sync_path, walk};
use crate::pipeline::fingerprint::FingerprintInputs;

/// An artifact in `objects/<hash>/<file_name>`. Records are files a user can
/// edit, so a reference is checked when read: a content hash (64 lowercase hex
/// digits) and a plain file name, never a path that leaves the object folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawObjectRef")]
pub struct ObjectRef {
    pub hash: String,
    pub file_name: String,
}

#[derive(Deserialize)]
struct RawObjectRef {
    hash: String,
    file_name: String,
}

impl TryFrom<RawObjectRef> for ObjectRef {
    type Error = String;
    fn try_from(r: RawObjectRef) -> std::result::Result<Self, String> {
        if !super::is_content_hash(&r.hash) {
            return Err(format!(
                "`hash` {:?} is not a content hash (64 hex digits)",
                r.hash.chars().take(80).collect::<String>()
            ));
        }
        let plain = Path::new(&r.file_name).components().count() == 1
            && matches!(Path::new(&r.file_name).components().next(), Some(std::path::Component::Normal(_)));
        if !plain {
            return Err(format!(
                "`file_name` {:?} is not a plain file name",
                r.file_name.chars().take(80).collect::<String>()
            ));
        }
        Ok(ObjectRef { hash: r.hash, file_name: r.file_name })
    }
}

impl ObjectRef {
    /// The artifact a path into a cache names (`<cache>/objects/<hash>/<file name>`,
    /// as a job file binds its inputs).
    pub fn of_stored_path(path: &Path) -> Result<ObjectRef> {
        let name = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().to_string());
        match (name(Some(path)), name(path.parent())) {
            (Some(file_name), Some(hash)) if super::is_content_hash(&hash) => Ok(ObjectRef { hash, file_name }),
            _ => bail!("{} is not an artifact of a cache (no content hash in its path)", path.display()),
        }
    }
}

/// What a completed stage left: written only after its outputs are in `objects/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub fingerprint: String,
    pub pipeline: String,
    pub stage: String,
    pub inputs: FingerprintInputs,
    pub outputs: BTreeMap<String, ObjectRef>,
    pub metrics: Option<Value>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_s: f64,
}

pub struct Cache {
    pub root: PathBuf,
}

const RECORDS: &str = "records";
const LATEST: &str = "latest";
const FILE_HASHES: &str = "file_hashes";

impl Cache {
    pub fn new(root: &Path) -> Cache {
        Cache { root: root.to_path_buf() }
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }
    pub fn work_root(&self) -> PathBuf {
        self.root.join("work")
    }
    pub fn work_dir(&self, fingerprint: &str) -> PathBuf {
        self.work_root().join(fingerprint)
    }
    /// TensorBoard's files of a stage (`report_to: tensorboard`): not artifacts, never hashed.
    /// Names become single path components whatever they hold (a job file
    /// may be edited): never a separator, never `.` or `..`.
    pub fn tensorboard_dir(&self, pipeline: &str, stage: &str) -> PathBuf {
        let component = |name: &str| -> String {
            let plain: String = name.chars().map(|c| if matches!(c, '/' | '\\' | '\0') { '_' } else { c }).collect();
            if plain.is_empty() || plain.chars().all(|c| c == '.') {
                "_".into()
            } else {
                plain
            }
        };
        self.root.join("tensorboard").join(component(pipeline)).join(component(stage))
    }
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }
    pub fn exists(&self) -> bool {
        self.root.join("index").exists()
    }

    pub fn object_path(&self, o: &ObjectRef) -> PathBuf {
        self.objects_dir().join(&o.hash).join(&o.file_name)
    }

    pub fn create_dirs(&self) -> Result<()> {
        for d in [self.objects_dir(), self.work_root(), self.runs_dir()] {
            fs::create_dir_all(&d).with_context(|| format!("creating cache folder {}", d.display()))?;
        }
        Ok(())
    }

    /// The index, opened for one short piece of work. sled locks its database,
    /// so it is never held across a stage's run: `status` can read in between.
    pub fn db(&self) -> Result<sled::Db> {
        let path = self.root.join("index");
        // Record copies without an index: the index was deleted. Opening a fresh one
        // would rerun every finished stage; the copies can restore it instead.
        if !path.exists() && fs::read_dir(self.record_copies_dir()).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "the cache index {} is missing, but {} holds the records of finished stages\n  hint: \
                 `r1pipe gc --repair --cache {}` rebuilds the index from them (every finished stage stays cached)",
                path.display(),
                self.record_copies_dir().display(),
                self.root.display()
            );
        }
        self.open_index()
    }

    /// Whether this process may not write the cache (a read-only mount, another
    /// user's cache): reading commands then work on a snapshot of the index.
    pub fn is_read_only(&self) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(self.root.as_os_str().as_bytes()) else { return false };
        // SAFETY: access only reads the NUL-terminated path it is given.
        self.root.exists() && unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0
    }

    /// A private copy of a read-only cache's index, opened: what `status`,
    /// `show` and a run with nothing to do read (sled cannot open a folder it
    /// may not write). Writes to it (remembered file hashes) are dropped.
    fn index_snapshot(&self) -> Result<sled::Db> {
        const PREFIX: &str = "r1pipe-index-snapshot-";
        // Snapshots of processes that have ended are removed: at most one per live process remains.
        for e in fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill with signal 0 only checks that the process exists.
                if unsafe { libc::kill(pid, 0) } != 0 {
                    let _ = remove_path(&e.path());
                }
            }
        }
        let snapshot = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        remove_path(&snapshot)?;
        fs::create_dir_all(&snapshot)?;
        let index = self.root.join("index");
        for entry in walk(&index).with_context(|| format!("reading the cache index {}", index.display()))? {
            let rel = entry.strip_prefix(&index).expect("walk stays under its root");
            if entry.is_dir() {
                fs::create_dir_all(snapshot.join(rel))?;
            } else {
                fs::copy(&entry, snapshot.join(rel)).with_context(|| format!("copying {}", entry.display()))?;
                make_writable_file(&snapshot.join(rel))?;
            }
        }
        tracing::info!(cache = %self.root.display(), snapshot = %snapshot.display(), "read-only cache: reading a snapshot of its index");
        // Removed when the last handle drops: no copy of the index is left in the temp folder.
        Ok(sled::Config::new().path(&snapshot).temporary(true).open()?)
    }

    fn open_index(&self) -> Result<sled::Db> {
        let path = self.root.join("index");
        if path.exists() && self.is_read_only() {
            return self.index_snapshot();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match sled::Config::new().path(&path).open() {
                Ok(db) => return Ok(db),
                Err(sled::Error::Io(e)) if Instant::now() < deadline && e.to_string().contains("lock") => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(
                    e @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_)),
                ) => {
                    anyhow::bail!(
                        "the cache index {} is damaged ({e})\n  hint: `r1pipe gc --repair --cache {}` rebuilds it from the \
                         record copies in {} (finished stages stay cached)",
                        path.display(),
                        self.root.display(),
                        self.record_copies_dir().display()
                    )
                }
                Err(e) => return Err(e).with_context(|| format!("opening the cache index {}", path.display())),
            }
        }
    }

    /// Where each record is also kept as a JSON file, the index's backup.
    pub fn record_copies_dir(&self) -> PathBuf {
        self.root.join("records")
    }

    /// Rebuild the index from the record copies: the damaged index is moved
    /// aside (`index.damaged-<time>`), and every record whose artifacts are all
    /// present is put back, the newest of each stage made its latest. Returns
    /// (records restored, records skipped for missing artifacts).
    pub fn repair(&self) -> Result<(usize, usize)> {
        let index = self.root.join("index");
        if index.exists() {
            let aside = self.root.join(format!("index.damaged-{}", Utc::now().format("%Y%m%dT%H%M%S")));
            fs::rename(&index, &aside).with_context(|| format!("moving {} aside", index.display()))?;
            eprintln!("moved the old index to {}", aside.display());
        }
        let db = self.open_index()?;
        let mut records: Vec<StageRecord> = Vec::new();
        let mut unreadable = 0;
        if let Ok(rd) = fs::read_dir(self.record_copies_dir()) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json") {
                    match fs::read(&p).map_err(anyhow::Error::from).and_then(|b| Ok(serde_json::from_slice(&b)?)) {
                        Ok(r) => records.push(r),
                        Err(err) => {
                            // Counted with the skipped: a record that cannot be read is not restored.
                            eprintln!("skipping {}: {err:#}", p.display());
                            unreadable += 1;
                        }
                    }
                }
            }
        }
        records.sort_by_key(|r| r.finished_at);
        let (mut restored, mut skipped) = (0, unreadable);
        for r in records {
            if self.outputs_present(&r) {
                self.put_record(&db, &r)?;
                restored += 1;
            } else {
                skipped += 1;
            }
        }
        Ok((restored, skipped))
    }

    pub fn record(&self, db: &sled::Db, fingerprint: &str) -> Result<Option<StageRecord>> {
        let tree = db.open_tree(RECORDS)?;
        match tree.get(fingerprint.as_bytes())? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("reading a cache record")?)),
            None => Ok(None),
        }
    }

    /// The newest completed record of `stage` in `pipeline`, whatever its fingerprint.
    pub fn latest(&self, db: &sled::Db, pipeline: &str, stage: &str) -> Result<Option<StageRecord>> {
        let tree = db.open_tree(LATEST)?;
        match tree.get(latest_key(pipeline, stage))? {
            Some(fp) => self.record(db, &String::from_utf8_lossy(&fp)),
            None => Ok(None),
        }
    }

    /// The cached record of a stage named `stage` (of the same kind) closest to
    /// `inputs`: the fewest differences, this pipeline's records before other
    /// pipelines', then the newest. What "why does this run" is said against: the
    /// newest record alone may be another `-S` variant, and tell the wrong story.
    pub fn nearest(
        &self,
        db: &sled::Db,
        pipeline: &str,
        stage: &str,
        inputs: &FingerprintInputs,
    ) -> Result<Option<StageRecord>> {
        let candidates = self.all_records(db)?.into_iter().filter(|r| r.stage == stage && r.inputs.kind == inputs.kind);
        // Fewest differences, then this pipeline's, then the newest.
        Ok(candidates
            .min_by_key(|r| (inputs.diff(&r.inputs).len(), r.pipeline != pipeline, std::cmp::Reverse(r.finished_at))))
    }

    pub fn all_records(&self, db: &sled::Db) -> Result<Vec<StageRecord>> {
        let tree = db.open_tree(RECORDS)?;
        tree.iter().values().map(|v| Ok(serde_json::from_slice(&v?)?)).collect()
    }

    /// All (pipeline, stage) → fingerprint pointers.
    pub fn latest_pointers(&self, db: &sled::Db) -> Result<Vec<(String, String, String)>> {
        let tree = db.open_tree(LATEST)?;
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let k = String::from_utf8_lossy(&k).to_string();
            let (p, s) = k.split_once('\0').unwrap_or((&k, ""));
            out.push((p.to_string(), s.to_string(), String::from_utf8_lossy(&v).to_string()));
        }
        Ok(out)
    }

    /// Write a completed record (after its outputs are in place) and make it the
    /// stage's latest; flushed before returning.
    pub fn put_record(&self, db: &sled::Db, rec: &StageRecord) -> Result<()> {
        for o in rec.outputs.values() {
            if !self.object_path(o).exists() {
                bail!("refusing to record stage `{}`: output {} is not in the cache", rec.stage, o.hash);
            }
        }
        // A copy outside the index first (written whole, then renamed in): what
        // `gc --repair` rebuilds a damaged index from.
        let copies = self.record_copies_dir();
        fs::create_dir_all(&copies)?;
        let copy = copies.join(format!("{}.json", rec.fingerprint));
        let tmp = copies.join(format!(".tmp-{}-{}", rec.fingerprint, std::process::id()));
        crate::common::fsutil::write_file(&tmp, serde_json::to_vec_pretty(rec)?)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &copy)?;
        db.open_tree(RECORDS)?.insert(rec.fingerprint.as_bytes(), serde_json::to_vec(rec)?)?;
        crate::common::fault::point("mid-record");
        db.open_tree(LATEST)?.insert(latest_key(&rec.pipeline, &rec.stage), rec.fingerprint.as_bytes())?;
        crate::common::fault::point("before-flush");
        db.flush()?;
        Ok(())
    }

    pub fn remove_record(&self, db: &sled::Db, fingerprint: &str) -> Result<()> {
        let _ = fs::remove_file(self.record_copies_dir().join(format!("{fingerprint}.json")));
        db.open_tree(RECORDS)?.remove(fingerprint.as_bytes())?;
        db.flush()?;
        Ok(())
    }

    /// Whether every output of a record is still on disk (a user may have deleted objects).
    pub fn outputs_present(&self, rec: &StageRecord) -> bool {
        rec.outputs.values().all(|o| self.object_path(o).exists())
    }

    /// Move a finished output (file or folder) into `objects/<hash>/<file_name>`.
    /// The object appears by one rename, so it is either whole or absent.
    pub fn commit_output(&self, db: &sled::Db, src: &Path, file_name: &str) -> Result<ObjectRef> {
        let content = self.hash_path(db, src)?;
        let hash = object_hash(file_name, &content);
        let oref = ObjectRef { hash: hash.clone(), file_name: file_name.to_string() };
        let dest = self.objects_dir().join(&hash);
        if dest.join(file_name).exists() {
            if self.object_damage(db, &oref, Check::Cheap)?.is_none() {
                // Identical content is already stored: the new copy is redundant.
                remove_path(src)?;
                return Ok(oref);
            }
            // The stored copy is damaged: the new one replaces it.
            remove_path(&dest)?;
        }
        let memo = db.open_tree(FILE_HASHES)?;
        let hashed = remembered_files(&memo, src)?;
        let tmp = self.objects_dir().join(format!(".tmp-{hash}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        fs::rename(src, tmp.join(file_name)).with_context(|| format!("moving {} into the cache", src.display()))?;
        crate::common::fsutil::sync_dir_files(&tmp)?;
        if dest.exists() {
            fs::remove_dir_all(&dest)?; // an incomplete leftover with no file inside
        }
        fs::rename(&tmp, &dest)?;
        sync_path(&self.objects_dir());
        // The files keep their size and mtime through the renames: what was hashed
        // at `src` is remembered at its new place, so a later check reads nothing.
        remember_at(&memo, &hashed, &dest.join(file_name))?;
        make_read_only(&dest)?;
        Ok(oref)
    }

    /// What is wrong with a stored artifact, if anything: missing, unreadable, or
    /// content that no longer hashes to its name. `Check::Cheap` re-hashes only
    /// files whose size or mtime differ from when they were hashed (DVC's rule);
    /// `Check::Full` re-reads every byte.
    pub fn object_damage(&self, db: &sled::Db, oref: &ObjectRef, check: Check) -> Result<Option<String>> {
        let path = self.object_path(oref);
        if fs::symlink_metadata(&path).is_err() {
            return Ok(Some(format!("{} is missing", path.display())));
        }
        // r1pipe stores copies, never links: a link inside an object was put there by
        // someone else and may point anywhere; such an object is never served.
        let links = crate::common::fsutil::symlinks_in(&self.objects_dir().join(&oref.hash))?;
        if let Some(link) = links.first() {
            return Ok(Some(format!(
                "{} holds a symbolic link ({}); a stored artifact never does",
                path.display(),
                link.display()
            )));
        }
        let content = match check {
            Check::Cheap => self.hash_path(db, &path),
            Check::Full => hash_path_uncached(&path),
        };
        Ok(match content {
            Err(e) => Some(format!("{} cannot be read ({e:#})", path.display())),
            Ok(c) if object_hash(&oref.file_name, &c) != oref.hash => {
                Some(format!("{} has changed since it was stored (its content hash differs)", path.display()))
            }
            Ok(_) => None,
        })
    }

    /// Never use a damaged artifact again: drop every record that points to it
    /// (those stages rerun) and remove it. Returns the stages whose records went.
    /// Call only while holding the lock.
    pub fn discard_object(&self, db: &sled::Db, oref: &ObjectRef) -> Result<Vec<String>> {
        let mut dropped = Vec::new();
        for rec in self.all_records(db)? {
            if rec.outputs.values().any(|o| o.hash == oref.hash) {
                self.remove_record(db, &rec.fingerprint)?;
                dropped.push(format!("{}/{}", rec.pipeline, rec.stage));
            }
        }
        remove_path(&self.objects_dir().join(&oref.hash))?;
        tracing::warn!(object = %oref.hash, ?dropped, "damaged artifact discarded");
        Ok(dropped)
    }

    /// Each damaged output of a record: (output name, what is wrong).
    pub fn damaged_outputs(&self, db: &sled::Db, rec: &StageRecord, check: Check) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (name, oref) in &rec.outputs {
            if let Some(problem) = self.object_damage(db, oref, check)? {
                out.push((name.clone(), problem));
            }
        }
        Ok(out)
    }

    /// Content hash of a local file or folder. A file's hash is remembered by
    /// (path, size, mtime) so large files are read once, not on every run.
    pub fn hash_path(&self, db: &sled::Db, path: &Path) -> Result<String> {
        let memo = db.open_tree(FILE_HASHES)?;
        content_hash(path, &mut |p| hash_file_memo(&memo, p))
    }

    /// Take the one-writer lock. Fails at once naming the holder, or waits with `wait`.
    pub fn lock(&self, wait: bool) -> Result<CacheLock> {
        fs::create_dir_all(&self.root).with_context(|| format!("creating cache {}", self.root.display()))?;
        let path = self.root.join("LOCK");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the cache's lock file {}", path.display()))?;
        // `status` peeks at the lock (try-lock, released at once): a run that starts at
        // that instant waits out the peek instead of failing.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut attempt = file.try_lock();
        while matches!(attempt, Err(fs::TryLockError::WouldBlock))
            && Instant::now() < deadline
            && !holder_running(&path)
        {
            std::thread::sleep(Duration::from_millis(25));
            attempt = file.try_lock();
        }
        match attempt {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = holder_description(&path);
                if !wait {
                    bail!(
                        "the cache {} is in use by {holder}\n  hint: wait for it to finish, or pass --wait to queue behind it",
                        self.root.display()
                    );
                }
                eprintln!("waiting for the cache lock held by {holder} …");
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).context("locking the cache"),
        }
        file.set_len(0)?;
        let args: Vec<String> = std::env::args().collect();
        writeln!(file, "pid {}\nstarted {}\ncommand {}", std::process::id(), Utc::now().to_rfc3339(), args.join(" "))?;
        file.sync_all()?;
        Ok(CacheLock { _file: file })
    }

    /// Who holds the writer lock right now, if anyone (for `status`).
    pub fn holder(&self) -> Option<String> {
        let path = self.root.join("LOCK");
        let file = fs::OpenOptions::new().read(true).write(true).open(&path).ok()?;
        match file.try_lock() {
            Ok(()) => None,
            Err(fs::TryLockError::WouldBlock) => Some(holder_description(&path)),
            Err(fs::TryLockError::Error(_)) => None,
        }
    }

    /// Remove leftovers of interrupted commits (`objects/.tmp-*`). Call only while holding the lock.
    pub fn sweep_temporaries(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        if let Ok(rd) = fs::read_dir(self.objects_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    remove_path(&e.path())?;
                    removed.push(e.path());
                }
            }
        }
        Ok(removed)
    }
}

/// Held while a run writes to the cache; released when dropped (or when the process dies).
pub struct CacheLock {
    _file: fs::File,
}

/// Whether the lock file names a live writer other than us (a run holds the lock
/// for its whole length and writes its pid; a `status` peek writes nothing).
fn holder_running(lock_path: &Path) -> bool {
    let text = fs::read_to_string(lock_path).unwrap_or_default();
    let pid: Option<i32> = text.lines().find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok());
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid.is_some_and(|p| p as u32 != std::process::id() && unsafe { libc::kill(p, 0) } == 0)
}

fn holder_description(lock_path: &Path) -> String {
    let text = fs::read_to_string(lock_path).unwrap_or_default();
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    match (field("pid "), field("started ")) {
        (Some(pid), Some(started)) => {
            format!("pid {pid} (started {started}: {})", field("command ").unwrap_or_default())
        }
        (Some(pid), None) => format!("pid {pid}"),
        _ => "another r1pipe process".into(),
    }
}

/// The local cache as an [`ArtifactStore`](super::ArtifactStore), with its index open.
pub struct LocalStore<'a> {
    pub cache: &'a Cache,
    pub db: &'a sled::Db,
}

impl super::ArtifactStore for LocalStore<'_> {
    fn name(&self) -> String {
        self.cache.root.display().to_string()
    }
    fn records(&self) -> Result<Vec<StageRecord>> {
        self.cache.all_records(self.db)
    }
    fn delete_record(&self, fingerprint: &str) -> Result<()> {
        self.cache.remove_record(self.db, fingerprint)
    }
    /// The records the index points to as each stage's latest (the last one recorded).
    fn newest(&self, _records: &[StageRecord]) -> Result<std::collections::BTreeSet<String>> {
        Ok(self.cache.latest_pointers(self.db)?.into_iter().map(|(_, _, fp)| fp).collect())
    }
    fn artifacts(&self) -> Result<Vec<super::StoredArtifact>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.cache.objects_dir()).into_iter().flatten().flatten() {
            let written =
                e.metadata().and_then(|m| m.modified()).map(DateTime::<Utc>::from).unwrap_or_else(|_| Utc::now());
            out.push(super::StoredArtifact {
                hash: e.file_name().to_string_lossy().to_string(),
                place: e.path().display().to_string(),
                bytes: super::size_of(&e.path()),
                written,
            });
        }
        Ok(out)
    }
    fn delete_artifact(&self, artifact: &super::StoredArtifact) -> Result<()> {
        remove_path(&self.cache.objects_dir().join(&artifact.hash))
    }
    fn place(&self, oref: &ObjectRef) -> String {
        self.cache.object_path(oref).display().to_string()
    }
    fn damage(&self, oref: &ObjectRef) -> Result<Option<String>> {
        self.cache.object_damage(self.db, oref, Check::Full)
    }
    fn discard(&self, oref: &ObjectRef) -> Result<Vec<String>> {
        self.cache.discard_object(self.db, oref)
    }
}

/// How thoroughly a stored artifact is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Re-hash only the files whose size or mtime changed since they were hashed.
    Cheap,
    /// Re-read and re-hash every file.
    Full,
}

fn latest_key(pipeline: &str, stage: &str) -> Vec<u8> {
    format!("{pipeline}\0{stage}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::files::make_writable;
    use super::*;
    use crate::common::fsutil::hash_file;

    #[test]
    fn identical_outputs_share_one_object_and_names_are_part_of_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        cache.create_dirs().unwrap();
        let db = cache.db().unwrap();
        let a = tmp.path().join("a.jsonl");
        fs::write(&a, "x\n").unwrap();
        let o1 = cache.commit_output(&db, &a, "train.jsonl").unwrap();
        fs::write(&a, "x\n").unwrap();
        let o2 = cache.commit_output(&db, &a, "train.jsonl").unwrap();
        assert_eq!(o1, o2);
        assert!(!a.exists(), "the redundant copy is removed");
        fs::write(&a, "x\n").unwrap();
        let o3 = cache.commit_output(&db, &a, "test.jsonl").unwrap();
        assert_ne!(o1.hash, o3.hash);
        assert_eq!(fs::read_to_string(cache.object_path(&o1)).unwrap(), "x\n");
    }

    #[test]
    fn every_file_of_an_artifact_is_read_only_for_all_whatever_its_mode_was() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        cache.create_dirs().unwrap();
        let db = cache.db().unwrap();
        let dir = tmp.path().join("model");
        fs::create_dir_all(&dir).unwrap();
        for (name, mode) in [("model.safetensors", 0o600), ("config.json", 0o644)] {
            fs::write(dir.join(name), name).unwrap();
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        let o = cache.commit_output(&db, &dir, "model").unwrap();
        for name in ["model.safetensors", "config.json"] {
            let mode = fs::metadata(cache.object_path(&o).join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o444, "{name}");
        }
        for folder in [cache.object_path(&o), cache.object_path(&o).parent().unwrap().to_path_buf()] {
            let mode = fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o555, "{}", folder.display());
        }
        remove_path(&cache.objects_dir().join(&o.hash)).unwrap();
        assert!(!cache.object_path(&o).exists(), "remove_path opens read-only folders to remove them");
    }

    /// Folders made writable again, as someone determined to change an artifact would.
    fn tamper(path: &Path, change: impl FnOnce(&Path)) {
        make_writable(path.parent().unwrap()).unwrap();
        change(path);
    }

    #[test]
    fn a_stored_folder_with_a_file_changed_deleted_or_added_is_damaged_and_a_new_commit_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        cache.create_dirs().unwrap();
        let db = cache.db().unwrap();
        let make = |dir: &Path| {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join("model.safetensors"), "weights").unwrap();
            fs::write(dir.join("config.json"), "{}").unwrap();
        };
        make(&tmp.path().join("m"));
        let o = cache.commit_output(&db, &tmp.path().join("m"), "model").unwrap();
        assert_eq!(cache.object_damage(&db, &o, Check::Cheap).unwrap(), None);
        assert_eq!(cache.object_damage(&db, &o, Check::Full).unwrap(), None);
        let weights = cache.object_path(&o).join("model.safetensors");
        type Change = Box<dyn Fn(&Path)>;
        let changes: [(&str, Change); 3] = [
            (
                "changed",
                Box::new(|w: &Path| {
                    fs::set_permissions(w, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
                    fs::write(w, "WEIGHTS").unwrap();
                }),
            ),
            ("deleted", Box::new(|w: &Path| fs::remove_file(w).unwrap())),
            ("added", Box::new(|w: &Path| fs::write(w.with_file_name("extra.bin"), "x").unwrap())),
        ];
        for (what, change) in changes {
            tamper(&weights, |w| change(w));
            let cheap = cache.object_damage(&db, &o, Check::Cheap).unwrap();
            assert!(cheap.is_some_and(|p| p.contains("has changed since it was stored")), "{what}");
            // Committing the same content again replaces the damaged copy.
            make(&tmp.path().join("m"));
            assert_eq!(cache.commit_output(&db, &tmp.path().join("m"), "model").unwrap(), o);
            assert_eq!(cache.object_damage(&db, &o, Check::Full).unwrap(), None, "{what}");
        }
        // Same size and mtime: only a full check can tell.
        let mtime = fs::metadata(&weights).unwrap().modified().unwrap();
        tamper(&weights, |w| {
            fs::set_permissions(w, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
            fs::write(w, "weighTs").unwrap();
            fs::File::options().write(true).open(w).unwrap().set_modified(mtime).unwrap();
        });
        assert_eq!(cache.object_damage(&db, &o, Check::Cheap).unwrap(), None);
        assert!(cache.object_damage(&db, &o, Check::Full).unwrap().is_some());
    }

    #[test]
    fn file_hash_is_remembered_until_the_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        cache.create_dirs().unwrap();
        let db = cache.db().unwrap();
        let f = tmp.path().join("w.bin");
        fs::write(&f, "one").unwrap();
        let h1 = cache.hash_path(&db, &f).unwrap();
        assert_eq!(h1, hash_file(&f).unwrap());
        fs::write(&f, "two!").unwrap();
        let h2 = cache.hash_path(&db, &f).unwrap();
        assert_ne!(h2, h1);
        // Same size and mtime, other bytes: the memo answers without reading the file
        // (which is what makes it a memo; a changed size or mtime is what invalidates it).
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        fs::write(&f, "TWO!").unwrap();
        fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        assert_eq!(cache.hash_path(&db, &f).unwrap(), h2, "the memo was not used");
        assert_ne!(hash_file(&f).unwrap(), h2, "the file did change");
    }

    #[test]
    fn a_record_cannot_point_at_a_missing_object() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        cache.create_dirs().unwrap();
        let db = cache.db().unwrap();
        let rec = StageRecord {
            fingerprint: "f".into(),
            pipeline: "p".into(),
            stage: "s".into(),
            inputs: FingerprintInputs {
                kind: "k".into(),
                kind_version: 1,
                params: Value::Null,
                inputs: Default::default(),
                files: Default::default(),
                env: Default::default(),
            },
            outputs: BTreeMap::from([("o".into(), ObjectRef { hash: "nope".into(), file_name: "x".into() })]),
            metrics: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            duration_s: 0.0,
        };
        assert!(cache.put_record(&db, &rec).is_err());
        assert!(cache.record(&db, "f").unwrap().is_none());
    }
}
