//! The `grpo` stage end to end on a tiny random model: it learns a synthetic
//! reward, logs TRL's metrics, and a run killed mid-way and resumed ends with
//! bitwise the same weights as an uninterrupted one.

mod common;

use std::fs;
use std::time::Duration;

use common::{gsm8k_rows, Project};

fn project() -> Project {
    common::tiny_project(5, 12)
}

/// Reward 1 when the completion starts with a letter (not a space or a symbol): a random
/// model does so about a third of the time, so groups have variance to learn from.
const PIPE: &str = r#"
name: grpo-test
seed: 3
device: cpu
dtype: DTYPE
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", system_prompt: "Answer." } }
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${prompts.train}
      rewards: [ { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]
      learning_rate: 0.05
      warmup_ratio: 0.0
      lr_scheduler_type: constant
      max_grad_norm: 1.0
      weight_decay: 0.0
      per_device_train_batch_size: 8
      gradient_accumulation_steps: 2
      num_generations: 8
      max_completion_length: 12
      max_steps: STEPS
      save_steps: 1
      log_completions: 5
"#;

fn pipe(steps: &str, dtype: &str) -> String {
    PIPE.replace("STEPS", steps).replace("DTYPE", dtype)
}

fn log_of(p: &Project) -> Vec<serde_json::Value> {
    let path = p.run(&["show", "grpo.log", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn grpo_raises_a_synthetic_reward_and_logs_trl_metrics() {
    let p = project();
    p.write("pipe.yaml", &pipe("40", "f32"));
    p.run(&["run", "pipe.yaml"]).ok();
    let log = log_of(&p);
    assert_eq!(log.len(), 40);
    for key in [
        "reward",
        "reward_std",
        "rewards/regex_match/mean",
        "rewards/regex_match/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "clip_ratio/region_mean",
        "loss",
        "grad_norm",
        "learning_rate",
        "step_time",
        "tokens_per_second",
    ] {
        assert!(log[0].get(key).is_some_and(|v| v.is_number()), "log lacks {key}: {}", log[0]);
    }
    assert!(log[4]["completions"].is_array(), "log_completions: 5 puts samples in step 5's line");
    let mean =
        |xs: &[serde_json::Value]| xs.iter().map(|l| l["reward"].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&log[..8]), mean(&log[32..]));
    println!("reward: first 8 steps {first:.3}, last 8 steps {last:.3}");
    assert!(last > first + 0.25 && last > 0.6, "the reward did not rise: {first:.3} → {last:.3}");
    let metrics: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.run(&["show", "grpo.metrics"]).ok().stdout.trim()).unwrap())
            .unwrap();
    assert_eq!(metrics["steps"], 40);
    // The trained model is a loadable Hugging Face folder.
    let model = p.run(&["show", "grpo.model"]).ok().stdout.trim().to_string();
    r1pipe::model::load::load(
        &r1pipe::model::ModelRef::Dir(model.into()),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
}

/// bf16 compute with f32 master weights (CUDA's default), on the portable ops:
/// the same synthetic reward is learned. (The run takes off later than f32's,
/// around step 30 against 22, on other samples: 60 steps leave it room.)
#[test]
fn grpo_learns_in_bf16_compute_with_f32_masters() {
    let p = project();
    p.write("pipe.yaml", &pipe("60", "bf16"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains("BF16, kernels: portable"), "{}", r.stderr);
    let log = log_of(&p);
    let mean =
        |xs: &[serde_json::Value]| xs.iter().map(|l| l["reward"].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&log[..8]), mean(&log[52..]));
    println!("bf16 reward: first 8 steps {first:.3}, last 8 steps {last:.3}");
    assert!(last > first + 0.25 && last > 0.6, "the reward did not rise in bf16: {first:.3} → {last:.3}");
}

#[test]
fn a_killed_grpo_run_resumes_to_bitwise_identical_weights() {
    let steps = "24";
    let whole = project();
    whole.write("pipe.yaml", &pipe(steps, "auto"));
    whole.run(&["run", "pipe.yaml"]).ok();
    let reference =
        fs::read(format!("{}/model.safetensors", whole.run(&["show", "grpo.model"]).ok().stdout.trim())).unwrap();

    let p = project();
    p.write("pipe.yaml", &pipe(steps, "auto"));
    let mut child = p.spawn(&["run", "pipe.yaml"]);
    let at = p.wait_for_checkpoint(3, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(at < 24, "finished before it could be killed");
    // The kill may also have cut the log mid-line: a partial UTF-8 sequence there is
    // dropped with a warning, not a failure of every later run.
    let work: Vec<_> = fs::read_dir(p.cache().join("work")).unwrap().flatten().map(|e| e.path()).collect();
    let log_path = work.iter().map(|w| w.join("log.jsonl")).find(|l| l.exists()).expect("a work log");
    let mut damaged = fs::read(&log_path).unwrap();
    damaged.extend_from_slice(b"{\"step\": 9\xe2\x82");
    fs::write(&log_path, damaged).unwrap();
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("grpo").starts_with("resume from step"), "{}", r.stdout);
    assert!(r.stderr.contains("dropped 1 damaged line(s)"), "{}", r.stderr);
    // Only the remaining steps ran: a restart from step 0 would report resumed_from_step 0.
    let m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.run(&["show", "grpo.metrics"]).ok().stdout.trim()).unwrap())
            .unwrap();
    let resumed = m["resumed_from_step"].as_u64().unwrap();
    assert!(resumed >= at, "resumed at {resumed}, a checkpoint at {at} existed");
    assert_eq!(m["steps_run"].as_u64().unwrap(), 24 - resumed);
    assert!(r.stderr.contains(&format!("grpo: resumed at step {resumed} of 24")), "{}", r.stderr);
    let resumed = fs::read(format!("{}/model.safetensors", p.run(&["show", "grpo.model"]).ok().stdout.trim())).unwrap();
    assert!(resumed == reference, "resumed weights differ from the uninterrupted run's");
    let log = log_of(&p);
    let steps: Vec<u64> = log.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>(), "each step logged once");
}

#[test]
fn grpo_parameters_are_validated() {
    let p = project();
    p.write("pipe.yaml", &pipe("2", "auto").replace("num_generations: 8", "num_generations: 3"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is not a multiple of num_generations = 3"), "{}", r.stderr);
    p.write("pipe.yaml", &pipe("2", "auto").replace("regex_match", "regexmatch"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("unknown reward function `regexmatch`") && r.stderr.contains("did you mean `regex_match`?"),
        "{}",
        r.stderr
    );
    // rollout_dtype: a value it does not know, and a setting a server's rollouts cannot honour.
    for (extra, says) in [
        ("      rollout_dtype: fp8\n", "rollout_dtype"),
        (
            "      rollout_dtype: bf16\n      lora: { r: 4 }\n      rollout: { url: \"http://localhost:1/v1\", model: m }\n",
            "applies to rollouts sampled here, and `rollout:` samples on a server",
        ),
    ] {
        p.write("pipe.yaml", &pipe("2", "auto").replace("      log_completions: 5\n", &format!("      log_completions: 5\n{extra}")));
        let r = p.run(&["run", "pipe.yaml", "--dry-run"]);
        assert_eq!(r.code, 2, "{extra}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(says), "{extra}: {}", r.stderr);
    }
}

/// A reward written as a program outside the binary trains like a built-in: its
/// values are logged under its name, and editing the script reruns the stage.
#[test]
fn a_reward_program_is_logged_and_editing_it_reruns_the_stage() {
    let p = project();
    let program = "import json, sys\n\
        for line in sys.stdin:\n\
        \x20   s = json.loads(line)['samples']\n\
        \x20   print(json.dumps({'rewards': [1.0 if x['completion'][:1].isalpha() else 0.0 for x in s]}), flush=True)\n";
    p.write("reward.py", program);
    let text = pipe("2", "f32").replace(
        r#"rewards: [ { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]"#,
        "rewards: [ { name: starts_with_letter, command: [python3, reward.py] } ]",
    );
    assert!(text.contains("reward.py"));
    p.write("pipe.yaml", &text);
    p.run(&["run", "pipe.yaml"]).ok();
    let log = log_of(&p);
    assert_eq!(log.len(), 2);
    for s in &log {
        let m = s["rewards/starts_with_letter/mean"].as_f64().expect("logged under its name");
        assert!((0.0..=1.0).contains(&m) && s["rewards/starts_with_letter/std"].is_f64(), "{s}");
    }
    assert!(p.run(&["run", "pipe.yaml"]).ok().skipped("grpo"));
    p.write("reward.py", &format!("{program}# pays for a leading letter\n"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(!r.skipped("grpo"), "the edited script reruns the stage: {}", r.stdout);
}

/// Dynamic sampling (DAPO): a reward that ties on every group of the even-numbered
/// questions. Without it some steps train on tied groups (no signal); with it every
/// step's batch is full and has none, and the log says how many groups were
/// dropped and in how many rounds.
#[test]
fn dynamic_sampling_replaces_tied_groups_so_every_step_trains_on_signal() {
    let p = project();
    let program = "import json, re, sys\n\
        for line in sys.stdin:\n\
        \x20   s = json.loads(line)['samples']\n\
        \x20   even = lambda x: int(re.search(r'has (\\d+) apples', x['prompt']).group(1)) % 2 == 0\n\
        \x20   r = [0.5 if even(x) else sum(map(ord, x['completion'])) % 1000 / 1000 for x in s]\n\
        \x20   print(json.dumps({'rewards': r}), flush=True)\n";
    p.write("reward.py", program);
    let text = pipe("4", "f32").replace(
        r#"rewards: [ { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]"#,
        "rewards: [ { name: ties_on_even, command: [python3, reward.py] } ]",
    );
    p.write("pipe.yaml", &text);
    p.run(&["run", "pipe.yaml"]).ok();
    let without = log_of(&p);
    let tied: f64 = without.iter().map(|s| s["frac_reward_zero_std"].as_f64().unwrap()).sum();
    assert!(tied > 0.0, "the plain run trains on tied groups: {without:?}");
    assert!(without[0].get("dynamic_sampling/rounds").is_none());

    let with = text.replace("      max_steps: 4\n", "      max_steps: 4\n      dynamic_sampling: true\n");
    assert_ne!(with, text);
    p.write("pipe.yaml", &with);
    p.run(&["run", "pipe.yaml"]).ok();
    let log = log_of(&p);
    assert_eq!(log.len(), 4);
    let mut dropped = 0.0;
    for s in &log {
        assert_eq!(s["frac_reward_zero_std"].as_f64(), Some(0.0), "no tied group is trained on: {s}");
        let rounds = s["dynamic_sampling/rounds"].as_u64().unwrap();
        let d = s["dynamic_sampling/dropped_fraction"].as_f64().unwrap();
        assert!((1..=5).contains(&rounds) && (0.0..1.0).contains(&d), "{s}");
        assert_eq!(d > 0.0, rounds > 1, "a group dropped costs a round: {s}");
        dropped += d;
    }
    assert!(dropped > 0.0, "groups were dropped: {log:?}");
}

/// `pipe` with more settings for the `grpo` stage and more stages after it.
fn pipe_with(steps: &str, grpo_extra: &str, stages: &str) -> String {
    let indented: String = grpo_extra.lines().map(|l| format!("      {l}\n")).collect();
    format!("{}{indented}{stages}", pipe(steps, "f32"))
}

fn metrics_of(p: &Project, stage: &str) -> serde_json::Value {
    let path = p.run(&["show", &format!("{stage}.metrics"), "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn evaluation_during_training_equals_a_separate_evaluate_of_that_steps_model() {
    let p = project();
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(5));
    let evaluate = "  evaluate:\n    kind: evaluate\n    with: { models: { grpo: \"${grpo.model}\" }, \
                    test: \"${prompts.test}\", limit: 4, batch_size: 3, max_new_tokens: 12 }\n";
    p.write(
        "pipe.yaml",
        &pipe_with(
            "2",
            "eval_dataset: ${prompts.test}\neval_steps: 1\neval_limit: 4\nper_device_eval_batch_size: 3",
            evaluate,
        ),
    );
    p.run(&["run", "pipe.yaml"]).ok();
    let log = log_of(&p);
    let names = r1pipe::train::task_eval::METRICS;
    assert!(names.len() == 7 && names.contains(&"reward"));
    for line in &log {
        for n in names {
            assert!(line[format!("eval/{n}")].is_number(), "step {} lacks eval/{n}: {line}", line["step"]);
        }
    }
    let separate = &metrics_of(&p, "evaluate")["models"]["grpo"];
    assert_eq!(separate["n"], 4);
    for n in names.iter().filter(|n| **n != "reward") {
        assert_eq!(log[1][format!("eval/{n}")], separate[*n], "eval/{n} at step 2 differs from `evaluate`");
    }
    // The answers themselves, not only their averages.
    let evaluations = p.run(&["show", "grpo.eval", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    let during: Vec<serde_json::Value> = fs::read_dir(evaluations)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("samples-step-2-"))
        .map(|e| fs::read_to_string(e.path()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
        .unwrap();
    let after_path = p.run(&["show", "evaluate.samples", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    let after: Vec<serde_json::Value> =
        fs::read_to_string(after_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts = |v: &[serde_json::Value]| {
        let mut t: Vec<(u64, String)> =
            v.iter().map(|s| (s["index"].as_u64().unwrap(), s["completion"].as_str().unwrap().to_string())).collect();
        t.sort();
        t
    };
    assert_eq!(texts(&during), texts(&after));
}

/// A `grpo` stage `name` like the test pipeline's, for `steps` steps, with `extra` settings.
fn plain_grpo(name: &str, steps: u64, extra: &str) -> String {
    let body = pipe("STEPS", "f32");
    let with = &body[body.find("    with:\n      model").unwrap()..];
    let extra: String = extra.lines().map(|l| format!("      {l}\n")).collect();
    format!("  {name}:\n    kind: grpo\n{}{extra}", with.replace("max_steps: STEPS", &format!("max_steps: {steps}")))
}

#[test]
fn load_best_model_at_end_makes_the_best_evaluated_step_the_stages_model() {
    let p = project();
    // A random model never writes the strict format: every evaluation ties at 0,
    // and the first (step 1) stays the best, so the model must be step 1's.
    let eval = "eval_dataset: ${prompts.test}\neval_steps: 1\nmetric_for_best_model: strict_format\nload_best_model_at_end: true";
    p.write("pipe.yaml", &pipe_with("3", eval, &format!("{}{}", plain_grpo("one", 1, ""), plain_grpo("last", 3, ""))));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains("best model: step 1 of 3 (eval/strict_format 0.0000)"), "{}", r.stderr);
    let m = metrics_of(&p, "grpo");
    assert_eq!((m["best_model_step"].as_u64(), m["loaded_best_model"].as_bool()), (Some(1), Some(true)), "{m}");
    let weights = |stage: &str| {
        let dir = p.run(&["show", &format!("{stage}.model"), "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
        fs::read(format!("{dir}/model.safetensors")).unwrap()
    };
    assert!(weights("grpo") == weights("one"), "the stage's model is not step 1's weights");
    assert!(weights("grpo") != weights("last"), "the stage's model is the last step's weights");
}

#[test]
fn evaluation_settings_without_held_out_prompts_are_refused_before_anything_runs() {
    let p = project();
    p.write("pipe.yaml", &pipe_with("2", "eval_steps: 1\nmetric_for_best_model: accuracy", ""));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("parameter `eval_dataset`: evaluation during training needs held-out prompts"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("parameter `metric_for_best_model`: `accuracy` is not an evaluation metric"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("accuracy_strict, accuracy_flexible"), "the hint lists the metrics: {}", r.stderr);
}

const KL: &str = "beta: 0.04\nreference_dtype: f32";

#[test]
fn sync_ref_model_with_alpha_one_every_step_keeps_the_reference_at_the_policy() {
    let p = project();
    let sync = format!("{KL}\nsync_ref_model: true\nref_model_mixup_alpha: 1.0\nref_model_sync_steps: 1");
    p.write("pipe.yaml", &pipe_with("4", &sync, &plain_grpo("fixed", 4, KL)));
    p.run(&["run", "pipe.yaml"]).ok();
    let kl = |stage: &str| -> Vec<f64> {
        let path = p.run(&["show", &format!("{stage}.log"), "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kl"].as_f64().unwrap())
            .collect()
    };
    let (synced, fixed) = (kl("grpo"), kl("fixed"));
    println!("kl synced {synced:?}\nkl fixed {fixed:?}");
    // Each round's reference is the policy that sampled it: no divergence to measure.
    assert!(synced.iter().all(|k| k.abs() < 1e-6), "{synced:?}");
    assert!(fixed[3] > 1e-4, "without the sync the policy drifts from the reference: {fixed:?}");
}

#[test]
fn a_grpo_run_with_a_synced_reference_killed_after_a_checkpoint_resumes_bitwise() {
    let extra = format!("{KL}\nsync_ref_model: true\nref_model_mixup_alpha: 0.5\nref_model_sync_steps: 1");
    let whole = project();
    whole.write("pipe.yaml", &pipe_with("4", &extra, &plain_grpo("fixed", 4, KL)));
    whole.run(&["run", "pipe.yaml"]).ok();
    let weights = |p: &Project, stage: &str| {
        let dir = p.run(&["show", &format!("{stage}.model"), "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
        fs::read(format!("{dir}/model.safetensors")).unwrap()
    };
    let reference = weights(&whole, "grpo");
    assert!(reference != weights(&whole, "fixed"), "the synced reference did not change training");

    let p = project();
    p.write("pipe.yaml", &pipe_with("4", &extra, ""));
    let killed = p.cmd(&["run", "pipe.yaml"]).env("R1PIPE_FAULT", "after-checkpoint-2").output().unwrap();
    assert!(!killed.status.success());
    let work = fs::read_dir(p.cache().join("work")).unwrap().flatten().next().unwrap().path();
    assert!(
        work.join("checkpoints/step-000000002/algorithm.safetensors").exists(),
        "the checkpoint lacks the reference"
    );
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains("resumed at step 2 of 4"), "{}", r.stderr);
    assert!(weights(&p, "grpo") == reference, "the resumed run's weights differ from the uninterrupted run's");
}

/// `importance_sampling_level: sequence` with `top_entropy_quantile` (each fine alone)
/// trains end to end: the sequence-level term is broadcast over the entropy mask's tokens.
#[test]
fn sequence_level_ratios_and_the_entropy_mask_train_together() {
    let p = project();
    p.write(
        "pipe.yaml",
        &pipe("2", "f32").replace(
            "      log_completions: 5\n",
            "      log_completions: 5\n      importance_sampling_level: sequence\n      top_entropy_quantile: 0.5\n",
        ),
    );
    let r = p.run(&["run", "pipe.yaml", "-q"]).ok();
    assert!(r.stdout.contains("grpo: done in"), "{}", r.stdout);
    let log = log_of(&p);
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l["loss"].as_f64().is_some_and(f64::is_finite)), "{log:?}");
}

/// `rollout_dtype: bf16`: rollouts decode from the policy's weights rounded to
/// bf16 (on an AVX-512 CPU), the loss takes the f32 policy's log-probabilities,
/// and the gap between the two is logged and corrected for as a server's is.
/// The synthetic reward is still learned, and a killed run resumes bitwise.
#[test]
fn bf16_rollouts_learn_are_corrected_for_their_rounding_and_resume_bitwise() {
    let bf16 = |steps: &str| {
        pipe(steps, "f32")
            .replace("      log_completions: 5\n", "      log_completions: 5\n      rollout_dtype: bf16\n")
    };
    let p = project();
    p.write("pipe.yaml", &bf16("40"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    let log = log_of(&p);
    if !r1pipe::kernels::packed::packs_here() {
        assert!(r.stderr.contains("rollouts decode with the policy's f32 weights here"), "{}", r.stderr);
        eprintln!(
            "skipped the bf16 checks: nothing packs here (no AVX-512 or portable kernels); the warning was checked"
        );
        return;
    }
    assert!(!r.stderr.contains("rollout_dtype: bf16 needs"), "{}", r.stderr);
    for l in &log {
        let gap = l["sampling/sampling_logp_difference/mean"].as_f64().expect("the sampler's gap is logged");
        assert!(gap > 0.0 && gap < 0.05, "bf16 rollouts off the f32 policy by {gap} per token: {l}");
        assert!(l["sampling/importance_sampling_ratio/mean"].is_number(), "the correction is applied: {l}");
    }
    let mean =
        |xs: &[serde_json::Value]| xs.iter().map(|l| l["reward"].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&log[..8]), mean(&log[32..]));
    println!("bf16 rollouts, reward: first 8 steps {first:.3}, last 8 steps {last:.3}");
    assert!(last > first + 0.25 && last > 0.6, "the reward did not rise: {first:.3} → {last:.3}");

    let steps = "12";
    let whole = project();
    whole.write("pipe.yaml", &bf16(steps));
    whole.run(&["run", "pipe.yaml"]).ok();
    let reference =
        fs::read(format!("{}/model.safetensors", whole.run(&["show", "grpo.model"]).ok().stdout.trim())).unwrap();
    let p = project();
    p.write("pipe.yaml", &bf16(steps));
    let mut child = p.spawn(&["run", "pipe.yaml"]);
    let at = p.wait_for_checkpoint(3, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(at < 12, "finished before it could be killed");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("grpo").starts_with("resume from step"), "{}", r.stdout);
    let resumed = fs::read(format!("{}/model.safetensors", p.run(&["show", "grpo.model"]).ok().stdout.trim())).unwrap();
    assert!(resumed == reference, "resumed weights differ from the uninterrupted run's with bf16 rollouts");
}
