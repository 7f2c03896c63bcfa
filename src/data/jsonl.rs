//! JSONL reading with line numbers in every error, and buffered writing.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The longest line read as one record. A GSM8K row is ~1 KB and an SFT example
/// of 1024 tokens ~5 KB; a longer line is a wrong file (a JSON array on one line,
/// a binary file), and reading on would hold all of it in memory first.
pub const MAX_LINE_BYTES: u64 = 16 << 20;

/// Each non-empty line parsed as `T`, with its 1-based line number.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(f);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}:{n}: reading", path.display()))?;
        if read == 0 {
            break;
        }
        if buf.len() as u64 > MAX_LINE_BYTES {
            bail!(
                "{}:{n}: the line is longer than {} MiB, the most one record may take; \
                 each line should be one JSON object (is this a JSON array or a binary file?)",
                path.display(),
                MAX_LINE_BYTES >> 20
            );
        }
        let line = std::str::from_utf8(&buf).map_err(|e| {
            anyhow!("{}:{n}: reading: the line is not valid UTF-8 (byte {})", path.display(), e.valid_up_to())
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v =
            serde_json::from_str(line).with_context(|| format!("{}:{n}: not a valid JSON record", path.display()))?;
        out.push((n, v));
    }
    Ok(out)
}

pub fn write<T: Serialize>(path: &Path, rows: impl IntoIterator<Item = T>) -> Result<usize> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    let mut n = 0;
    for r in rows {
        serde_json::to_writer(&mut w, &r)?;
        w.write_all(b"\n")?;
        n += 1;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(n)
}

/// Appends one record per call, flushing each line: for logs that a kill must not truncate mid-record.
pub struct Appender {
    w: BufWriter<File>,
}

impl Appender {
    pub fn open(path: &Path) -> Result<Appender> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Appender { w: BufWriter::new(f) })
    }

    pub fn append<T: Serialize>(&mut self, row: &T) -> Result<()> {
        serde_json::to_writer(&mut self.w, row)?;
        self.w.write_all(b"\n")?;
        self.w.flush()?;
        Ok(())
    }
}
