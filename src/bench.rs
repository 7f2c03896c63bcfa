//! Throughput measurements shared by `cargo bench` and `r1pipe bench` (the
//! latter runs where there is no Rust toolchain, such as a lent GPU machine):
//! prefill and decode tokens/s with the decode roofline, a training step's
//! tokens/s, and a device-versus-CPU logits check.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};

use crate::model::{Batch, KvCache, LoadedModel, Transformer};
use crate::train::optim::{AdamW, AdamWConfig};

#[derive(Debug, Clone)]
pub struct GenRow {
    pub batch: usize,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub ms_per_step: f64,
    /// Decode tokens/s if every step only had to read the weights once at `bandwidth`.
    pub roofline_tps: Option<f64>,
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()?;
    Ok(())
}

/// Prefill `prompt_len` tokens then decode `steps` tokens at each batch size.
/// `bandwidth_gbs`: memory bandwidth for the roofline (decode reads all weights per step).
pub fn generation(
    m: &Transformer,
    batches: &[usize],
    prompt_len: usize,
    steps: usize,
    bandwidth_gbs: Option<f64>,
) -> Result<Vec<GenRow>> {
    let bytes_per_param = match m.compute_dtype {
        DType::BF16 | DType::F16 => 2.0,
        DType::F64 => 8.0,
        _ => 4.0,
    };
    let weight_bytes = m.num_parameters() as f64 * bytes_per_param;
    let mut rows = Vec::new();
    for &b in batches {
        let prompt: Vec<Vec<u32>> =
            (0..b).map(|r| (0..prompt_len).map(|i| ((i * 31 + r * 7) % 1000 + 10) as u32).collect()).collect();
        let mut cache = KvCache::new(m.cfg.num_layers, prompt_len + steps + 1);
        sync(&m.device)?;
        let t = Instant::now();
        m.forward_cached(&prompt, &mut cache)?;
        sync(&m.device)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for s in 0..steps {
            let step: Vec<Vec<u32>> = (0..b).map(|r| vec![((s * 13 + r) % 1000 + 10) as u32]).collect();
            m.forward_cached(&step, &mut cache)?;
        }
        sync(&m.device)?;
        let dec = t.elapsed().as_secs_f64();
        rows.push(GenRow {
            batch: b,
            prefill_tps: (b * prompt_len) as f64 / prefill,
            decode_tps: (b * steps) as f64 / dec,
            ms_per_step: dec / steps as f64 * 1e3,
            roofline_tps: bandwidth_gbs.map(|bw| b as f64 * bw * 1e9 / weight_bytes),
        });
    }
    Ok(rows)
}

pub fn print_generation(name: &str, rows: &[GenRow]) {
    println!(
        "{:<34} {:>5} {:>14} {:>13} {:>9} {:>15} {:>9}",
        "model", "batch", "prefill tok/s", "decode tok/s", "ms/step", "roofline tok/s", "achieved"
    );
    for r in rows {
        let (roof, frac) = match r.roofline_tps {
            Some(x) => (format!("{x:.0}"), format!("{:.0}%", 100.0 * r.decode_tps / x)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<34} {:>5} {:>14.0} {:>13.1} {:>9.1} {:>15} {:>9}",
            r.batch, r.prefill_tps, r.decode_tps, r.ms_per_step, roof, frac
        );
    }
}

/// Sampled generation end to end through [`generate`](crate::model::generate):
/// a chat-templated question, temperature 1 (sampling from the full
/// distribution, as GRPO does), up to `new_tokens` per row; returns
/// (batch, generated tokens per second with the prefill included) per batch size.
pub fn sampled_generation(m: &LoadedModel, batches: &[usize], new_tokens: usize) -> Result<Vec<(usize, f64)>> {
    use crate::model::{generate, Message, SamplingParams};
    use rand::SeedableRng;
    let question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
                    How many clips did Natalia sell altogether in April and May?";
    let text = m.tokenizer.apply_chat_template(&[Message::new("user", question)], true)?;
    let prompt = m.tokenizer.encode(&text)?;
    let params = SamplingParams { temperature: 1.0, max_new_tokens: new_tokens, ..Default::default() };
    let mut rows = Vec::new();
    for &b in batches {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(b as u64);
        sync(&m.model.device)?;
        let t = Instant::now();
        let out = generate(&m.model, &m.tokenizer, &vec![prompt.clone(); b], 1, &params, &mut rng, None)?;
        sync(&m.model.device)?;
        let tokens: usize = out.iter().map(|c| c.tokens.len() + c.eos as usize).sum();
        rows.push((b, tokens as f64 / t.elapsed().as_secs_f64()));
    }
    Ok(rows)
}

/// One training step (forward + backward over `batch × seq` tokens, then AdamW):
/// returns (seconds per step, tokens per second), the median of `reps` after a warm-up.
pub fn train_step(m: &Transformer, batch: usize, seq: usize, reps: usize) -> Result<(f64, f64)> {
    let ids: Vec<Vec<u32>> =
        (0..batch).map(|r| (0..seq).map(|i| ((i * 17 + r * 3) % 1000 + 10) as u32).collect()).collect();
    let b = Batch::left_padded(&ids, 0, &m.device)?;
    let mut opt = AdamW::new(m.trainable(), AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 })?;
    let mut times = Vec::new();
    for _ in 0..reps + 1 {
        sync(&m.device)?;
        let t = Instant::now();
        let lp = m.next_token_logprobs(&b)?;
        let loss = lp.mean_all()?.neg()?;
        m.backward(&loss)?;
        opt.step(&m.take_grads(), 1e-6)?;
        sync(&m.device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    Ok((med, (batch * seq) as f64 / med))
}

/// Largest absolute difference between `m`'s logits on its device and a CPU f32 copy's.
pub fn logits_vs_cpu(m: &Transformer) -> Result<f32> {
    let ids: Vec<Vec<u32>> = vec![
        (0..24).map(|i| (i * 37 % 900 + 5) as u32).collect(),
        (0..17).map(|i| (i * 11 % 900 + 5) as u32).collect(),
    ];
    let cpu = Transformer::new(
        m.cfg.clone(),
        m.tensors().into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?,
        &Device::Cpu,
        DType::F32,
    )?;
    let a = m.forward(&Batch::left_padded(&ids, 0, &m.device)?, crate::model::Ops::Fused)?.to_device(&Device::Cpu)?;
    let b = cpu.forward(&Batch::left_padded(&ids, 0, &Device::Cpu)?, crate::model::Ops::Fused)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Approximate read bandwidth of this machine's memory from the CPU, in GB/s:
/// the decode kernel's threads reading a matrix larger than the caches, as a
/// decode step reads the weights.
pub fn cpu_bandwidth_gbs() -> f64 {
    let (rows, k) = (32 << 10, 4096); // 512 MiB of f32
    let w = vec![1f32; rows * k];
    let x = vec![1f32; k];
    let mut out = vec![0f32; rows];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        // x [1, k] @ wᵀ reads w once, with the decode kernel's threads, and writes next to nothing.
        crate::kernels::matmul_t::matmul_t_slices(&x, &w, 1, rows, k, &mut out);
        std::hint::black_box(&out);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (rows * k * 4) as f64 / best / 1e9
}
