//! Continuous batching: many prompts through a fixed number of decoding slots.
//! A row that finishes (EOS, a stop string, its token limit) frees its slot,
//! and waiting prompts take the free slots together: they are prefilled as a
//! batch of their own and their keys and values placed in the shared cache,
//! right-aligned to its current length, so the batch never waits for its
//! longest member. Evaluation and inference run every question through this.
//!
//! The cache's time axis is shared by all slots: a new row's prompt occupies
//! the last positions before the current step (its earlier positions are
//! masked), its positions restart at 0, and when the axis is full the
//! positions no active row still sees are dropped (compaction). Each prompt
//! draws from its own seeded RNG, so what a row samples does not depend on
//! which others it shares a batch with.

use std::collections::VecDeque;

use anyhow::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::generate::{pick_scored, AnswerCall, Completion, FinishReason, RowText, SamplingParams};
use super::kv_cache::KvCache;
use super::tokenizer::ChatTokenizer;
use super::transformer::{Transformer, PAD_SENTINEL};
use crate::common::CancelToken;

/// How a batch of prompts is scheduled.
#[derive(Debug, Clone, Copy)]
pub struct Slots {
    /// Rows decoded at once.
    pub slots: usize,
    /// Wait for this many free slots before prefilling waiting prompts together.
    pub refill_at: usize,
}

impl Slots {
    /// Refill as soon as one slot is free: a free slot decodes padding, wasted
    /// work, while a prompt's prefill is a product of as many rows as it has
    /// tokens, efficient however few prompts share it (measured: refilling at
    /// every finish is faster than waiting for an eighth of the batch).
    pub fn new(slots: usize) -> Slots {
        Slots { slots: slots.max(1), refill_at: 1 }
    }
}

/// One decoding slot's row.
struct Active<'t> {
    index: usize,
    text: RowText<'t>,
    rng: ChaCha8Rng,
    /// The token to feed at the next step (the one just sampled).
    next: u32,
}

/// Complete every prompt (token ids, already templated) once, `slots.slots` at
/// a time; `on_done(i, completion)` receives prompt i's completion as soon as
/// it finishes (in finishing order). Prompt i samples from an RNG seeded with
/// `seed_of(i)`. Stops between steps when `cancel` is set (finished prompts
/// have been handed over; the rest are not). With `answer`, a row at a tool
/// call (`params.tool_call`) is fed the result in its slot, a token a step,
/// while the others decode (as [`super::generate::generate_answering`]);
/// `answer` is called with the prompt's index.
#[allow(clippy::too_many_arguments)]
pub fn generate_continuous(
    model: &Transformer,
    tok: &ChatTokenizer,
    prompts: &[Vec<u32>],
    slots: Slots,
    params: &SamplingParams,
    seed_of: &dyn Fn(usize) -> u64,
    cancel: Option<&CancelToken>,
    mut answer: Option<&mut AnswerCall>,
    on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
) -> Result<()> {
    super::generate::check_prompts(model, prompts, params)?;
    let mut queue: VecDeque<usize> = (0..prompts.len()).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // The live window of the time axis never exceeds a prompt plus its completion;
    // room for half as much again means a compaction every hundred-odd steps.
    let capacity = (longest + params.max_new_tokens + 1) * 3 / 2;
    let mut cache = KvCache::new(model.cfg.num_layers, capacity);
    let mut rows: Vec<Option<Active>> = Vec::new();
    while !queue.is_empty() || rows.iter().any(Option::is_some) {
        if let Some(c) = cancel {
            c.check()?;
        }
        let free = rows.iter().filter(|r| r.is_none()).count() + slots.slots.saturating_sub(rows.len());
        if rows.iter().all(Option::is_none) {
            // Nothing decoding: start a fresh batch.
            let take: Vec<usize> = (0..slots.slots.min(queue.len())).filter_map(|_| queue.pop_front()).collect();
            cache = KvCache::new(model.cfg.num_layers, capacity);
            rows = start(model, tok, prompts, &take, params, seed_of, &mut cache, answer.as_deref_mut(), on_done)?;
        } else if !queue.is_empty() && free >= slots.refill_at.min(queue.len()) {
            let answer = answer.as_deref_mut();
            refill(model, tok, prompts, &mut queue, params, seed_of, &mut cache, &mut rows, answer, on_done)?;
        }
        if rows.iter().all(Option::is_none) {
            continue;
        }
        if queue.is_empty() {
            shrink(&mut cache, &mut rows)?;
        }
        if cache.len + 1 > capacity {
            compact(&mut cache, &rows)?;
        }
        step(model, tok, prompts, params, &mut cache, &mut rows, answer.as_deref_mut(), on_done)?;
    }
    Ok(())
}

/// The first rows of a fresh cache: `take`'s prompts prefilled together.
#[allow(clippy::too_many_arguments)]
fn start<'t>(
    model: &Transformer,
    tok: &'t ChatTokenizer,
    prompts: &[Vec<u32>],
    take: &[usize],
    params: &SamplingParams,
    seed_of: &dyn Fn(usize) -> u64,
    cache: &mut KvCache,
    mut answer: Option<&mut AnswerCall>,
    on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
) -> Result<Vec<Option<Active<'t>>>> {
    let logits = prefill(model, prompts, take, cache)?;
    let mut rows = Vec::with_capacity(take.len());
    for (mut row, done) in first_tokens(tok, prompts, take, &logits, params, seed_of)? {
        let done = row.text.settle(row.index, done, answer.as_deref_mut())?;
        rows.push(finish_or_keep(tok, row, done, on_done)?);
    }
    Ok(rows)
}

/// Waiting prompts into free slots: prefilled as a batch of their own, then
/// placed in the cache right-aligned to its current length. A group longer
/// than the cache's current length waits until the axis has grown to fit it.
#[allow(clippy::too_many_arguments)]
fn refill<'t>(
    model: &Transformer,
    tok: &'t ChatTokenizer,
    prompts: &[Vec<u32>],
    queue: &mut VecDeque<usize>,
    params: &SamplingParams,
    seed_of: &dyn Fn(usize) -> u64,
    cache: &mut KvCache,
    rows: &mut [Option<Active<'t>>],
    mut answer: Option<&mut AnswerCall>,
    on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
) -> Result<()> {
    let free: Vec<usize> = (0..rows.len()).filter(|&s| rows[s].is_none()).collect();
    let mut take = Vec::new();
    while take.len() < free.len() {
        match queue.front() {
            Some(&i) if prompts[i].len() <= cache.len => {
                take.push(i);
                queue.pop_front();
            }
            _ => break,
        }
    }
    if take.is_empty() {
        return Ok(());
    }
    let mut group = KvCache::new(model.cfg.num_layers, take.iter().map(|&i| prompts[i].len()).max().unwrap_or(0));
    let logits = prefill(model, prompts, &take, &mut group)?;
    let slots: Vec<usize> = free[..take.len()].to_vec();
    cache.place(&slots, &group)?;
    for ((mut row, done), &slot) in first_tokens(tok, prompts, &take, &logits, params, seed_of)?.into_iter().zip(&slots)
    {
        let done = row.text.settle(row.index, done, answer.as_deref_mut())?;
        rows[slot] = finish_or_keep(tok, row, done, on_done)?;
    }
    Ok(())
}

/// Prefill `take`'s prompts, left-padded, into `cache`; their last logits [k, V].
fn prefill(model: &Transformer, prompts: &[Vec<u32>], take: &[usize], cache: &mut KvCache) -> Result<Tensor> {
    let longest = take.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
    let padded: Vec<Vec<u32>> = take
        .iter()
        .map(|&i| {
            std::iter::repeat_n(PAD_SENTINEL, longest - prompts[i].len()).chain(prompts[i].iter().copied()).collect()
        })
        .collect();
    Ok(model.forward_cached(&padded, cache)?)
}

/// New rows with their first token from their prefill's logits, and whether
/// that token already ends them.
fn first_tokens<'t>(
    tok: &'t ChatTokenizer,
    prompts: &[Vec<u32>],
    take: &[usize],
    logits: &Tensor,
    params: &SamplingParams,
    seed_of: &dyn Fn(usize) -> u64,
) -> Result<Vec<(Active<'t>, Option<FinishReason>)>> {
    let mut rngs: Vec<ChaCha8Rng> = take.iter().map(|&i| ChaCha8Rng::seed_from_u64(seed_of(i))).collect();
    let uniforms: Vec<f32> =
        rngs.iter_mut().map(|r| if params.temperature > 0.0 { r.random::<f32>() } else { 0.0 }).collect();
    let seen = |i: usize| prompts[take[i]].clone();
    let picked = pick_scored(logits, params, &uniforms, &seen)?;
    let mut out = Vec::with_capacity(take.len());
    for ((&index, rng), scored) in take.iter().zip(rngs).zip(picked) {
        let mut row = Active { index, text: RowText::new(tok, params), rng, next: scored.0 };
        let done = row.text.advance(scored, tok, params)?;
        out.push((row, done));
    }
    Ok(out)
}

/// Hand a finished row over (freeing its slot), or keep it decoding.
fn finish_or_keep<'t>(
    tok: &ChatTokenizer,
    row: Active<'t>,
    done: Option<FinishReason>,
    on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
) -> Result<Option<Active<'t>>> {
    match done {
        Some(reason) => {
            on_done(row.index, row.text.into_completion(tok, row.index, reason)?)?;
            Ok(None)
        }
        None => Ok(Some(row)),
    }
}

/// One decoding step of every occupied slot.
#[allow(clippy::too_many_arguments)]
fn step<'t>(
    model: &Transformer,
    tok: &'t ChatTokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    cache: &mut KvCache,
    rows: &mut [Option<Active<'t>>],
    mut answer: Option<&mut AnswerCall>,
    on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
) -> Result<()> {
    let feed: Vec<Vec<u32>> = rows.iter().map(|r| vec![r.as_ref().map_or(PAD_SENTINEL, |r| r.next)]).collect();
    let logits = model.forward_cached(&feed, cache)?;
    let uniforms: Vec<f32> = rows
        .iter_mut()
        .map(|r| match r {
            // A row feeding a tool's result draws nothing: what it samples does not
            // depend on how long the results before were.
            Some(r) if params.temperature > 0.0 && !r.text.forcing() => r.rng.random::<f32>(),
            _ => 0.0,
        })
        .collect();
    let seen = |i: usize| -> Vec<u32> {
        rows[i].as_ref().map_or_else(Vec::new, |r| prompts[r.index].iter().chain(r.text.tokens()).copied().collect())
    };
    let picked = pick_scored(&logits, params, &uniforms, &seen)?;
    for (slot, scored) in rows.iter_mut().zip(picked) {
        let Some(row) = slot.as_mut() else { continue };
        let (token, done) = if row.text.forcing() {
            row.text.advance_forced(tok, params)?
        } else {
            let done = row.text.advance(scored, tok, params)?;
            (scored.0, row.text.settle(row.index, done, answer.as_deref_mut())?)
        };
        row.next = token;
        if done.is_some() {
            let row = slot.take().expect("matched above");
            *slot = finish_or_keep(tok, row, done, on_done)?;
        }
    }
    Ok(())
}

/// With no prompt left to take a free slot, drop the free slots from the batch
/// once a quarter of it is free: decoding them is wasted work.
fn shrink(cache: &mut KvCache, rows: &mut Vec<Option<Active>>) -> Result<()> {
    let live: Vec<u32> = (0..rows.len() as u32).filter(|&s| rows[s as usize].is_some()).collect();
    if live.len() * 4 > rows.len() * 3 {
        return Ok(());
    }
    *cache = cache.select_rows(&live)?;
    rows.retain(Option::is_some);
    Ok(())
}

/// Drop the leading positions of the time axis that no occupied slot sees.
fn compact(cache: &mut KvCache, rows: &[Option<Active>]) -> Result<()> {
    let first_seen = (0..rows.len())
        .filter(|&s| rows[s].is_some())
        .filter_map(|s| cache.valid[s].iter().position(|&v| v))
        .min()
        .unwrap_or(cache.len);
    if first_seen == 0 {
        anyhow::bail!("the KV cache is full ({} positions) and every position is still in use", cache.len);
    }
    Ok(cache.drop_front(first_seen)?)
}
