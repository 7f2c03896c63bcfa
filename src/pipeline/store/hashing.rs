//! The hashing rules, once for every store: a file's blake3; a folder's
//! hash from its files' relative paths and hashes; an artifact's name from its
//! file name and content hash. The local cache remembers each file's hash by
//! path, size and mtime (DVC's rule), so a file that did not change is not
//! read again; a remote's manifest is checked with the same functions.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::common::fsutil::{hash_file, walk};

/// Whether `s` is a content hash as r1pipe writes them: 64 lowercase hex digits
/// (an artifact's, a file's, a fingerprint). Names read from a record, a
/// manifest or a path are checked with it before they become paths or keys.
pub fn is_content_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the memo remembers of a file: its hash, valid while its size and mtime stay.
#[derive(Serialize, Deserialize)]
pub(super) struct FileHashMemo {
    len: u64,
    mtime_ns: u128,
    hash: String,
}

/// An object's name: its file name and content hash, hashed together.
pub(crate) fn object_hash(file_name: &str, content: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"r1pipe-object-v1\0");
    h.update(file_name.as_bytes());
    h.update(b"\0");
    h.update(content.as_bytes());
    h.finalize().to_hex().to_string()
}

/// The content hash of a file, or of a folder from its files' relative paths
/// and hashes (each file's hash from `file_hash`).
pub(super) fn content_hash(path: &Path, file_hash: &mut dyn FnMut(&Path) -> Result<String>) -> Result<String> {
    if path.is_file() {
        return file_hash(path);
    }
    if !path.is_dir() {
        bail!("{} does not exist", path.display());
    }
    let mut files = Vec::new();
    // Inputs may be folders of links (a model in the hub cache); stored objects never
    // hold one (`object_damage` says so before their content is trusted).
    for p in crate::common::fsutil::walk_following_links(path)? {
        if p.is_file() {
            let rel = p.strip_prefix(path).expect("walk stays under its root");
            files.push((rel.to_string_lossy().to_string(), file_hash(&p)?));
        }
    }
    Ok(folder_hash(&files))
}

/// A folder's content hash from its files' relative paths and content hashes, in
/// the order a walk lists them (a remote's manifest is checked with it).
pub(crate) fn folder_hash(files: &[(String, String)]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"dir\0");
    for (rel, hash) in files {
        h.update(rel.as_bytes());
        h.update(b"\0");
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// The content hash of a file or folder, every byte read now.
pub(super) fn hash_path_uncached(path: &Path) -> Result<String> {
    content_hash(path, &mut |p| hash_file(p))
}

fn memo_key(path: &Path) -> Result<(String, u64, u128)> {
    let abs = fs::canonicalize(path)?;
    let meta = fs::metadata(&abs)?;
    let mtime_ns = meta.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok((abs.to_string_lossy().to_string(), meta.len(), mtime_ns))
}

pub(super) fn hash_file_memo(memo: &sled::Tree, path: &Path) -> Result<String> {
    let (key, len, mtime_ns) = memo_key(path)?;
    if let Some(bytes) = memo.get(key.as_bytes())? {
        if let Ok(m) = serde_json::from_slice::<FileHashMemo>(&bytes) {
            if m.len == len && m.mtime_ns == mtime_ns {
                return Ok(m.hash);
            }
        }
    }
    let hash = hash_file(path)?;
    memo.insert(key.as_bytes(), serde_json::to_vec(&FileHashMemo { len, mtime_ns, hash: hash.clone() })?)?;
    Ok(hash)
}

/// The remembered hashes of the files under `root` (relative path → memo entry).
pub(super) fn remembered_files(memo: &sled::Tree, root: &Path) -> Result<Vec<(PathBuf, FileHashMemo)>> {
    let files = if root.is_file() {
        vec![root.to_path_buf()]
    } else {
        walk(root)?.into_iter().filter(|p| p.is_file()).collect()
    };
    let mut out = Vec::new();
    for f in files {
        let (key, _, _) = memo_key(&f)?;
        if let Some(m) = memo.get(key.as_bytes())?.and_then(|b| serde_json::from_slice::<FileHashMemo>(&b).ok()) {
            let rel = f.strip_prefix(root).map(Path::to_path_buf).unwrap_or_default();
            out.push((rel, m));
        }
    }
    Ok(out)
}

/// Remember `files` (from [`remembered_files`]) under their new root, where their size and mtime still match.
pub(super) fn remember_at(memo: &sled::Tree, files: &[(PathBuf, FileHashMemo)], root: &Path) -> Result<()> {
    for (rel, m) in files {
        let path = if rel.as_os_str().is_empty() { root.to_path_buf() } else { root.join(rel) };
        let (key, len, mtime_ns) = memo_key(&path)?;
        if len == m.len && mtime_ns == m.mtime_ns {
            memo.insert(key.as_bytes(), serde_json::to_vec(m)?)?;
        }
    }
    Ok(())
}
