//! One round's completions as training data, and a micro-batch packed as the
//! model takes it: each prompt once, followed by its completions, which attend
//! to it and to themselves at the positions they would have alone. Pure data
//! layout: no model, no tensors (tested against one row per completion).

use std::ops::Range;

/// One round's completions as training data: each completion's tokens (EOS
/// appended when it ended on it) after its prompt, and its loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// Per completion: its prompt's ids.
    pub prompts: Vec<Vec<u32>>,
    /// Per completion: its tokens, EOS included when it ended on it.
    pub completions: Vec<Vec<u32>>,
    /// [completions][completion_len]: 1 for completion tokens the loss counts.
    pub masks: Vec<Vec<f32>>,
    /// The longest completion (with EOS): the width of log-probability matrices.
    pub completion_len: usize,
}

/// What [`build_rows`] needs to know of a sampled completion.
#[derive(Debug, Clone)]
pub struct RowSpec<'a> {
    pub prompt: &'a [u32],
    pub tokens: &'a [u32],
    /// Ended by EOS (which training appends back, so the model learns to stop).
    pub eos: bool,
    /// Ranges of `tokens` a tool wrote: context, masked out of the loss.
    pub tool_spans: &'a [Range<usize>],
}

/// The training rows and loss masks of a round. A completion cut off at
/// `max_completion_length` is masked out entirely when `mask_truncated`.
pub fn build_rows(specs: &[RowSpec], eos_id: u32, max_completion_length: usize, mask_truncated: bool) -> Rows {
    let completions: Vec<Vec<u32>> =
        specs.iter().map(|s| s.tokens.iter().copied().chain(s.eos.then_some(eos_id)).collect()).collect();
    let clen = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let masks = specs
        .iter()
        .zip(&completions)
        .map(|(s, comp)| {
            let truncated = !s.eos && s.tokens.len() >= max_completion_length;
            let keep = !(mask_truncated && truncated);
            let from_tool = |j: usize| s.tool_spans.iter().any(|r| r.contains(&j));
            (0..clen).map(|j| if keep && j < comp.len() && !from_tool(j) { 1.0 } else { 0.0 }).collect()
        })
        .collect();
    Rows { prompts: specs.iter().map(|s| s.prompt.to_vec()).collect(), completions, masks, completion_len: clen }
}

/// A packed row takes further completions of its prompt while it stays within
/// this many tokens; past it the prompt starts a new row. The attention mask
/// is [rows, T, T], so unbounded rows (16 completions of 1,024 tokens) would
/// cost more in the mask than the shared prompt saves.
pub const PACKED_ROW_TOKENS: usize = 2048;

/// Completions of a micro-batch as the model takes them: each prompt once,
/// followed by its completions in the micro-batch (a `Batch::shared_prefix`
/// row), and where to read each completion token's log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// (prompt, its completions), one row each.
    pub rows: Vec<(Vec<u32>, Vec<Vec<u32>>)>,
    /// Per completion and completion position (row-major, `completion_len` per
    /// completion): the flat position (row × T + t) whose output predicts the
    /// token. The prompt's last position predicts every completion's first token.
    pub at: Vec<u32>,
    /// The predicted tokens (0 past a completion's end, where the mask is 0).
    pub targets: Vec<u32>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// Prompt + completion tokens of completions `r`, counted per completion
    /// (as TRL counts trained tokens), whatever the layout computes once.
    pub fn tokens(&self, r: &Range<usize>) -> usize {
        r.clone().map(|i| self.prompts[i].len() + self.completions[i].len()).sum()
    }

    /// Completions `r` packed: consecutive completions of one prompt share one
    /// row, so the prompt goes through the model once per group instead of
    /// once per completion. Each completion attends to its prompt and itself
    /// only, at the positions it would have alone: the same computation as
    /// one row per completion, in a different float order.
    pub fn pack(&self, r: Range<usize>) -> Packed {
        let mut rows: Vec<(Vec<u32>, Vec<Vec<u32>>)> = Vec::new();
        // Per completion: (row, offset of its first token in the row).
        let mut place = Vec::with_capacity(r.len());
        for i in r.clone() {
            let n = rows.len();
            match rows.last_mut() {
                Some((p, cs))
                    if *p == self.prompts[i]
                        && p.len() + cs.iter().map(Vec::len).sum::<usize>() + self.completions[i].len()
                            <= PACKED_ROW_TOKENS =>
                {
                    place.push((n - 1, p.len() + cs.iter().map(Vec::len).sum::<usize>()));
                    cs.push(self.completions[i].clone());
                }
                _ => {
                    place.push((rows.len(), self.prompts[i].len()));
                    rows.push((self.prompts[i].clone(), vec![self.completions[i].clone()]));
                }
            }
        }
        let t = rows.iter().map(|(p, cs)| p.len() + cs.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
        let clen = self.completion_len;
        let (mut at, mut targets) = (Vec::with_capacity(r.len() * clen), Vec::with_capacity(r.len() * clen));
        for (i, &(row, offset)) in r.zip(&place) {
            let comp = &self.completions[i];
            let base = row * t;
            let prompt_last = self.prompts[i].len().saturating_sub(1);
            for j in 0..clen {
                if j < comp.len() {
                    at.push((base + if j == 0 { prompt_last } else { offset + j - 1 }) as u32);
                    targets.push(comp[j]);
                } else {
                    at.push(base as u32);
                    targets.push(0);
                }
            }
        }
        Packed { rows, at, targets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, Pass};
    use candle_core::Tensor;

    #[test]
    fn rows_append_eos_and_mask_past_each_completion() {
        let (p1, p2) = (vec![10u32, 11, 12], vec![20u32]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2], eos: true, tool_spans: &[] },
            RowSpec { prompt: &p2, tokens: &[3, 4, 5, 6], eos: false, tool_spans: &[] },
        ];
        let r = build_rows(&specs, 99, 4, false);
        assert_eq!(r.completion_len, 4);
        assert_eq!(r.completions, vec![vec![1, 2, 99], vec![3, 4, 5, 6]]);
        assert_eq!(r.prompts, vec![p1, p2]);
        assert_eq!(r.masks, vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0; 4]]);
        assert_eq!(r.tokens(&(0..2)), 6 + 5, "prompt + completion per completion");
    }

    #[test]
    fn truncated_completions_are_masked_out_only_when_asked() {
        let p = vec![7u32];
        let specs = [
            RowSpec { prompt: &p, tokens: &[1, 2, 3], eos: false, tool_spans: &[] }, // hit max_completion_length = 3
            RowSpec { prompt: &p, tokens: &[1], eos: false, tool_spans: &[] }, // stopped by a stop string: not truncated
            RowSpec { prompt: &p, tokens: &[1, 2], eos: true, tool_spans: &[] },
        ];
        let kept = build_rows(&specs, 99, 3, false);
        assert_eq!(kept.masks[0], vec![1.0, 1.0, 1.0]);
        let masked = build_rows(&specs, 99, 3, true);
        assert_eq!(masked.masks[0], vec![0.0, 0.0, 0.0]);
        assert_eq!(masked.masks[1], vec![1.0, 0.0, 0.0]);
        assert_eq!(masked.masks[2], vec![1.0, 1.0, 1.0]);
        assert_eq!(masked.completions, kept.completions, "masking changes the loss, not the rows");
    }

    #[test]
    fn a_group_shares_one_row_and_each_token_is_read_where_it_is_predicted() {
        let (p1, p2) = (vec![10u32, 11, 12], vec![20u32]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2], eos: true, tool_spans: &[] },
            RowSpec { prompt: &p1, tokens: &[3], eos: true, tool_spans: &[] },
            RowSpec { prompt: &p2, tokens: &[4, 5, 6, 7], eos: false, tool_spans: &[] },
        ];
        let rows = build_rows(&specs, 99, 8, false);
        let p = rows.pack(0..3);
        assert_eq!(p.rows, vec![(p1.clone(), vec![vec![1, 2, 99], vec![3, 99]]), (p2, vec![vec![4, 5, 6, 7]])]);
        // Rows are 8 long (3 + 3 + 2; 1 + 4 padded). Completion 0 starts at 3, completion 1 at 6,
        // and both first tokens are predicted by the prompt's last position (2).
        assert_eq!(p.at, vec![2, 3, 4, 0, 2, 6, 0, 0, 8, 9, 10, 11]);
        assert_eq!(p.targets, vec![1, 2, 99, 0, 3, 99, 0, 0, 4, 5, 6, 7]);
        // A micro-batch that splits a group packs its part of it.
        let p = rows.pack(1..3);
        assert_eq!(p.rows[0], (p1.clone(), vec![vec![3, 99]]));
        assert_eq!(&p.at[..4], &[2, 3, 0, 0]);
        // A row stops growing at PACKED_ROW_TOKENS: the prompt starts another.
        let long = vec![1u32; PACKED_ROW_TOKENS / 2 - 2];
        let specs = vec![RowSpec { prompt: &p1, tokens: &long, eos: false, tool_spans: &[] }; 3];
        let p = build_rows(&specs, 99, 8, false).pack(0..3);
        let members: Vec<usize> = p.rows.iter().map(|(_, cs)| cs.len()).collect();
        assert_eq!(members, [2, 1], "3 + 2 × 1022 = 2047 fits in a row, a third completion does not");
        assert_eq!(p.at[2 * (PACKED_ROW_TOKENS / 2 - 2)], 2047 + 2, "the third completion reads from row 1's prompt");
    }

    /// The packed layout computes what one row per completion computes: the same
    /// log-probabilities and the same gradients, up to float order.
    #[test]
    fn packed_groups_give_the_per_completion_values_and_gradients() {
        use crate::model::{Config, Transformer};
        use candle_core::Device;
        let cfg = Config::from_json(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "max_position_embeddings": 128
        }))
        .unwrap();
        let mut m = Transformer::random(cfg, 3, &Device::Cpu).unwrap();
        m.gradient_checkpointing = true;
        let (p1, p2) = (vec![5u32, 9, 13, 2, 40], vec![7u32, 8]);
        let specs = [
            RowSpec { prompt: &p1, tokens: &[1, 2, 3], eos: true, tool_spans: &[] },
            RowSpec { prompt: &p1, tokens: &[4], eos: false, tool_spans: &[] },
            RowSpec { prompt: &p1, tokens: &[6, 6, 6, 6, 6], eos: false, tool_spans: &[] },
            RowSpec { prompt: &p2, tokens: &[11, 12], eos: true, tool_spans: &[] },
        ];
        let rows = build_rows(&specs, 0, 8, false);
        let n = rows.len();
        let clen = rows.completion_len;
        let mask = Tensor::new(rows.masks.clone(), &Device::Cpu).unwrap();
        // Packed: the layout GRPO trains on.
        let packed = rows.pack(0..n);
        let b = Batch::shared_prefix(&packed.rows, 0, &Device::Cpu).unwrap();
        let lp = m.logprobs_at(&b, &packed.at, &packed.targets, 0.7, Pass::TRAIN).unwrap().reshape((n, clen)).unwrap();
        m.backward(&(&lp * &mask).unwrap().sum_all().unwrap()).unwrap();
        let (packed_lp, packed_g): (Vec<Vec<f32>>, _) = ((&lp * &mask).unwrap().to_vec2().unwrap(), m.take_grads());
        // One left-padded row per completion.
        let plen = rows.prompts.iter().map(Vec::len).max().unwrap();
        let seqs: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                let mut s = vec![0; plen - rows.prompts[i].len()];
                s.extend(&rows.prompts[i]);
                s.extend(&rows.completions[i]);
                s.extend(std::iter::repeat_n(0, clen - rows.completions[i].len()));
                s
            })
            .collect();
        let valid: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                let pad = plen - rows.prompts[i].len();
                let len = pad + rows.prompts[i].len() + rows.completions[i].len();
                (0..plen + clen).map(|j| j >= pad && j < len).collect()
            })
            .collect();
        let b = Batch::from_rows(seqs, valid, &Device::Cpu).unwrap();
        let lp = m.next_token_logprobs_range(&b, plen - 1, clen, 0.7, Pass::TRAIN).unwrap();
        m.backward(&(&lp * &mask).unwrap().sum_all().unwrap()).unwrap();
        let (row_lp, row_g): (Vec<Vec<f32>>, _) = ((&lp * &mask).unwrap().to_vec2().unwrap(), m.take_grads());
        for (a, b) in packed_lp.iter().flatten().zip(row_lp.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "log-probability {a} packed vs {b} per row");
        }
        assert!(packed_lp.iter().flatten().any(|x| *x != 0.0));
        assert_eq!(packed_g.len(), row_g.len());
        for (name, g) in &packed_g {
            let d = (g - &row_g[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * scale.max(1e-3), "{name}: max |Δ grad| {d} (scale {scale})");
        }
    }

    #[test]
    fn a_tools_result_is_context_not_trained_on() {
        let p = vec![9];
        // Tokens 2..4 were written by a tool; EOS appended after the last.
        let spans = vec![std::ops::Range { start: 2, end: 4 }];
        let specs = vec![RowSpec { prompt: &p, tokens: &[1, 2, 3, 4, 5], eos: true, tool_spans: &spans }];
        let rows = build_rows(&specs, 0, 16, false);
        assert_eq!(rows.completions[0], vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(rows.masks[0], vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }
}
