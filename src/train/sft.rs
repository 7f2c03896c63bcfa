//! SFT as an algorithm of the training loop: chat examples tokenized with
//! the model's own template, a mask that keeps only the assistant's tokens,
//! optional packing, and the token cross-entropy averaged over the unmasked
//! tokens of the whole accumulated batch.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::TrainingConfig;
use super::trainer::{Algorithm, StepReport};
use crate::common::ParamError;
use crate::kernels::transfer;
use crate::model::{Batch, ChatTokenizer, Message, Pass, Transformer};

/// SFT's configuration: TRL's SFTConfig names and defaults (full fine-tuning),
/// the shared training settings flattened in, and its checks in the YAML's names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftConfig {
    #[serde(flatten)]
    pub training: TrainingConfig,
    /// Examples longer than this many tokens are truncated (and counted).
    pub max_length: usize,
    /// Pack several examples per sequence; attention never crosses examples.
    pub packing: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig { training: TrainingConfig::default(), max_length: 1024, packing: false }
    }
}

impl SftConfig {
    /// Every problem with the settings, in the YAML's field names.
    pub fn problems(&self) -> Vec<ParamError> {
        let mut errors = self.training.problems();
        if self.max_length < 2 {
            errors.push(ParamError::new("max_length", "must be at least 2 (a token and the one it predicts)"));
        }
        errors
    }
}

/// One tokenized example: `targets[i]` says whether token i is trained on.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
    pub truncated: bool,
}

/// Tokenize a conversation; only assistant turns are targets. Each assistant
/// turn's tokens are found as the difference between the conversation rendered
/// up to that turn (with the generation prompt) and including it.
pub fn tokenize(tok: &ChatTokenizer, messages: &[Message], max_len: usize) -> Result<Example> {
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("the conversation has no assistant turn to train on");
    }
    let full = tok.encode_chat(messages, false)?;
    let mut targets = vec![false; full.len()];
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.encode_chat(&messages[..k], true)?;
        let upto = tok.encode_chat(&messages[..=k], false)?;
        // Templates are prefix-stable in practice; where one is not, train from the first difference.
        let start = before.iter().zip(&upto).take_while(|(a, b)| a == b).count();
        for t in targets.iter_mut().take(upto.len().min(full.len())).skip(start) {
            *t = true;
        }
    }
    // What a tool writes after an inline call (`<<48/2=` is the model's, `24>>` the
    // calculator's) is context, as in GRPO's rollouts: not trained on.
    let text = tok.apply_chat_template(messages, false)?;
    let spans = crate::data::gsm8k::tool_result_spans(&text);
    if !spans.is_empty() {
        let tokens = tok.encode_with_offsets(&text)?;
        if tokens.len() == full.len() {
            for (t, (_, at)) in targets.iter_mut().zip(&tokens) {
                if spans.iter().any(|s| at.start < s.end && s.start < at.end) {
                    *t = false;
                }
            }
        }
    }
    let truncated = full.len() > max_len;
    let n = full.len().min(max_len);
    Ok(Example { ids: full[..n].to_vec(), targets: targets[..n].to_vec(), truncated })
}

/// Sum of −log π over target tokens divided by `normalizer` (the number of target
/// tokens in the whole accumulated batch, so micro-batches add up to the mean).
/// `logp`: [B, T] log-probabilities of each position's token; `mask`: [B, T].
pub fn loss(logp: &Tensor, mask: &Tensor, normalizer: f64) -> candle_core::Result<Tensor> {
    (logp * mask)?.sum_all()?.neg()? / normalizer.max(1.0)
}

/// Where the loop is in the data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftState {
    /// Examples consumed so far (position in the seeded epoch order).
    pub data_pos: u64,
    pub tokens_seen: u64,
}

/// SFT's per-step log fields.
#[derive(Debug, Clone, Serialize)]
pub struct SftLog {
    pub epoch: f64,
}

pub struct SftAlgorithm<'a> {
    pub cfg: SftConfig,
    pub pad_id: u32,
    pub examples: &'a [Example],
    pub seed: u64,
    pub state: SftState,
}

impl<'a> SftAlgorithm<'a> {
    pub fn new(cfg: SftConfig, pad_id: u32, examples: &'a [Example], seed: u64) -> Self {
        SftAlgorithm { cfg, pad_id, examples, seed, state: SftState { data_pos: 0, tokens_seen: 0 } }
    }

    fn example_at(&self, pos: u64) -> &'a Example {
        let n = self.examples.len() as u64;
        let mut order: Vec<usize> = (0..n as usize).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(pos / n)));
        &self.examples[order[(pos % n) as usize]]
    }

    /// A micro-batch as a model batch and its target mask over next-token positions.
    pub fn batch(&self, exs: &[&Example], device: &candle_core::Device) -> Result<(Batch, Tensor)> {
        let (batch, targets): (Batch, Vec<Vec<bool>>) = if self.cfg.packing {
            // Greedy packing into rows of at most max_length tokens.
            let mut rows: Vec<Vec<&Example>> = Vec::new();
            let mut lens: Vec<usize> = Vec::new();
            for e in exs {
                match lens.iter().position(|l| l + e.ids.len() <= self.cfg.max_length) {
                    Some(i) => {
                        rows[i].push(e);
                        lens[i] += e.ids.len();
                    }
                    None => {
                        rows.push(vec![e]);
                        lens.push(e.ids.len());
                    }
                }
            }
            let ids: Vec<Vec<Vec<u32>>> = rows.iter().map(|r| r.iter().map(|e| e.ids.clone()).collect()).collect();
            let b = Batch::packed(&ids, self.pad_id, device)?;
            let t = b.ids.dim(1)?;
            let targets = rows
                .iter()
                .map(|r| {
                    let mut v: Vec<bool> = Vec::with_capacity(t);
                    for e in r {
                        // A segment's first token is never a target of the previous segment.
                        v.extend(e.targets.iter().enumerate().map(|(i, &x)| x && i > 0));
                    }
                    v.resize(t, false);
                    v
                })
                .collect();
            (b, targets)
        } else {
            let t = exs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
            let ids = exs
                .iter()
                .map(|e| e.ids.iter().copied().chain(std::iter::repeat_n(self.pad_id, t - e.ids.len())).collect())
                .collect();
            let valid = exs.iter().map(|e| (0..t).map(|i| i < e.ids.len()).collect()).collect();
            let targets = exs.iter().map(|e| (0..t).map(|i| i < e.ids.len() && e.targets[i]).collect()).collect();
            (Batch::from_rows(ids, valid, device)?, targets)
        };
        // Position i of the log-probs predicts token i + 1.
        let mask: Vec<Vec<f32>> =
            targets.iter().map(|r| r.iter().skip(1).map(|&x| if x { 1.0 } else { 0.0 }).collect()).collect();
        Ok((batch, Tensor::new(mask, device)?))
    }
}

impl Algorithm for SftAlgorithm<'_> {
    type State = SftState;
    type Log = SftLog;

    fn total_steps(&self) -> u64 {
        self.cfg.training.total_steps(self.examples.len(), self.cfg.training.per_step())
    }

    fn state(&self) -> SftState {
        self.state.clone()
    }

    fn restore(&mut self, state: SftState) {
        self.state = state;
    }

    fn step(&mut self, model: &Transformer, _step: u64) -> Result<StepReport<SftLog>> {
        let exs: Vec<&Example> =
            (0..self.cfg.training.per_step() as u64).map(|i| self.example_at(self.state.data_pos + i)).collect();
        let normalizer: f64 = exs.iter().map(|e| e.targets.iter().skip(1).filter(|x| **x).count() as f64).sum();
        let tokens: usize = exs.iter().map(|e| e.ids.len()).sum();
        let mut loss_sum = 0.0;
        for chunk in exs.chunks(self.cfg.training.per_device_train_batch_size) {
            let (b, mask) = self.batch(chunk, &model.device)?;
            let t = b.ids.dim(1)?;
            let lp = model.next_token_logprobs_range(&b, 0, t - 1, 1.0, Pass::TRAIN)?.to_dtype(DType::F32)?;
            let l = loss(&lp, &mask, normalizer)?;
            loss_sum += transfer::to_scalar::<f64>(&l.to_dtype(DType::F64)?)?;
            model.backward(&l)?;
        }
        self.state.data_pos += exs.len() as u64;
        self.state.tokens_seen += tokens as u64;
        Ok(StepReport {
            loss: loss_sum,
            log: SftLog { epoch: self.state.data_pos as f64 / self.examples.len() as f64 },
            tokens,
            message: format!("loss {loss_sum:.3}"),
        })
    }

    fn summary(&self) -> Value {
        serde_json::json!({ "tokens_seen": self.state.tokens_seen })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn masked_positions_contribute_nothing_to_loss_or_gradient() {
        let mask = Tensor::new(&[[0f32, 1.0, 1.0], [0.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let a = Var::new(&[[-5f32, -1.0, -2.0], [-7.0, -9.0, -0.5]], &Device::Cpu).unwrap();
        let b = Var::new(&[[-0.1f32, -1.0, -2.0], [-3.0, -0.2, -0.5]], &Device::Cpu).unwrap();
        let la = loss(a.as_tensor(), &mask, 3.0).unwrap();
        let lb = loss(b.as_tensor(), &mask, 3.0).unwrap();
        assert_eq!(la.to_scalar::<f32>().unwrap(), lb.to_scalar::<f32>().unwrap());
        assert!((la.to_scalar::<f32>().unwrap() - 3.5 / 3.0).abs() < 1e-6);
        let g = la.backward().unwrap();
        let g: Vec<Vec<f32>> = g.get(a.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(g, vec![vec![0.0, -1.0 / 3.0, -1.0 / 3.0], vec![0.0, 0.0, -1.0 / 3.0]]);
    }
}
