//! TensorBoard's event files, written directly: no crate for them is kept up
//! (the `tensorboard-rs` crate was last released in 2020 and pulls a
//! protobuf toolchain), and the format is small and fixed. What is written
//! follows its published definitions:
//!
//! - the record framing of TFRecord files (tensorflow/core/lib/io/record_writer.cc):
//!   `u64 length`, `u32 masked CRC-32C of the length`, the bytes, `u32 masked
//!   CRC-32C of the bytes`, little-endian;
//! - `Event` (tensorflow/core/util/event.proto): `wall_time` (1, double),
//!   `step` (2, int64), `file_version` (3, string, the first event:
//!   `brain.Event:2`), `summary` (5);
//! - `Summary` (tensorflow/core/framework/summary.proto): repeated `value`
//!   (1), each `tag` (1, string) and `simple_value` (2, float), which
//!   TensorBoard reads as a scalar.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// An open event file: one per attempt of a stage (a resumed run adds a
/// file; TensorBoard reads a folder's files as one run).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard's writers
    /// name theirs: `events.out.tfevents.<seconds>.<host>.<pid>`.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = hostname();
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        let mut event = Vec::new();
        field_double(&mut event, 1, wall_time());
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step, as one event; flushed, so a TensorBoard watching
    /// the folder shows the step at once.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        field_double(&mut event, 1, wall_time());
        key(&mut event, 2, 0);
        varint(&mut event, step);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&framed)
            .and_then(|_| self.out.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// This machine's name, as TensorBoard's writers put it in file names.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).to_string() } else { String::new() };
    // A file name: nothing that separates paths.
    let name: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// TFRecord's CRC: CRC-32C, rotated right by 15 bits plus a constant (a CRC
/// of data that holds CRCs is then not trivially a CRC).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A protobuf field key: the field number and its wire type.
fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn field_double(out: &mut Vec<u8>, field: u64, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crc_mask_and_varints_match_the_format() {
        // CRC-32C of "123456789" is 0xE3069283 (its standard check value);
        // masked as record_writer.cc masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }

    #[test]
    fn records_frame_their_bytes_with_length_and_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss".into(), 0.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Walk the records back: each length and checksum is what the reader checks.
        let mut at = 0;
        let mut records = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 2);
        assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
        // step 7 (field 2, varint) and the tag, and 0.5 as a float after field 2 of the value.
        assert!(records[1].windows(2).any(|w| w == [0x10, 7]));
        assert!(records[1].windows(10).any(|w| w == b"train/loss"));
        assert!(records[1].windows(5).any(|w| w == [0x15, 0, 0, 0, 0x3f]));
    }
}
