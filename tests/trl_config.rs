//! A TRL config carries over: the DeepSeek-R1 `GRPOConfig` of TRL's own docs
//! (docs/source/paper_index.md), with the keys a TRL user's script adds, runs as
//! a `grpo` stage after the changes docs/grpo.md's table lists (and only those),
//! and an `SFTConfig`'s `max_length` and schedules are read.

mod common;

use common::Project;

fn project() -> Project {
    common::tiny_project(5, 12)
}

/// TRL's docs' GRPOConfig for DeepSeek-R1 as YAML, with what scripts around it
/// usually add (output_dir, bf16, logging, warmup, seed, report_to, max_steps: -1 …).
const TRL_GRPO: &str = r#"
      output_dir: Qwen2-0.5B-GRPO
      loss_type: grpo
      beta: 0.001
      epsilon: 10.0
      num_generations: 16
      max_completion_length: 32768
      steps_per_generation: 16
      per_device_train_batch_size: 4
      gradient_accumulation_steps: 128
      bf16: true
      logging_steps: 1
      warmup_steps: 1
      seed: 7
      report_to: none
      push_to_hub: false
      max_steps: -1
      num_train_epochs: 1
      scale_rewards: false
      lr_scheduler_type: cosine_with_min_lr
      lr_scheduler_kwargs: { min_lr_rate: 0.1 }
      use_vllm: false
      save_strategy: steps
      optim: adamw_torch
"#;

fn pipe(config: &str) -> String {
    format!(
        r#"
name: trl
seed: 3
device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ dataset: data/gsm8k }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}", system_prompt: "Answer." }} }}
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${{prompts.train}}
      rewards: [ {{ name: regex_match, params: {{ pattern: "^[A-Za-z]" }} }} ]
{config}"#
    )
}

#[test]
fn trls_grpo_config_runs_after_the_documented_changes_only() {
    let p = project();
    p.write("p.yaml", &pipe(TRL_GRPO));
    let r = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    // Exactly the two keys docs/grpo.md's table refuses, each saying what r1pipe does instead.
    let errors: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("`output_dir: Qwen2-0.5B-GRPO` has no counterpart"), "{}", r.stderr);
    assert!(r.stderr.contains("r1pipe show STAGE.model"), "{}", r.stderr);
    assert!(r.stderr.contains("`steps_per_generation: 16` has no counterpart"), "{}", r.stderr);

    // Those two removed, and the run made tiny from the command line: it trains.
    let config =
        TRL_GRPO.replace("      output_dir: Qwen2-0.5B-GRPO\n", "").replace("      steps_per_generation: 16\n", "");
    p.write("p.yaml", &pipe(&config));
    let tiny = [
        "-S",
        "grpo.num_generations=4",
        "-S",
        "grpo.per_device_train_batch_size=4",
        "-S",
        "grpo.gradient_accumulation_steps=1",
        "-S",
        "grpo.max_completion_length=8",
    ];
    let r = p.run(&[&["run", "p.yaml"][..], &tiny].concat()).ok();
    // bf16: true is this stage's compute dtype; one epoch of 12 prompts at one prompt a step.
    assert!(r.stderr.contains(", BF16, kernels"), "{}", r.stderr);
    let log = p.run(&[&["show", "grpo.log", "-p", "p.yaml"][..], &tiny].concat()).ok().stdout;
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(log.trim()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12, "num_train_epochs 1 over 12 prompts (max_steps -1)");
    // warmup_steps 1, then cosine to a floor of a tenth of the rate: the last step is above the floor.
    let lr: Vec<f64> = lines.iter().map(|l| l["learning_rate"].as_f64().unwrap()).collect();
    let base = 1e-6; // GRPOConfig's default learning rate
    assert!((lr[0] - base).abs() < 1e-15 && lr[11] > 0.1 * base && lr[11] < lr[1], "{lr:?}");
}

#[test]
fn trl_values_are_checked_with_trls_meaning() {
    let p = project();
    for (config, needle) in [
        ("      max_steps: -2\n", "`max_steps`: -2 is not a step count"),
        ("      fp16: true\n", "bf16: true"),
        ("      vllm_mode: server\n      use_vllm: true\n      vllm_server_port: 8001\n", ""),
        ("      use_vllm: true\n", "`colocate` runs vLLM inside the trainer"),
        ("      lr_scheduler_type: cosine_with_min_lr\n", "`cosine_with_min_lr` needs a floor"),
        ("      lr_scheduler_type: constant\n      warmup_steps: 5\n", "use `constant_with_warmup`"),
    ] {
        p.write("p.yaml", &pipe(config));
        let r = p.run(&["run", "p.yaml", "--dry-run"]);
        if needle.is_empty() {
            // use_vllm in server mode is a rollout server; full fine-tuning cannot send it weights.
            assert_eq!(r.code, 2, "{config}: {}{}", r.stdout, r.stderr);
            assert!(r.stderr.contains("add `lora: { r: 16 }`"), "{config}: {}", r.stderr);
            continue;
        }
        assert_eq!(r.code, 2, "{config}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(needle), "{config}: {}", r.stderr);
    }
}

#[test]
fn sft_reads_trls_max_length_and_r1pipes_earlier_name_alike() {
    let p = project();
    let sft = |key: &str| {
        format!(
            "name: s\nstages:\n  gsm8k: {{ kind: download, with: {{ dataset: data/gsm8k }} }}\n  prompts: {{ kind: format, with: {{ data: \"${{gsm8k.dataset}}\" }} }}\n  sft:\n    kind: sft\n    with: {{ model: models/tiny, train: \"${{prompts.sft}}\", max_steps: 1, {key}: 64 }}\n"
        )
    };
    p.write("a.yaml", &sft("max_length"));
    p.run(&["run", "a.yaml", "-q"]).ok();
    // The earlier spelling is the same parameter: the same fingerprint, so cached.
    p.write("a.yaml", &sft("max_seq_length"));
    let r = p.run(&["run", "a.yaml", "--dry-run"]).ok();
    assert!(r.skipped("sft"), "{}", r.stdout);
}
