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
    let cfg = Config::from_json(serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 512
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
