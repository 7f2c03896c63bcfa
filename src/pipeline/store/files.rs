//! The file rules of the local store: artifacts are read-only once stored,
//! and removing one never follows a link out of the cache.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::common::fsutil::walk;

/// Remove a file, a folder (a stored artifact's read-only folders included) or a
/// link. A symbolic link is removed itself, never followed: nothing outside `p`
/// is changed, whatever links someone planted under it.
pub fn remove_path(p: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(p) else { return Ok(()) };
    if meta.is_dir() {
        // Stored artifacts are read-only folders: make them writable to empty them.
        make_writable(p)?;
        fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    } else {
        fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Artifacts are immutable: every file becomes 0444 and every folder 0555
/// (readable by all, written by none), whatever mode the library that wrote it
/// chose, so a stray write or delete fails loudly and the files of one artifact look alike.
pub(super) fn make_read_only(p: &Path) -> Result<()> {
    set_modes(p, 0o444, 0o555)
}

pub(super) fn make_writable_file(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Folders writable again (files stay read-only), so a stored artifact can be removed.
pub(super) fn make_writable(p: &Path) -> Result<()> {
    set_modes(p, 0o444, 0o755)
}

fn set_modes(p: &Path, file_mode: u32, dir_mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut all = vec![p.to_path_buf()];
    if p.is_dir() {
        all.extend(walk(p)?);
    }
    for f in all {
        // Symlinks are left alone: a mode change would follow them out of the cache.
        let meta = fs::symlink_metadata(&f)?;
        let mode = if meta.is_dir() {
            dir_mode
        } else if meta.is_file() {
            file_mode
        } else {
            continue;
        };
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", f.display()))?;
    }
    Ok(())
}

/// The bytes of a file, or of the files under a folder (links not followed).
pub fn size_of(p: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(p) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    crate::common::fsutil::walk(p)
        .map(|v| v.iter().filter_map(|f| fs::symlink_metadata(f).ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
