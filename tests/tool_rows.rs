//! Tool calls answered inside the batch (`generate_answering`, continuous
//! batching with an answerer): a row at a call is fed the result a token a
//! step while the others decode, and nothing is prefilled again. Checked on a
//! model built to write a known text (each token determines the next: a
//! chain through `<<2+3=`, so some rows call the calculator at once, some
//! later, some never), so that what each row must get is known exactly:
//! - every row's completion in a batch is the one it gets alone, and the one
//!   the wave loop (re-prefilling each row after its call) assembles;
//! - `max_tool_calling_iterations` and the token budget hold (a result cut by
//!   the budget is marked only as far as it goes);
//! - the tool's tokens are marked as context.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use r1pipe::model::batching::{generate_continuous, Slots};
use r1pipe::model::generate::generate_answering;
use r1pipe::model::{ChatTokenizer, Completion, Config, FinishReason, SamplingParams, Transformer};
use r1pipe::rollout::tools::{sample_with_tools, BuiltinTool, InBatchCalls, ToolSettings, ToolSpec, Toolbox};
use r1pipe::rollout::Sampler;
use rand::SeedableRng;

fn tok() -> ChatTokenizer {
    ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap()
}

/// The one token `text` encodes to.
fn id(tok: &ChatTokenizer, text: &str) -> u32 {
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), 1, "{text:?} is not one token here: {ids:?}");
    ids[0]
}

/// A model whose greedy next token depends only on the current one, as
/// `next` says (every other token is followed by EOS): its layers add
/// nothing (zero output projections), each token of the chain has an
/// embedding of its own axis, and the head maps that axis to its successor.
fn chain_model(tok: &ChatTokenizer, next: &[(u32, u32)]) -> Transformer {
    let hidden = 32;
    let cfg = Config::from_json(serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.vocab_size(), "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 512
    }))
    .unwrap();
    let m = Transformer::random(cfg, 1, &Device::Cpu).unwrap();
    let v = tok.vocab_size();
    let axis: HashMap<u32, usize> = next.iter().enumerate().map(|(k, &(from, _))| (from, k + 1)).collect();
    assert!(axis.len() < hidden, "a chain longer than the hidden size");
    let mut embed = vec![0f32; v * hidden];
    for t in 0..v {
        embed[t * hidden + axis.get(&(t as u32)).copied().unwrap_or(0)] = 1.0;
    }
    let mut head = vec![0f32; v * hidden];
    head[tok.eos_ids[0] as usize * hidden] = 10.0; // axis 0: any other token → EOS
    for &(from, to) in next {
        head[to as usize * hidden + axis[&from]] = 10.0;
    }
    for (name, var) in &m.weights {
        let shape = var.as_tensor().shape().clone();
        let value = if name.ends_with("embed_tokens.weight") {
            Tensor::from_vec(embed.clone(), shape, &Device::Cpu).unwrap()
        } else if name.starts_with("lm_head") {
            Tensor::from_vec(head.clone(), shape, &Device::Cpu).unwrap()
        } else if name.contains("norm") {
            Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
        } else {
            Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
        };
        var.set(&value).unwrap();
    }
    m
}

struct Chain {
    model: Transformer,
    /// Prompts ending in a token that leads (a) straight into a call, (b) to
    /// EOS without one, (c) into a call after two tokens.
    prompts: Vec<Vec<u32>>,
}

fn chain(tok: &ChatTokenizer) -> Chain {
    let [a, b, c] = [" A", " B", " C"].map(|t| id(tok, t));
    let [open, two, plus, three, equals] = ["<<", "2", "+", "3", "="].map(|t| id(tok, t));
    let [close, and, no, so, then] = [">>", " and", " no", " so", " then"].map(|t| id(tok, t));
    // The calculator's answer "5>>" must end in the chain's `>>`, which leads to the next call.
    let result = tok.encode("5>>").unwrap();
    assert_eq!(result.last(), Some(&close), "\"5>>\" encodes as {result:?}");
    let next = [
        (a, open),
        (open, two),
        (two, plus),
        (plus, three),
        (three, equals),
        // After `=` the calculator's result is fed; unanswered, the model ends the row.
        (close, and),
        (and, open),
        (b, no),
        (c, so),
        (so, then),
        (then, open),
    ];
    let eos = tok.eos_ids[0];
    let model = chain_model(tok, &next);
    let prompt = |last: u32, len: usize| -> Vec<u32> { std::iter::repeat_n(eos + 1, len).chain([last]).collect() };
    Chain { model, prompts: vec![prompt(a, 3), prompt(b, 5), prompt(c, 2), prompt(a, 6), prompt(c, 4)] }
}

fn calculator(limit: Option<usize>) -> ToolSettings {
    ToolSettings {
        tools: vec![ToolSpec::Builtin(BuiltinTool::Calculator)],
        max_tool_calling_iterations: limit,
        ..ToolSettings::default()
    }
}

fn params(max_new_tokens: usize) -> SamplingParams {
    SamplingParams { max_new_tokens, ..SamplingParams::default() }
}

/// Every prompt's completion by continuous batching with `slots` slots,
/// calls answered in the batch.
fn in_batch(ch: &Chain, prompts: &[Vec<u32>], slots: usize, limit: Option<usize>, max: usize) -> Vec<Completion> {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    let mut toolbox = Toolbox::new(&calculator(limit), dir.path()).unwrap();
    let mut out = vec![None; prompts.len()];
    Sampler::Local(&ch.model)
        .complete_each_with_tools(
            &tok,
            prompts,
            slots,
            &params(max),
            &|_| 0,
            None,
            &calculator(limit),
            &mut toolbox,
            &mut |i, c| {
                out[i] = Some(c);
                Ok(())
            },
        )
        .unwrap();
    out.into_iter().map(Option::unwrap).collect()
}

/// The same completions by the wave loop: each row re-prefilled with its result after its call.
fn in_waves(ch: &Chain, limit: Option<usize>, max: usize) -> Vec<Completion> {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    let mut toolbox = Toolbox::new(&calculator(limit), dir.path()).unwrap();
    let mut out = vec![None; ch.prompts.len()];
    sample_with_tools(
        &tok,
        &ch.prompts,
        &params(max),
        &calculator(limit),
        &mut toolbox,
        &mut |wave, p, on_segment| {
            generate_continuous(&ch.model, &tok, &wave.contexts, Slots::new(8), p, &|_| 0, None, None, on_segment)
        },
        &mut |c| {
            let i = c.prompt_index;
            out[i] = Some(c);
            Ok(())
        },
    )
    .unwrap();
    out.into_iter().map(Option::unwrap).collect()
}

fn summary(c: &Completion) -> (Vec<u32>, FinishReason, bool, Vec<std::ops::Range<usize>>, Vec<String>) {
    let calls = c.tool_calls.iter().map(|k| format!("{}={}", k.expression, k.result)).collect();
    (c.tokens.clone(), c.finish_reason, c.eos, c.tool_spans.clone(), calls)
}

#[test]
fn rows_get_their_results_in_the_batch_as_alone_and_as_the_wave_loop_gives_them() {
    let tok = tok();
    let ch = chain(&tok);
    for (limit, max) in [(Some(2), 64), (None, 40), (Some(3), 6)] {
        // Two slots for five prompts: rows are refilled while others are fed results.
        let batch = in_batch(&ch, &ch.prompts, 2, limit, max);
        let waves = in_waves(&ch, limit, max);
        for (i, p) in ch.prompts.iter().enumerate() {
            let alone = in_batch(&ch, std::slice::from_ref(p), 1, limit, max).remove(0);
            assert_eq!(summary(&batch[i]), summary(&alone), "prompt {i}, limit {limit:?}, max {max}: batch vs alone");
            assert_eq!(
                summary(&batch[i]),
                summary(&waves[i]),
                "prompt {i}, limit {limit:?}, max {max}: in the batch vs waves"
            );
        }
    }
}

#[test]
fn the_texts_are_the_chains_with_the_call_limit_and_the_budget() {
    let tok = tok();
    let ch = chain(&tok);
    // Limit 2: two answered calls, the third unanswered ends the row (the model's EOS after `=`).
    let c = in_batch(&ch, &ch.prompts, 3, Some(2), 64);
    assert_eq!(c[0].text, "<<2+3=5>> and<<2+3=5>> and<<2+3=");
    assert_eq!((c[0].finish_reason, c[0].eos), (FinishReason::Stop, true));
    assert_eq!(c[0].tool_calls.len(), 2);
    let five = tok.encode("5>>").unwrap().len();
    let at = 5; // `<<`, `2`, `+`, `3`, `=`
    assert_eq!(c[0].tool_spans[0], at..at + five, "the first result is the tool's");
    assert_eq!(c[1].text, " no");
    assert!(c[1].tool_calls.is_empty() && c[1].tool_spans.is_empty());
    assert_eq!(c[2].text, " so then<<2+3=5>> and<<2+3=5>> and<<2+3=");
    // Every token a tool wrote is marked: the completion's text without them is the model's.
    for x in &c {
        let model_tokens: Vec<u32> = x
            .tokens
            .iter()
            .enumerate()
            .filter(|(k, _)| !x.tool_spans.iter().any(|r| r.contains(k)))
            .map(|(_, &t)| t)
            .collect();
        assert!(!tok.decode(&model_tokens).unwrap().contains('5'), "{:?}", x.text);
    }
    // A budget of 6 tokens: the call takes 5, its result is cut after its first token.
    let c = in_batch(&ch, &ch.prompts[..1], 1, None, 6);
    assert_eq!((c[0].tokens.len(), c[0].finish_reason), (6, FinishReason::Length));
    assert_eq!(c[0].tool_spans, vec![5..6], "the cut result is marked as far as it goes");
    // A call at the last allowed token has no room for a result: not answered.
    let c = in_batch(&ch, &ch.prompts[..1], 1, None, 5);
    assert_eq!((c[0].text.as_str(), c[0].finish_reason), ("<<2+3=", FinishReason::Length));
    assert!(c[0].tool_calls.is_empty());
}

#[test]
fn groups_sampled_from_one_prefill_get_their_results_in_the_batch() {
    // GRPO's path: n completions a prompt sharing the prompt's prefill.
    let tok = tok();
    let ch = chain(&tok);
    let dir = tempfile::tempdir().unwrap();
    let mut toolbox = Toolbox::new(&calculator(Some(1)), dir.path()).unwrap();
    let mut p = params(32);
    p.tool_call = Some(toolbox.format());
    let mut calls = InBatchCalls::new(&tok, &calculator(Some(1)), &mut toolbox);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let answer = &mut |row: usize, text: &str| calls.answer(row, text);
    let out = generate_answering(&ch.model, &tok, &ch.prompts[..3], 2, &p, &mut rng, None, Some(answer)).unwrap();
    let texts: Vec<&str> = out.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "<<2+3=5>> and<<2+3=",
            "<<2+3=5>> and<<2+3=",
            " no",
            " no",
            " so then<<2+3=5>> and<<2+3=",
            " so then<<2+3=5>> and<<2+3="
        ]
    );
    let prompts: Vec<usize> = out.iter().map(|c| c.prompt_index).collect();
    assert_eq!(prompts, [0, 0, 1, 1, 2, 2]);
}
