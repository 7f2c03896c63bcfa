//! Numbered checkpoint folders (`checkpoints/step-000000012/`) in a work
//! folder, written so that a kill at any moment leaves either the previous
//! set or the new one, never half of one. What goes inside a checkpoint is the
//! caller's business (the training loop's, a test stage's).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::fsutil::{sync_dir_files, sync_path};

const PREFIX: &str = "step-";

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
        write(&tmp).with_context(|| format!("writing checkpoint for step {step}"))?;
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
}
