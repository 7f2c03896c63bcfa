//! GRPO's mathematics: group-relative advantages and the clipped surrogate
//! loss with an optional k3 KL penalty, for each of TRL's loss normalizations.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::kernels::transfer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences (length-biased).
    Grpo,
    /// Sum over the micro-batch's tokens / its number of tokens.
    Bnpo,
    /// Sum over tokens / the number of tokens in the whole accumulated batch.
    Dapo,
    /// Sum over tokens / (batch × max_completion_length).
    DrGrpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by each group's standard deviation.
    Group,
    /// Divide by the whole batch's standard deviation.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

/// Unbiased standard deviation (as torch.std), 0 for fewer than two values.
fn std(v: &[f32]) -> f32 {
    crate::rewards::set::std(v)
}

/// Advantages for rewards laid out group after group (`group` completions per prompt):
/// reward − group mean, divided per `scale` (with 1e-4 added to the std, as TRL).
pub fn advantages(rewards: &[f32], group: usize, scale: ScaleRewards) -> Vec<f32> {
    let batch_std = std(rewards);
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f32>() / g.len() as f32;
            let div = match scale {
                ScaleRewards::Group => std(g) + 1e-4,
                ScaleRewards::Batch => batch_std + 1e-4,
                ScaleRewards::None => 1.0,
            };
            g.iter().map(move |r| (r - mean) / div)
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub loss_type: LossType,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub max_completion_length: usize,
    /// Micro-batches per optimizer step (the loss is divided by it, except for `dapo`).
    pub micro_batches: usize,
    /// Completion tokens in the whole accumulated batch (the `dapo` normalizer).
    pub global_tokens: f64,
}

/// Statistics of one micro-batch's loss, for the logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossStats {
    /// Mean k3 KL over completion tokens (0 when β = 0).
    pub kl: f64,
    /// Fraction of completion tokens whose ratio was clipped (low or high region).
    pub clip_region: f64,
    pub tokens: f64,
}

/// How the importance weights between the trainer's πold and the sampler's
/// log-probabilities are bounded (TRL's `vllm_importance_sampling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsMode {
    /// Per-token ratio clipped to [min, max].
    TokenTruncate,
    /// Per-token ratio, 0 outside [min, max].
    TokenMask,
    /// One ratio per sequence (exp of the summed log difference), clipped.
    SequenceTruncate,
    /// One ratio per sequence, 0 (the sequence dropped) outside [min, max].
    SequenceMask,
}

/// Importance weights [B, C] correcting for sampling by another engine (vLLM):
/// exp(log πold − log πsampler) over `mask`ed tokens, bounded per `mode`, as TRL
/// computes them. `known`: 1 where the sampler returned a log-probability (a
/// token without one gets weight 1, no correction, as in TRL).
pub fn importance_weights(
    old_logp: &Tensor,
    sampling_logp: &Tensor,
    known: &Tensor,
    mask: &Tensor,
    mode: IsMode,
    clip_min: Option<f64>,
    clip_max: Option<f64>,
) -> Result<Tensor> {
    let diff = ((old_logp.detach() - sampling_logp)? * (mask * known)?)?;
    let log_ratio = match mode {
        IsMode::TokenTruncate | IsMode::TokenMask => diff,
        IsMode::SequenceTruncate | IsMode::SequenceMask => diff.sum_keepdim(D::Minus1)?.broadcast_as(mask.shape())?,
    };
    let ratio = log_ratio.exp()?;
    let (lo, hi) = (clip_min.unwrap_or(f64::NEG_INFINITY), clip_max.unwrap_or(f64::INFINITY));
    match mode {
        IsMode::TokenTruncate | IsMode::SequenceTruncate => ratio.clamp(lo.max(0.0), hi),
        IsMode::TokenMask | IsMode::SequenceMask => {
            let inside = (ratio.ge(lo)?.to_dtype(ratio.dtype())? * ratio.le(hi)?.to_dtype(ratio.dtype())?)?;
            ratio * inside
        }
    }
}

/// The GRPO loss of one micro-batch.
/// `logp`, `old_logp`, `ref_logp`: [B, C] per-token log-probabilities of the completions;
/// `adv`: [B]; `mask`: [B, C] (1 for completion tokens that count); `is_weight`:
/// [B, C] importance weights for off-policy samples ([`importance_weights`]),
/// applied to the policy term and not to the KL term, as in TRL.
pub fn loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    is_weight: Option<&Tensor>,
    cfg: &LossConfig,
) -> Result<(Tensor, LossStats)> {
    let adv = adv.unsqueeze(1)?;
    let ratio = (logp - old_logp.detach())?.exp()?;
    let clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let l1 = ratio.broadcast_mul(&adv)?;
    let l2 = clipped.broadcast_mul(&adv)?;
    let mut per_token = l1.minimum(&l2)?.neg()?;
    if let Some(w) = is_weight {
        per_token = (per_token * w.detach())?;
    }
    // The statistics are summed on the device and read in one copy.
    let mut sums = vec![mask.sum_all()?.to_dtype(DType::F64)?];
    if cfg.beta != 0.0 {
        let r = ref_logp.expect("β > 0 needs reference log-probabilities");
        let d = (r.detach() - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        sums.push((&kl * mask)?.sum_all()?.to_dtype(DType::F64)?);
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    // Clipped region: low clip with A < 0, high clip with A > 0 (TRL's clip_ratio/region_mean).
    {
        let r = ratio.detach();
        let dt = mask.dtype();
        let low = r.lt(1.0 - cfg.epsilon_low)?.to_dtype(dt)?.broadcast_mul(&adv.lt(0.0)?.to_dtype(dt)?)?;
        let high = r.gt(1.0 + cfg.epsilon_high)?.to_dtype(dt)?.broadcast_mul(&adv.gt(0.0)?.to_dtype(dt)?)?;
        sums.push(((low + high)? * mask)?.sum_all()?.to_dtype(DType::F64)?);
    }
    let sums = transfer::to_vec1::<f64>(&Tensor::stack(&sums, 0)?)?;
    let tokens = sums[0];
    let mut stats = LossStats { tokens, ..Default::default() };
    if cfg.beta != 0.0 {
        stats.kl = sums[1] / tokens.max(1.0);
    }
    stats.clip_region = sums[sums.len() - 1] / tokens.max(1.0);
    let masked = (per_token * mask)?;
    let b = logp.dim(0)? as f64;
    let acc = cfg.micro_batches.max(1) as f64;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked.sum(D::Minus1)?.broadcast_div(&mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?;
            (per_seq.mean_all()? / acc)?
        }
        LossType::Bnpo => (masked.sum_all()? / (tokens.max(1.0) * acc))?,
        LossType::DrGrpo => (masked.sum_all()? / (b * cfg.max_completion_length as f64 * acc))?,
        LossType::Dapo => (masked.sum_all()? / cfg.global_tokens.max(1.0))?,
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn advantages_are_group_relative_and_scaled_as_asked() {
        let r = [1.0, 3.0, 0.0, 0.0];
        let a = advantages(&r, 2, ScaleRewards::None);
        assert_eq!(a, vec![-1.0, 1.0, 0.0, 0.0]);
        let a = advantages(&r, 2, ScaleRewards::Group);
        let s = 2f32.sqrt(); // unbiased std of [1, 3]
        assert!((a[0] + 1.0 / (s + 1e-4)).abs() < 1e-6 && a[2] == 0.0);
        let a = advantages(&r, 2, ScaleRewards::Batch);
        let bs = std(&r);
        assert!((a[1] - 1.0 / (bs + 1e-4)).abs() < 1e-6);
    }

    /// B = 2 sequences, C = 3 tokens, second sequence one token shorter.
    fn case() -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let d = Device::Cpu;
        let logp = Tensor::new(&[[-1.0f64, -0.5, -2.0], [-0.2, -1.5, -9.0]], &d).unwrap();
        let old = Tensor::new(&[[-1.1f64, -0.5, -1.0], [-0.2, -1.0, -9.0]], &d).unwrap();
        let refp = Tensor::new(&[[-1.0f64, -0.7, -2.0], [-0.3, -1.5, -9.0]], &d).unwrap();
        let adv = Tensor::new(&[1.0f64, -2.0], &d).unwrap();
        let mask = Tensor::new(&[[1.0f64, 1.0, 1.0], [1.0, 1.0, 0.0]], &d).unwrap();
        (logp, old, refp, adv, mask)
    }

    /// The per-token loss by hand: −min(r·A, clip(r)·A) + β·(e^(ref−θ) − (ref−θ) − 1).
    fn by_hand(beta: f64) -> [[f64; 3]; 2] {
        by_hand_eps(beta, 0.2, 0.2)
    }

    fn by_hand_eps(beta: f64, lo: f64, hi: f64) -> [[f64; 3]; 2] {
        let logp = [[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]];
        let old = [[-1.1, -0.5, -1.0], [-0.2, -1.0, -9.0]];
        let refp = [[-1.0, -0.7, -2.0], [-0.3, -1.5, -9.0]];
        let adv = [1.0, -2.0];
        let mut out = [[0.0; 3]; 2];
        for i in 0..2 {
            for j in 0..3 {
                let r: f64 = f64::exp(logp[i][j] - old[i][j]);
                let c = r.clamp(1.0 - lo, 1.0 + hi);
                let d: f64 = refp[i][j] - logp[i][j];
                out[i][j] = -(r * adv[i]).min(c * adv[i]) + beta * (d.exp() - d - 1.0);
            }
        }
        out
    }

    fn cfg(loss_type: LossType, beta: f64) -> LossConfig {
        LossConfig {
            loss_type,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta,
            max_completion_length: 4,
            micro_batches: 2,
            global_tokens: 10.0,
        }
    }

    #[test]
    fn each_loss_type_matches_a_hand_computed_example() {
        let (logp, old, refp, adv, mask) = case();
        for beta in [0.0, 0.04] {
            let t = by_hand(beta);
            let s0 = t[0][0] + t[0][1] + t[0][2];
            let s1 = t[1][0] + t[1][1];
            let expected = [
                (LossType::Grpo, (s0 / 3.0 + s1 / 2.0) / 2.0 / 2.0),
                (LossType::Bnpo, (s0 + s1) / 5.0 / 2.0),
                (LossType::DrGrpo, (s0 + s1) / (2.0 * 4.0) / 2.0),
                (LossType::Dapo, (s0 + s1) / 10.0),
            ];
            for (lt, want) in expected {
                let (l, _) = loss(&logp, &old, Some(&refp), &adv, &mask, None, &cfg(lt, beta)).unwrap();
                let got = l.to_scalar::<f64>().unwrap();
                assert!((got - want).abs() < 1e-12, "{lt:?} β={beta}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn asymmetric_clipping_uses_its_own_upper_bound() {
        // DAPO's clip-higher: ε_low 0.2, ε_high 0.05. Row 0's first ratio e^0.1 ≈ 1.105 with A > 0
        // is clipped at 1.05 here and not at 1.2.
        let (logp, old, refp, adv, mask) = case();
        let mut c = cfg(LossType::Bnpo, 0.04);
        c.epsilon_high = 0.05;
        let t = by_hand_eps(0.04, 0.2, 0.05);
        let want = (t[0][0] + t[0][1] + t[0][2] + t[1][0] + t[1][1]) / 5.0 / 2.0;
        let (l, s) = loss(&logp, &old, Some(&refp), &adv, &mask, None, &c).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        assert_ne!(by_hand_eps(0.04, 0.2, 0.05)[0][0], by_hand(0.04)[0][0], "the case exercises the upper bound");
        assert!((s.clip_region - 2.0 / 5.0).abs() < 1e-12, "{}", s.clip_region);
    }

    #[test]
    fn each_loss_type_has_the_gradient_of_its_value() {
        // Central finite differences in f64 on every log-probability, β > 0, old ≠ θ (μ > 1).
        let (logp, old, refp, adv, mask) = case();
        for lt in [LossType::Grpo, LossType::Bnpo, LossType::Dapo, LossType::DrGrpo] {
            let c = cfg(lt, 0.04);
            let x = candle_core::Var::from_tensor(&logp).unwrap();
            let (l, _) = loss(x.as_tensor(), &old, Some(&refp), &adv, &mask, None, &c).unwrap();
            let g: Vec<Vec<f64>> = l.backward().unwrap().get(x.as_tensor()).unwrap().to_vec2().unwrap();
            let base: Vec<Vec<f64>> = logp.to_vec2().unwrap();
            let value = |v: &Vec<Vec<f64>>| {
                let t = Tensor::new(v.clone(), &Device::Cpu).unwrap();
                loss(&t, &old, Some(&refp), &adv, &mask, None, &c).unwrap().0.to_scalar::<f64>().unwrap()
            };
            for i in 0..2 {
                for j in 0..3 {
                    let h = 1e-6;
                    let (mut up, mut down) = (base.clone(), base.clone());
                    up[i][j] += h;
                    down[i][j] -= h;
                    let fd = (value(&up) - value(&down)) / (2.0 * h);
                    assert!(
                        (fd - g[i][j]).abs() < 1e-6,
                        "{lt:?} [{i}][{j}]: backward {} vs finite difference {fd}",
                        g[i][j]
                    );
                }
            }
            // Masked tokens get no gradient.
            assert_eq!(g[1][2], 0.0, "{lt:?}");
        }
    }

    #[test]
    fn importance_weights_are_bounded_per_mode_as_trl_does() {
        let d = Device::Cpu;
        // Log differences πold − πsampler: row 0: 0.5, −2, 1.5 (masked); row 1: 2, unknown, 0.
        let old = Tensor::new(&[[0.0f64, 0.0, 0.0], [0.0, 0.0, 0.0]], &d).unwrap();
        let samp = Tensor::new(&[[-0.5f64, 2.0, -1.5], [-2.0, 0.0, 0.0]], &d).unwrap();
        let known = Tensor::new(&[[1.0f64, 1.0, 1.0], [1.0, 0.0, 1.0]], &d).unwrap();
        let mask = Tensor::new(&[[1.0f64, 1.0, 0.0], [1.0, 1.0, 1.0]], &d).unwrap();
        let w = |mode, lo, hi| -> Vec<Vec<f64>> {
            importance_weights(&old, &samp, &known, &mask, mode, lo, hi).unwrap().to_vec2().unwrap()
        };
        let e = f64::exp;
        let close = |a: Vec<Vec<f64>>, b: [[f64; 3]; 2]| {
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
            }
        };
        // Masked and unknown tokens: log difference 0, weight 1.
        close(w(IsMode::TokenTruncate, None, Some(3.0)), [[e(0.5), e(-2.0), 1.0], [3.0, 1.0, 1.0]]);
        close(w(IsMode::TokenTruncate, Some(0.5), Some(3.0)), [[e(0.5), 0.5, 1.0], [3.0, 1.0, 1.0]]);
        close(w(IsMode::TokenMask, Some(0.5), Some(3.0)), [[e(0.5), 0.0, 1.0], [0.0, 1.0, 1.0]]);
        // Sequences: row 0 sums to −1.5, row 1 to 2.
        close(w(IsMode::SequenceTruncate, None, Some(3.0)), [[e(-1.5); 3], [3.0; 3]]);
        close(w(IsMode::SequenceMask, None, Some(3.0)), [[e(-1.5); 3], [0.0; 3]]);
    }

    #[test]
    fn importance_weights_scale_the_policy_term_and_not_the_kl() {
        let (logp, old, refp, adv, mask) = case();
        let w = Tensor::new(&[[2.0f64, 1.0, 0.5], [1.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let c = cfg(LossType::Dapo, 0.04);
        let (l, _) = loss(&logp, &old, Some(&refp), &adv, &mask, Some(&w), &c).unwrap();
        let (pol, kl) = (by_hand(0.0), by_hand(0.04));
        let ww = [[2.0, 1.0, 0.5], [1.0, 0.0, 1.0]];
        let mut want = 0.0;
        for (i, j) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] {
            want += pol[i][j] * ww[i][j] + (kl[i][j] - pol[i][j]);
        }
        want /= 10.0;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn stats_report_kl_and_the_clipped_region() {
        let (logp, old, refp, adv, mask) = case();
        let (_, s) = loss(&logp, &old, Some(&refp), &adv, &mask, None, &cfg(LossType::Dapo, 0.04)).unwrap();
        // Ratios: row 0: e^0.1 (≤1.2), 1, e^-1 (< 0.8, but A > 0: not clipped); row 1: 1, e^-0.5 (< 0.8, A < 0: clipped).
        assert!((s.clip_region - 1.0 / 5.0).abs() < 1e-12, "{}", s.clip_region);
        let kl = |d: f64| d.exp() - d - 1.0;
        let want = (kl(0.0) + kl(-0.2) + kl(0.0) + kl(-0.1) + kl(0.0)) / 5.0;
        assert!((s.kl - want).abs() < 1e-12);
        assert_eq!(s.tokens, 5.0);
    }
}
