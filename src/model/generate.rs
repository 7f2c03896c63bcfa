//! Batched sampling with a KV cache: left padding, temperature, top-p, top-k,
//! greedy, max_new_tokens, EOS and stop strings, a seeded RNG, and groups of
//! `n` samples per prompt that share one prefill of the prompt.

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::kv_cache::KvCache;
use super::tokenizer::ChatTokenizer;
use super::transformer::{Transformer, PAD_SENTINEL};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation ends when the text ends with one of these (not included in the text).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, max_new_tokens: 256, stop: Vec::new() }
    }
}

impl SamplingParams {
    /// Problems with the settings, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut e = Vec::new();
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            e.push(("temperature", "must be ≥ 0 (0 is greedy)".to_string()));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            e.push(("top_p", "must be in (0, 1]".to_string()));
        }
        if self.max_new_tokens == 0 {
            e.push(("max_new_tokens", "must be at least 1".to_string()));
        }
        e
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Which prompt this completes.
    pub prompt_index: usize,
    /// Generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Ended by an EOS token (which `tokens` leaves out; training appends it back).
    pub eos: bool,
    /// The sampler's log-probability of each sampled token (EOS included when
    /// `eos`), when an inference server returned them; `None` from local generation.
    pub sampling_logprobs: Option<Vec<f32>>,
}

/// Streams text as it is generated: (row, new text).
pub type OnText<'a> = &'a mut dyn FnMut(usize, &str);

struct Row {
    prompt_index: usize,
    tokens: Vec<u32>,
    emitted: usize,
    finish: Option<FinishReason>,
    eos: bool,
    text: String,
}

/// Generate `n` completions for each prompt (token ids, already templated).
/// Rows finish independently; finished rows are dropped from the batch as it shrinks.
pub fn generate(
    model: &Transformer,
    tok: &ChatTokenizer,
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
    mut on_text: Option<OnText>,
) -> Result<Vec<Completion>> {
    if prompts.is_empty() || n == 0 {
        return Ok(Vec::new());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::new(model.cfg.num_layers, longest + params.max_new_tokens + 1);
    let padded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| std::iter::repeat_n(PAD_SENTINEL, longest - p.len()).chain(p.iter().copied()).collect())
        .collect();
    // One prefill per prompt; the group's rows share it.
    let logits = model.forward_cached(&padded, &mut cache)?;
    let expand: Vec<u32> = (0..prompts.len() as u32).flat_map(|p| std::iter::repeat_n(p, n)).collect();
    let (mut logits, mut cache) = if n > 1 {
        let idx = candle_core::Tensor::new(expand.as_slice(), logits.device())?;
        (logits.index_select(&idx, 0)?, cache.select_rows(&expand)?)
    } else {
        (logits, cache)
    };
    let mut rows: Vec<Row> = expand
        .iter()
        .map(|&p| Row {
            prompt_index: p as usize,
            tokens: Vec::new(),
            emitted: 0,
            finish: None,
            eos: false,
            text: String::new(),
        })
        .collect();
    // `active[i]`: which row of `rows` is row i of the batch.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    for step in 0..params.max_new_tokens {
        let host: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(active.len());
        for (i, &r) in active.iter().enumerate() {
            let row = &mut rows[r];
            if row.finish.is_some() {
                next.push(vec![PAD_SENTINEL]);
                continue;
            }
            let token = sample(&host[i], params, rng).map_err(|e| anyhow::anyhow!("generation step {step}: {e}"))?.0;
            if tok.eos_ids.contains(&token) {
                row.finish = Some(FinishReason::Stop);
                row.eos = true;
                next.push(vec![PAD_SENTINEL]);
                continue;
            }
            row.tokens.push(token);
            row.text = tok.decode(&row.tokens)?;
            if let Some(cut) = params.stop.iter().filter_map(|s| row.text.find(s.as_str())).min() {
                row.text.truncate(cut);
                row.finish = Some(FinishReason::Stop);
            } else if step + 1 == params.max_new_tokens {
                row.finish = Some(FinishReason::Length);
            }
            if let Some(cb) = on_text.as_mut() {
                // Hold back a partial UTF-8 character or a possible stop-string prefix.
                let safe = if row.finish.is_some() { row.text.len() } else { stream_safe_len(&row.text, &params.stop) };
                if safe > row.emitted {
                    cb(r, &row.text[row.emitted..safe]);
                    row.emitted = safe;
                }
            }
            next.push(vec![if row.finish.is_some() { PAD_SENTINEL } else { token }]);
        }
        let alive: Vec<usize> = (0..active.len()).filter(|&i| rows[active[i]].finish.is_none()).collect();
        if alive.is_empty() {
            break;
        }
        // Shrink the batch once a quarter of it is finished: decoding finished rows is wasted work.
        if alive.len() * 4 <= active.len() * 3 {
            let keep: Vec<u32> = alive.iter().map(|&i| i as u32).collect();
            cache = cache.select_rows(&keep)?;
            next = alive.iter().map(|&i| next[i].clone()).collect();
            active = alive.iter().map(|&i| active[i]).collect();
        }
        logits = model.forward_cached(&next, &mut cache)?;
    }
    Ok(rows
        .into_iter()
        .map(|r| Completion {
            prompt_index: r.prompt_index,
            tokens: r.tokens,
            text: r.text,
            finish_reason: r.finish.unwrap_or(FinishReason::Length),
            eos: r.eos,
            sampling_logprobs: None,
        })
        .collect())
}

/// The length of `text` that can be shown without risking a later stop-string cut
/// or a replacement character from an incomplete UTF-8 sequence.
fn stream_safe_len(text: &str, stops: &[String]) -> usize {
    let mut safe = text.trim_end_matches('\u{FFFD}').len();
    for s in stops {
        for k in (1..s.len()).rev() {
            if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                safe = safe.min(safe - k);
                break;
            }
        }
    }
    safe
}

/// Pick the next token from one row of logits; returns it with its log-probability.
/// Logits with a NaN (a diverged model) are an error, not a guess.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> Result<(u32, f32)> {
    if let Some(i) = logits.iter().position(|l| l.is_nan()) {
        anyhow::bail!(
            "the model's logits are NaN (first at token id {i}): its weights have diverged; \
             retrain with a lower learning_rate or a smaller max_grad_norm"
        );
    }
    Ok(sample_finite(logits, p, rng))
}

fn sample_finite(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let t = if p.temperature > 0.0 { p.temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max / t + logits.iter().map(|&l| ((l - max) / t).exp()).sum::<f32>().ln();
    let logprob = |i: usize| logits[i] / t - lse;
    if p.temperature <= 0.0 {
        let best = logits.iter().enumerate().fold(0, |b, (i, &l)| if l > logits[b] { i } else { b });
        return (best as u32, logprob(best));
    }
    if p.top_k == 0 && p.top_p >= 1.0 {
        // Plain sampling from the full distribution: no sort needed.
        let mut u = rng.random::<f32>();
        for (i, &l) in logits.iter().enumerate() {
            let prob = (l / t - lse).exp();
            if u < prob {
                return (i as u32, logprob(i));
            }
            u -= prob;
        }
        let best = logits.iter().enumerate().fold(0, |b, (i, &l)| if l > logits[b] { i } else { b });
        return (best as u32, logprob(best));
    }
    // Candidates by descending probability, cut by top-k then top-p.
    let floor = max / t - 30.0; // below e^-30 of the best: never sampled in practice
    let mut cand: Vec<(usize, f32)> =
        logits.iter().enumerate().filter(|(_, &l)| l / t >= floor).map(|(i, &l)| (i, (l / t - lse).exp())).collect();
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, (_, prob)) in cand.iter().enumerate() {
            acc += prob;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let total: f32 = cand.iter().map(|c| c.1).sum();
    let mut u = rng.random::<f32>() * total;
    for &(i, prob) in &cand {
        if u < prob {
            return (i as u32, logprob(i));
        }
        u -= prob;
    }
    // Every logit −∞ (an empty candidate list): fall back to the first token.
    let last = cand.last().map(|c| c.0).unwrap_or(0);
    (last as u32, logprob(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (t, lp) = sample(&[0.0, 2.0, 1.0], &SamplingParams::default(), &mut rng).unwrap();
        assert_eq!(t, 1);
        let z = (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - (2.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [3.0, 2.9, 0.0, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let k1 = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        assert!((0..200).all(|_| sample(&logits, &k1, &mut rng).unwrap().0 == 0));
        let p = SamplingParams { temperature: 1.0, top_p: 0.8, ..Default::default() };
        let seen: std::collections::BTreeSet<u32> =
            (0..500).map(|_| sample(&logits, &p, &mut rng).unwrap().0).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_reproducible() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws: Vec<u32> = (0..4000).map(|_| sample(&logits, &p, &mut rng).unwrap().0).collect();
        let frac = draws.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        let mut again = ChaCha8Rng::seed_from_u64(7);
        let redraw: Vec<u32> = (0..4000).map(|_| sample(&logits, &p, &mut again).unwrap().0).collect();
        assert_eq!(draws, redraw);
    }

    #[test]
    fn nan_logits_are_an_error_that_says_so_with_every_sampler() {
        let logits = [f32::NAN; 4];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for p in [
            SamplingParams::default(),
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() },
            SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
        ] {
            let e = sample(&logits, &p, &mut rng).unwrap_err().to_string();
            assert!(e.contains("logits are NaN"), "{e}");
        }
    }

    #[test]
    fn streaming_holds_back_a_possible_stop_prefix() {
        let stops = vec!["</answer>".to_string()];
        assert_eq!(stream_safe_len("42\n</ans", &stops), 3);
        assert_eq!(stream_safe_len("42", &stops), 2);
    }
}
