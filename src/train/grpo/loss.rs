//! GRPO's mathematics: group-relative advantages and the clipped surrogate
//! loss with an optional k3 KL penalty, for each of TRL's loss normalizations.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::common::ParamError;
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
    /// Clipped importance weights (detached) times A times log π (MiniMax-M1); normalized as `dapo`.
    Cispo,
    /// A sigmoid gate instead of hard clipping (Soft Adaptive Policy Optimization); normalized as `grpo`.
    Sapo,
    /// Each sequence's loss summed over its tokens (length-unbiased GSPO); needs sequence-level ratios.
    Luspo,
    /// Gamma-weighted sequence ratios times A times log π (VESPO); normalized as `dapo`.
    Vespo,
}

/// Whether the importance ratio π/πold is one per token or one per sequence
/// (the mean of its tokens' log-ratios: GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsLevel {
    Token,
    Sequence,
}

/// How several reward functions become one advantage (TRL's `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Weighted sum of the rewards, then the advantage of the sum.
    SumThenNormalize,
    /// Each reward normalized within its group, weighted and summed, then normalized over the batch (GDPO).
    NormalizeThenSum,
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

/// GDPO's advantages (`normalize_then_sum`): each function's rewards
/// normalized within its group (NaN, a function that does not apply, left out),
/// weighted and summed, then normalized over the whole batch, as TRL computes
/// them. `per_function[f][i]`: function f on completion i.
pub fn advantages_normalize_then_sum(per_function: &[Vec<f32>], weights: &[f32], group: usize) -> Vec<f32> {
    let n = per_function.first().map_or(0, Vec::len);
    let mut summed = vec![0f32; n];
    let mut any = vec![false; n];
    for (values, &w) in per_function.iter().zip(weights) {
        for (g, chunk) in values.chunks(group).enumerate() {
            let seen: Vec<f32> = chunk.iter().copied().filter(|x| !x.is_nan()).collect();
            let mean = seen.iter().sum::<f32>() / seen.len().max(1) as f32;
            let sd = std(&seen);
            for (k, &x) in chunk.iter().enumerate() {
                if !x.is_nan() {
                    summed[g * group + k] += (x - mean) / (sd + 1e-4) * w;
                    any[g * group + k] = true;
                }
            }
        }
    }
    let seen: Vec<f32> = summed.iter().zip(&any).filter(|(_, &a)| a).map(|(&x, _)| x).collect();
    let (mean, sd) = (seen.iter().sum::<f32>() / seen.len().max(1) as f32, std(&seen));
    // A completion no function scored carries no signal (TRL zeroes its advantage).
    summed.iter().zip(&any).map(|(&x, &a)| if a { (x - mean) / (sd + 1e-4) } else { 0.0 }).collect()
}

/// The loss's hyperparameters, declared once: TRL 1.16's names, defaults and
/// checks side by side. `GrpoConfig` embeds this struct (flattened, so the
/// YAML keys are TRL's own) and the loss reads it as it is; a further TRL loss
/// option is a field here and its use in [`loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossParams {
    pub loss_type: LossType,
    /// The KL penalty's coefficient (0: no KL term and no reference model).
    pub beta: f64,
    /// The clipping range below 1, and above it unless `epsilon_high` is set.
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping: the unclipped ratio capped at δ (> 1 + ε; INTELLECT-2).
    pub delta: Option<f64>,
    pub importance_sampling_level: IsLevel,
    /// Drop sequences with A < 0 whose mean log πsampler − log π exceeds this (DeepSeek-V3.2's OPSM).
    pub off_policy_mask_threshold: Option<f64>,
    /// Weight the KL term by the importance ratio.
    pub use_bias_correction_kl: bool,
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    pub vespo_k_pos: f64,
    pub vespo_k_neg: f64,
    pub vespo_lambda_pos: f64,
    pub vespo_lambda_neg: f64,
}

impl Default for LossParams {
    /// TRL 1.16's GRPOConfig defaults.
    fn default() -> Self {
        LossParams {
            loss_type: LossType::Dapo,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            importance_sampling_level: IsLevel::Token,
            off_policy_mask_threshold: None,
            use_bias_correction_kl: true,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_k_pos: 2.0,
            vespo_k_neg: 3.0,
            vespo_lambda_pos: 3.0,
            vespo_lambda_neg: 2.0,
        }
    }
}

impl LossParams {
    /// TRL's defaults with this normalization, clipping range and β (`epsilon_high`
    /// set only when it differs from `epsilon_low`).
    pub fn new(loss_type: LossType, epsilon_low: f64, epsilon_high: f64, beta: f64) -> LossParams {
        LossParams {
            loss_type,
            epsilon: epsilon_low,
            epsilon_high: (epsilon_high != epsilon_low).then_some(epsilon_high),
            beta,
            ..LossParams::default()
        }
    }

    pub fn epsilon_low(&self) -> f64 {
        self.epsilon
    }

    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Every problem with these settings, in the YAML's field names.
    pub fn problems(&self) -> Vec<ParamError> {
        let mut errors = Vec::new();
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            errors.push(ParamError::new("beta", "must be ≥ 0 (0: no KL term and no reference model)"));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            errors.push(ParamError::new("epsilon", "clipping ranges must be ≥ 0"));
        }
        if self.epsilon_high.is_some_and(|e| !(e.is_finite() && e >= 0.0)) {
            errors.push(ParamError::new("epsilon_high", "clipping ranges must be ≥ 0"));
        }
        if let Some(d) = self.delta {
            let hi = 1.0 + self.epsilon_high();
            if !(d.is_finite() && d > hi) {
                errors.push(ParamError::new("delta", format!("must be greater than 1 + ε_high = {hi}")));
            }
        }
        if self.loss_type == LossType::Luspo && self.importance_sampling_level != IsLevel::Sequence {
            errors.push(
                ParamError::new("loss_type", "luspo is a sequence-level loss")
                    .hint("set importance_sampling_level: sequence"),
            );
        }
        if self.off_policy_mask_threshold.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
            errors.push(ParamError::new("off_policy_mask_threshold", "must be ≥ 0"));
        }
        for (k, v) in
            [("sapo_temperature_pos", self.sapo_temperature_pos), ("sapo_temperature_neg", self.sapo_temperature_neg)]
        {
            if !(v.is_finite() && v > 0.0) {
                errors.push(ParamError::new(k, "must be > 0"));
            }
        }
        for (k, v) in [
            ("vespo_k_pos", self.vespo_k_pos),
            ("vespo_k_neg", self.vespo_k_neg),
            ("vespo_lambda_pos", self.vespo_lambda_pos),
            ("vespo_lambda_neg", self.vespo_lambda_neg),
        ] {
            if !v.is_finite() {
                errors.push(ParamError::new(k, "must be a finite number"));
            }
        }
        errors
    }
}

/// One step's loss settings: the hyperparameters and what the step's batch adds.
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub params: LossParams,
    pub max_completion_length: usize,
    /// Micro-batches per optimizer step (the loss is divided by it, except for `dapo`).
    pub micro_batches: usize,
    /// Completion tokens in the whole accumulated batch (the `dapo` normalizer).
    pub global_tokens: f64,
    /// The entropy bonus's coefficient this step (0: none).
    pub entropy_coef: f64,
}

impl LossConfig {
    /// A single micro-batch without an entropy bonus.
    pub fn new(params: LossParams) -> LossConfig {
        LossConfig { params, max_completion_length: 0, micro_batches: 1, global_tokens: 0.0, entropy_coef: 0.0 }
    }
}

/// Statistics of one micro-batch's loss, for the logs (TRL's names in `GrpoLog`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LossStats {
    /// Mean k3 KL over completion tokens (0 when β = 0).
    pub kl: f64,
    /// Fraction of completion tokens whose ratio was clipped (low or high region).
    pub clip_region: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    /// `cispo`: fraction of tokens whose weight hit ε_high with A > 0.
    pub cispo_clip: f64,
    /// `vespo`: mean gamma weight.
    pub vespo_phi: f64,
    /// Mean entropy of the policy over completion tokens (when given).
    pub entropy: f64,
    pub tokens: f64,
}

impl LossStats {
    /// Adds a micro-batch's statistics weighted by its tokens: a step's
    /// statistics are the token-weighted means of its micro-batches'.
    pub fn add_weighted(&mut self, s: &LossStats) {
        let w = s.tokens;
        self.kl += s.kl * w;
        self.clip_region += s.clip_region * w;
        self.clip_low += s.clip_low * w;
        self.clip_high += s.clip_high * w;
        self.cispo_clip += s.cispo_clip * w;
        self.vespo_phi += s.vespo_phi * w;
        self.entropy += s.entropy * w;
        self.tokens += w;
    }

    /// The means of what [`LossStats::add_weighted`] summed.
    pub fn weighted_mean(&self) -> LossStats {
        let n = self.tokens.max(1.0);
        LossStats {
            kl: self.kl / n,
            clip_region: self.clip_region / n,
            clip_low: self.clip_low / n,
            clip_high: self.clip_high / n,
            cispo_clip: self.cispo_clip / n,
            vespo_phi: self.vespo_phi / n,
            entropy: self.entropy / n,
            tokens: self.tokens,
        }
    }
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

/// What one micro-batch's loss is computed from. Every tensor is [B, C]
/// (completions × completion positions) but `adv` ([B]).
pub struct LossInputs<'a> {
    /// log π of the sampled tokens, with a graph to the policy.
    pub logp: &'a Tensor,
    pub old_logp: &'a Tensor,
    pub ref_logp: Option<&'a Tensor>,
    /// The sampler's log-probabilities (a rollout server's), for the off-policy mask.
    pub sampling_logp: Option<&'a Tensor>,
    pub adv: &'a Tensor,
    /// 1 for completion tokens that count.
    pub mask: &'a Tensor,
    /// Importance weights πold / πsampler ([`importance_weights`]).
    pub is_weight: Option<&'a Tensor>,
    /// The policy's per-token entropy (with a graph when there is an entropy bonus).
    pub entropy: Option<&'a Tensor>,
    /// 1 for the tokens the policy term keeps (`top_entropy_quantile`).
    pub entropy_mask: Option<&'a Tensor>,
}

/// The GRPO loss of one micro-batch, for every loss type, as TRL 1.16's
/// `_compute_loss` computes it: the importance ratio (per token or per
/// sequence), the loss type's per-token term, then the off-policy mask, the
/// entropy mask, the sampler's importance weights (not for `vespo`, which
/// folds them into its ratio), the KL term (bias-corrected when asked), the
/// loss type's normalization, and the entropy bonus.
pub fn loss(x: &LossInputs, cfg: &LossConfig) -> Result<(Tensor, LossStats)> {
    let p = &cfg.params;
    let (eps_low, eps_high) = (p.epsilon_low(), p.epsilon_high());
    let (logp, mask) = (x.logp, x.mask);
    let dt = mask.dtype();
    let adv = x.adv.unsqueeze(1)?;
    let log_ratio = (logp - x.old_logp.detach())?;
    let log_w = match p.importance_sampling_level {
        IsLevel::Token => log_ratio.clone(),
        IsLevel::Sequence => (&log_ratio * mask)?
            .sum_keepdim(D::Minus1)?
            .broadcast_div(&mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?,
    };
    let coef_1 = log_w.exp()?;
    let positive = adv.gt(0.0)?.to_dtype(dt)?;
    let nonnegative = adv.ge(0.0)?.to_dtype(dt)?;
    let negative = adv.lt(0.0)?.to_dtype(dt)?;
    let mut stats = StatSums::new(mask)?;
    let mut per_token = match p.loss_type {
        LossType::Cispo => {
            let clamped = coef_1.clamp(f64::NEG_INFINITY, eps_high)?.detach();
            let clipped = coef_1.detach().gt(eps_high)?.to_dtype(dt)?.broadcast_mul(&positive)?;
            stats.mean(Stat::CispoClip, &clipped)?;
            clamped.broadcast_mul(&adv)?.broadcast_mul(logp)?.neg()?
        }
        LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo | LossType::Luspo => {
            let coef_2 = coef_1.clamp(1.0 - eps_low, 1.0 + eps_high)?;
            let coef_1 = match p.delta {
                Some(d) => coef_1.clamp(f64::NEG_INFINITY, d)?,
                None => coef_1.clone(),
            };
            // The clipped fractions are TRL's: of the ratio after δ's cap.
            let r = coef_1.detach();
            stats.mean(Stat::ClipLow, &r.lt(1.0 - eps_low)?.to_dtype(dt)?.broadcast_mul(&negative)?)?;
            stats.mean(Stat::ClipHigh, &r.gt(1.0 + eps_high)?.to_dtype(dt)?.broadcast_mul(&positive)?)?;
            coef_1.broadcast_mul(&adv)?.minimum(&coef_2.broadcast_mul(&adv)?)?.neg()?
        }
        LossType::Sapo => {
            let temps =
                ((&positive * p.sapo_temperature_pos)? + (positive.affine(-1.0, 1.0)? * p.sapo_temperature_neg)?)?;
            let gate = candle_nn::ops::sigmoid(&(&coef_1 - 1.0)?.broadcast_mul(&temps)?)?;
            let soft = (gate * 4.0)?.broadcast_div(&temps)?;
            soft.broadcast_mul(&adv)?.neg()?
        }
        LossType::Vespo => {
            let phi = vespo_weights(&log_ratio.detach(), mask, x.is_weight, &nonnegative, p)?;
            stats.mean(Stat::VespoPhi, &phi)?;
            phi.broadcast_mul(&adv)?.broadcast_mul(logp)?.neg()?
        }
    };
    if let Some(threshold) = p.off_policy_mask_threshold {
        let sampling = x.sampling_logp.unwrap_or(x.old_logp);
        let kl = (sampling.detach() - logp.detach())?;
        let mean_kl = (&kl * mask)?
            .sum_keepdim(D::Minus1)?
            .broadcast_div(&mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?;
        let keep = nonnegative.maximum(&mean_kl.le(threshold)?.to_dtype(dt)?)?;
        per_token = per_token.broadcast_mul(&keep)?;
    }
    if let Some(m) = x.entropy_mask {
        // A sequence-level term ([B, 1]) meets the token mask ([B, C]) by broadcasting, as in TRL.
        per_token = per_token.broadcast_mul(m)?;
    }
    if let (Some(w), false) = (x.is_weight, p.loss_type == LossType::Vespo) {
        per_token = per_token.broadcast_mul(&w.detach())?;
    }
    if p.beta != 0.0 {
        let Some(r) = x.ref_logp else { candle_core::bail!("β > 0 needs reference log-probabilities") };
        let d = (r.detach() - logp)?;
        let mut kl = ((d.exp()? - &d)? - 1.0)?;
        if p.use_bias_correction_kl {
            kl = kl.broadcast_mul(&coef_1)?;
        }
        stats.mean(Stat::Kl, &kl.detach())?;
        per_token = (per_token.broadcast_as(mask.shape())? + (kl * p.beta)?)?;
    }
    let per_token = per_token.broadcast_as(mask.shape())?;
    if let Some(h) = x.entropy {
        stats.mean(Stat::Entropy, &h.detach())?;
    }
    let stats = stats.read()?;
    let (tokens, b) = (stats.tokens, logp.dim(0)? as f64);
    let masked = (per_token * mask)?;
    let acc = cfg.micro_batches.max(1) as f64;
    let mut loss = match p.loss_type {
        LossType::Grpo | LossType::Sapo => {
            let per_seq = masked.sum(D::Minus1)?.broadcast_div(&mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?;
            (per_seq.mean_all()? / acc)?
        }
        LossType::Bnpo => (masked.sum_all()? / (tokens.max(1.0) * acc))?,
        LossType::DrGrpo => (masked.sum_all()? / (b * cfg.max_completion_length as f64 * acc))?,
        LossType::Dapo | LossType::Cispo | LossType::Vespo => (masked.sum_all()? / cfg.global_tokens.max(1.0))?,
        LossType::Luspo => (masked.sum(D::Minus1)?.mean_all()? / acc)?,
    };
    if cfg.entropy_coef != 0.0 {
        // The bonus is the mean entropy over the tokens the policy term acts on, for every
        // loss type (TRL: L = L_policy − coef · H), scaled only for accumulation.
        let Some(h) = x.entropy else { candle_core::bail!("an entropy bonus needs the policy's entropy") };
        let effective = match x.entropy_mask {
            Some(m) => (mask * m)?,
            None => mask.clone(),
        };
        let mean_h = (((h * &effective)?.sum_all()? / effective.sum_all()?.clamp(1.0, f64::INFINITY)?)? / acc)?;
        loss = (loss - (mean_h * cfg.entropy_coef)?)?;
    }
    Ok((loss, stats))
}

/// A statistic [`loss`] logs.
#[derive(Debug, Clone, Copy)]
enum Stat {
    Kl,
    ClipLow,
    ClipHigh,
    CispoClip,
    VespoPhi,
    Entropy,
}

/// The statistics of one loss, summed on the device as it computes them and
/// read back in one copy. A statistic of one value per sequence ([B, 1]:
/// sequence-level ratios, vespo's φ) is a mean over sequences, as TRL's
/// `global_masked_mean`; the others are means over the masked tokens.
struct StatSums<'a> {
    mask: &'a Tensor,
    tokens: Tensor,
    /// (which, its sum, whether per sequence).
    sums: Vec<(Stat, Tensor, bool)>,
}

impl<'a> StatSums<'a> {
    fn new(mask: &'a Tensor) -> Result<StatSums<'a>> {
        Ok(StatSums { mask, tokens: mask.sum_all()?.to_dtype(DType::F64)?, sums: Vec::new() })
    }

    fn mean(&mut self, which: Stat, t: &Tensor) -> Result<()> {
        let per_sequence = t.dim(D::Minus1)? == 1;
        let sum = if per_sequence { t.sum_all()? } else { t.broadcast_mul(self.mask)?.sum_all()? };
        self.sums.push((which, sum.to_dtype(DType::F64)?, per_sequence));
        Ok(())
    }

    fn read(self) -> Result<LossStats> {
        let all: Vec<&Tensor> = std::iter::once(&self.tokens).chain(self.sums.iter().map(|s| &s.1)).collect();
        let values = transfer::to_vec1::<f64>(&Tensor::stack(&all, 0)?)?;
        let tokens = values[0];
        let sequences = self.mask.dim(0)? as f64;
        let mut stats = LossStats { tokens, ..LossStats::default() };
        for ((which, _, per_sequence), v) in self.sums.iter().zip(&values[1..]) {
            let mean = v / if *per_sequence { sequences.max(1.0) } else { tokens.max(1.0) };
            match which {
                Stat::Kl => stats.kl = mean,
                Stat::ClipLow => stats.clip_low = mean,
                Stat::ClipHigh => stats.clip_high = mean,
                Stat::CispoClip => stats.cispo_clip = mean,
                Stat::VespoPhi => stats.vespo_phi = mean,
                Stat::Entropy => stats.entropy = mean,
            }
        }
        stats.clip_region = stats.clip_low + stats.clip_high;
        Ok(stats)
    }
}

/// TRL's `get_high_entropy_mask`: 1 for the masked-in tokens whose entropy is at
/// least the `quantile` of the masked-in entropies (linear interpolation, as
/// `torch.quantile`), 0 elsewhere.
pub fn high_entropy_mask(entropy: &Tensor, mask: &Tensor, quantile: f64) -> Result<Tensor> {
    let h: Vec<Vec<f32>> = transfer::to_vec2(&entropy.detach().to_dtype(DType::F32)?)?;
    let m: Vec<Vec<f32>> = transfer::to_vec2(&mask.to_dtype(DType::F32)?)?;
    let mut seen: Vec<f32> =
        h.iter().flatten().zip(m.iter().flatten()).filter(|(_, &k)| k > 0.0).map(|(&x, _)| x).collect();
    if seen.is_empty() {
        return mask.zeros_like();
    }
    seen.sort_by(f32::total_cmp);
    let pos = quantile * (seen.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let threshold = seen[lo] as f64 + (seen[hi] as f64 - seen[lo] as f64) * (pos - lo as f64);
    let keep = entropy.detach().to_dtype(DType::F64)?.ge(threshold)?.to_dtype(mask.dtype())?;
    keep * mask
}

/// VESPO's gamma weights per sequence, [B, 1], without a graph:
/// φ(w) = e^λ · w^k · e^(−λw) for the sequence ratio w = exp(Σ log π/πold (+ Σ log πold/πsampler)),
/// k and λ by the sign of the advantage, computed in log space with TRL's clamps.
fn vespo_weights(
    log_ratio: &Tensor,
    mask: &Tensor,
    is_weight: Option<&Tensor>,
    nonnegative: &Tensor,
    cfg: &LossParams,
) -> Result<Tensor> {
    let lower = 1e-8f64.ln();
    let mut seq = (log_ratio.clamp(-20.0, 20.0)? * mask)?.sum_keepdim(D::Minus1)?;
    if let Some(w) = is_weight {
        seq = (seq + w.log()?.clamp(lower, 20.0)?.sum_keepdim(D::Minus1)?)?;
    }
    let log_w = seq.clamp(lower, 20.0)?;
    let w = log_w.exp()?;
    let pick =
        |pos: f64, neg: f64| -> Result<Tensor> { (nonnegative * pos)? + (nonnegative.affine(-1.0, 1.0)? * neg)? };
    let k = pick(cfg.vespo_k_pos, cfg.vespo_k_neg)?;
    let lambda = pick(cfg.vespo_lambda_pos, cfg.vespo_lambda_neg)?.clamp(1e-4, f64::INFINITY)?;
    let log_phi = ((&lambda + (k * &log_w)?)? - (lambda * w)?)?;
    // TRL's nan_to_num(nan=0, posinf=0, neginf=0): a non-finite φ weighs nothing.
    let phi = log_phi.exp()?;
    let dt = phi.dtype();
    let finite = phi.eq(&phi)?.to_dtype(dt)?.mul(&phi.abs()?.lt(f64::INFINITY)?.to_dtype(dt)?)?;
    finite.gt(0.0)?.where_cond(&phi, &phi.zeros_like()?)
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

    /// The hand-computed examples use the plain k3 KL (TRL's `use_bias_correction_kl = False`).
    fn cfg(loss_type: LossType, beta: f64) -> LossConfig {
        let params = LossParams { use_bias_correction_kl: false, ..LossParams::new(loss_type, 0.2, 0.2, beta) };
        LossConfig { max_completion_length: 4, micro_batches: 2, global_tokens: 10.0, ..LossConfig::new(params) }
    }

    /// The loss of policy `logp` against `old` and `refp`, optionally importance-weighted.
    fn loss_of(
        logp: &Tensor,
        old: &Tensor,
        refp: &Tensor,
        adv: &Tensor,
        mask: &Tensor,
        is_weight: Option<&Tensor>,
        cfg: &LossConfig,
    ) -> Result<(Tensor, LossStats)> {
        let x = LossInputs {
            logp,
            old_logp: old,
            ref_logp: Some(refp),
            sampling_logp: None,
            adv,
            mask,
            is_weight,
            entropy: None,
            entropy_mask: None,
        };
        loss(&x, cfg)
    }

    /// A tool's result inside a completion (mask 0 between model tokens): its
    /// tokens get exactly no gradient from any loss type, the KL or the entropy
    /// bonus, while the model's tokens around it are trained on.
    #[test]
    fn a_tools_result_tokens_get_exactly_no_gradient() {
        use candle_core::Var;
        let d = Device::Cpu;
        // Row 0: model, tool, tool, model; row 1: model, model, pad, pad.
        let logp = Var::new(&[[-1.0f64, -0.5, -2.0, -0.7], [-0.2, -1.5, -9.0, -9.0]], &d).unwrap();
        let old = Tensor::new(&[[-1.1f64, -0.4, -1.0, -0.6], [-0.2, -1.0, -9.0, -9.0]], &d).unwrap();
        let refp = Tensor::new(&[[-1.0f64, -0.7, -2.2, -0.8], [-0.3, -1.5, -9.0, -9.0]], &d).unwrap();
        let entropy = Var::new(&[[0.5f64, 1.5, 2.0, 0.7], [0.2, 0.9, 0.0, 0.0]], &d).unwrap();
        let adv = Tensor::new(&[1.0f64, -2.0], &d).unwrap();
        let mask = Tensor::new(&[[1.0f64, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]], &d).unwrap();
        for lt in [
            LossType::Grpo,
            LossType::Bnpo,
            LossType::Dapo,
            LossType::DrGrpo,
            LossType::Cispo,
            LossType::Sapo,
            LossType::Vespo,
        ] {
            let mut c = cfg(lt, 0.04);
            c.params.use_bias_correction_kl = true;
            c.entropy_coef = 0.01;
            let x = LossInputs {
                logp: logp.as_tensor(),
                old_logp: &old,
                ref_logp: Some(&refp),
                sampling_logp: None,
                adv: &adv,
                mask: &mask,
                is_weight: None,
                entropy: Some(entropy.as_tensor()),
                entropy_mask: None,
            };
            let (l, _) = loss(&x, &c).unwrap();
            let grads = l.backward().unwrap();
            let g: Vec<Vec<f64>> = grads.get(logp.as_tensor()).unwrap().to_vec2().unwrap();
            let h: Vec<Vec<f64>> = grads.get(entropy.as_tensor()).unwrap().to_vec2().unwrap();
            for (j, k) in [(0, 1), (0, 2)] {
                assert_eq!(g[j][k], 0.0, "{lt:?}: ∂loss/∂logp at a tool token");
                assert_eq!(h[j][k], 0.0, "{lt:?}: ∂loss/∂entropy at a tool token");
            }
            assert!(g[0][0] != 0.0 && g[0][3] != 0.0, "{lt:?}: the model's tokens around it are trained on");
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
                let (l, _) = loss_of(&logp, &old, &refp, &adv, &mask, None, &cfg(lt, beta)).unwrap();
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
        c.params.epsilon_high = Some(0.05);
        let t = by_hand_eps(0.04, 0.2, 0.05);
        let want = (t[0][0] + t[0][1] + t[0][2] + t[1][0] + t[1][1]) / 5.0 / 2.0;
        let (l, s) = loss_of(&logp, &old, &refp, &adv, &mask, None, &c).unwrap();
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
            let (l, _) = loss_of(x.as_tensor(), &old, &refp, &adv, &mask, None, &c).unwrap();
            let g: Vec<Vec<f64>> = l.backward().unwrap().get(x.as_tensor()).unwrap().to_vec2().unwrap();
            let base: Vec<Vec<f64>> = logp.to_vec2().unwrap();
            let value = |v: &Vec<Vec<f64>>| {
                let t = Tensor::new(v.clone(), &Device::Cpu).unwrap();
                loss_of(&t, &old, &refp, &adv, &mask, None, &c).unwrap().0.to_scalar::<f64>().unwrap()
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
        let (l, _) = loss_of(&logp, &old, &refp, &adv, &mask, Some(&w), &c).unwrap();
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
        let (_, s) = loss_of(&logp, &old, &refp, &adv, &mask, None, &cfg(LossType::Dapo, 0.04)).unwrap();
        // Ratios: row 0: e^0.1 (≤1.2), 1, e^-1 (< 0.8, but A > 0: not clipped); row 1: 1, e^-0.5 (< 0.8, A < 0: clipped).
        assert!((s.clip_region - 1.0 / 5.0).abs() < 1e-12, "{}", s.clip_region);
        let kl = |d: f64| d.exp() - d - 1.0;
        let want = (kl(0.0) + kl(-0.2) + kl(0.0) + kl(-0.1) + kl(0.0)) / 5.0;
        assert!((s.kl - want).abs() < 1e-12);
        assert_eq!(s.tokens, 5.0);
    }
}
