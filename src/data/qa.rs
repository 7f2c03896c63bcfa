//! Question–answer data sets (GSM8K's shape, `{question, answer}`) as they are
//! published: a local folder of `<split>.jsonl`, or a hub dataset's parquet files
//! under `<config>/<split>-*.parquet`.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::jsonl;
use crate::hub::HubRepo;

#[derive(Debug, Serialize, Deserialize)]
pub struct QaRow {
    pub question: String,
    pub answer: String,
}

/// `<dir>/<split>.jsonl`.
pub fn read_local_split(dir: &Path, split: &str) -> Result<Vec<QaRow>> {
    Ok(jsonl::read::<QaRow>(&dir.join(format!("{split}.jsonl")))?.into_iter().map(|(_, r)| r).collect())
}

/// A split from the hub: the parquet files of `<config>/<split>-*.parquet`, in order.
pub fn read_hub_split(id: &str, config: &str, revision: &str, split: &str) -> Result<Vec<QaRow>> {
    let repo = HubRepo::dataset(id, revision);
    let prefix = format!("{config}/{split}-");
    let mut files: Vec<String> =
        repo.files()?.into_iter().filter(|f| f.starts_with(&prefix) && f.ends_with(".parquet")).collect();
    files.sort();
    if files.is_empty() {
        bail!("the hub dataset {id} (revision {revision}) has no {prefix}*.parquet: check `config` and `splits`");
    }
    let mut rows = Vec::new();
    for f in files {
        let local = repo.get(&f)?;
        rows.extend(read_parquet(&local).with_context(|| format!("reading {f} of {id}"))?);
    }
    Ok(rows)
}

/// `{question, answer}` rows of a parquet file with those two string columns.
pub fn read_parquet(path: &Path) -> Result<Vec<QaRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let reader = SerializedFileReader::new(fs::File::open(path)?)?;
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None)?.enumerate() {
        let row = row?;
        let (mut q, mut a) = (None, None);
        for (name, field) in row.get_column_iter() {
            if let Field::Str(s) = field {
                match name.as_str() {
                    "question" => q = Some(s.clone()),
                    "answer" => a = Some(s.clone()),
                    _ => {}
                }
            }
        }
        match (q, a) {
            (Some(question), Some(answer)) => rows.push(QaRow { question, answer }),
            _ => bail!("{}: row {} lacks a string `question` or `answer` column", path.display(), i + 1),
        }
    }
    Ok(rows)
}
