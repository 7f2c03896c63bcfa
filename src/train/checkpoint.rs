//! Training checkpoints: weights, optimizer moments, the loop's own state
//! (step, RNG, data position) and any tensors the algorithm keeps besides the
//! weights (GRPO's synced reference), written atomically into the stage's work folder.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::optim::AdamW;
use crate::common::checkpoints::Checkpoints;

/// The algorithm's own tensors in a checkpoint (absent when it keeps none).
const ALGORITHM_TENSORS: &str = "algorithm.safetensors";

/// What a checkpoint gives back: its step, the loop state and the algorithm's tensors.
pub type Restored<S> = (u64, S, HashMap<String, Tensor>);

/// Saves what the optimizer trains (every weight, or only the LoRA adapters)
/// with its moments, the loop state and the algorithm's `tensors`.
pub fn save<S: Serialize>(
    cps: &Checkpoints,
    step: u64,
    keep: usize,
    opt: &AdamW,
    state: &S,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    cps.save(step, keep, |dir| {
        write_weights(dir, opt)?;
        opt.save(dir)?;
        crate::common::fsutil::write_file(&dir.join("state.json"), serde_json::to_string(state)?)?;
        if !tensors.is_empty() {
            crate::common::fsutil::save_safetensors(tensors, &dir.join(ALGORITHM_TENSORS))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Save only the trainable weights as `step`'s folder of `cps` (the best evaluation's).
pub fn save_weights(cps: &Checkpoints, step: u64, opt: &AdamW) -> Result<()> {
    cps.save(step, 1, |dir| write_weights(dir, opt))?;
    Ok(())
}

fn write_weights(dir: &Path, opt: &AdamW) -> Result<()> {
    let t: HashMap<String, Tensor> = opt.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    crate::common::fsutil::save_safetensors(&t, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Set the trainable weights from `step`'s folder of `cps` (written by [`save_weights`]), checked whole first.
pub fn load_weights(cps: &Checkpoints, step: u64, opt: &AdamW, device: &candle_core::Device) -> Result<()> {
    let dir = cps
        .list()
        .into_iter()
        .find(|(s, _)| *s == step)
        .map(|(_, d)| d)
        .with_context(|| format!("the weights of step {step} are missing from {}", cps.dir().display()))?;
    Checkpoints::verify(&dir).with_context(|| format!("{} is damaged", dir.display()))?;
    for ((_, var), w) in opt.params().iter().zip(read_weights(&dir, opt, device)?) {
        var.set(&w)?;
    }
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
) -> Result<Option<Restored<S>>> {
    for (step, dir) in cps.list().into_iter().rev() {
        match read::<S>(&dir, opt, device) {
            Ok(Contents(weights, moments, state, tensors)) => {
                for ((_, var), w) in opt.params().iter().zip(weights) {
                    var.set(&w)?;
                }
                opt.apply(moments);
                return Ok(Some((step, state, tensors)));
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

/// Everything a checkpoint holds: weights, moments, loop state, the algorithm's tensors.
struct Contents<S>(Vec<Tensor>, super::optim::SavedMoments, S, HashMap<String, Tensor>);

/// Everything a checkpoint holds, read and checked against the parameters.
fn read<S: DeserializeOwned>(dir: &Path, opt: &AdamW, device: &candle_core::Device) -> Result<Contents<S>> {
    Checkpoints::verify(dir)?;
    let weights = read_weights(dir, opt, device)?;
    let moments = opt.read(dir, device)?;
    let state_path = dir.join("state.json");
    let state = serde_json::from_str(
        &fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{} is not valid", state_path.display()))?;
    let tensors_path = dir.join(ALGORITHM_TENSORS);
    let tensors = if tensors_path.exists() {
        candle_core::safetensors::load(&tensors_path, device)
            .with_context(|| format!("reading {}", tensors_path.display()))?
    } else {
        HashMap::new()
    };
    Ok(Contents(weights, moments, state, tensors))
}

/// A folder's `model.safetensors`, one tensor per trainable parameter, shapes checked.
fn read_weights(dir: &Path, opt: &AdamW, device: &candle_core::Device) -> Result<Vec<Tensor>> {
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
    Ok(weights)
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
