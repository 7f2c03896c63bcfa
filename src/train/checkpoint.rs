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

/// Restore the newest readable checkpoint into the optimizer's parameters and
/// moments; returns its loop state, or `None` when there is none. A damaged
/// checkpoint (truncated, corrupted, incomplete, or any file's bytes no longer
/// those its manifest lists) is reported by name and the
/// previous one tried; nothing is applied from a checkpoint until all of it
/// has been read and checked, so a damaged one leaves the model untouched.
pub fn restore<S: DeserializeOwned>(
    cps: &Checkpoints,
    opt: &mut AdamW,
    device: &candle_core::Device,
) -> Result<Option<(u64, S)>> {
    for (step, dir) in cps.list().into_iter().rev() {
        match read::<S>(&dir, opt, device) {
            Ok((weights, moments, state)) => {
                for ((_, var), w) in opt.params().iter().zip(weights) {
                    var.set(&w)?;
                }
                opt.apply(moments);
                return Ok(Some((step, state)));
            }
            Err(e) => {
                eprintln!("checkpoint {} is damaged ({e:#}); trying the one before it", dir.display());
                tracing::warn!(checkpoint = %dir.display(), error = %format!("{e:#}"), "damaged checkpoint skipped");
            }
        }
    }
    if !cps.list().is_empty() {
        eprintln!("no checkpoint could be read: starting over from step 0");
    }
    Ok(None)
}

/// Everything a checkpoint holds, read and checked against the parameters.
fn read<S: DeserializeOwned>(
    dir: &Path,
    opt: &AdamW,
    device: &candle_core::Device,
) -> Result<(Vec<Tensor>, super::optim::SavedMoments, S)> {
    Checkpoints::verify(dir)?;
    let path = dir.join("model.safetensors");
    let saved = candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))?;
    let mut weights = Vec::new();
    for (name, var) in opt.params() {
        let w = saved.get(name).with_context(|| format!("{} lacks {name}", path.display()))?;
        if w.shape() != var.shape() {
            anyhow::bail!("{}: {name} has shape {:?}, the model {:?}", path.display(), w.dims(), var.dims());
        }
        weights.push(w.clone());
    }
    let moments = opt.read(dir, device)?;
    let state_path = dir.join("state.json");
    let state = serde_json::from_str(
        &fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{} is not valid", state_path.display()))?;
    Ok((weights, moments, state))
}

/// Drop log lines of steps after `step` (they are redone after a resume).
pub fn truncate_log(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut kept, mut damaged) = (String::new(), 0usize);
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        // A line cut by a kill, or bytes that are not a JSON object, are damage: they
        // are dropped (said below) rather than failing every later run.
        let value = std::str::from_utf8(line)
            .ok()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok().map(|v| (l, v)));
        match value {
            Some((l, v)) => match v["step"].as_u64() {
                Some(s) if s <= step => {
                    kept.push_str(l);
                    kept.push('\n');
                }
                Some(_) => {}
                None => damaged += 1,
            },
            None => damaged += 1,
        }
    }
    if damaged > 0 {
        eprintln!("warning: {}: dropped {damaged} damaged line(s); the log goes on from step {step}", path.display());
        tracing::warn!(path = %path.display(), damaged, "damaged log lines dropped");
    }
    let tmp = path.with_extension("jsonl.tmp");
    fs::write(&tmp, kept).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
