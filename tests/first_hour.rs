//! A new user's first hour, in a project folder of their own (not a checkout
//! of r1pipe): the built-in presets and reward sets, their listing, reward
//! sets fingerprinted by content, and what a training run says while it runs.

mod common;

use std::fs;
use std::path::Path;

use common::Project;

/// A project with a tiny model and a little GSM8K-shaped data, and no `stages/`
/// files of its own: every preset and reward set below is a built-in.
fn project() -> Project {
    let p = common::tiny_project(5, 12);
    fs::remove_dir_all(p.root().join("stages")).unwrap();
    fs::write(p.root().join(".git"), "").unwrap(); // the project root marker of a user's repository
    p
}

const PIPE: &str = r#"
name: mine
seed: 3
device: cpu
stages:
  gsm8k: { kind: download, with: { dataset: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", system_prompt: "Answer." } }
  grpo:
    kind: grpo
    use: grpo
    with:
      model: models/tiny
      train: ${prompts.train}
      rewards: REWARDS
      per_device_train_batch_size: 4
      gradient_accumulation_steps: 1
      num_generations: 4
      max_completion_length: 8
      max_steps: STEPS
      save_steps: 1
      logging_steps: 3
"#;

fn pipe(rewards: &str, steps: u64) -> String {
    PIPE.replace("REWARDS", rewards).replace("STEPS", &steps.to_string())
}

#[test]
fn built_in_presets_and_reward_sets_work_outside_the_repository() {
    let p = project();
    assert!(!p.root().join("stages").exists());
    p.write("p.yaml", &pipe("r1-gsm8k", 1));
    let r = p.run(&["run", "p.yaml", "--dry-run"]).ok();
    assert!(r.decision("grpo").starts_with("run"), "{}", r.stdout);

    // A name that is not a built-in is refused with the nearest one and how to list them.
    p.write("bad.yaml", &pipe("r1-gsm8k", 1).replace("use: grpo", "use: grop"));
    let r = p.run(&["run", "bad.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no built-in preset `grop`"), "{}", r.stderr);
    assert!(r.stderr.contains("did you mean `grpo`?") && r.stderr.contains("r1pipe presets"), "{}", r.stderr);
    p.write("bad.yaml", &pipe("r1-gsm9k", 1));
    let r = p.run(&["run", "bad.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no built-in reward set `r1-gsm9k`"), "{}", r.stderr);
    assert!(r.stderr.contains("did you mean `r1-gsm8k`?"), "{}", r.stderr);

    // The listing names every built-in with how to use it; one prints as its file.
    let list = p.run(&["presets"]).ok().stdout;
    for needle in ["use: grpo", "use: sft", "rewards: r1-gsm8k", "rewards: building-r1", "rewards: format-only"] {
        assert!(list.contains(needle), "{list}");
    }
    let text = p.run(&["presets", "r1-gsm8k"]).ok().stdout;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(text, fs::read_to_string(repo.join("stages/rewards/r1-gsm8k.yaml")).unwrap());
    assert_ne!(p.run(&["presets", "nope"]).code, 0);

    // `rewards --set` takes a built-in's name too.
    p.write(
        "c.jsonl",
        "{\"completion\": \"<think>\\n1+1\\n</think>\\n<answer>\\n2\\n</answer>\", \"answer\": \"2\"}\n",
    );
    let scored = p.run(&["rewards", "--set", "r1-gsm8k", "c.jsonl"]).ok().stdout;
    assert!(scored.contains("correctness"), "{scored}");
}

#[test]
fn a_reward_set_is_fingerprinted_by_content_not_by_its_comments() {
    let p = project();
    p.write("rewards.yaml", "# mine\n- name: regex_match\n  weight: 1.0\n  params: { pattern: \"^[A-Za-z]\" }\n");
    p.write("p.yaml", &pipe("rewards.yaml", 1));
    p.run(&["run", "p.yaml", "-q"]).ok();
    // A comment and a different layout: the same set, so nothing reruns.
    p.write(
        "rewards.yaml",
        "# mine, now with a longer comment\n\n- {name: regex_match, weight: 1.0, params: {pattern: \"^[A-Za-z]\"}}\n",
    );
    let r = p.run(&["run", "p.yaml", "--dry-run"]).ok();
    assert!(r.skipped("grpo"), "{}", r.stdout);
    // A different weight is a different set.
    p.write("rewards.yaml", "- {name: regex_match, weight: 2.0, params: {pattern: \"^[A-Za-z]\"}}\n");
    let r = p.run(&["run", "p.yaml", "--dry-run"]).ok();
    assert!(r.decision("grpo").starts_with("run"), "{}", r.stdout);
    assert!(r.decision("grpo").contains("rewards changed"), "{}", r.stdout);
}

#[test]
fn training_prints_a_line_every_logging_steps_and_is_quiet_with_q() {
    let p = project();
    p.write("p.yaml", &pipe("[ { name: regex_match, params: { pattern: \"^[A-Za-z]\" } } ]", 4));
    let r = p.run(&["run", "p.yaml"]).ok();
    let steps: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("grpo: step ")).collect();
    // logging_steps 3: the first step, the third, and the last.
    assert_eq!(steps.len(), 3, "{}", r.stderr);
    for (line, at) in steps.iter().zip(["step 1/4 ", "step 3/4 ", "step 4/4 "]) {
        assert!(line.contains(at), "{line}");
        for field in ["loss ", "reward ", "(regex_match ", "kl ", "entropy ", "grad_norm ", "lr ", "s/step", "ETA "] {
            assert!(line.contains(field), "`{field}` missing from: {line}");
        }
    }

    p.write("p.yaml", &pipe("[ { name: regex_match, params: { pattern: \"^[A-Za-z]\" } } ]", 2));
    let r = p.run(&["run", "p.yaml", "-q"]).ok();
    assert!(r.decision("grpo").starts_with("run"), "{}", r.stdout);
    assert!(!r.stderr.contains("step 1/2"), "-q printed step lines:\n{}", r.stderr);
}

#[test]
fn a_run_where_every_group_ties_says_so_and_names_the_constant_reward() {
    let p = project();
    // No completion of a random model is `ZZZZ` exactly: every reward 0, every group tied.
    p.write("p.yaml", &pipe("[ { name: regex_match, params: { pattern: \"^ZZZZ$\" } } ]", 3));
    let r = p.run(&["run", "p.yaml"]).ok();
    let warnings: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("grpo: warning: ")).collect();
    assert!(warnings.iter().any(|w| w.contains("steps 1–3: all rewards equal within every group")), "{}", r.stderr);
    assert!(warnings.iter().any(|w| w.contains("reward `regex_match` was 0 for every completion")), "{}", r.stderr);
    // A run that learns says neither.
    p.write("q.yaml", &pipe("[ { name: regex_match, params: { pattern: \"^[A-Za-z]\" } } ]", 3));
    let r = p.run(&["run", "q.yaml"]).ok();
    assert!(!r.stderr.contains("warning: steps"), "{}", r.stderr);
}

#[test]
fn r1pipe_alone_says_what_to_do_first_and_every_option_has_a_help_text() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_r1pipe")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("First steps: `scripts/quickstart.sh`") && text.contains("docs/"), "{text}");
    for command in ["convert", "show", "verify", "gc", "fetch", "presets", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_r1pipe")).args([command, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        // An option line with nothing after its name: `      --cache <DIR>` alone.
        let bare: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with("--") && !l.trim().contains("  "))
            .filter(|l| !l.contains("--help") && !l.contains("--version"))
            .collect();
        assert!(bare.is_empty(), "`r1pipe {command} --help` has options without a help text: {bare:?}\n{help}");
    }
}
