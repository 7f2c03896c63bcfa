//! One way to ask for completions, wherever they are sampled: the local model
//! (`model::generate`) or an OpenAI-compatible server. Either way the result is
//! `model::Completion`s with the ids training needs.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::client::{Choice, Client, CompletionRequest};
use super::tools::{sample_with_tools, segment_seed, InBatchCalls, ToolSettings, Toolbox};
use crate::common::CancelToken;
use crate::model::batching::{generate_continuous, Slots};
use crate::model::generate::generate_answering;
use crate::model::tool_call::{CallFormat, HERMES_CLOSE};
use crate::model::{generate, ChatTokenizer, Completion, FinishReason, SamplingParams, Transformer};

pub enum Sampler<'a> {
    Local(&'a Transformer),
    /// A server; `model` is the name to ask for: the served base model or a loaded adapter.
    Server {
        client: &'a Client,
        model: String,
    },
}

impl Sampler<'_> {
    /// One completion of each prompt, `slots` in flight at a time, each handed to
    /// `on_done(i, completion)` as it finishes: on the local model by continuous
    /// batching (a finished row's slot takes the next prompt at once); on a
    /// server, `slots` requests at a time (it batches on its own). Prompt i
    /// samples with a generator seeded by `seed_of(i)`.
    #[allow(clippy::too_many_arguments)]
    pub fn complete_each(
        &self,
        tok: &ChatTokenizer,
        prompts: &[Vec<u32>],
        slots: usize,
        params: &SamplingParams,
        seed_of: &dyn Fn(usize) -> u64,
        cancel: Option<&CancelToken>,
        on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        match self {
            Sampler::Local(model) => {
                generate_continuous(model, tok, prompts, Slots::new(slots), params, seed_of, cancel, None, on_done)
            }
            Sampler::Server { .. } => {
                let indices: Vec<usize> = (0..prompts.len()).collect();
                for chunk in indices.chunks(slots.max(1)) {
                    if let Some(c) = cancel {
                        c.check()?;
                    }
                    let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
                    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(chunk[0]));
                    for c in self.sample(tok, &batch, 1, params, &mut rng, false)? {
                        on_done(chunk[c.prompt_index], c)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// [`Sampler::complete_each`] with the model's tool calls answered by
    /// `toolbox`. On the local model a row at a call is fed the result in its
    /// slot while the others decode; on a server it waits for its result in the
    /// next wave of requests while the others go on, its segments seeded from
    /// `seed_of(i)` and the wave.
    #[allow(clippy::too_many_arguments)]
    pub fn complete_each_with_tools(
        &self,
        tok: &ChatTokenizer,
        prompts: &[Vec<u32>],
        slots: usize,
        params: &SamplingParams,
        seed_of: &dyn Fn(usize) -> u64,
        cancel: Option<&CancelToken>,
        tools: &ToolSettings,
        toolbox: &mut Toolbox,
        on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        if let Sampler::Local(model) = self {
            toolbox.check_template(tok)?;
            let params = SamplingParams { tool_call: Some(toolbox.format()), ..params.clone() };
            let mut calls = InBatchCalls::new(tok, tools, toolbox);
            let answer = &mut |row: usize, text: &str| calls.answer(row, text);
            let slots = Slots::new(slots);
            return generate_continuous(model, tok, prompts, slots, &params, seed_of, cancel, Some(answer), on_done);
        }
        sample_with_tools(
            tok,
            prompts,
            params,
            tools,
            toolbox,
            &mut |wave, p, on_segment| {
                let seed = |j: usize| segment_seed(seed_of(wave.rows[j]), wave.iteration);
                self.complete_each(tok, &wave.contexts, slots, p, &seed, cancel, on_segment)
            },
            &mut |c| on_done(c.prompt_index, c),
        )
    }

    /// [`Sampler::sample`] with the model's tool calls answered by `toolbox`:
    /// `n` completions of each prompt, prompt after prompt. On the local model a
    /// row at a call is fed the result in the batch (`generate_answering`); on a
    /// server, in waves of requests.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_with_tools(
        &self,
        tok: &ChatTokenizer,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
        logprobs: bool,
        tools: &ToolSettings,
        toolbox: &mut Toolbox,
    ) -> Result<Vec<Completion>> {
        if let Sampler::Local(model) = self {
            toolbox.check_template(tok)?;
            let params = SamplingParams { tool_call: Some(toolbox.format()), logprobs, ..params.clone() };
            let mut calls = InBatchCalls::new(tok, tools, toolbox);
            let answer = &mut |row: usize, text: &str| calls.answer(row, text);
            return generate_answering(model, tok, prompts, n, &params, rng, None, Some(answer));
        }
        let contexts: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect();
        let mut out: Vec<Option<Completion>> = vec![None; contexts.len()];
        sample_with_tools(
            tok,
            &contexts,
            params,
            tools,
            toolbox,
            &mut |wave, p, on_segment| {
                for c in self.sample(tok, &wave.contexts, 1, p, rng, logprobs)? {
                    on_segment(c.prompt_index, c)?;
                }
                Ok(())
            },
            &mut |c| {
                let i = c.prompt_index;
                out[i] = Some(c);
                Ok(())
            },
        )?;
        out.into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.ok_or_else(|| anyhow::anyhow!("completion {i} was not sampled"))?;
                c.prompt_index = i / n.max(1);
                Ok(c)
            })
            .collect()
    }

    /// `n` completions of each prompt (prompt after prompt). `logprobs`: also the
    /// sampler's log-probabilities of the sampled tokens.
    pub fn sample(
        &self,
        tok: &ChatTokenizer,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
        logprobs: bool,
    ) -> Result<Vec<Completion>> {
        match self {
            Sampler::Local(model) => {
                generate(model, tok, prompts, n, &SamplingParams { logprobs, ..params.clone() }, rng, None)
            }
            Sampler::Server { client, model } => {
                // A Hermes call ends at its closing tag, a stop string for the server,
                // kept in the text (an inline call has no such end: refused at validation).
                let hermes = params.tool_call == Some(CallFormat::Hermes);
                let mut stop = params.stop.clone();
                if hermes {
                    stop.push(HERMES_CLOSE.to_string());
                }
                let reqs: Vec<CompletionRequest> = prompts
                    .iter()
                    .map(|p| CompletionRequest {
                        model: model.clone(),
                        prompt: p.clone(),
                        n,
                        max_tokens: params.max_new_tokens,
                        temperature: params.temperature,
                        top_p: params.top_p,
                        top_k: params.top_k,
                        stop: stop.clone(),
                        include_stop_str_in_output: hermes || params.include_stop_str_in_output,
                        // Drawn from the run's seeded RNG (restored on resume): a server
                        // that honours seeds samples a resumed round as the first time.
                        seed: Some(rng.random::<u32>() as u64),
                        logprobs,
                    })
                    .collect();
                let answers = client.complete_all(&reqs)?;
                let mut out = Vec::with_capacity(prompts.len() * n);
                for (i, choices) in answers.into_iter().enumerate() {
                    for c in choices {
                        let mut c = completion(i, c, tok, params.max_new_tokens, client.url())?;
                        if hermes && c.finish_reason == FinishReason::Stop && !c.eos {
                            if CallFormat::Hermes.pending(&c.text).is_some() {
                                c.finish_reason = FinishReason::ToolCall;
                            } else if !params.include_stop_str_in_output {
                                // One of the user's stop strings, kept only for the call's
                                // sake: cut from the text as local generation does.
                                if let Some(s) = params.stop.iter().find(|s| c.text.ends_with(s.as_str())) {
                                    c.text.truncate(c.text.len() - s.len());
                                }
                            }
                        }
                        out.push(c);
                    }
                }
                Ok(out)
            }
        }
    }
}

/// A server's choice as a completion of prompt `prompt_index`: the ids it sampled
/// (EOS split off), or, from a server that returns no ids, its text tokenized.
fn completion(prompt_index: usize, c: Choice, tok: &ChatTokenizer, max_new: usize, url: &str) -> Result<Completion> {
    let finish_reason = if c.finish_reason == "length" { FinishReason::Length } else { FinishReason::Stop };
    let (tokens, eos) = match c.token_ids {
        Some(mut ids) => {
            // Ids index the embedding: one out of range is the server's error, named here.
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= tok.vocab_size()) {
                bail!(
                    "rollout server {url} returned token id {bad}, outside the tokenizer's {} ids: is it \
                     serving another model?",
                    tok.vocab_size()
                );
            }
            if ids.len() > max_new + 1 {
                bail!("rollout server {url} returned {} tokens for a limit of {max_new}", ids.len());
            }
            let eos = ids.last().is_some_and(|t| tok.eos_ids.contains(t));
            if eos {
                ids.pop();
            }
            (ids, eos)
        }
        None => {
            if c.logprobs.is_some() {
                bail!(
                    "rollout server {url} returned log-probabilities without token ids: importance \
                     sampling needs the sampled ids (vLLM returns them with `return_token_ids`)"
                );
            }
            // Re-tokenized text can differ from the sampled ids at a few merges; training
            // then scores slightly different tokens. vLLM's token ids avoid this.
            let mut ids = tok.encode(&c.text)?;
            ids.truncate(max_new);
            (ids, finish_reason == FinishReason::Stop && c.stop_reason.is_none())
        }
    };
    if let Some(lp) = &c.logprobs {
        if lp.len() != tokens.len() + eos as usize {
            bail!(
                "rollout server {url}: {} log-probabilities for {} sampled tokens",
                lp.len(),
                tokens.len() + eos as usize
            );
        }
    }
    Ok(Completion {
        prompt_index,
        tokens,
        text: c.text,
        finish_reason,
        eos,
        sampling_logprobs: c.logprobs,
        tool_spans: Vec::new(),
        tool_calls: Vec::new(),
    })
}
