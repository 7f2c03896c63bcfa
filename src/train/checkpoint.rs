//! Training checkpoints: weights, optimizer moments and the loop's own state
//! (step, RNG, data position), written atomically into the stage's work folder.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::optim::AdamW;
use crate::model::Transformer;
use crate::pipeline::checkpoint::Checkpoints;

pub fn save<S: Serialize>(
    cps: &Checkpoints,
    step: u64,
    keep: usize,
    model: &Transformer,
    opt: &AdamW,
    state: &S,
) -> Result<()> {
    cps.save(step, keep, |dir| {
        let t: HashMap<String, Tensor> = model.tensors().into_iter().collect();
        candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
        opt.save(dir)?;
        fs::write(dir.join("state.json"), serde_json::to_string(state)?)?;
        Ok(())
    })?;
    Ok(())
}

/// Restore the newest checkpoint into `model` and `opt`; returns the loop state, or
/// `None` when there is no checkpoint.
pub fn restore<S: DeserializeOwned>(
    cps: &Checkpoints,
    model: &Transformer,
    opt: &mut AdamW,
) -> Result<Option<(u64, S)>> {
    let Some((step, dir)) = cps.latest() else { return Ok(None) };
    for (name, t) in candle_core::safetensors::load(dir.join("model.safetensors"), &model.device)? {
        model.weights.get(&name).with_context(|| format!("checkpoint has unknown weight {name}"))?.set(&t)?;
    }
    opt.load(&dir, &model.device)?;
    let state = serde_json::from_str(&fs::read_to_string(dir.join("state.json"))?)?;
    Ok(Some((step, state)))
}

/// Drop log lines of steps after `step` (they are redone after a resume).
pub fn truncate_log(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept: String = fs::read_to_string(path)?
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(path, kept)?;
    Ok(())
}
