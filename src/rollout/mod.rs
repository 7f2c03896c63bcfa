//! Sampling completions on an OpenAI-compatible inference server (vLLM,
//! SGLang, llama.cpp's server) instead of the training process: the
//! [`client`] speaks `/v1/completions` and vLLM's runtime LoRA API with
//! bounded retries, and [`Sampler`] gives GRPO, evaluate and infer one way to
//! ask for completions whether they come from the local model or a server.

pub mod calculator;
pub mod client;
mod sampler;
pub mod tools;

pub use client::{Choice, Client, CompletionRequest};
pub use sampler::Sampler;

use serde::{Deserialize, Serialize};

/// Where rollouts come from: the `rollout:` parameter of `grpo`, `evaluate` and `infer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The API's base, e.g. `http://localhost:8000/v1`.
    pub url: String,
    /// The served model's name (`vllm serve NAME`); with LoRA, the base that adapters apply to.
    pub model: String,
    /// The environment variable holding the API key (sent as a bearer token), if
    /// the server wants one. The key itself never enters the pipeline file, the
    /// fingerprint or the logs.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Seconds one request may take (a round of long completions on a busy server is slow).
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Requests in flight at once (one per prompt, each asking for the whole group).
    #[serde(default = "d_concurrency")]
    pub max_concurrency: usize,
    /// Retries of a request that failed in a way that may pass (connection refused,
    /// timeout, 429, 5xx, a malformed answer), with doubling waits from `retry_backoff_s`.
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    #[serde(default = "d_backoff")]
    pub retry_backoff_s: f64,
    /// LoRA runs: where adapters are written for the server to load. It must be
    /// readable by the server at the same path (a shared filesystem when the
    /// server runs elsewhere). Default: the stage's work folder.
    #[serde(default)]
    pub adapter_dir: Option<String>,
}

fn d_timeout() -> f64 {
    600.0
}
fn d_concurrency() -> usize {
    8
}
fn d_retries() -> u32 {
    5
}
fn d_backoff() -> f64 {
    1.0
}

impl ServerConfig {
    /// The keys of the `rollout:` mapping.
    pub const KEYS: &'static [&'static str] = &[
        "url",
        "model",
        "api_key_env",
        "timeout_s",
        "max_concurrency",
        "max_retries",
        "retry_backoff_s",
        "adapter_dir",
    ];

    /// Keys that change how results are fetched, not what they are: left out of
    /// the stage's fingerprint, so tuning them does not rerun a finished stage.
    pub const TRANSPORT_KEYS: &'static [&'static str] =
        &["api_key_env", "timeout_s", "max_concurrency", "max_retries", "retry_backoff_s", "adapter_dir"];

    /// Problems with the settings, as (key under `rollout.`, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            out.push((
                "url".into(),
                format!("`{}` is not an http(s) URL; write the API's base, e.g. http://localhost:8000/v1", self.url),
            ));
        }
        if self.model.trim().is_empty() {
            out.push(("model".into(), "names no model: give the name the server serves (`vllm serve NAME`)".into()));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            out.push(("timeout_s".into(), "must be a positive number of seconds".into()));
        }
        if self.max_concurrency == 0 {
            out.push(("max_concurrency".into(), "must be at least 1".into()));
        }
        if !(self.retry_backoff_s.is_finite() && self.retry_backoff_s >= 0.0) {
            out.push(("retry_backoff_s".into(), "must be ≥ 0 seconds".into()));
        }
        if let Some(v) = &self.api_key_env {
            if v.is_empty() || v.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                out.push((
                    "api_key_env".into(),
                    format!("`{v}` is not an environment variable name (letters, digits, _)"),
                ));
            }
        }
        out
    }
}
