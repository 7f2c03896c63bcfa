//! `r1pipe fetch`: bring a model or a data set from the Hugging Face Hub ahead
//! of a run (on a login node before cluster jobs without internet, or to make
//! the offline folders the quickstart and the tests read), through the same
//! hub client the stages use (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use r1pipe::data::{jsonl, qa};
use r1pipe::model::load::fetch_hub_files;

#[derive(Subcommand)]
pub enum FetchCommand {
    /// A model's config, tokenizer and safetensors, into the hub cache and (with --out) a folder
    Model {
        /// OWNER/NAME[@REVISION], e.g. HuggingFaceTB/SmolLM2-135M-Instruct
        id: String,
        /// Also copy the files into this folder (a model folder any stage can name)
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Only the config and tokenizer files, not the weights
        #[arg(long)]
        no_weights: bool,
    },
    /// A {question, answer} data set's splits (parquet on the hub), into the hub cache and (with --out) JSONL files
    Dataset {
        /// OWNER/NAME, e.g. openai/gsm8k
        id: String,
        /// The data set's config (a folder of the hub repository)
        #[arg(long, default_value = "main")]
        config: String,
        #[arg(long, default_value = "main")]
        revision: String,
        /// Comma-separated splits
        #[arg(long, default_value = "train,test", value_delimiter = ',')]
        splits: Vec<String>,
        /// Write <split>.jsonl files into this folder (what `download` reads as `dataset: DIR`)
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
}

pub fn run(command: FetchCommand) -> Result<i32> {
    match command {
        FetchCommand::Model { id, out, no_weights } => {
            let (repo, revision) = split_revision(&id)?;
            let (dir, names) = fetch_hub_files(repo, revision, !no_weights)?;
            match out {
                Some(out) => {
                    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
                    for name in &names {
                        copy_atomically(&dir.join(name), &out.join(name))?;
                    }
                    eprintln!("fetch: {id}: {} into {}", names.join(", "), out.display());
                    println!("{}", out.display());
                }
                None => {
                    eprintln!("fetch: {id}: {} in the hub cache", names.join(", "));
                    println!("{}", dir.display());
                }
            }
        }
        FetchCommand::Dataset { id, config, revision, splits, out } => {
            split_revision(&id)?;
            if let Some(out) = &out {
                fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            }
            for split in &splits {
                let rows = qa::read_hub_split(&id, &config, &revision, split)?;
                match &out {
                    Some(out) => {
                        let path = out.join(format!("{split}.jsonl"));
                        let partial = out.join(format!(".{split}.jsonl.partial"));
                        jsonl::write(&partial, &rows)?;
                        fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
                        eprintln!("fetch: {id} {config}/{split}: {} rows into {}", rows.len(), path.display());
                    }
                    None => eprintln!("fetch: {id} {config}/{split}: {} rows in the hub cache", rows.len()),
                }
            }
            if let Some(out) = out {
                println!("{}", out.display());
            }
        }
    }
    Ok(0)
}

/// `OWNER/NAME[@REVISION]`, checked.
fn split_revision(id: &str) -> Result<(&str, &str)> {
    let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || revision.is_empty() {
        bail!(
            "`{id}` is not a hub id: write OWNER/NAME or OWNER/NAME@REVISION, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
        );
    }
    Ok((repo, revision))
}

/// Copy through a temporary name beside the target, so an interrupted fetch
/// never leaves a short file under the real name.
fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    let name = to.file_name().context("a file name")?.to_string_lossy();
    let partial = to.with_file_name(format!(".{name}.partial"));
    fs::copy(from, &partial).with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
    fs::rename(&partial, to).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}
