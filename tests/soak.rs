//! A crash soak: an SFT → GRPO pipeline on a tiny model killed with SIGKILL
//! at random moments (in training, in checkpoint writes, in commits),
//! resumed each time, and run to the end: both models must be byte-identical
//! to an uninterrupted run's. The kill times are drawn from a seed printed
//! at the start (`R1PIPE_SOAK_SEED` replays one), scaled by the measured
//! length of the uninterrupted run so the kills land inside the work on any
//! machine and build.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::Instant;

use common::{gsm8k_rows, tiny_model, Project};
use rand::{Rng, SeedableRng};

const PIPE: &str = r#"
name: soak
seed: 11
device: cpu
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", system_prompt: "Answer." } }
  sft:
    kind: sft
    with:
      model: models/tiny
      train: ${prompts.sft}
      learning_rate: 0.01
      per_device_train_batch_size: 4
      max_steps: 30
      save_steps: 1
  grpo:
    kind: grpo
    with:
      model: ${sft.model}
      train: ${prompts.train}
      rewards: [ { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]
      learning_rate: 0.05
      lr_scheduler_type: constant
      per_device_train_batch_size: 8
      num_generations: 8
      max_completion_length: 10
      max_steps: 12
      save_steps: 1
"#;

fn project() -> Project {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 9);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(16));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(2));
    p.write("pipe.yaml", PIPE);
    p
}

fn models(p: &Project) -> Vec<Vec<u8>> {
    ["sft.model", "grpo.model"]
        .iter()
        .map(|t| {
            let dir = p.run(&["show", t, "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
            fs::read(format!("{dir}/model.safetensors")).unwrap()
        })
        .collect()
}

#[test]
fn random_kills_across_sft_and_grpo_end_with_the_uninterrupted_runs_models() {
    let seed: u64 = std::env::var("R1PIPE_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("soak seed {seed} (R1PIPE_SOAK_SEED={seed} replays these kill times)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let whole = project();
    let t = Instant::now();
    whole.run(&["run", "pipe.yaml"]).ok();
    let length = t.elapsed();
    let reference = models(&whole);

    let p = project();
    let mut kills = Vec::new();
    for _ in 0..10 {
        let mut child = p.cmd(&["run", "pipe.yaml"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Each attempt resumes, so a kill anywhere in the run's length lands in what is left or after it.
        let after = length.mul_f64(rng.random_range(0.03..0.3));
        std::thread::sleep(after);
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
            kills.push(format!("{:.2}s", after.as_secs_f64()));
        }
        child.wait().unwrap();
        if finished {
            break;
        }
    }
    println!("killed after {} (uninterrupted run: {:.1}s)", kills.join(", "), length.as_secs_f64());
    assert!(!kills.is_empty(), "no kill landed inside the run");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    let resumed = models(&p);
    assert!(resumed[0] == reference[0], "sft's model differs after kills at {kills:?} (seed {seed})");
    assert!(resumed[1] == reference[1], "grpo's model differs after kills at {kills:?} (seed {seed})");
}
