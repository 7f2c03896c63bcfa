//! `download`: GSM8K-shaped data (`{question, answer}`) from the hub (parquet)
//! or from a local folder of `train.jsonl`/`test.jsonl`, as JSONL split files.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::common::{typed, ParamError};
use crate::data::jsonl;
use crate::hub::HubRepo;
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// A hub dataset id, e.g. `openai/gsm8k`.
    pub dataset: Option<String>,
    /// The dataset's config (a folder of the hub repo).
    #[serde(default = "default_config")]
    pub config: String,
    #[serde(default = "default_revision")]
    pub revision: String,
    /// A local folder with `<split>.jsonl` files.
    pub path: Option<String>,
    #[serde(default = "default_splits")]
    pub splits: Vec<String>,
}

fn default_config() -> String {
    "main".into()
}
fn default_revision() -> String {
    "main".into()
}
fn default_splits() -> Vec<String> {
    vec!["train".into(), "test".into()]
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub question: String,
    pub answer: String,
}

pub struct Download;

const OUTPUTS: &[OutputSpec] =
    &[OutputSpec::dir("dataset", "a folder of <split>.jsonl files, one {question, answer} per line")];

impl StageKind for Download {
    fn info(&self) -> &'static KindInfo {
        &KindInfo {
            name: "download",
            version: 1,
            description: "fetch a {question, answer} data set from the hub (parquet) or a local folder of JSONL",
            outputs: OUTPUTS,
        }
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let mut req = Requirements::default();
        match (&p.dataset, &p.path) {
            (Some(_), Some(_)) => {
                return Err(vec![ParamError::new("path", "give either `dataset` (hub) or `path` (local), not both")])
            }
            (None, None) => {
                return Err(vec![ParamError::new("", "no source")
                    .hint("add `dataset: openai/gsm8k` (hub) or `path: data/gsm8k/` (local JSONL)")])
            }
            (None, Some(path)) => {
                if let Some(dir) = project.local_path(path) {
                    if dir.is_dir() {
                        let missing: Vec<String> = p
                            .splits
                            .iter()
                            .filter(|s| !dir.join(format!("{s}.jsonl")).is_file())
                            .map(|s| format!("{s}.jsonl"))
                            .collect();
                        if !missing.is_empty() {
                            return Err(vec![ParamError::new(
                                "path",
                                format!("{} has no {}", dir.display(), missing.join(", ")),
                            )
                            .hint("the folder must hold one <split>.jsonl per split in `splits`")]);
                        }
                    }
                    req.local_paths.push(("path".into(), dir));
                }
            }
            (Some(id), None) => {
                if id.split('/').count() != 2 {
                    return Err(vec![ParamError::new("dataset", format!("`{id}` is not a hub id"))
                        .hint("write OWNER/NAME, e.g. openai/gsm8k")]);
                }
            }
        }
        if p.splits.is_empty() {
            return Err(vec![ParamError::new("splits", "no splits requested")]);
        }
        Ok(req)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let out = ctx.output_path("dataset");
        fs::create_dir_all(&out)?;
        let mut counts = serde_json::Map::new();
        for split in &p.splits {
            ctx.cancel.check()?;
            let rows = match (&p.path, &p.dataset) {
                (Some(dir), _) => {
                    let dir = ctx.project.local_path(dir).expect("a local path");
                    read_local(&dir.join(format!("{split}.jsonl")))?
                }
                (None, Some(id)) => read_hub(id, &p.config, &p.revision, split)?,
                (None, None) => unreachable!("checked before running"),
            };
            counts.insert(split.clone(), json!(rows.len()));
            jsonl::write(&out.join(format!("{split}.jsonl")), &rows)?;
            tracing::info!(split, rows = rows.len(), "downloaded split");
        }
        ctx.set_metrics(json!({ "rows": counts }));
        Ok(())
    }
}

fn read_local(path: &Path) -> Result<Vec<Row>> {
    Ok(jsonl::read::<Row>(path)?.into_iter().map(|(_, r)| r).collect())
}

/// A split from the hub: the parquet files of `<config>/<split>-*.parquet`, in order.
fn read_hub(id: &str, config: &str, revision: &str, split: &str) -> Result<Vec<Row>> {
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
pub fn read_parquet(path: &Path) -> Result<Vec<Row>> {
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
            (Some(question), Some(answer)) => rows.push(Row { question, answer }),
            _ => bail!("{}: row {} lacks a string `question` or `answer` column", path.display(), i + 1),
        }
    }
    Ok(rows)
}
