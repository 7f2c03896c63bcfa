//! JSONL reading with line numbers in every error, and buffered writing.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Each non-empty line parsed as `T`, with its 1-based line number.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: reading", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a valid JSON record", path.display(), i + 1))?;
        out.push((i + 1, v));
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
