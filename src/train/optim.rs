//! AdamW (decoupled weight decay, bias-corrected moments, as PyTorch's) over
//! the trainable parameters only, and global-norm gradient clipping. The
//! learning-rate schedules are in `schedule`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::kernels::inplace::{self, Coefficients};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One optimizer over named trainable parameters. Weight decay skips biases
/// and norm weights, as Hugging Face's Trainer does.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, m, v, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads` (by parameter name) at learning rate `lr`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (name, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(name) else { continue };
            let decay = if decays(name) { c.weight_decay } else { 0.0 };
            let k = Coefficients {
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                bias_correction1: bc1 as f32,
                bias_correction2: bc2 as f32,
                eps: c.eps as f32,
                lr: lr as f32,
                weight_decay: decay as f32,
            };
            inplace::adamw(p, &mut self.m[i], &mut self.v[i], g, k)?;
        }
        Ok(())
    }

    /// The moments and step, for a checkpoint.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut t = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        crate::common::fsutil::save_safetensors(&t, &dir.join("optimizer.safetensors"))?;
        crate::common::fsutil::write_file(
            &dir.join("optimizer.json"),
            serde_json::to_string(&(self.step, &self.cfg))?,
        )?;
        Ok(())
    }

    /// The moments and step of a checkpoint, read and checked whole before any is applied.
    pub fn read(&self, dir: &Path, device: &Device) -> Result<SavedMoments> {
        let path = dir.join("optimizer.safetensors");
        let t = candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))?;
        let mut m = Vec::with_capacity(self.params.len());
        let mut v = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            for (out, key) in [(&mut m, format!("m.{name}")), (&mut v, format!("v.{name}"))] {
                let x = t.get(&key).with_context(|| format!("{} lacks {key}", path.display()))?;
                if x.shape() != p.shape() {
                    anyhow::bail!("{}: {key} has shape {:?}, the parameter {:?}", path.display(), x.dims(), p.dims());
                }
                out.push(x.clone());
            }
        }
        let json = dir.join("optimizer.json");
        let (step, _cfg): (u64, AdamWConfig) = serde_json::from_str(
            &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
        )
        .with_context(|| format!("{} is not valid", json.display()))?;
        Ok(SavedMoments { m, v, step })
    }

    pub fn apply(&mut self, saved: SavedMoments) {
        (self.m, self.v, self.step) = (saved.m, saved.v, saved.step);
    }
}

/// An optimizer's state as read from a checkpoint (see [`AdamW::read`]).
pub struct SavedMoments {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    // In name order: the same summation order, hence the same norm, on every run.
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let ordered: Vec<&Tensor> = names.iter().map(|n| &grads[*n]).collect();
    let norm = inplace::sum_of_squares(&ordered)?.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = inplace::scale(g.clone(), s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        // p = 1, g = 0.5, lr 0.1, wd 0.1, β1 .9, β2 .99: after bias correction m̂ = 0.5, v̂ = 0.25,
        // update = 0.5 / (0.5 + eps) ≈ 1; p ← 1·(1 − 0.01) − 0.1·1 = 0.89.
        let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("w.weight".into(), p.clone())],
            AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
        )
        .unwrap();
        let g = HashMap::from([("w.weight".to_string(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap())]);
        opt.step(&g, 0.1).unwrap();
        let v: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        assert!((v[0] - 0.89).abs() < 1e-6, "{v:?}");
        // A bias is not decayed: 1 − 0.1 = 0.9.
        let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x.bias".into(), b.clone())], opt.cfg.clone()).unwrap();
        let g = HashMap::from([("x.bias".to_string(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap())]);
        opt.step(&g, 0.1).unwrap();
        assert!((b.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
        let mut g = HashMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &Device::Cpu).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()),
        ]);
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
