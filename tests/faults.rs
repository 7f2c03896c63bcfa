//! Faults survived with nothing lost: a process killed (aborted, as by kill -9,
//! at a fault-injection point compiled only into test builds) while it commits a
//! stage leaves a cache that the next run trusts or repairs, and that run completes.

mod common;

use std::fs;

use common::Project;

const CHAIN: &str = r#"
name: chain
stages:
  a:
    kind: test.counter
    with: { steps: 2, text: "alpha" }
  b:
    kind: test.counter
    with: { steps: 2, text: "beta", input: "${a.result}" }
"#;

#[test]
fn a_kill_at_any_point_of_a_commit_loses_nothing_and_the_next_run_completes() {
    for point in ["between-outputs", "before-record", "mid-record", "before-flush"] {
        let p = Project::new();
        p.write("pipe.yaml", CHAIN);
        let killed = p.cmd(&["run", "pipe.yaml"]).env("R1PIPE_FAULT", point).output().unwrap();
        let stderr = String::from_utf8_lossy(&killed.stderr);
        assert!(
            !killed.status.success() && stderr.contains(&format!("fault injected at `{point}`")),
            "{point}: {stderr}"
        );
        // The next run completes, and whatever it had to redo gives the same bytes.
        let r = p.run(&["run", "pipe.yaml"]).ok();
        assert!(!r.stdout.contains("failed"), "{point}: {}", r.stdout);
        let b = fs::read_to_string(p.run(&["show", "b.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
        assert_eq!(b, "beta\ncount=2\nalpha\ncount=2\n", "{point}");
        // No leftovers of the interrupted commit, and everything is cached now.
        let tmp: Vec<_> = fs::read_dir(p.cache().join("objects"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{point}: leftovers {tmp:?}");
        let again = p.run(&["run", "pipe.yaml"]).ok();
        assert!(again.skipped("a") && again.skipped("b"), "{point}: {}", again.stdout);
    }
}

#[test]
fn a_damaged_index_is_named_with_its_repair_and_repair_keeps_every_finished_stage() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    fs::write(p.cache().join("index/db"), vec![0xA5u8; 4096]).unwrap();
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.contains("is damaged") && r.stderr.contains("r1pipe gc --repair"), "{}", r.stderr);
    let fixed = p.run(&["gc", "--repair"]).ok();
    assert!(fixed.stdout.contains("2 record(s) restored, 0 skipped"), "{}", fixed.stdout);
    let again = p.run(&["run", "pipe.yaml"]).ok();
    assert!(again.skipped("a") && again.skipped("b"), "{}", again.stdout);
    assert!(fs::read_dir(p.cache())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("index.damaged-")));
}

#[test]
fn a_full_disk_fails_the_stage_with_no_space_and_the_next_run_completes() {
    use common::{gsm8k_rows, tiny_model};
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 3);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(8));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(1));
    p.write(
        "pipe.yaml",
        "device: cpu\nstages:\n  gsm8k: { kind: download, with: { path: data/gsm8k } }\n  prompts: { kind: format, with: { data: \"${gsm8k.dataset}\" } }\n  sft:\n    kind: sft\n    with: { model: models/tiny, train: \"${prompts.sft}\", max_steps: 2, save_steps: 1, per_device_train_batch_size: 2 }\n",
    );
    // A 2 MB file-size limit (RLIMIT_FSIZE, as a full disk): the data stages fit, a checkpoint does not.
    let bin = env!("CARGO_BIN_EXE_r1pipe");
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("ulimit -f 2048; exec {bin} run pipe.yaml")])
        .current_dir(p.root())
        .output()
        .unwrap();
    let r = common::Run::from(out);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("sft: failed") && r.stderr.contains("no space left to write"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    // The message names the step, the checkpoint folder and the file it was
    // writing, and gives the system's reason once (not once per layer).
    let failed = r.stderr.lines().find(|l| l.contains("sft: failed")).unwrap();
    assert!(failed.contains("writing the checkpoint of step 1 in "), "{failed}");
    assert!(failed.contains("/checkpoints/") && failed.contains(".safetensors"), "{failed}");
    assert_eq!(failed.matches("(os error").count(), 1, "{failed}");
    // The stages before it are recorded and intact; the next run skips them and completes.
    let again = p.run(&["run", "pipe.yaml"]).ok();
    assert!(again.skipped("gsm8k") && again.skipped("prompts"), "{}", again.stdout);
    assert!(again.decision("sft").starts_with("run"), "{}", again.stdout);
}
