//! `download`: GSM8K-shaped data (`{question, answer}`) from the hub (parquet)
//! or from a local folder of `train.jsonl`/`test.jsonl`, as JSONL split files.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::common::{typed, ParamError};
use crate::data::{jsonl, qa};
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// A hub dataset id (`openai/gsm8k`) or a local folder of `<split>.jsonl` files,
    /// told apart as model references are: a folder that exists, or a path starting
    /// with `.`, `/` or `~`, is local; `OWNER/NAME` otherwise is the hub.
    pub dataset: Option<String>,
    /// The dataset's config (a folder of the hub repo).
    #[serde(default = "default_config")]
    pub config: String,
    #[serde(default = "default_revision")]
    pub revision: String,
    /// A local folder with `<split>.jsonl` files (never the hub).
    pub path: Option<String>,
    #[serde(default = "default_splits")]
    pub splits: Vec<String>,
}

/// Where a data set comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Local(PathBuf),
    Hub(String),
}

impl Params {
    /// The source the parameters name, or the parameter error that says why none.
    pub fn source(&self, project: &Project) -> Result<Option<Source>, ParamError> {
        match (&self.dataset, &self.path) {
            (Some(_), Some(_)) => {
                Err(ParamError::new("path", "give either `dataset` (hub or folder) or `path`, not both"))
            }
            (None, None) => Err(ParamError::new("", "no source")
                .hint("add `dataset: openai/gsm8k` (hub) or `dataset: data/gsm8k/` (a local folder of JSONL)")),
            (None, Some(path)) => Ok(project.local_path(path).map(Source::Local)),
            (Some(value), None) => {
                let Some(local) = project.local_path(value) else { return Ok(None) };
                Source::parse(value, local)
                    .map(Some)
                    .map_err(|e| e.hint("write OWNER/NAME, e.g. openai/gsm8k, or a local folder"))
            }
        }
    }
}

impl Source {
    /// `value` as written, `local` the path it would name (anchored at the project root).
    fn parse(value: &str, local: PathBuf) -> Result<Source, ParamError> {
        let path_like = value.starts_with('.') || value.starts_with('/') || value.starts_with('~');
        if local.is_dir() || path_like {
            return Ok(Source::Local(local));
        }
        let parts: Vec<&str> = value.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(ParamError::new(
                "dataset",
                format!("`{value}` is neither an existing folder nor a hub id, and {} does not exist", local.display()),
            ));
        }
        // `data/gsm8k` has a hub id's shape, but an existing folder `data/` says it is a path.
        if local.parent().is_some_and(Path::is_dir) {
            return Ok(Source::Local(local));
        }
        Ok(Source::Hub(value.to_string()))
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            dataset: None,
            config: default_config(),
            revision: default_revision(),
            path: None,
            splits: default_splits(),
        }
    }
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

    fn parameters(&self) -> Value {
        serde_json::to_value(Params::default()).unwrap_or_default()
    }
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let mut req = Requirements::default();
        if let Some(Source::Local(dir)) = p.source(project).map_err(|e| vec![e])? {
            if dir.is_dir() {
                let missing: Vec<String> = p
                    .splits
                    .iter()
                    .filter(|s| !dir.join(format!("{s}.jsonl")).is_file())
                    .map(|s| format!("{s}.jsonl"))
                    .collect();
                if !missing.is_empty() {
                    return Err(vec![ParamError::new(
                        if p.path.is_some() { "path" } else { "dataset" },
                        format!("{} has no {}", dir.display(), missing.join(", ")),
                    )
                    .hint("the folder must hold one <split>.jsonl per split in `splits`")]);
                }
            }
            req.local_paths.push((if p.path.is_some() { "path" } else { "dataset" }.into(), dir));
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
            let rows = match p.source(&ctx.project).map_err(|e| anyhow::anyhow!("{}", e.message))? {
                Some(Source::Local(dir)) => qa::read_local_split(&dir, split)?,
                Some(Source::Hub(id)) => qa::read_hub_split(&id, &p.config, &p.revision, split)?,
                None => bail!("the data set's source was not bound before running"),
            };
            counts.insert(split.clone(), json!(rows.len()));
            jsonl::write(&out.join(format!("{split}.jsonl")), &rows)?;
            tracing::info!(split, rows = rows.len(), "downloaded split");
        }
        ctx.set_metrics(json!({ "rows": counts }));
        Ok(())
    }
}
