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
use crate::common::checkpoints::Checkpoints;

/// Saves what the optimizer trains (every weight, or only the LoRA adapters) with its moments.
pub fn save<S: Serialize>(cps: &Checkpoints, step: u64, keep: usize, opt: &AdamW, state: &S) -> Result<()> {
    cps.save(step, keep, |dir| {
        let t: HashMap<String, Tensor> = opt.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
        opt.save(dir)?;
        fs::write(dir.join("state.json"), serde_json::to_string(state)?)?;
        Ok(())
    })?;
    Ok(())
}

/// Restore the newest checkpoint into the optimizer's parameters and moments;
/// returns the loop state, or `None` when there is no checkpoint.
pub fn restore<S: DeserializeOwned>(
    cps: &Checkpoints,
    opt: &mut AdamW,
    device: &candle_core::Device,
) -> Result<Option<(u64, S)>> {
    let Some((step, dir)) = cps.latest() else { return Ok(None) };
    let saved = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
    for (name, var) in opt.params() {
        var.set(saved.get(name).with_context(|| format!("checkpoint {} lacks {name}", dir.display()))?)?;
    }
    opt.load(&dir, device)?;
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
