//! Numbered checkpoint folders (`checkpoints/step-000000012/`) in a work
//! folder, written so that a kill at any moment leaves either the previous
//! set or the new one, never half of one. What goes inside a checkpoint is the
//! caller's business (the training loop's, a test stage's); every checkpoint
//! also carries a manifest of its files' sizes and blake3 hashes, written
//! before it is published and checked by [`Checkpoints::verify`] before it is
//! resumed from, so bytes changed after the save (same size or not) are noticed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::fsutil::{sync_dir_files, sync_path, walk};

const PREFIX: &str = "step-";

/// The file in a checkpoint folder that lists the others with their hashes.
pub const MANIFEST: &str = "manifest.json";

/// One checkpoint file as it was written.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileEntry {
    size: u64,
    blake3: String,
}

pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    pub fn new(work_dir: &Path) -> Self {
        Checkpoints { dir: work_dir.join("checkpoints") }
    }

    /// Complete checkpoints, oldest first. Temporary folders of an interrupted save are ignored.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
                Some((step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn latest(&self) -> Option<(u64, PathBuf)> {
        self.list().pop()
    }

    /// Write a checkpoint for `step` with `write` (which fills the folder it is
    /// given), publish it by rename, then keep only the newest `keep`.
    pub fn save(
        &self,
        step: u64,
        keep: usize,
        write: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let tmp = self.dir.join(format!(".tmp-{PREFIX}{step:09}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        write(&tmp).with_context(|| format!("writing the checkpoint of step {step} in {}", self.dir.display()))?;
        let manifest = manifest_of(&tmp)?;
        super::fsutil::write_file(&tmp.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
        sync_dir_files(&tmp)?;
        let dest = self.dir.join(format!("{PREFIX}{step:09}"));
        if dest.exists() {
            fs::remove_dir_all(&dest)?;
        }
        fs::rename(&tmp, &dest)?;
        sync_path(&self.dir);
        let all = self.list();
        let excess = all.len().saturating_sub(keep.max(1));
        for (_, old) in all.into_iter().take(excess) {
            let _ = fs::remove_dir_all(old);
        }
        Ok(dest)
    }

    /// Check a checkpoint's files against its manifest: each listed file is
    /// there with its size and hash, and no file was added. A checkpoint written
    /// before manifests existed has none and is accepted as it is.
    pub fn verify(dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Ok(());
        }
        let recorded: BTreeMap<String, FileEntry> =
            serde_json::from_slice(&fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("{} is not a checkpoint manifest", path.display()))?;
        let found = manifest_of(dir)?;
        for (name, want) in &recorded {
            match found.get(name) {
                None => bail!("{name} is missing"),
                Some(got) if got.size != want.size => {
                    bail!("{name} has {} bytes, {} were written", got.size, want.size)
                }
                Some(got) if got.blake3 != want.blake3 => {
                    bail!("{name} has changed since it was written (its blake3 hash differs)")
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = found.keys().find(|k| !recorded.contains_key(*k)) {
            bail!("{extra} was not part of the checkpoint when it was written");
        }
        Ok(())
    }
}

/// Size and hash of every file under `dir` but the manifest, by relative path.
fn manifest_of(dir: &Path) -> anyhow::Result<BTreeMap<String, FileEntry>> {
    let mut out = BTreeMap::new();
    for path in walk(dir).with_context(|| format!("listing {}", dir.display()))? {
        if !path.is_file() {
            continue;
        }
        let rel = path.strip_prefix(dir).expect("walk stays under its root").to_string_lossy().to_string();
        if rel == MANIFEST {
            continue;
        }
        let size = fs::metadata(&path)?.len();
        out.insert(rel, FileEntry { size, blake3: super::fsutil::hash_file(&path)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_publishes_atomically_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(tmp.path());
        for step in [1u64, 2, 3] {
            c.save(step, 2, |d| Ok(fs::write(d.join("w"), step.to_string())?)).unwrap();
        }
        let steps: Vec<u64> = c.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3]);
        let (s, p) = c.latest().unwrap();
        assert_eq!(s, 3);
        assert_eq!(fs::read_to_string(p.join("w")).unwrap(), "3");
    }

    #[test]
    fn an_unfinished_save_is_never_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(tmp.path());
        c.save(1, 3, |d| Ok(fs::write(d.join("w"), "1")?)).unwrap();
        let r = c.save(2, 3, |_| anyhow::bail!("killed mid-write"));
        assert!(r.is_err());
        assert_eq!(c.latest().unwrap().0, 1);
    }

    #[test]
    fn verify_names_a_file_changed_deleted_or_added_after_the_save() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(tmp.path());
        let dir = c.save(1, 3, |d| Ok(fs::write(d.join("w"), "1234")?)).unwrap();
        Checkpoints::verify(&dir).unwrap();
        let w = dir.join("w");
        fs::write(&w, "1235").unwrap(); // same size, other bytes
        let e = Checkpoints::verify(&dir).unwrap_err().to_string();
        assert!(e.contains("w has changed"), "{e}");
        fs::write(&w, "12").unwrap();
        let e = Checkpoints::verify(&dir).unwrap_err().to_string();
        assert!(e.contains("w has 2 bytes, 4 were written"), "{e}");
        fs::remove_file(&w).unwrap();
        assert!(Checkpoints::verify(&dir).unwrap_err().to_string().contains("w is missing"));
        fs::write(&w, "1234").unwrap();
        Checkpoints::verify(&dir).unwrap();
        fs::write(dir.join("extra"), "x").unwrap();
        assert!(Checkpoints::verify(&dir).unwrap_err().to_string().contains("extra was not part"));
    }
}
