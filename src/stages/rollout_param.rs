//! The `rollout:` parameter of `grpo`, `evaluate` and `infer`: an
//! OpenAI-compatible server to sample from. Its URL and model enter the
//! fingerprint; how it is reached (API key variable, timeouts, retries,
//! concurrency, adapter folder) does not, so tuning those never reruns a stage.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::common::{typed, ParamError};
use crate::pipeline::StageContext;
use crate::rollout::ServerConfig;

/// The server settings under `key`, checked; `None` when absent.
pub fn check(params: &Value, key: &str) -> Result<Option<ServerConfig>, Vec<ParamError>> {
    let Some(v) = params.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if v.get("api_key").is_some() {
        return Err(vec![ParamError::new(
            format!("{key}.api_key"),
            "an API key in the pipeline file would be copied into the cache's records and logs",
        )
        .hint("put it in an environment variable and name the variable: `api_key_env: VLLM_API_KEY`")]);
    }
    let cfg: ServerConfig = typed(v).map_err(|mut e| {
        e.path = if e.path.is_empty() { key.to_string() } else { format!("{key}.{}", e.path) };
        vec![e]
    })?;
    let errors: Vec<ParamError> =
        cfg.problems().into_iter().map(|(k, m)| ParamError::new(format!("{key}.{k}"), m)).collect();
    if errors.is_empty() {
        Ok(Some(cfg))
    } else {
        Err(errors)
    }
}

/// The parameters as they enter the fingerprint: `key`'s transport settings left out.
pub fn fingerprint_params(params: &Value, key: &str) -> Value {
    let mut p = params.clone();
    if let Some(Value::Object(r)) = p.get_mut(key) {
        for k in ServerConfig::TRANSPORT_KEYS {
            r.remove(*k);
        }
    }
    p
}

/// Sampling with tools on the local model answers calls inside the batch
/// (since 2026-12-08; before, in waves that re-prefilled each row), which draws
/// the random numbers of sampled (temperature > 0) completions differently: such
/// a stage's result is a new one, so its fingerprint carries the sampler's mark.
/// Greedy completions are the same tokens either way and keep their fingerprints,
/// as do stages without tools.
pub fn mark_tool_sampler(params: &mut Value, default_temperature: f64) {
    let tools = params.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty());
    let temperature = params.get("temperature").and_then(Value::as_f64).unwrap_or(default_temperature);
    if let (true, true, Some(m)) = (tools, temperature > 0.0, params.as_object_mut()) {
        m.insert("tool_sampler".into(), Value::String("in-batch".into()));
    }
}

/// Where LoRA adapters are written for the server: `adapter_dir` (absolute, as
/// the server must read it) or the stage's work folder.
pub fn adapter_dir(ctx: &StageContext, cfg: &ServerConfig) -> Result<PathBuf> {
    let dir = match &cfg.adapter_dir {
        Some(d) => ctx.project.local_path(d).unwrap_or_else(|| d.into()),
        None => ctx.work_dir.join("adapters"),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::canonicalize(&dir)?)
}

/// A prefix for the adapter names of this stage's run: the stage and its work
/// folder (which holds the fingerprint), so that two runs on one server differ.
pub fn adapter_prefix(ctx: &StageContext) -> String {
    let h = blake3::hash(ctx.work_dir.to_string_lossy().as_bytes()).to_hex();
    format!("r1pipe-{}-{}", ctx.stage, &h[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(params: Value, default_temperature: f64) -> bool {
        let mut p = params;
        mark_tool_sampler(&mut p, default_temperature);
        p.get("tool_sampler").is_some()
    }

    #[test]
    fn only_sampled_stages_with_tools_carry_the_tool_samplers_mark() {
        let tools = serde_json::json!(["calculator"]);
        // GRPO samples at 1.0 unless told otherwise.
        assert!(marked(serde_json::json!({ "tools": tools }), 1.0));
        assert!(!marked(serde_json::json!({ "tools": [] }), 1.0), "no tools: the sampler is unchanged");
        assert!(!marked(serde_json::json!({}), 1.0));
        // Evaluation is greedy unless told otherwise: the same tokens, the same fingerprint.
        assert!(!marked(serde_json::json!({ "tools": tools }), 0.0));
        assert!(marked(serde_json::json!({ "tools": tools, "temperature": 0.7 }), 0.0));
    }
}
