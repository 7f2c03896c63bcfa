//! Batched sampling with a KV cache: left padding, temperature, top-p, top-k,
//! greedy, max_new_tokens, EOS and stop strings, a seeded RNG, and groups of
//! `n` samples per prompt that share one prefill of the prompt. The choice of
//! each step's tokens moves as little as it can from the device (`pick`), and
//! the text grows a token at a time (`ChatTokenizer::text_stream`).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::kv_cache::KvCache;
use super::tokenizer::{ChatTokenizer, TextStream};
use super::transformer::{Transformer, PAD_SENTINEL};
use crate::kernels::transfer;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// Keep only tokens at least this fraction as likely as the most likely one.
    pub min_p: Option<f32>,
    /// Above 1, every token already in the prompt or the completion is made less
    /// likely: its logit divided by it when positive, multiplied when negative
    /// (HF's and vLLM's rule).
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    /// Generation ends when the text reaches one of these, which the text leaves
    /// out unless `include_stop_str_in_output` (vLLM's names).
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    /// Stop at a tool call of this format so that a tool can answer it
    /// (`rollout::tools`); set by the tool loop, never by a user.
    #[serde(skip)]
    pub tool_call: Option<super::tool_call::CallFormat>,
    /// Keep the sampler's log-probability of each sampled token in the
    /// completion (GRPO's importance-sampling correction); set by the caller,
    /// never by a user.
    #[serde(skip)]
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: None,
            repetition_penalty: 1.0,
            max_new_tokens: 256,
            stop: Vec::new(),
            include_stop_str_in_output: false,
            tool_call: None,
            logprobs: false,
        }
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
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            e.push(("min_p", "must be in [0, 1]".to_string()));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            e.push(("repetition_penalty", "must be > 0 (1: none)".to_string()));
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
    /// An inline tool call (`<<expr=`): a segment that a tool's result continues.
    ToolCall,
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
    /// Ranges of `tokens` that a tool wrote (its results): context, never trained on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_spans: Vec<std::ops::Range<usize>>,
    /// The calls the completion made, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<super::tool_call::ToolCall>,
}

/// Streams text as it is generated: (row, new text).
pub type OnText<'a> = &'a mut dyn FnMut(usize, &str);

/// Answers a tool call inside generation: given the row (its prompt's index
/// in continuous batching, its row in [`generate_answering`]) and its text so
/// far, which ends with a call, the tokens of the tool's result and the call's
/// record, or `None` to let the row write on (its call limit is reached).
/// `rollout::tools` implements it; generation only forces the tokens in.
pub type AnswerCall<'a> = dyn FnMut(usize, &str) -> Result<Option<(Vec<u32>, super::tool_call::ToolCall)>> + 'a;

/// A row's completion as it grows: its tokens, and its text decoded a token at
/// a time (for stop strings and streaming; the completion reports the whole
/// decode, as before).
pub(crate) struct RowText<'t> {
    tokens: Vec<u32>,
    eos: bool,
    stream: Option<TextStream<'t>>,
    text: String,
    /// A stop string ended the row and `text` is cut there.
    stopped: bool,
    emitted: usize,
    /// A tool's result still to be fed, a token a step, in place of sampling.
    forced: std::collections::VecDeque<u32>,
    /// Ranges of `tokens` that tools wrote, and the calls, in order.
    tool_spans: Vec<std::ops::Range<usize>>,
    tool_calls: Vec<super::tool_call::ToolCall>,
    /// With `SamplingParams::logprobs`: the sampler's log-probability of each
    /// token (EOS included; NaN for a tool's tokens, which were not sampled).
    logprobs: Option<Vec<f32>>,
}

impl<'t> RowText<'t> {
    pub(crate) fn new(tok: &'t ChatTokenizer, params: &SamplingParams) -> RowText<'t> {
        RowText {
            tokens: Vec::new(),
            eos: false,
            stream: Some(tok.text_stream()),
            text: String::new(),
            stopped: false,
            emitted: 0,
            forced: std::collections::VecDeque::new(),
            tool_spans: Vec::new(),
            tool_calls: Vec::new(),
            logprobs: params.logprobs.then(Vec::new),
        }
    }

    /// The tokens generated so far (EOS excluded).
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Take the sampled `token`; whether (and why) the row ends here: EOS, a
    /// stop string (the text is cut there, after it with
    /// `include_stop_str_in_output`), or `max_new_tokens` reached.
    pub(crate) fn advance(
        &mut self,
        (token, logprob): (u32, f32),
        tok: &ChatTokenizer,
        params: &SamplingParams,
    ) -> Result<Option<FinishReason>> {
        if let Some(lp) = &mut self.logprobs {
            lp.push(logprob);
        }
        if tok.eos_ids.contains(&token) {
            self.eos = true;
            return Ok(Some(FinishReason::Stop));
        }
        let before = self.text.len();
        self.push(token, tok)?;
        // A stop string can only have appeared in what this token added (and the
        // stop's length before it).
        let longest_stop = params.stop.iter().map(String::len).max().unwrap_or(0);
        let from = before.saturating_sub(longest_stop);
        let from = (0..=from).rev().find(|&k| self.text.is_char_boundary(k)).unwrap_or(0);
        if params.stop.iter().any(|s| self.text[from..].contains(s.as_str())) {
            // Cut on the whole decode, the text the completion reports.
            let full = tok.decode(&self.tokens)?;
            let cut = params
                .stop
                .iter()
                .filter_map(|s| {
                    full.find(s.as_str()).map(|at| if params.include_stop_str_in_output { at + s.len() } else { at })
                })
                .min();
            if let Some(cut) = cut {
                self.text = full[..cut].to_string();
                self.stopped = true;
                return Ok(Some(FinishReason::Stop));
            }
        }
        // A call at the last allowed token has no room for its result: the row ends there.
        if params.tool_call.is_some_and(|f| f.pending(&self.text).is_some())
            && self.tokens.len() < params.max_new_tokens
        {
            return Ok(Some(FinishReason::ToolCall));
        }
        Ok((self.tokens.len() >= params.max_new_tokens).then_some(FinishReason::Length))
    }

    /// Append `token` to the tokens and the text.
    fn push(&mut self, token: u32, tok: &ChatTokenizer) -> Result<()> {
        self.tokens.push(token);
        let step = self.stream.as_mut().map(|s| s.step(token));
        match step {
            Some(Ok(Some(piece))) => self.text.push_str(&piece),
            Some(Ok(None)) => {}
            // A tokenizer that cannot decode this sequence incrementally: decode it whole.
            Some(Err(_)) | None => {
                self.stream = None;
                self.text = tok.decode(&self.tokens)?;
            }
        }
        Ok(())
    }

    /// A tool's result to feed next, a token a step (context, marked as the tool's).
    pub(crate) fn force(&mut self, ids: Vec<u32>, call: super::tool_call::ToolCall) {
        let at = self.tokens.len();
        self.tool_spans.push(at..at + ids.len());
        self.forced.extend(ids);
        self.tool_calls.push(call);
    }

    /// Whether the next token is a tool's, not the model's.
    pub(crate) fn forcing(&self) -> bool {
        !self.forced.is_empty()
    }

    /// Take the next token of a tool's result in place of a sampled one; the row
    /// ends when it reaches `max_new_tokens` (the result cut there).
    pub(crate) fn advance_forced(
        &mut self,
        tok: &ChatTokenizer,
        params: &SamplingParams,
    ) -> Result<(u32, Option<FinishReason>)> {
        let token = self.forced.pop_front().expect("called while forcing");
        if let Some(lp) = &mut self.logprobs {
            lp.push(f32::NAN);
        }
        self.push(token, tok)?;
        let full = self.tokens.len() >= params.max_new_tokens;
        if full {
            self.forced.clear();
        }
        Ok((token, full.then_some(FinishReason::Length)))
    }

    /// After the model's `token` ended the row for `done`: at a tool call that
    /// `answer` answers, the result is queued and the row goes on (`None`); at a
    /// call `answer` declines, the row writes on too.
    pub(crate) fn settle(
        &mut self,
        row: usize,
        done: Option<FinishReason>,
        answer: Option<&mut AnswerCall>,
    ) -> Result<Option<FinishReason>> {
        let (Some(FinishReason::ToolCall), Some(answer)) = (done, answer) else { return Ok(done) };
        if let Some((ids, call)) = answer(row, &self.text)? {
            self.force(ids, call);
        }
        Ok(None)
    }

    /// What can be shown of the text so far without a later stop-string cut or
    /// a partial character taking it back; `finished` shows the rest.
    fn unshown(&mut self, params: &SamplingParams, finished: bool) -> Option<&str> {
        let safe = if finished { self.text.len() } else { stream_safe_len(&self.text, &params.stop) };
        (safe > self.emitted).then(|| {
            let from = std::mem::replace(&mut self.emitted, safe);
            &self.text[from..safe]
        })
    }

    /// The completion of prompt `prompt_index`, finished for `reason`.
    pub(crate) fn into_completion(
        self,
        tok: &ChatTokenizer,
        prompt_index: usize,
        reason: FinishReason,
    ) -> Result<Completion> {
        let text = if self.stopped { self.text } else { tok.decode(&self.tokens)? };
        let n = self.tokens.len();
        // A result cut by the token budget: its span ends with the tokens.
        let tool_spans = self.tool_spans.into_iter().filter(|r| r.start < n).map(|r| r.start..r.end.min(n)).collect();
        Ok(Completion {
            prompt_index,
            tokens: self.tokens,
            text,
            finish_reason: reason,
            eos: self.eos,
            sampling_logprobs: self.logprobs,
            tool_spans,
            tool_calls: self.tool_calls,
        })
    }
}

/// Refuse, before any memory is set aside, prompts that cannot be generated
/// from: an empty one (a chat template that rendered nothing) or one whose
/// completion would run past the model's context.
pub fn check_prompts(model: &Transformer, prompts: &[Vec<u32>], params: &SamplingParams) -> Result<()> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!(
            "prompt {i} encodes to no tokens: the chat template rendered nothing for it, or the tokenizer made no \
             tokens of what it rendered (check the tokenizer's chat template, its vocabulary and the prompt)"
        );
    }
    let context = model.cfg.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest.saturating_add(params.max_new_tokens) > context {
        bail!(
            "a prompt of {longest} tokens plus max_new_tokens {} is more than the model's context of {context} tokens \
             (max_position_embeddings): lower max_new_tokens or shorten the prompt",
            params.max_new_tokens
        );
    }
    Ok(())
}

/// Generate `n` completions for each prompt (token ids, already templated).
/// Rows finish independently; finished rows are dropped from the batch as it
/// shrinks. Each step moves to the host only what picking the next tokens
/// needs: B token ids when greedy (the argmax is taken on the device).
/// (Many prompts, one completion each: `batching::generate_continuous`.)
pub fn generate(
    model: &Transformer,
    tok: &ChatTokenizer,
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
    on_text: Option<OnText>,
) -> Result<Vec<Completion>> {
    generate_answering(model, tok, prompts, n, params, rng, on_text, None)
}

/// [`generate`] with tool calls answered inside the batch: a row whose text
/// ends with a call (`params.tool_call`) gets `answer`'s result fed to it a
/// token a step, where it would have sampled, while the other rows go on;
/// then it samples again. No row waits for another and nothing is prefilled
/// again. A row feeding a result draws no random number. `answer` is called
/// with the row's index (prompt-major: completion j of prompt i is row i·n + j).
#[allow(clippy::too_many_arguments)]
pub fn generate_answering(
    model: &Transformer,
    tok: &ChatTokenizer,
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
    mut on_text: Option<OnText>,
    mut answer: Option<&mut AnswerCall>,
) -> Result<Vec<Completion>> {
    if prompts.is_empty() || n == 0 {
        return Ok(Vec::new());
    }
    check_prompts(model, prompts, params)?;
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
        let idx = Tensor::new(expand.as_slice(), logits.device())?;
        (logits.index_select(&idx, 0)?, cache.select_rows(&expand)?)
    } else {
        (logits, cache)
    };
    let mut rows: Vec<RowText> = expand.iter().map(|_| RowText::new(tok, params)).collect();
    let mut finish: Vec<Option<FinishReason>> = vec![None; rows.len()];
    // `active[i]`: which row of `rows` is row i of the batch.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    for step in 0..params.max_new_tokens {
        // One uniform per unfinished row, in batch order, as the sampler has always drawn them.
        let uniforms: Vec<f32> = active
            .iter()
            .map(|&r| {
                let samples = finish[r].is_none() && !rows[r].forcing();
                if samples && params.temperature > 0.0 {
                    rng.random::<f32>()
                } else {
                    0.0
                }
            })
            .collect();
        let seen = |i: usize| -> Vec<u32> {
            let r = active[i];
            prompts[expand[r] as usize].iter().chain(rows[r].tokens()).copied().collect()
        };
        let picked = pick_scored(&logits, params, &uniforms, &seen)
            .map_err(|e| anyhow::anyhow!("generation step {step}: {e}"))?;
        let mut next = Vec::with_capacity(active.len());
        for (i, &r) in active.iter().enumerate() {
            if finish[r].is_some() {
                next.push(vec![PAD_SENTINEL]);
                continue;
            }
            let token = if rows[r].forcing() {
                let (token, done) = rows[r].advance_forced(tok, params)?;
                finish[r] = done;
                token
            } else {
                let done = rows[r].advance(picked[i], tok, params)?;
                finish[r] = rows[r].settle(r, done, answer.as_deref_mut())?;
                picked[i].0
            };
            if let Some(cb) = on_text.as_mut() {
                if let Some(piece) = rows[r].unshown(params, finish[r].is_some()) {
                    cb(r, piece);
                }
            }
            next.push(vec![if finish[r].is_some() { PAD_SENTINEL } else { token }]);
        }
        let alive: Vec<usize> = (0..active.len()).filter(|&i| finish[active[i]].is_none()).collect();
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
    rows.into_iter()
        .zip(finish)
        .zip(expand)
        .map(|((row, f), p)| row.into_completion(tok, p as usize, f.unwrap_or(FinishReason::Length)))
        .collect()
}

/// The next token of every row of `logits` [B, V], moving to the host only what
/// the choice needs: greedy takes the argmax on the device (B ids cross);
/// plain sampling picks a block of the vocabulary, then a token in it (about
/// 2·√V numbers a row cross, not V); top-k and top-p copy the rows and cut
/// them on the host, in parallel. `uniforms[i]`: row i's draw in [0, 1).
/// Each token comes with its log-probability under the sampling distribution
/// (the logits at temperature τ, before any top-k/top-p/min-p cut, as
/// [`sample`] reports it); NaN for a greedy pick, where none is computed.
pub(crate) fn pick_scored(
    logits: &Tensor,
    p: &SamplingParams,
    uniforms: &[f32],
    seen: &dyn Fn(usize) -> Vec<u32>,
) -> Result<Vec<(u32, f32)>> {
    let (b, v) = logits.dims2()?;
    if p.repetition_penalty != 1.0 || p.min_p.is_some() {
        // Per-row adjustments by what each row has seen: on the host, rows in parallel.
        let mut rows: Vec<Vec<f32>> = transfer::to_vec2(logits)?;
        if p.repetition_penalty != 1.0 {
            for (i, row) in rows.iter_mut().enumerate() {
                penalize(row, &seen(i), p.repetition_penalty);
            }
        }
        return rows.par_iter().zip(uniforms.par_iter()).map(|(row, &u)| sample(row, p, u)).collect();
    }
    if p.temperature <= 0.0 {
        // A row with a NaN (a diverged model) gets the id `v`, which no token has.
        let nan = logits.ne(logits)?.max(D::Minus1)?.to_dtype(DType::U32)?;
        let ids = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
        let ids = transfer::to_vec1::<u32>(&(ids + (nan * (v as f64))?)?)?;
        return ids
            .into_iter()
            .map(|id| if (id as usize) < v { Ok((id, f32::NAN)) } else { Err(nan_error()) })
            .collect();
    }
    if p.top_k == 0 && p.top_p >= 1.0 {
        return sample_in_blocks(logits, p.temperature, uniforms);
    }
    let rows: Vec<Vec<f32>> = transfer::to_vec2(logits)?;
    debug_assert_eq!(rows.len(), b);
    rows.par_iter().zip(uniforms.par_iter()).map(|(row, &u)| sample(row, p, u)).collect()
}

/// HF's repetition penalty on one row: a logit of a token already seen is
/// divided by `penalty` when positive and multiplied by it when negative.
fn penalize(row: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if let Some(x) = row.get_mut(t as usize).filter(|_| done.insert(t)) {
            *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
        }
    }
}

/// Plain sampling at temperature τ from the device's logits: the softmax on the
/// device; per row, the sums of √V-sized blocks of probabilities cross, the
/// draw picks a block, and that block's probabilities cross to pick the token.
fn sample_in_blocks(logits: &Tensor, temperature: f32, uniforms: &[f32]) -> Result<Vec<(u32, f32)>> {
    let (b, v) = logits.dims2()?;
    let block = ((v as f64).sqrt().ceil() as usize).max(1);
    let blocks = v.div_ceil(block);
    let probs = candle_nn::ops::softmax_last_dim(&(logits.to_dtype(DType::F32)? / temperature as f64)?)?;
    let padded = if blocks * block > v {
        Tensor::cat(&[&probs, &Tensor::zeros((b, blocks * block - v), DType::F32, probs.device())?], 1)?
    } else {
        probs
    };
    let by_block = padded.reshape((b * blocks, block))?;
    let sums: Vec<Vec<f32>> = transfer::to_vec2(&by_block.sum(D::Minus1)?.reshape((b, blocks))?)?;
    let mut chosen = Vec::with_capacity(b);
    let mut rests = Vec::with_capacity(b);
    for (row, &u) in sums.iter().zip(uniforms) {
        if row.iter().any(|x| x.is_nan()) {
            return Err(nan_error());
        }
        let (k, rest) = walk(row, u);
        chosen.push((chosen.len() * blocks + k) as u32);
        rests.push(rest);
    }
    let picked: Vec<Vec<f32>> =
        transfer::to_vec2(&by_block.index_select(&Tensor::new(chosen.as_slice(), by_block.device())?, 0)?)?;
    Ok(picked
        .iter()
        .zip(chosen.iter().zip(&rests))
        .map(|(probs, (&flat, &rest))| {
            let k = flat as usize % blocks;
            let (j, _) = walk(&probs[..block.min(v - k * block)], rest);
            ((k * block + j) as u32, probs[j].ln())
        })
        .collect())
}

/// The first index where the running sum of `probs` passes `u`, and what is left
/// of `u` at that index; the last index with any mass when rounding leaves `u` past the end.
fn walk(probs: &[f32], mut u: f32) -> (usize, f32) {
    for (i, &p) in probs.iter().enumerate() {
        if u < p {
            return (i, u);
        }
        u -= p;
    }
    let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    (last, probs.get(last).map_or(0.0, |p| p * 0.5))
}

fn nan_error() -> anyhow::Error {
    anyhow::anyhow!(
        "the model's logits are NaN: its weights have diverged; \
         retrain with a lower learning_rate or a smaller max_grad_norm"
    )
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

/// Pick the next token from one row of logits with the draw `u` in [0, 1);
/// returns it with its log-probability. Logits with a NaN (a diverged model)
/// are an error, not a guess.
pub fn sample(logits: &[f32], p: &SamplingParams, u: f32) -> Result<(u32, f32)> {
    if logits.iter().any(|l| l.is_nan()) {
        return Err(nan_error());
    }
    Ok(sample_finite(logits, p, u))
}

fn sample_finite(logits: &[f32], p: &SamplingParams, mut u: f32) -> (u32, f32) {
    let t = if p.temperature > 0.0 { p.temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max / t + logits.iter().map(|&l| ((l - max) / t).exp()).sum::<f32>().ln();
    let logprob = |i: usize| logits[i] / t - lse;
    if p.temperature <= 0.0 {
        let best = logits.iter().enumerate().fold(0, |b, (i, &l)| if l > logits[b] { i } else { b });
        return (best as u32, logprob(best));
    }
    if p.top_k == 0 && p.top_p >= 1.0 && p.min_p.is_none() {
        // Plain sampling from the full distribution: no sort needed.
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
    if let Some(min_p) = p.min_p {
        // Relative to the most likely token (the first candidate), as HF's MinPLogitsWarper.
        let floor = cand.first().map_or(0.0, |c| c.1) * min_p;
        let keep = cand.iter().take_while(|c| c.1 >= floor).count();
        cand.truncate(keep.max(1));
    }
    let total: f32 = cand.iter().map(|c| c.1).sum();
    let mut u = u * total;
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

    /// The tokens [`pick_scored`] picks.
    fn picks(l: &Tensor, p: &SamplingParams, u: &[f32], seen: &dyn Fn(usize) -> Vec<u32>) -> Result<Vec<u32>> {
        Ok(pick_scored(l, p, u, seen)?.into_iter().map(|(t, _)| t).collect())
    }
    use candle_core::Device;
    use rand::SeedableRng;

    fn rows(v: &[Vec<f32>]) -> Tensor {
        Tensor::new(v.to_vec(), &Device::Cpu).unwrap()
    }

    fn draws(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>()).collect()
    }

    #[test]
    fn greedy_takes_each_rows_argmax_on_the_device() {
        let l = rows(&[vec![0.0, 2.0, 1.0], vec![5.0, -1.0, 4.9]]);
        assert_eq!(picks(&l, &SamplingParams::default(), &[0.0, 0.0], &|_| vec![]).unwrap(), vec![1, 0]);
        let (t, lp) = sample(&[0.0, 2.0, 1.0], &SamplingParams::default(), 0.0).unwrap();
        assert_eq!(t, 1);
        let z = (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - (2.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let l = rows(&[vec![3.0, 2.9, 0.0, -1.0]]);
        let k1 = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        assert!(draws(200, 1).iter().all(|&u| picks(&l, &k1, &[u], &|_| vec![]).unwrap()[0] == 0));
        let p = SamplingParams { temperature: 1.0, top_p: 0.8, ..Default::default() };
        let seen: std::collections::BTreeSet<u32> =
            draws(500, 2).iter().map(|&u| picks(&l, &p, &[u], &|_| vec![]).unwrap()[0]).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    /// The block sampler draws from the softmax: frequencies over a vocabulary
    /// of several blocks (and a ragged last one) match the probabilities.
    #[test]
    fn sampling_in_blocks_follows_the_distribution_and_is_reproducible() {
        let logits: Vec<f32> = (0..23).map(|i| ((i * 7) % 5) as f32 * 0.4).collect();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let want: Vec<f32> = logits.iter().map(|l| l.exp() / z).collect();
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let l = rows(std::slice::from_ref(&logits));
        let n = 20000;
        let us = draws(n, 7);
        let mut counts = [0usize; 23];
        let picked: Vec<u32> = us.iter().map(|&u| picks(&l, &p, &[u], &|_| vec![]).unwrap()[0]).collect();
        for &t in &picked {
            counts[t as usize] += 1;
        }
        for (i, (&c, &w)) in counts.iter().zip(&want).enumerate() {
            let f = c as f32 / n as f32;
            assert!((f - w).abs() < 0.01, "token {i}: {f} drawn, {w} expected");
        }
        let again: Vec<u32> = us.iter().map(|&u| picks(&l, &p, &[u], &|_| vec![]).unwrap()[0]).collect();
        assert_eq!(picked, again);
        // At temperature τ the distribution is softmax(l / τ): the host sampler agrees with the blocks.
        let p = SamplingParams { temperature: 0.5, ..Default::default() };
        let mut agree = 0;
        for &u in &us[..2000] {
            agree += (picks(&l, &p, &[u], &|_| vec![]).unwrap()[0] == sample(&logits, &p, u).unwrap().0) as usize;
        }
        assert!(agree >= 1990, "the block sampler and the host sampler disagree on {} of 2000 draws", 2000 - agree);
    }

    #[test]
    fn nan_logits_are_an_error_that_says_so_with_every_sampler() {
        let l = rows(&[vec![0.0, 1.0, 2.0, 3.0], vec![f32::NAN; 4]]);
        for p in [
            SamplingParams::default(),
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() },
            SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
        ] {
            let e = picks(&l, &p, &[0.3, 0.3], &|_| vec![]).unwrap_err().to_string();
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
