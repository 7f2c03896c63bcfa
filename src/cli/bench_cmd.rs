//! `r1pipe bench`: throughput tables on any device, for machines without a Rust
//! toolchain (a lent GPU machine runs the binary it is given).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use r1pipe::bench;
use r1pipe::model::{self, device, Config, Transformer};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A model (folder, .gguf, hub id)
    #[arg(long, conflicts_with = "config")]
    pub model: Option<String>,
    /// A config.json: random weights of that shape
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Sequences per training step (0 skips it)
    #[arg(long, default_value_t = 4)]
    pub train_batch: usize,
    #[arg(long, default_value_t = 256)]
    pub train_seq: usize,
    /// Memory bandwidth in GB/s for the roofline (measured on the CPU when not given)
    #[arg(long)]
    pub bandwidth: Option<f64>,
    /// Compare the device's logits with the CPU's first
    #[arg(long)]
    pub check: bool,
}

pub fn run(a: BenchArgs) -> Result<i32> {
    let (name, m) = match (&a.model, &a.config) {
        (Some(r), None) => (r.clone(), model::open(r, &std::env::current_dir()?, &a.device, &a.dtype)?.model),
        (None, Some(c)) => {
            let dev = device::select(&a.device)?;
            let dtype = device::compute_dtype(&a.dtype, &dev)?;
            let text = std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            let cfg =
                Config::from_json(serde_json::from_str(&text).with_context(|| format!("{} is not JSON", c.display()))?)
                    .with_context(|| format!("in {}", c.display()))?;
            let mut m = Transformer::random(cfg, 0, &dev)?;
            m.set_compute_dtype(dtype)?;
            (format!("{} (random)", c.display()), m)
        }
        _ => bail!("give --model REF or --config CONFIG.json (random weights of that shape)"),
    };
    let dev = m.device.clone();
    let dtype = m.compute_dtype;
    let bandwidth = a.bandwidth.or_else(|| dev.is_cpu().then(bench::cpu_bandwidth_gbs));
    println!(
        "device {}, compute {dtype:?}, {:.1}M parameters, bandwidth {}",
        device::describe(&dev),
        m.num_parameters() as f64 / 1e6,
        bandwidth.map(|b| format!("{b:.0} GB/s")).unwrap_or_else(|| "unknown (--bandwidth)".into())
    );
    if a.check && !dev.is_cpu() {
        let diff = bench::logits_vs_cpu(&m)?;
        let tol = if matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) { 0.5 } else { 1e-3 };
        println!(
            "logits vs CPU f32: max |diff| = {diff:.4} (tolerance {tol}) {}",
            if diff <= tol { "OK" } else { "FAIL" }
        );
        if diff > tol {
            return Ok(1);
        }
    }
    let rows = bench::generation(&m, &a.batches, a.prompt_len, a.decode_steps, bandwidth)?;
    bench::print_generation(&name, &rows);
    if a.train_batch > 0 {
        let (secs, tps) = bench::train_step(&m, a.train_batch, a.train_seq, 3)?;
        println!(
            "train step (forward + backward + AdamW) batch {} × {} tokens: {:.3} s/step, {:.0} tokens/s",
            a.train_batch, a.train_seq, secs, tps
        );
    }
    Ok(0)
}
