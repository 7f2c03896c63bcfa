//! GRPO step time and its split (generation, scoring, reference forward,
//! policy forward+backward, optimizer) for SmolLM2-135M-Instruct on CPU:
//! 2 prompts × 4 generations × 128 completion tokens, as the issue's TRL
//! reference (about 28 s per step on this 2-core machine). Runs the real
//! `grpo` stage through the binary and reads its log. Prints one table.
//!
//! `cargo bench --bench grpo_step` (needs scripts/fetch-smollm2.sh and ../shared).

use std::fs;
use std::path::Path;
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/smollm2-135m-instruct");
    let data = root.join("../shared/data/gsm8k");
    if !model.exists() || !data.exists() {
        println!("grpo_step: skipped: needs {} (scripts/fetch-smollm2.sh) and {}", model.display(), data.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("stages")).unwrap();
    let beta = std::env::var("R1PIPE_BENCH_BETA").unwrap_or_else(|_| "0.04".into());
    let pipeline = format!(
        r#"
name: bench
device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ path: "{data}" }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}", limit: {{ train: 16, test: 1 }} }} }}
  grpo:
    kind: grpo
    with:
      model: "{model}"
      train: ${{prompts.train}}
      rewards: "{rewards}"
      per_device_train_batch_size: 4
      gradient_accumulation_steps: 2
      num_generations: 4
      max_completion_length: 128
      beta: {beta}
      max_steps: 5
      save_steps: 100
"#,
        data = data.display(),
        model = model.display(),
        rewards = root.join("stages/rewards/r1-gsm8k.yaml").display(),
    );
    fs::write(dir.path().join("bench.yaml"), pipeline).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_r1pipe"))
        .args(["run", "bench.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show =
        Command::new(env!("CARGO_BIN_EXE_r1pipe")).args(["show", "grpo.log"]).current_dir(dir.path()).output().unwrap();
    let log = fs::read_to_string(String::from_utf8_lossy(&show.stdout).trim()).unwrap();
    // (log key, column label)
    let cols = [
        ("step_time", "step s"),
        ("timing/generation", "generation"),
        ("timing/scoring", "scoring"),
        ("timing/reference", "reference"),
        ("timing/policy_forward_backward", "policy fwd+bwd"),
        ("timing/optimizer", "optimizer"),
        ("completions/mean_length", "mean length"),
        ("generation_tokens_per_second", "gen tokens/s"),
    ];
    println!("GRPO on SmolLM2-135M-Instruct (f32, CPU), 2 prompts × 4 generations × ≤128 tokens, β = {beta}");
    println!("{:<5}{}", "step", cols.iter().map(|(_, label)| format!("{label:>15}")).collect::<String>());
    let mut times = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        times.push(v["step_time"].as_f64().unwrap_or(f64::NAN));
        println!(
            "{:<5}{}",
            v["step"],
            cols.iter().map(|(key, _)| format!("{:>15.2}", v[*key].as_f64().unwrap_or(f64::NAN))).collect::<String>()
        );
    }
    // Step 1 also pays for first-touch allocation of the weights' gradients and moments.
    let mut steady = times[1.min(times.len() - 1)..].to_vec();
    steady.sort_by(f64::total_cmp);
    println!("median step time after the first: {:.2} s", steady[steady.len() / 2]);
}
