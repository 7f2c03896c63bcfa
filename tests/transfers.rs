//! What crosses from the device to the host: on a GPU every copy is a
//! synchronization, so decoding must move a few token ids per step, not a
//! [batch, vocabulary] matrix, and a training step's copies must not grow with
//! the number of layers or parameters. Counted through `kernels::transfer`,
//! the one way the loops read tensors (tests/layers.rs holds them to it). Run
//! in both kernel modes by scripts/test.sh; the portable mode is CUDA's path.

mod common;

use candle_core::Device;
use r1pipe::common::{CancelToken, FolderHost};
use r1pipe::kernels::transfer::counts;
use r1pipe::model::{generate, ChatTokenizer, Config, SamplingParams, Transformer};
use r1pipe::train::sft::{Example, SftAlgorithm, SftConfig};
use r1pipe::train::trainer;
use rand::SeedableRng;

fn model(layers: usize, hidden: usize, vocab: usize) -> Transformer {
    let cfg = Config::from_json(serde_json::json!({
        "model_type": "qwen2", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 256
    }))
    .unwrap();
    Transformer::random(cfg, 3, &Device::Cpu).unwrap()
}

/// SmolLM2's tokenizer with no stop token, so every row decodes all its steps.
fn tokenizer() -> ChatTokenizer {
    let mut tok = ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap();
    tok.eos_ids.clear();
    tok
}

/// (copies, elements) that generating `steps` tokens for `prompts` moves to the host.
fn generation_transfers(m: &Transformer, params: &SamplingParams, prompts: &[Vec<u32>]) -> (u64, u64) {
    let tok = tokenizer();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let before = counts();
    let out = generate(m, &tok, prompts, 1, params, &mut rng, None).unwrap();
    assert!(out.iter().all(|c| c.tokens.len() == params.max_new_tokens), "every row runs every step");
    let after = counts();
    (after.0 - before.0, after.1 - before.1)
}

const PROMPTS: [&[u32]; 3] = [&[5, 9, 13, 2], &[7, 8], &[40, 41, 42, 43, 44]];

#[test]
fn greedy_decoding_moves_the_batchs_token_ids_and_no_more_whatever_the_vocabulary() {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let params = SamplingParams { max_new_tokens: 6, ..Default::default() };
    for vocab in [256, 4096] {
        let (copies, elements) = generation_transfers(&model(2, 32, vocab), &params, &prompts);
        assert_eq!(copies, 6, "vocabulary {vocab}: one copy per step");
        assert_eq!(elements, 6 * 3, "vocabulary {vocab}: B = 3 token ids per step");
    }
}

#[test]
fn sampling_moves_about_two_square_roots_of_the_vocabulary_per_row_and_step() {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let params = SamplingParams { max_new_tokens: 5, temperature: 1.0, ..Default::default() };
    for vocab in [256usize, 4096] {
        let (copies, elements) = generation_transfers(&model(2, 32, vocab), &params, &prompts);
        let root = (vocab as f64).sqrt().ceil() as u64;
        assert_eq!(copies, 2 * 5, "vocabulary {vocab}: the block sums, then the chosen blocks");
        assert!(elements <= 5 * 3 * (2 * root + 1), "vocabulary {vocab}: {elements} elements moved");
    }
}

fn sft_step_transfers(m: &mut Transformer) -> u64 {
    let examples: Vec<Example> = (0..4)
        .map(|i| Example {
            ids: (0..12).map(|t| (t * 5 + i) % 200).collect(),
            targets: vec![true; 12],
            truncated: false,
        })
        .collect();
    let mut cfg = SftConfig::default();
    cfg.training.per_device_train_batch_size = 2;
    cfg.training.gradient_accumulation_steps = 2;
    cfg.training.max_steps = Some(1);
    let training = cfg.training.clone();
    let mut algo = SftAlgorithm::new(cfg, 0, &examples, 1);
    let dir = tempfile::tempdir().unwrap();
    let host = FolderHost { dir: dir.path().to_path_buf(), cancel: CancelToken::default() };
    let before = counts().0;
    trainer::train(m, &mut algo, &training, &host, None).unwrap();
    counts().0 - before
}

#[test]
fn a_training_steps_host_copies_do_not_grow_with_layers_or_parameters() {
    let small = sft_step_transfers(&mut model(1, 16, 256));
    let large = sft_step_transfers(&mut model(4, 64, 256));
    assert_eq!(small, large, "1 layer of 16 vs 4 layers of 64: the same number of copies");
    // Per micro-batch: its loss and the head's live rows; per step: the global norm.
    assert!(small <= 2 * 2 + 1, "{small} copies for one step of two micro-batches");
}
