//! The Hugging Face Hub through hf-hub: endpoint from `HF_ENDPOINT`, cache from
//! `HF_HOME`, token from `HF_TOKEN`, and `HF_HUB_OFFLINE=1` to use only what is cached.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

pub fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("yes"))
}

fn api() -> Result<Api> {
    let mut b = ApiBuilder::from_env().with_progress(false);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        b = b.with_token(Some(token));
    }
    b.build().context("setting up the Hugging Face Hub client")
}

/// A repository on the hub (model or dataset) at a revision.
pub struct HubRepo {
    repo: Repo,
}

impl HubRepo {
    pub fn model(id: &str, revision: &str) -> HubRepo {
        HubRepo { repo: Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string()) }
    }
    pub fn dataset(id: &str, revision: &str) -> HubRepo {
        HubRepo { repo: Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string()) }
    }

    fn online(&self) -> Result<ApiRepo> {
        Ok(api()?.repo(self.repo.clone()))
    }

    /// The repository's file names: from the hub, or offline from the hub cache's snapshot.
    pub fn files(&self) -> Result<Vec<String>> {
        if offline() {
            return self.cached_files().with_context(|| {
                format!(
                    "HF_HUB_OFFLINE is set and {} at revision {} is not in the hub cache",
                    self.repo.url(),
                    self.repo.revision()
                )
            });
        }
        let info = self
            .online()?
            .info()
            .map_err(unreachable)
            .with_context(|| format!("listing {} on {}", self.repo.url(), endpoint()))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// A file of the repository, from the local hub cache when there, else downloaded into it.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = Cache::from_env().repo(self.repo.clone()).get(file) {
            return Ok(p);
        }
        if offline() {
            bail!("HF_HUB_OFFLINE is set and {file} of {} is not in the hub cache", self.repo.url());
        }
        self.online()?
            .get(file)
            .map_err(unreachable)
            .with_context(|| format!("downloading {file} of {} from {}", self.repo.url(), endpoint()))
    }
}

impl HubRepo {
    /// Files of the cached snapshot that `refs/<revision>` points at.
    fn cached_files(&self) -> Result<Vec<String>> {
        let folder = Cache::from_env().path().join(self.repo.folder_name());
        let commit = std::fs::read_to_string(folder.join("refs").join(self.repo.revision()))?;
        let snapshot = folder.join("snapshots").join(commit.trim());
        let mut out = Vec::new();
        for p in crate::common::fsutil::walk(&snapshot)? {
            if p.is_file() || p.is_symlink() {
                out.push(p.strip_prefix(&snapshot)?.to_string_lossy().to_string());
            }
        }
        Ok(out)
    }
}

/// A failed hub request, with what to do when the hub cannot be reached at all
/// (a machine without internet, a firewall): the ways around it, named once here.
fn unreachable(e: hf_hub::api::sync::ApiError) -> anyhow::Error {
    use hf_hub::api::sync::ApiError;
    let transport = match &e {
        ApiError::RequestError(r) => matches!(**r, ureq::Error::Transport(_)),
        ApiError::TooManyRetries(inner) => {
            matches!(&**inner, ApiError::RequestError(r) if matches!(**r, ureq::Error::Transport(_)))
        }
        _ => false,
    };
    let err = anyhow::Error::new(e);
    if transport {
        // The transport error's chain repeats the URL at every level: its root says what happened.
        anyhow::anyhow!(
            "the hub at {} cannot be reached ({}): set HF_ENDPOINT to a mirror you can reach, or \
             HF_HUB_OFFLINE=1 to use only what the hub cache (HF_HOME) holds, or name a local folder instead of a hub id",
            endpoint(),
            err.root_cause()
        )
    } else {
        err
    }
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}
