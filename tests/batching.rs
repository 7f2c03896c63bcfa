//! Continuous batching gives each prompt the completion it gets alone: rows
//! finish at different steps, free slots take waiting prompts (prefilled
//! together and placed in the shared cache), and the cache's time axis is
//! compacted as it fills, all without changing a single greedy token.

mod common;

use candle_core::Device;
use r1pipe::model::batching::{generate_continuous, Slots};
use r1pipe::model::{generate, ChatTokenizer, Completion, Config, FinishReason, SamplingParams, Transformer};
use rand::SeedableRng;

fn model() -> Transformer {
    model_tied(true)
}

fn model_tied(tied: bool) -> Transformer {
    let cfg = Config::from_json(serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": tied, "max_position_embeddings": 512
    }))
    .unwrap();
    let m = Transformer::random(cfg, 9, &Device::Cpu).unwrap();
    // Larger weights than the init's std 0.02, so the greedy tokens vary with the prompt.
    for v in m.weights.values() {
        v.set(&(v.as_tensor() * 10.0).unwrap()).unwrap();
    }
    m
}

fn prompts() -> Vec<Vec<u32>> {
    (0..24u32).map(|i| (0..(3 + i % 7)).map(|t| (i * 13 + t * 7) % 90 + 3).collect()).collect()
}

fn alone(m: &Transformer, tok: &ChatTokenizer, prompt: &[u32], params: &SamplingParams) -> Completion {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    generate(m, tok, &[prompt.to_vec()], 1, params, &mut rng, None).unwrap().remove(0)
}

#[test]
fn continuous_batching_gives_every_prompt_its_completion_alone() {
    every_prompt_gets_its_completion_alone(&model());
}

#[test]
fn with_packed_weights_too() {
    // Evaluation and inference pack the weights (kernels::packed): prefill and decode
    // then share one product, and a row must still not depend on its batch.
    let mut m = model();
    m.pack_for_inference().unwrap();
    every_prompt_gets_its_completion_alone(&m);
}

#[test]
fn packed_weights_give_the_unpacked_logits() {
    use r1pipe::model::KvCache;
    let plain = model();
    let mut packed = model();
    packed.pack_for_inference().unwrap();
    let ids: Vec<Vec<u32>> = prompts().into_iter().filter(|p| p.len() == 5).collect();
    assert!(ids.len() >= 2);
    let logits = |m: &Transformer| {
        let mut cache = KvCache::new(m.cfg.num_layers, 16);
        let first = m.forward_cached(&ids, &mut cache).unwrap();
        let next: Vec<Vec<u32>> = (0..ids.len() as u32).map(|i| vec![i + 3]).collect();
        let second = m.forward_cached(&next, &mut cache).unwrap();
        [first, second].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let (a, b) = (logits(&plain), logits(&packed));
    for (x, y) in a.iter().zip(&b) {
        let scale = x.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4 * scale, "packed logits differ by {d} (scale {scale})");
        if r1pipe::kernels::packed::packs_here() {
            assert_ne!(x, y, "the packed product should have run (its sums are in another order)");
        } else {
            eprintln!("nothing is packed here (portable kernels or no AVX-512): the logits must be the unpacked ones");
            assert_eq!(x, y, "nothing packed: the same op sequence as unpacked");
        }
    }
}

fn every_prompt_gets_its_completion_alone(m: &Transformer) {
    let mut tok = ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap();
    tok.eos_ids.clear();
    let params = SamplingParams { max_new_tokens: 14, ..Default::default() };
    let prompts = prompts();
    // An end token that greedy decoding reaches at different steps for different prompts.
    let free_runs: Vec<Vec<u32>> = prompts.iter().map(|p| alone(m, &tok, p, &params).tokens).collect();
    let eos = (0..96u32)
        .max_by_key(|&t| {
            let firsts: std::collections::BTreeSet<usize> =
                free_runs.iter().filter_map(|r| r.iter().position(|&x| x == t)).collect();
            firsts.len()
        })
        .unwrap();
    tok.eos_ids = vec![eos];
    let want: Vec<Completion> = prompts.iter().map(|p| alone(m, &tok, p, &params)).collect();
    let lengths: std::collections::BTreeSet<usize> = want.iter().map(|c| c.tokens.len()).collect();
    assert!(lengths.len() >= 3, "rows should finish at different steps: lengths {lengths:?}");
    assert!(want.iter().any(|c| c.finish_reason == FinishReason::Length));
    let mut got: Vec<Option<Completion>> = vec![None; prompts.len()];
    let mut order = Vec::new();
    generate_continuous(
        m,
        &tok,
        &prompts,
        Slots { slots: 3, refill_at: 1 },
        &params,
        &|_| 0,
        None,
        None,
        &mut |i, c| {
            order.push(i);
            got[i] = Some(c);
            Ok(())
        },
    )
    .unwrap();
    assert_ne!(order, (0..prompts.len()).collect::<Vec<_>>(), "rows finished out of order: slots were refilled");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let g = g.as_ref().unwrap_or_else(|| panic!("prompt {i} was never completed"));
        assert_eq!(g.tokens, w.tokens, "prompt {i}");
        assert_eq!((g.finish_reason, g.eos, &g.text), (w.finish_reason, w.eos, &w.text), "prompt {i}");
    }
}

#[test]
fn a_stop_string_ends_a_row_and_can_stay_in_the_text() {
    let m = model();
    let tok = ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap();
    let free = alone(&m, &tok, &[5, 6, 7], &SamplingParams { max_new_tokens: 12, ..Default::default() });
    // The text's middle as the stop string: the row must end right there.
    let chars: Vec<char> = free.text.chars().collect();
    assert!(chars.len() >= 6, "{:?}", free.text);
    let stop: String = chars[2..4].iter().collect();
    let at = free.text.find(&stop).unwrap();
    for include in [false, true] {
        let params = SamplingParams {
            max_new_tokens: 12,
            stop: vec![stop.clone()],
            include_stop_str_in_output: include,
            ..Default::default()
        };
        let mut got = None;
        generate_continuous(&m, &tok, &[vec![5, 6, 7]], Slots::new(2), &params, &|_| 0, None, None, &mut |_, c| {
            got = Some(c);
            Ok(())
        })
        .unwrap();
        let got = got.unwrap();
        assert_eq!(got.finish_reason, FinishReason::Stop);
        let want = if include { &free.text[..at + stop.len()] } else { &free.text[..at] };
        assert_eq!(got.text, want);
        assert!(got.tokens.len() < free.tokens.len());
    }
}

/// Log-softmax of `logits / t` at `token`, in f64.
fn logprob_f64(logits: &[f32], t: f64, token: u32) -> f64 {
    let z: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    z[token as usize] - lse
}

/// With `logprobs`, each sampled token carries the sampler's log-probability of
/// it: the model's own log-softmax at the sampling temperature (over the whole
/// vocabulary, before any top-k cut), recomputed here a token at a time in f64.
/// Both samplers: plain sampling (the block walk on the device's softmax) and
/// top-k (the host's candidate list).
#[test]
fn the_samplers_logprobs_are_the_models_own_at_the_sampling_temperature() {
    use r1pipe::model::KvCache;
    let m = model();
    let mut tok = ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap();
    tok.eos_ids = vec![7];
    let prompts: Vec<Vec<u32>> = prompts().into_iter().take(3).collect();
    for top_k in [0, 5] {
        let params =
            SamplingParams { temperature: 0.7, top_k, max_new_tokens: 10, logprobs: true, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let out = generate(&m, &tok, &prompts, 4, &params, &mut rng, None).unwrap();
        for c in &out {
            let lp = c.sampling_logprobs.as_ref().expect("logprobs were asked for");
            let mut seq = c.tokens.clone();
            if c.eos {
                seq.push(7);
            }
            assert_eq!(lp.len(), seq.len(), "one log-probability per sampled token, EOS included");
            let mut cache = KvCache::new(m.cfg.num_layers, 64);
            let mut logits = m.forward_cached(&[prompts[c.prompt_index].clone()], &mut cache).unwrap();
            for (j, (&t, &got)) in seq.iter().zip(lp).enumerate() {
                let row = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = logprob_f64(&row, 0.7, t);
                // 1e-3: the batch and this one-row pass sum in different orders (candle's
                // gemm on the portable path blocks by the row count); a wrong temperature
                // or distribution is off by tenths.
                assert!((got as f64 - want).abs() < 1e-3, "top_k {top_k}, token {j}: {got} against {want}");
                logits = m.forward_cached(&[vec![t]], &mut cache).unwrap();
            }
        }
    }
    // Not asked for: none kept.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let params = SamplingParams { temperature: 0.7, max_new_tokens: 4, ..Default::default() };
    assert!(generate(&m, &tok, &prompts, 2, &params, &mut rng, None)
        .unwrap()
        .iter()
        .all(|c| c.sampling_logprobs.is_none()));
}

/// The weights of the model's products (its projections and head) rounded to
/// bf16 in place (candle's rounding: nearest even); embeddings and norms as they are.
fn round_to_bf16(m: &Transformer) {
    use candle_core::DType;
    for (_, v) in m.weights.iter().filter(|(name, _)| name.contains("_proj.") || name.starts_with("lm_head")) {
        v.set(&v.as_tensor().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    }
}

/// GRPO's `rollout_dtype: bf16`: a view of the model with its weights rounded
/// to bf16 and packed. It computes the model whose weights are the rounded
/// ones (to f32 summation order; an untied head, so that the reference can
/// round the head and not the embedding lookup), which is not the f32 model
/// (the rounding is real); a row's completion does not depend on its batch;
/// and a view built after the weights change follows them.
#[test]
fn a_bf16_rollout_view_computes_the_bf16_rounded_model_and_keeps_rows_independent() {
    use r1pipe::kernels::packed::Precision;
    use r1pipe::model::KvCache;
    let m = model_tied(false);
    let Some(view) = m.rollout_view(Precision::Bf16).unwrap() else {
        eprintln!(
            "skipped: no bf16 rollout view here (portable kernels or no AVX-512); GRPO says so and decodes in f32"
        );
        assert!(!r1pipe::kernels::packed::packs_here());
        return;
    };
    let ids: Vec<Vec<u32>> = prompts().into_iter().filter(|p| p.len() == 5).collect();
    let logits = |m: &Transformer| {
        let mut cache = KvCache::new(m.cfg.num_layers, 16);
        m.forward_cached(&ids, &mut cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let off = |a: &[f32], b: &[f32]| {
        let scale = a.iter().fold(1f32, |s, v| s.max(v.abs()));
        (a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max), scale)
    };
    let rounded = model_tied(false);
    round_to_bf16(&rounded);
    let (d, scale) = off(&logits(&rounded), &logits(&view));
    assert!(d < 1e-4 * scale, "the view is not the bf16-rounded model: off by {d} (scale {scale})");
    let (d, _) = off(&logits(&m), &logits(&view));
    assert!(d > 0.0, "the view's logits are the f32 model's bit for bit: its weights were not rounded");
    every_prompt_gets_its_completion_alone(&view);
    // The view shares the variables: after an update, a new view follows it.
    for v in m.weights.values() {
        v.set(&(v.as_tensor() * 0.5).unwrap()).unwrap();
    }
    let after = logits(&m.rollout_view(Precision::Bf16).unwrap().unwrap());
    round_to_bf16(&m);
    let (d, scale) = off(&logits(&m), &after);
    assert!(d < 1e-4 * scale, "a view built after the update does not follow it: off by {d} (scale {scale})");
}
