//! A remote cache in object storage, shared by machines and people. Its
//! layout under the remote's prefix:
//!
//! ```text
//! files/<ab>/<rest of blake3>    one file's bytes, named by their blake3
//! objects/<object hash>.json      an artifact's manifest: its name, and each file's path, hash and size
//! records/<fingerprint>.json      a finished stage: which fingerprint made which artifacts
//! jobs/<fingerprint>/             a stage running as a job with no shared filesystem (jobs.rs):
//!                                 job.json, exit.json, work.json (its checkpoints' manifest)
//! ```
//!
//! Everything is named by its content, so a push of what is there sends
//! nothing and two pushers of one artifact write the same bytes to the same
//! names. A push writes files, then manifests, then the record, so a reader
//! that sees a record finds everything it names. A pull checks each file's
//! bytes against its hash as they arrive and each manifest against its
//! artifact's hash, and the artifact enters the local cache the way a stage's
//! output does (hashed again, moved in by one rename), so nothing
//! half-pulled is ever visible. Files already pulled wait, verified, in the
//! cache's `pulls/` for the next call when one is interrupted.

mod connect;
mod jobs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

use super::{folder_hash, object_hash, Cache, ObjectRef, StageRecord};
use crate::common::fsutil;

/// `remote:` in a pipeline file (a URL, or `{url, endpoint}`), or `--remote URL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    pub url: String,
    /// An S3-compatible server's address (MinIO, Ceph, a local test server).
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Files above this go up in parts of this size (where the store takes parts).
const PART_SIZE: usize = 32 << 20;

/// The largest manifest or record read from a remote.
const JSON_CAP: usize = 16 << 20;

/// An artifact's manifest: what `objects/<hash>.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    file_name: String,
    /// `file` (one file) or `dir` (a folder of files).
    kind: String,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    /// Relative to the artifact's folder; empty for a `file` artifact.
    path: String,
    hash: String,
    size: u64,
}

impl Manifest {
    /// The artifact hash this manifest describes (the local cache's rule, `store::object_hash`).
    fn object_hash(&self) -> String {
        let content = if self.kind == "file" {
            self.files.first().map(|f| f.hash.clone()).unwrap_or_default()
        } else {
            folder_hash(&self.files.iter().map(|f| (f.path.clone(), f.hash.clone())).collect::<Vec<_>>())
        };
        object_hash(&self.file_name, &content)
    }

    /// Refuse what no push of r1pipe writes: another artifact's manifest, or
    /// files [`Manifest::check_files`] refuses.
    fn check(&self, oref: &ObjectRef) -> Result<()> {
        if self.file_name != oref.file_name || self.object_hash() != oref.hash {
            bail!("its manifest does not describe artifact {} ({})", oref.hash, oref.file_name);
        }
        self.check_files()
    }

    /// Refuse paths that would leave the artifact's folder and hashes that are not hashes.
    fn check_files(&self) -> Result<()> {
        for f in &self.files {
            let plain = Path::new(&f.path).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !super::is_content_hash(&f.hash) || !plain || (self.kind == "dir" && f.path.is_empty()) {
                bail!("its manifest names a file r1pipe would not have written ({:?})", f.path);
            }
        }
        if self.kind == "file" && (self.files.len() != 1 || !self.files[0].path.is_empty()) {
            bail!("its manifest says `file` and lists {} files", self.files.len());
        }
        Ok(())
    }
}

/// What a push or pull moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    pub files_sent: usize,
    pub files_there: usize,
    pub bytes: u64,
}

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// The URL without credentials: how messages name the remote.
    pub name: String,
    url: String,
    spec: RemoteSpec,
    rt: tokio::runtime::Runtime,
}

impl Remote {
    pub fn open(spec: &RemoteSpec, project_root: &Path) -> Result<Remote> {
        let (store, prefix) = connect::open(spec, project_root)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the remote's I/O runtime")?;
        let remote = Remote {
            store,
            prefix,
            name: crate::common::redact::url(&spec.url),
            url: spec.url.clone(),
            spec: spec.clone(),
            rt,
        };
        remote.probe()?;
        Ok(remote)
    }

    /// What the remote was opened from (to open it again in a stage's thread or a job).
    pub fn spec(&self) -> &RemoteSpec {
        &self.spec
    }

    /// Fail before any work when the remote cannot be read: no such bucket, wrong
    /// credentials, no server.
    fn probe(&self) -> Result<()> {
        self.rt
            .block_on(self.store.list_with_delimiter(Some(&self.prefix)))
            .map(|_| ())
            .map_err(|e| self.failure("reading what it holds", "", e))
    }

    fn key(&self, rel: &str) -> Key {
        let mut key = self.prefix.clone();
        for part in rel.split('/') {
            key = key.child(part);
        }
        key
    }

    fn file_key(hash: &str) -> String {
        format!("files/{}/{}", &hash[..2], &hash[2..])
    }

    /// An object-store error as a message naming the remote and the object, never a credential.
    fn failure(&self, what: &str, key: &str, e: object_store::Error) -> anyhow::Error {
        let mut text = connect::scrub(&e.to_string(), &self.url);
        if let Ok(secret) = std::env::var("AWS_SECRET_ACCESS_KEY") {
            // A real secret is long; a short one would blank out ordinary words.
            if secret.len() >= 8 {
                text = text.replace(&secret, "***");
            }
        }
        let object = if key.is_empty() { String::new() } else { format!(" {key}") };
        // S3's words for credentials it does not take: say where r1pipe read them.
        let refused = ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"];
        let hint = if refused.iter().any(|code| text.contains(&format!("<Code>{code}</Code>"))) {
            "\n  hint: the server refused the credentials: r1pipe reads AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), else the AWS_PROFILE section (default: [default]) of \
             ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE)"
        } else {
            ""
        };
        anyhow::anyhow!("remote {}: {what}{object}: {}{hint}", self.name, short_error(&text))
    }

    fn exists(&self, rel: &str) -> Result<bool> {
        match self.rt.block_on(self.store.head(&self.key(rel))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failure("looking for", rel, e)),
        }
    }

    /// A small object (a manifest, a record), or `None` when the remote has none.
    fn get_small(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let got = self.rt.block_on(async {
            let r = self.store.get(&self.key(rel)).await?;
            if r.meta.size > JSON_CAP as u64 {
                return Ok(Err(r.meta.size));
            }
            r.bytes().await.map(Ok)
        });
        match got {
            Ok(Ok(b)) => Ok(Some(b.to_vec())),
            Ok(Err(size)) => bail!("remote {}: {rel} is {size} bytes, more than a record or manifest is", self.name),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failure("reading", rel, e)),
        }
    }

    fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.store.put(&self.key(rel), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.failure("writing", rel, e))
    }

    /// Send a local file to `key`: whole when small; in parts when large and the
    /// store takes parts (S3, a folder), so that a model of gigabytes is never
    /// held in memory; the object appears only once every part is there. Its
    /// bytes are hashed on the way: a file that changed is not sent.
    fn upload(&self, key: &str, path: &Path, hash: &str) -> Result<()> {
        use std::io::Read;
        let changed =
            || anyhow::anyhow!("{} changed while it was pushed; `r1pipe verify` checks the cache", path.display());
        let size = path.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        let whole = |this: &Remote| -> Result<()> {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if blake3::hash(&bytes).to_hex().as_str() != hash {
                return Err(changed());
            }
            this.put(key, bytes)
        };
        if size <= PART_SIZE as u64 {
            return whole(self);
        }
        let upload = match self.rt.block_on(self.store.put_multipart(&self.key(key))) {
            Ok(u) => u,
            Err(object_store::Error::NotImplemented) => return whole(self), // WebDAV: one PUT
            Err(e) => return Err(self.failure("writing", key, e)),
        };
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 8 << 20];
        let sent: Result<()> = self.rt.block_on(async {
            loop {
                let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                writer.wait_for_capacity(4).await.map_err(|e| self.failure("writing", key, e))?;
                writer.write(&buf[..n]);
            }
        });
        let sent =
            sent.and_then(|()| if hasher.finalize().to_hex().as_str() == hash { Ok(()) } else { Err(changed()) });
        match sent {
            Ok(()) => self.rt.block_on(writer.finish()).map(|_| ()).map_err(|e| self.failure("writing", key, e)),
            Err(e) => {
                let _ = self.rt.block_on(writer.abort());
                Err(e)
            }
        }
    }

    /// Whether the remote holds the record of `fingerprint`.
    pub fn has_record(&self, fingerprint: &str) -> Result<bool> {
        self.exists(&format!("records/{fingerprint}.json"))
    }

    /// Send a finished stage: its artifacts' files (those the remote lacks), their
    /// manifests, then its record. Local artifacts are checked first: a damaged
    /// one is never pushed.
    pub fn push(
        &self,
        cache: &Cache,
        db: &sled::Db,
        rec: &StageRecord,
        bar: &indicatif::ProgressBar,
    ) -> Result<Transfer> {
        let mut moved = Transfer::default();
        // Even when the record is there, every file it needs is looked for: a
        // remote that lost one is mended by the next push.
        let orefs: Vec<&ObjectRef> = rec.outputs.values().collect();
        self.push_objects(cache, db, &orefs, bar, &mut moved)?;
        let record_key = format!("records/{}.json", rec.fingerprint);
        if !self.exists(&record_key)? {
            self.put(&record_key, serde_json::to_vec_pretty(rec)?)?;
        }
        Ok(moved)
    }

    /// Send local artifacts: each one's files the remote lacks, then its manifest
    /// (a reader that finds a manifest finds its files). Each is checked against
    /// its hash first.
    pub fn push_objects(
        &self,
        cache: &Cache,
        db: &sled::Db,
        orefs: &[&ObjectRef],
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<()> {
        let mut manifests = Vec::new();
        for &oref in orefs {
            let manifest = self.manifest_of(cache, db, oref)?;
            bar.inc_length(manifest.files.iter().map(|f| f.size).sum());
            manifests.push((oref, manifest));
        }
        for (oref, manifest) in &manifests {
            self.push_files(&cache.object_path(oref), &manifest.files, bar, moved)?;
            let manifest_key = format!("objects/{}.json", oref.hash);
            if !self.exists(&manifest_key)? {
                self.put(&manifest_key, serde_json::to_vec_pretty(manifest)?)?;
            }
        }
        Ok(())
    }

    /// Send the files of a manifest that the remote lacks (`root` is the artifact's
    /// path: the file itself, or the folder the paths are relative to).
    fn push_files(
        &self,
        root: &Path,
        files: &[ManifestFile],
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<()> {
        for f in files {
            let key = Self::file_key(&f.hash);
            if self.exists(&key)? {
                moved.files_there += 1;
                bar.inc(f.size);
                continue;
            }
            let path = if f.path.is_empty() { root.to_path_buf() } else { root.join(&f.path) };
            self.upload(&key, &path, &f.hash)?;
            moved.files_sent += 1;
            moved.bytes += f.size;
            bar.inc(f.size);
            crate::common::fault::point("push-after-file");
        }
        Ok(())
    }

    /// The manifest of a local artifact, its hash checked against its name.
    fn manifest_of(&self, cache: &Cache, db: &sled::Db, oref: &ObjectRef) -> Result<Manifest> {
        let path = cache.object_path(oref);
        let mut files = Vec::new();
        let kind = if path.is_file() {
            files.push(ManifestFile {
                path: String::new(),
                hash: cache.hash_path(db, &path)?,
                size: path.metadata()?.len(),
            });
            "file"
        } else {
            for p in fsutil::walk(&path)? {
                if p.is_file() {
                    let rel = p.strip_prefix(&path).expect("walk stays under its root").to_string_lossy().to_string();
                    files.push(ManifestFile { path: rel, hash: cache.hash_path(db, &p)?, size: p.metadata()?.len() });
                }
            }
            "dir"
        };
        let manifest = Manifest { file_name: oref.file_name.clone(), kind: kind.into(), files };
        if manifest.object_hash() != oref.hash {
            bail!("{} is damaged (its content no longer hashes to its name): not pushed", path.display());
        }
        Ok(manifest)
    }

    /// The remote's record of `fingerprint`, checked: `None` when it has none.
    pub fn record(&self, fingerprint: &str) -> Result<Option<StageRecord>> {
        let key = format!("records/{fingerprint}.json");
        let Some(bytes) = self.get_small(&key)? else { return Ok(None) };
        let rec: StageRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("remote {}: {key} is not a stage record", self.name))?;
        if rec.fingerprint != fingerprint || rec.inputs.fingerprint() != fingerprint {
            bail!("remote {}: {key} is the record of another fingerprint; it is not used", self.name);
        }
        Ok(Some(rec))
    }

    /// Bring the artifacts of a remote record into the local cache, each checked
    /// byte by byte, then record it there. Call while holding the cache's lock.
    pub fn pull(
        &self,
        cache: &Cache,
        db: &sled::Db,
        rec: &StageRecord,
        bar: &indicatif::ProgressBar,
    ) -> Result<Transfer> {
        let mut moved = Transfer::default();
        let orefs: Vec<&ObjectRef> = rec.outputs.values().collect();
        self.pull_objects(cache, db, &orefs, bar, &mut moved)?;
        cache.put_record(db, rec)?;
        Ok(moved)
    }

    /// Bring artifacts into the local cache (those not already there, whole),
    /// each file checked against its hash as it arrives and each artifact
    /// against its own once assembled; nothing half-pulled enters the cache.
    pub fn pull_objects(
        &self,
        cache: &Cache,
        db: &sled::Db,
        orefs: &[&ObjectRef],
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<()> {
        let mut manifests = Vec::new();
        for &oref in orefs {
            if cache.object_damage(db, oref, super::Check::Cheap)?.is_none() {
                continue; // already here, whole
            }
            let manifest = self.manifest(oref)?;
            bar.inc_length(manifest.files.iter().map(|f| f.size).sum());
            manifests.push((oref, manifest));
        }
        let pulls = Self::pulls_dir(cache)?;
        for (oref, manifest) in &manifests {
            // Assembled beside the cache's objects, then moved in as a stage's output is;
            // the half-assembled folder of a failed pull goes (its verified files stay).
            let staging = pulls.join(format!("{}-{}", oref.hash, std::process::id()));
            super::remove_path(&staging)?;
            let top = staging.join(&oref.file_name);
            let pulled = self.materialize(manifest, &pulls, &top, moved, bar).and_then(|()| {
                let stored = cache.commit_output(db, &top, &oref.file_name)?;
                if stored != **oref {
                    bail!("remote {}: artifact {} hashed to {} once pulled", self.name, oref.hash, stored.hash);
                }
                Ok(())
            });
            super::remove_path(&staging)?;
            pulled?;
        }
        for (_, manifest) in &manifests {
            Self::forget_pulled(&pulls, &manifest.files);
        }
        Ok(())
    }

    /// Write a remote artifact as `dest` (a file, or a folder of files), each file
    /// checked against its hash as it arrives; the artifact's manifest is checked
    /// against its hash first. What a cluster's head does with a job's outputs:
    /// they become the stage's outputs, committed as if the stage had run here.
    pub fn fetch_object(
        &self,
        cache: &Cache,
        oref: &ObjectRef,
        dest: &Path,
        bar: &indicatif::ProgressBar,
        moved: &mut Transfer,
    ) -> Result<()> {
        let manifest = self.manifest(oref)?;
        bar.inc_length(manifest.files.iter().map(|f| f.size).sum());
        let pulls = Self::pulls_dir(cache)?;
        super::remove_path(dest)?;
        self.materialize(&manifest, &pulls, dest, moved, bar)?;
        Self::forget_pulled(&pulls, &manifest.files);
        Ok(())
    }

    /// The manifest of a remote artifact, checked against the artifact's hash.
    fn manifest(&self, oref: &ObjectRef) -> Result<Manifest> {
        let key = format!("objects/{}.json", oref.hash);
        let bytes =
            self.get_small(&key)?.with_context(|| format!("remote {}: artifact {key} is missing", self.name))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("remote {}: {key} is not an artifact manifest", self.name))?;
        manifest.check(oref).map_err(|e| anyhow::anyhow!("remote {}: {key}: {e:#}", self.name))?;
        Ok(manifest)
    }

    /// Where fetched files wait, verified, until their artifact is whole: a pull
    /// cut short keeps them for the next call.
    fn pulls_dir(cache: &Cache) -> Result<PathBuf> {
        let pulls = cache.root.join("pulls");
        std::fs::create_dir_all(&pulls).with_context(|| format!("creating {}", pulls.display()))?;
        Ok(pulls)
    }

    fn forget_pulled(pulls: &Path, files: &[ManifestFile]) {
        for f in files {
            let _ = std::fs::remove_file(pulls.join(&f.hash));
        }
    }

    /// Write `files` as `top` (`top` itself for a one-file artifact, else files
    /// under it), fetching into `pulls/` what is not there yet.
    fn materialize(
        &self,
        manifest: &Manifest,
        pulls: &Path,
        top: &Path,
        moved: &mut Transfer,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        if manifest.kind == "dir" {
            std::fs::create_dir_all(top).with_context(|| format!("creating {}", top.display()))?;
        }
        for f in &manifest.files {
            let have = pulls.join(&f.hash);
            if !have.exists() {
                self.download(&f.hash, f.size, &have)?;
                moved.files_sent += 1;
                moved.bytes += f.size;
            } else {
                moved.files_there += 1;
            }
            bar.inc(f.size);
            let dest = if f.path.is_empty() { top.to_path_buf() } else { top.join(&f.path) };
            let parent = dest.parent().expect("a file under the artifact's place");
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            // A link where the file system allows (no second copy), else a copy.
            if std::fs::hard_link(&have, &dest).is_err() {
                std::fs::copy(&have, &dest).with_context(|| format!("writing {}", dest.display()))?;
            }
        }
        Ok(())
    }

    /// What is wrong with remote file `hash` (missing, another length, other
    /// bytes), read through and hashed, nothing written.
    fn file_damage(&self, hash: &str, size: u64) -> Result<Option<String>> {
        let key = Self::file_key(hash);
        let read: Result<Option<(u64, String)>> = self.rt.block_on(async {
            let got = match self.store.get(&self.key(&key)).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.failure("reading", &key, e)),
            };
            let mut stream = got.into_stream();
            let (mut hasher, mut n) = (blake3::Hasher::new(), 0u64);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.failure("reading", &key, e))?;
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Ok(Some((n, hasher.finalize().to_hex().to_string())))
        });
        Ok(match read? {
            None => Some(format!("{key} is missing")),
            Some((n, _)) if n != size => Some(format!("{key} is {n} bytes, its manifest says {size}")),
            Some((_, h)) if h != hash => Some(format!("{key} does not hold the bytes its name promises")),
            Some(_) => None,
        })
    }

    /// Fetch file `hash` into `dest`: streamed into `dest.part`, hashed as it
    /// arrives, renamed to `dest` only when every byte matches.
    fn download(&self, hash: &str, size: u64, dest: &Path) -> Result<()> {
        use std::io::Write;
        let key = Self::file_key(hash);
        let part = PathBuf::from(format!("{}.part", dest.display()));
        // A local failure (a full disk, say) names the remote's object too; the
        // files already pulled whole stay for the next call.
        let local = |e: std::io::Error| {
            let full = e.raw_os_error() == Some(libc::ENOSPC);
            let hint = if full { "\n  hint: the cache's disk is full: free space and pull again" } else { "" };
            anyhow::anyhow!("remote {}: pulling {key} into {}: {e}{hint}", self.name, part.display())
        };
        let mut out = std::fs::File::create(&part).map_err(local)?;
        let mut hasher = blake3::Hasher::new();
        let mut got = 0u64;
        let result: Result<()> = self.rt.block_on(async {
            let mut stream =
                self.store.get(&self.key(&key)).await.map_err(|e| self.failure("reading", &key, e))?.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.failure("reading", &key, e))?;
                got += chunk.len() as u64;
                if got > size {
                    bail!("remote {}: {key} is longer than its manifest says ({size} bytes)", self.name);
                }
                hasher.update(&chunk);
                out.write_all(&chunk).map_err(local)?;
            }
            Ok(())
        });
        if let Err(e) = result.and_then(|()| {
            out.sync_all().map_err(local)?;
            if got != size || hasher.finalize().to_hex().as_str() != hash {
                bail!(
                    "remote {}: {key} does not hold the bytes its name promises (damaged or tampered with); \
                     nothing of it was kept",
                    self.name
                );
            }
            Ok(())
        }) {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        std::fs::rename(&part, dest).with_context(|| format!("writing {}", dest.display()))?;
        Ok(())
    }
}

impl Remote {
    /// Everything under `dir/` in the remote: (key below the prefix, size, last modified).
    fn list(&self, dir: &str) -> Result<Vec<(String, u64, chrono::DateTime<chrono::Utc>)>> {
        let listed: Vec<_> = self.rt.block_on(self.store.list(Some(&self.key(dir))).collect::<Vec<_>>());
        let mut out = Vec::new();
        for item in listed {
            let meta = item.map_err(|e| self.failure("listing", &format!("{dir}/"), e))?;
            let full = meta.location.to_string();
            let rel = full.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(&full).to_string();
            out.push((rel, meta.size, meta.last_modified));
        }
        Ok(out)
    }

    fn delete(&self, rel: &str) -> Result<()> {
        self.rt.block_on(self.store.delete(&self.key(rel))).map_err(|e| self.failure("deleting", rel, e))
    }

    /// `gc --remote`: the keep rule of `gc` ([`collect`](crate::pipeline::gc::collect))
    /// on the remote's records and artifact manifests, then the files no remaining
    /// manifest (or pushed work folder of an unfinished job) holds, older than
    /// `grace` like the manifests, and the job files of stages that have a record.
    pub fn gc(
        &self,
        keep: Option<&crate::pipeline::gc::Keep>,
        grace: chrono::TimeDelta,
        dry_run: bool,
    ) -> Result<Vec<crate::pipeline::gc::Removed>> {
        use crate::pipeline::gc::{collect, describe, Removed};
        let collected = collect(self, keep, grace, dry_run)?;
        let mut removed = Vec::new();
        for r in &collected.dropped {
            let what = r.outputs.keys().map(|o| describe(r, o)).collect::<Vec<_>>().join("; ");
            removed.push(Removed {
                path: Self::record_key(&r.fingerprint).into(),
                what: format!("the record of {what}"),
                bytes: 0,
            });
        }
        for (artifact, what) in &collected.removed {
            removed.push(Removed {
                path: artifact.place.clone().into(),
                what: format!("the manifest of {what}"),
                bytes: artifact.bytes,
            });
        }
        let mut kept_files = std::collections::BTreeSet::new();
        for artifact in &collected.kept_artifacts {
            if let Some(m) = self.get_small(&artifact.place)?.and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            {
                kept_files.extend(m.files.into_iter().map(|f| Self::file_key(&f.hash)));
            }
        }
        // A job's pushed work folder keeps its files while its stage has no record;
        // once it has one, what its job left is garbage (a head that died before clearing it).
        let recorded: std::collections::BTreeSet<&String> = collected.all.iter().map(|r| &r.fingerprint).collect();
        let mut unreached = Vec::new();
        for (key, size, _) in self.list("jobs")? {
            let fp = key.trim_start_matches("jobs/").split('/').next().unwrap_or_default().to_string();
            if recorded.contains(&fp) {
                unreached.push((key, size, "a finished job's file"));
            } else if key.ends_with("/work.json") {
                if let Some(m) = self.get_small(&key)?.and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()) {
                    kept_files.extend(m.files.into_iter().map(|f| Self::file_key(&f.hash)));
                }
            }
        }
        let now = chrono::Utc::now();
        for (key, size, at) in self.list("files")? {
            if !kept_files.contains(&key) && now - at >= grace {
                unreached.push((key, size, "a file no kept artifact holds"));
            }
        }
        for (key, size, what) in unreached {
            if !dry_run {
                self.delete(&key)?;
            }
            removed.push(Removed { path: key.into(), what: what.into(), bytes: size });
        }
        Ok(removed)
    }

    fn record_key(fingerprint: &str) -> String {
        format!("records/{fingerprint}.json")
    }
}

impl super::ArtifactStore for Remote {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn records(&self) -> Result<Vec<StageRecord>> {
        let mut out = Vec::new();
        for (key, _, _) in self.list("records")? {
            let fp = key.trim_start_matches("records/").trim_end_matches(".json").to_string();
            match self.record(&fp) {
                Ok(Some(rec)) => out.push(rec),
                _ => tracing::warn!("remote {}: {key} is not a record r1pipe can read; left alone", self.name),
            }
        }
        Ok(out)
    }
    fn delete_record(&self, fingerprint: &str) -> Result<()> {
        self.delete(&Self::record_key(fingerprint))
    }
    /// The artifacts' manifests (their files are collected after them, by `gc`).
    fn artifacts(&self) -> Result<Vec<super::StoredArtifact>> {
        Ok(self
            .list("objects")?
            .into_iter()
            .map(|(key, bytes, written)| super::StoredArtifact {
                hash: key.trim_start_matches("objects/").trim_end_matches(".json").to_string(),
                place: key,
                bytes,
                written,
            })
            .collect())
    }
    fn delete_artifact(&self, artifact: &super::StoredArtifact) -> Result<()> {
        self.delete(&artifact.place)
    }
    fn place(&self, oref: &ObjectRef) -> String {
        format!("{}/objects/{}.json", self.name.trim_end_matches('/'), oref.hash)
    }
    fn damage(&self, oref: &ObjectRef) -> Result<Option<String>> {
        let manifest = match self.manifest(oref) {
            Ok(m) => m,
            Err(e) => return Ok(Some(format!("{e:#}"))),
        };
        for f in &manifest.files {
            if let Some(problem) = self.file_damage(&f.hash, f.size)? {
                return Ok(Some(problem));
            }
        }
        Ok(None)
    }
    /// The records naming it, its manifest and its damaged files go (a push
    /// sends only files the remote lacks: a damaged one left would never be mended).
    fn discard(&self, oref: &ObjectRef) -> Result<Vec<String>> {
        let mut dropped = Vec::new();
        for rec in super::ArtifactStore::records(self)? {
            if rec.outputs.values().any(|o| o.hash == oref.hash) {
                self.delete(&Self::record_key(&rec.fingerprint))?;
                dropped.push(format!("{}/{}", rec.pipeline, rec.stage));
            }
        }
        let manifest = self.manifest(oref).ok();
        let key = format!("objects/{}.json", oref.hash);
        if self.exists(&key)? {
            self.delete(&key)?;
        }
        for f in manifest.map(|m| m.files).unwrap_or_default() {
            if self.file_damage(&f.hash, f.size)?.is_some() && self.exists(&Self::file_key(&f.hash))? {
                self.delete(&Self::file_key(&f.hash))?;
            }
        }
        tracing::warn!(object = %oref.hash, ?dropped, remote = %self.name, "damaged remote artifact discarded");
        Ok(dropped)
    }
}

/// A storage error as a line: an S3 reply's error code and message instead of its
/// XML body, and no more than a few hundred characters of anything else.
fn short_error(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find("</")? + start;
        Some(text[start..end].to_string())
    };
    if let Some(code) = tag("Code") {
        let head = text.split(" - Server returned").next().unwrap_or(text).split(" in ").next().unwrap_or(text);
        return format!("{head}: the server says {code}: {}", tag("Message").unwrap_or_default());
    }
    let line = text.lines().next().unwrap_or(text);
    if line.chars().count() > 400 {
        format!("{}…", line.chars().take(400).collect::<String>())
    } else {
        line.to_string()
    }
}

/// A bar with bytes, rate and ETA for a push or pull.
pub fn transfer_bar(what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} · {bytes_per_sec} · ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}
