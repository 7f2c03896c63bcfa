//! Durable file operations: fsync of written folders, directory entries, and
//! a sorted recursive walk (so that hashes over folders are stable).

use std::fs;
use std::path::{Path, PathBuf};

/// fsync every file under a folder, then the folder itself.
pub fn sync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for entry in walk(dir)? {
        if entry.is_file() {
            fs::File::open(&entry)?.sync_all()?;
        }
    }
    sync_path(dir);
    Ok(())
}

/// fsync a directory entry so a rename into it survives power loss (best effort).
pub fn sync_path(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// All files, folders and symbolic links under `dir`, recursively, in sorted
/// order. A symbolic link is listed, never followed: whatever a caller does to
/// the entries (chmod, remove, hash) stays inside `dir`, even when someone
/// planted a link to a folder elsewhere.
pub fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    walk_inner(dir, false)
}

/// [`walk`], descending into linked folders too: for reading a user's input
/// folder (a model in the hub cache is links into its blobs), never for
/// changing or removing anything.
pub fn walk_following_links(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    walk_inner(dir, true)
}

fn walk_inner(dir: &Path, follow: bool) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let is_dir = if follow { p.is_dir() } else { fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) };
        out.push(p.clone());
        if is_dir {
            out.extend(walk_inner(&p, follow)?);
        }
    }
    Ok(out)
}

/// The symbolic links under `dir` (or `dir` itself, if it is one).
pub fn symlinks_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Ok(vec![dir.to_path_buf()]);
    }
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    Ok(walk(dir)?.into_iter().filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())).collect())
}

/// A text file a user names (pipeline, preset, reward set), read whole but
/// refused beyond `cap` bytes (a device such as /dev/zero, or the wrong file,
/// would otherwise be read until memory runs out), with a UTF-8 byte-order mark
/// dropped (editors on Windows write one).
pub fn read_text_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    // A FIFO would block the open until someone writes to it, a device would never
    // end: only a regular file (or a link to one) is read.
    if !std::fs::metadata(path)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file (a FIFO, a device or a folder)"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} KiB: is it the right file?", cap / 1024),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::new(ErrorKind::InvalidData, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Write `bytes` to `path`; an error names the file (a full disk otherwise
/// reads as a bare "No space left on device").
pub fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
    use anyhow::Context;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Write `tensors` as a safetensors file; an error names the file and keeps
/// the OS error as its cause (candle's own text would repeat it).
pub fn save_safetensors<S: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<S, candle_core::Tensor>,
    path: &Path,
) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| {
        let cause = match e {
            candle_core::Error::Io(io) => anyhow::Error::new(io),
            other => anyhow::Error::new(other),
        };
        cause.context(format!("writing {}", path.display()))
    })
}

/// The blake3 hash of a file's bytes, as hex, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_and_a_linked_folder_is_not_walked_into() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("preset.yaml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_text_capped(&fifo, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "x").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub/link")).unwrap();
        let listed = walk(dir.path()).unwrap();
        assert!(listed.iter().any(|p| p.ends_with("sub/link")), "{listed:?}");
        assert!(!listed.iter().any(|p| p.ends_with("link/secret")), "walked into a link: {listed:?}");
        assert!(walk_following_links(dir.path()).unwrap().iter().any(|p| p.ends_with("link/secret")));
        assert_eq!(symlinks_in(dir.path()).unwrap(), vec![dir.path().join("sub/link")]);
    }
}
