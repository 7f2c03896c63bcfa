//! Errors and "why" lines that point to the right place and say what would fix
//! them: a bad `-S` value names the command line, values are described in
//! words (not serde's), every problem of a file in one pass, a reward program
//! checked before anything runs, `dag` listing only what a stage writes, and
//! the plan's reasons said against the closest cached run, a resume and a
//! forced rerun said as such.

mod common;

use std::time::Duration;

use common::{gsm8k_rows, tiny_model, Project};

fn data_project() -> Project {
    let p = Project::new();
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(6));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(2));
    p
}

const DATA: &str = "name: m\nstages:\n  gsm8k: { kind: download, with: { dataset: data/gsm8k } }\n  prompts: { kind: format, with: { data: \"${gsm8k.dataset}\" } }\n";

#[test]
fn a_bad_command_line_value_is_reported_as_the_command_lines_in_words() {
    let p = data_project();
    p.write("p.yaml", DATA);
    let r = p.run(&["run", "p.yaml", "--dry-run", "-S", "prompts.limit=-5"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // Before: `p.yaml:4: … data did not match any variant of untagged enum Limit`.
    assert!(r.stderr.contains("command line `-S prompts.limit=-5`"), "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "expected a row count for every split (e.g. 200) or one per split (e.g. {train: 200, test: 16}), not -5"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("untagged"), "{}", r.stderr);
    // Before: `invalid type: string "abc", expected u64`.
    let r = p.run(&["run", "p.yaml", "--dry-run", "-S", "prompts.shuffle_seed=abc"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("command line `-S prompts.shuffle_seed=abc`"), "{}", r.stderr);
    assert!(r.stderr.contains("expected a whole number ≥ 0 (e.g. 100), not \"abc\""), "{}", r.stderr);
    assert!(!r.stderr.contains("invalid type"), "{}", r.stderr);
}

#[test]
fn unknown_keys_and_wrong_values_are_reported_in_one_pass() {
    let p = data_project();
    tiny_model(&p.root().join("models/tiny"), 1);
    p.write(
        "p.yaml",
        &format!("{DATA}  sft:\n    kind: sft\n    with: {{ model: models/tiny, train: \"${{prompts.sft}}\", lerning_rate: 1.0, max_steps: 1.5 }}\n"),
    );
    let r = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown parameter `lerning_rate`") && r.stderr.contains("did you mean `learning_rate`?")
    );
    assert!(
        r.stderr.contains("parameter `max_steps`: expected a whole number ≥ 0 (e.g. 100), not 1.5"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_reward_program_that_cannot_start_is_named_before_anything_runs() {
    let p = data_project();
    tiny_model(&p.root().join("models/tiny"), 1);
    let grpo = |command: &str| {
        format!("{DATA}  grpo:\n    kind: grpo\n    with:\n      model: models/tiny\n      train: ${{prompts.train}}\n      rewards: [ {{ name: mine, command: {command} }} ]\n")
    };
    p.write("p.yaml", &grpo("[python3, rewards/missing.py]"));
    let r = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("rewards/missing.py does not exist"), "{}", r.stderr);
    p.write("p.yaml", &grpo("[no-such-program-here, x]"));
    let r = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the program `no-such-program-here` is not on PATH nor a file"), "{}", r.stderr);
    p.write("rewards/there.py", "print('x')\n");
    p.write("p.yaml", &grpo("[python3, rewards/there.py]"));
    p.run(&["run", "p.yaml", "--dry-run"]).ok();
}

#[test]
fn dag_lists_only_what_a_stage_writes() {
    let p = data_project();
    tiny_model(&p.root().join("models/tiny"), 1);
    p.write(
        "p.yaml",
        &format!("{DATA}  sft:\n    kind: sft\n    with: {{ model: models/tiny, train: \"${{prompts.sft}}\" }}\n"),
    );
    let dag = p.run(&["dag", "p.yaml"]).ok().stdout;
    let line = dag.lines().find(|l| l.starts_with("sft (sft)")).unwrap();
    assert_eq!(line, "sft (sft)  → model, metrics, log, plots", "{dag}");
    // SFT never evaluates while it trains: `eval` is no output of it at all.
    p.write("q.yaml", &format!("{DATA}  sft:\n    kind: sft\n    with: {{ model: models/tiny, train: \"${{prompts.sft}}\" }}\n  after: {{ kind: format, with: {{ data: \"${{sft.eval}}\" }} }}\n"));
    let r = p.run(&["run", "q.yaml", "--dry-run"]);
    assert_eq!(r.code, 2);
    assert!(!r.stderr.contains("eval_dataset"), "{}", r.stderr);
}

#[test]
fn why_a_stage_runs_is_said_against_the_closest_cached_run() {
    let p = data_project();
    p.write(
        "p.yaml",
        &format!("{DATA}  extra: {{ kind: format, with: {{ data: \"${{gsm8k.dataset}}\", limit: 3 }} }}\n"),
    );
    p.run(&["run", "p.yaml"]).ok();
    p.run(&["run", "p.yaml", "-S", "extra.limit=4"]).ok(); // now the newest record of `extra`
                                                           // A third variant: the closest cached one is limit 4 for `limit: 5`, and limit 3 for
                                                           // a changed system prompt with limit 3 (not the newest, limit 4).
    let r = p.run(&["run", "p.yaml", "--dry-run", "-S", "extra.system_prompt=Be brief."]).ok();
    let d = r.decision("extra");
    assert!(d.contains("param system_prompt"), "{d}");
    assert!(!d.contains("param limit"), "compared with the newest record, not the closest: {d}");
    // A stage never run under any settings says so.
    p.write(
        "q.yaml",
        &format!("{DATA}  other: {{ kind: format, with: {{ data: \"${{gsm8k.dataset}}\", limit: 2 }} }}\n"),
    );
    let r = p.run(&["run", "q.yaml", "--dry-run"]).ok();
    assert!(r.decision("other").contains("never run"), "{}", r.stdout);
}

const SLOW: &str = r#"
name: slow
stages:
  long:
    kind: test.counter
    with: { steps: 40, step_ms: 100, text: "done" }
"#;

fn interrupt(p: &Project, args: &[&str]) {
    let child = p.spawn(args);
    p.wait_for_stage_checkpoint("long", 3, Duration::from_secs(60));
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(common::Run::from(child.wait_with_output().unwrap()).code, 130);
}

#[test]
fn a_resume_and_a_continued_forced_run_say_what_they_are() {
    let p = Project::new();
    p.write("pipe.yaml", SLOW);
    interrupt(&p, &["run", "pipe.yaml"]);
    // Before: `resume from step N … (never run)`.
    let r = p.run(&["run", "pipe.yaml", "--dry-run"]).ok();
    let d = r.decision("long");
    assert!(d.starts_with("resume from step") && d.contains("interrupted earlier; its checkpoint at step"), "{d}");
    assert!(!d.contains("never run"), "{d}");
    p.run(&["run", "pipe.yaml", "-q"]).ok();

    // A forced rerun, interrupted, then forced again: it continues, and says how to start over.
    interrupt(&p, &["run", "pipe.yaml", "--force", "long"]);
    let r = p.run(&["run", "pipe.yaml", "--force", "long", "--dry-run"]).ok();
    let d = r.decision("long");
    assert!(d.contains("forced; continuing the forced run interrupted at step"), "{d}");
    assert!(d.contains("to start over, remove") && d.contains("work"), "{d}");
}
