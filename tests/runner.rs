//! The runner end to end, through the binary: caching, invalidation, resume
//! after kill -9 and Ctrl-C, the lock, gc, --only/--until, dry runs.

mod common;

use std::fs;
use std::time::Duration;

use common::{gsm8k_rows, Project};

/// a → b (reads a's result), c independent.
const CHAIN: &str = r#"
name: chain
stages:
  a:
    kind: test.counter
    with: { steps: 3, text: "alpha" }
  b:
    kind: test.counter
    with: { steps: 2, text: "beta", input: "${a.result}" }
  c:
    kind: test.counter
    with: { steps: 1, text: "gamma" }
"#;

#[test]
fn a_second_run_skips_every_stage() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    let first = p.run(&["run", "pipe.yaml"]).ok();
    for s in ["a", "b", "c"] {
        assert!(first.decision(s).starts_with("run"), "{}", first.stdout);
    }
    let second = p.run(&["run", "pipe.yaml"]).ok();
    for s in ["a", "b", "c"] {
        assert!(second.skipped(s), "{}", second.stdout);
    }
    assert!(second.stdout.contains("everything is up to date"));
}

#[test]
fn changing_a_parameter_reruns_exactly_the_stages_downstream_and_says_why() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let r = p.run(&["run", "pipe.yaml", "-S", "a.text=ALPHA"]).ok();
    assert_eq!(r.decision("a").split("  ").next().unwrap(), "run");
    assert!(r.decision("a").contains("param text: alpha → ALPHA"), "{}", r.stdout);
    assert!(r.decision("b").starts_with("run"), "{}", r.stdout);
    assert!(r.decision("b").contains("input a.result changed"), "{}", r.stdout);
    assert!(r.skipped("c"), "{}", r.stdout);

    // Changing only b's own parameter leaves a and c alone.
    let r = p.run(&["run", "pipe.yaml", "-S", "a.text=ALPHA", "-S", "b.steps=3"]).ok();
    assert!(r.skipped("a") && r.skipped("c"), "{}", r.stdout);
    assert!(r.decision("b").contains("param steps: 2 → 3"), "{}", r.stdout);
}

#[test]
fn an_upstream_rerun_with_identical_bytes_does_not_invalidate_downstream() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    // A new fingerprint for `a` (step_ms changes how long it takes, not what it writes):
    // `b` is keyed on a's output bytes, not on a's fingerprint, so it stays cached.
    let r = p.run(&["run", "pipe.yaml", "-S", "a.step_ms=1"]).ok();
    assert!(r.decision("a").starts_with("run") && r.decision("a").contains("param step_ms added"), "{}", r.stdout);
    assert!(r.skipped("b"), "b must stay cached, its input bytes are the same:\n{}", r.stdout);
    let r = p.run(&["run", "pipe.yaml", "--force", "a"]).ok();
    assert!(r.decision("a").contains("forced") && r.skipped("b"), "{}", r.stdout);
}

#[test]
fn force_all_reruns_everything() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let r = p.run(&["run", "pipe.yaml", "--force-all"]).ok();
    for s in ["a", "b", "c"] {
        assert!(r.decision(s).starts_with("run"), "{}", r.stdout);
    }
}

const SLOW: &str = r#"
name: slow
stages:
  first:
    kind: test.counter
    with: { steps: 2 }
  long:
    kind: test.counter
    with: { steps: 40, step_ms: 100, text: "done", input: "${first.result}" }
"#;

#[test]
fn kill_9_mid_stage_leaves_a_cache_the_next_run_resumes_and_completes() {
    let p = Project::new();
    p.write("pipe.yaml", SLOW);
    let mut child = p.spawn(&["run", "pipe.yaml"]);
    let at = p.wait_for_stage_checkpoint("long", 5, Duration::from_secs(60));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let st = p.run(&["status", "pipe.yaml"]).ok();
    let long_line = st.stdout.lines().find(|l| l.starts_with("long")).unwrap().to_string();
    assert!(long_line.contains("interrupted (last checkpoint at step"), "{}", st.stdout);
    assert!(st.stdout.lines().find(|l| l.starts_with("first")).unwrap().contains("cached"), "{}", st.stdout);

    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.skipped("first"), "{}", r.stdout);
    let d = r.decision("long");
    let step: u64 = d.strip_prefix("resume from step ").expect(&d).split_whitespace().next().unwrap().parse().unwrap();
    assert!(step >= at, "resumed from {step}, but a checkpoint at {at} existed");

    let out = p.run(&["show", "long.result", "-p", "pipe.yaml"]).ok();
    let text = fs::read_to_string(out.stdout.trim()).unwrap();
    assert!(text.starts_with("done\ncount=40\n"), "{text}");
    // The resumed run did only the remaining steps: a restart from 0 would have executed
    // `at` + 40 steps in the work folder; a resume at most one step more than 40
    // (the one in flight when killed, checkpointed or not).
    let executed = steps_executed(&p, "long");
    assert!(executed <= 41, "{executed} steps executed for 40: the stage restarted instead of resuming");
    assert!(p.run(&["run", "pipe.yaml"]).ok().skipped("long"));
}

/// The `steps_executed_in_work_dir` metric of a stage's current record.
fn steps_executed(p: &Project, stage: &str) -> u64 {
    let st = p.run(&["status", "pipe.yaml"]).ok();
    assert!(st.stdout.lines().any(|l| l.starts_with(stage) && l.contains("cached")), "{}", st.stdout);
    // The record's metrics are in the run log of the last run.
    let runs = p.cache().join("runs");
    let mut logs: Vec<_> = fs::read_dir(&runs).unwrap().flatten().map(|e| e.path()).collect();
    logs.sort();
    for log in logs.iter().rev() {
        for line in fs::read_to_string(log).unwrap().lines().rev() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["fields"]["stage"] == stage && v["fields"]["message"] == "stage finished" {
                let m: serde_json::Value = serde_json::from_str(v["fields"]["metrics"].as_str().unwrap()).unwrap();
                return m["steps_executed_in_work_dir"].as_u64().unwrap();
            }
        }
    }
    panic!("no finished record of {stage} in the run logs");
}

#[test]
fn ctrl_c_checkpoints_and_exits_cleanly_then_resumes() {
    let p = Project::new();
    p.write("pipe.yaml", SLOW);
    let child = p.spawn(&["run", "pipe.yaml"]);
    p.wait_for_stage_checkpoint("long", 3, Duration::from_secs(60));
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = common::Run::from(child.wait_with_output().unwrap());
    assert_eq!(out.code, 130, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("interrupted; checkpoint at step"), "{}", out.stdout);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("long").starts_with("resume from step"), "{}", r.stdout);
    assert!(steps_executed(&p, "long") <= 41, "the stage restarted instead of resuming");
}

#[test]
fn a_second_writer_fails_at_once_naming_the_holder_and_wait_queues() {
    let p = Project::new();
    p.write("pipe.yaml", SLOW);
    let mut holder = p.spawn(&["run", "pipe.yaml"]);
    // `long` itself must have started (not only `first`) for status to show it running.
    p.wait_for_stage_checkpoint("long", 1, Duration::from_secs(60));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains(&format!("is in use by pid {}", holder.id())), "{}", r.stderr);
    assert!(r.stderr.contains("--wait"), "{}", r.stderr);
    // Read-only commands still work while the run holds the lock, and see it running.
    let st = p.run(&["status", "pipe.yaml"]).ok();
    let long = st.stdout.lines().find(|l| l.starts_with("long")).unwrap().to_string();
    assert!(long.contains(&format!("running (pid {}", holder.id())), "{}", st.stdout);

    let waited = p.run(&["run", "pipe.yaml", "--wait"]).ok();
    assert!(waited.skipped("long"), "after waiting, the holder's results are used:\n{}", waited.stdout);
    assert!(holder.wait().unwrap().success());
}

#[test]
fn two_runs_started_at_the_same_instant_on_one_cache_one_runs_the_other_says_who_holds_it() {
    let p = Project::new();
    p.write("pipe.yaml", &SLOW.replace("steps: 40, step_ms: 100", "steps: 10, step_ms: 100"));
    let (a, b) = (p.spawn(&["run", "pipe.yaml"]), p.spawn(&["run", "pipe.yaml"]));
    let (a, b) = (common::Run::from(a.wait_with_output().unwrap()), common::Run::from(b.wait_with_output().unwrap()));
    let mut codes = [a.code, b.code];
    codes.sort();
    assert_eq!(codes, [0, 1], "a:\n{}{}\nb:\n{}{}", a.stdout, a.stderr, b.stdout, b.stderr);
    let loser = if a.code == 1 { &a } else { &b };
    assert!(loser.stderr.contains("is in use by pid"), "{}", loser.stderr);
}

#[test]
fn status_while_a_run_starts_and_goes_never_makes_it_fail() {
    for _ in 0..3 {
        let p = Project::new();
        p.write("pipe.yaml", &SLOW.replace("steps: 40, step_ms: 100", "steps: 6, step_ms: 50"));
        // Peek with status at the instant the run starts, and all through it.
        let run = p.spawn(&["run", "pipe.yaml"]);
        let peeks: Vec<_> = (0..4).map(|_| p.spawn(&["status", "pipe.yaml"])).collect();
        for peek in peeks {
            assert!(peek.wait_with_output().unwrap().status.success());
        }
        for _ in 0..10 {
            p.run(&["status", "pipe.yaml"]).ok();
        }
        let out = common::Run::from(run.wait_with_output().unwrap());
        assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    }
}

#[test]
fn a_failing_stage_stops_the_run_and_records_nothing() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "stages:\n  a: {kind: test.counter, with: {steps: 5, fail_at: 3}}\n  b: {kind: test.counter, with: {steps: 1, input: \"${a.result}\"}}\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("failing at step 3 as asked"), "{}", r.stderr);
    assert!(!r.stdout.contains("] b:"), "b must not run after a failed:\n{}", r.stdout);
    let st = p.run(&["status", "pipe.yaml"]).ok();
    assert!(st.stdout.lines().find(|l| l.starts_with("a ")).unwrap().contains("interrupted"), "{}", st.stdout);
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    let r = p.run(&["run", "pipe.yaml", "--dry-run"]).ok();
    assert!(r.decision("a").starts_with("run"), "{}", r.stdout);
    assert!(r.decision("b").starts_with("run after `a`"), "{}", r.stdout);
    assert!(r.stdout.contains("dry run: nothing was executed"));
    assert!(!p.cache().exists(), "a dry run created the cache");

    p.run(&["run", "pipe.yaml"]).ok();
    let r = p.run(&["run", "pipe.yaml", "--dry-run", "-S", "c.steps=2"]).ok();
    assert!(r.skipped("a") && r.skipped("b"));
    assert!(r.decision("c").contains("param steps: 1 → 2"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.skipped("c"), "the dry run must not have run c:\n{}", r.stdout);
}

#[test]
fn only_and_until_select_part_of_the_graph() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    let r = p.run(&["run", "pipe.yaml", "--only", "b"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--until b"), "{}", r.stderr);

    let r = p.run(&["run", "pipe.yaml", "--until", "b"]).ok();
    assert!(r.decision("a").starts_with("run") && r.decision("b").starts_with("run"));
    assert!(!r.stdout.contains("] c:"), "{}", r.stdout);

    let r = p.run(&["run", "pipe.yaml", "--only", "b", "--force", "b"]).ok();
    assert!(r.decision("b").starts_with("run"));
    assert!(!r.stdout.contains("] a:") && !r.stdout.contains("] c:"), "{}", r.stdout);
}

#[test]
fn gc_keeps_what_records_reference_and_drops_the_rest() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let old_c = p.run(&["show", "c.result", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    p.write("pipe.yaml", &CHAIN.replace("gamma", "new"));
    p.run(&["run", "pipe.yaml"]).ok();
    let orphan = p.cache().join("objects").join("deadbeef");
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("x"), "x").unwrap();

    // Without a pipeline: every record is kept, only the orphan goes.
    let r = p.run(&["gc"]).ok();
    assert!(r.stdout.contains("removed 1 item(s)"), "{}", r.stdout);
    assert!(!orphan.exists());
    assert!(fs::metadata(&old_c).is_ok(), "a recorded artifact was removed");

    // Keeping only the pipeline's current results drops the old c.
    let dry = p.run(&["gc", "--dry-run", "pipe.yaml"]).ok();
    assert!(dry.stdout.contains("would remove"), "{}", dry.stdout);
    assert!(fs::metadata(&old_c).is_ok(), "--dry-run removed something");
    p.run(&["gc", "pipe.yaml"]).ok();
    assert!(fs::metadata(&old_c).is_err(), "the superseded artifact is still there");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    for s in ["a", "b", "c"] {
        assert!(r.skipped(s), "gc removed something current:\n{}", r.stdout);
    }
}

#[test]
fn deleted_artifacts_are_repaired_by_the_next_run() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let a = p.run(&["show", "a.result", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    fs::remove_dir_all(std::path::Path::new(&a).parent().unwrap()).unwrap();
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("a").contains("missing"), "{}", r.stdout);
    assert!(fs::metadata(&a).is_ok());
}

#[test]
fn data_stages_turn_gsm8k_into_prompts_and_sft_examples() {
    let p = Project::new();
    let mut train = gsm8k_rows(5);
    train.push_str("{\"question\": \"no answer marker\", \"answer\": \"42\"}\n");
    train.push_str("{\"question\": \"\", \"answer\": \"#### 1\"}\n");
    p.write("data/gsm8k/train.jsonl", &train);
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(3));
    p.write(
        "pipe.yaml",
        "stages:\n  gsm8k: {kind: download, with: {path: data/gsm8k}}\n  prompts:\n    kind: format\n    with: {data: \"${gsm8k.dataset}\", system_prompt: SYS, limit: {test: 2}}\n",
    );
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains("dropped 2 bad row(s)") && r.stderr.contains("lines 6, 7"), "{}", r.stderr);
    let train = fs::read_to_string(p.run(&["show", "prompts.train"]).ok().stdout.trim()).unwrap();
    let rows: Vec<serde_json::Value> = train.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["answer"], "2");
    assert_eq!(rows[0]["prompt"][0], serde_json::json!({"role": "system", "content": "SYS"}));
    let test = fs::read_to_string(p.run(&["show", "prompts.test"]).ok().stdout.trim()).unwrap();
    assert_eq!(test.lines().count(), 2);
    let sft = fs::read_to_string(p.run(&["show", "prompts.sft"]).ok().stdout.trim()).unwrap();
    let first: serde_json::Value = serde_json::from_str(sft.lines().next().unwrap()).unwrap();
    assert_eq!(first["messages"][2]["content"], "<think>\nHe has 0 + 2 = 2 apples.\n</think>\n<answer>\n2\n</answer>");

    // Editing the local data file reruns both stages.
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(4));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("gsm8k").contains("file path changed"), "{}", r.stdout);

    // strict: true fails on the first bad row, naming file and line.
    let r = p.run(&["run", "pipe.yaml", "-S", "prompts.strict=true"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("train.jsonl:6: no final answer after `####`"), "{}", r.stderr);
}

#[test]
fn dag_renders_text_mermaid_and_dot() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    let t = p.run(&["dag", "pipe.yaml"]).ok().stdout;
    assert!(t.contains("b (test.counter)") && t.contains("└─ ${a.result}"), "{t}");
    let m = p.run(&["dag", "pipe.yaml", "--format", "mermaid"]).ok().stdout;
    assert!(m.starts_with("flowchart TD") && m.contains("a -->|result| b"), "{m}");
    let d = p.run(&["dag", "pipe.yaml", "--format", "dot"]).ok().stdout;
    assert!(d.contains("\"a\" -> \"b\" [label=\"result\"]"), "{d}");
}

#[test]
fn every_shipped_pipeline_validates_and_plans() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(root.join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_r1pipe"))
            .args(["run", "--dry-run", "--cache"])
            .arg(cache.path())
            .arg(&path)
            .output()
            .unwrap();
        let r = common::Run::from(out);
        // A pipeline that asks for CUDA validates, then a build without it says what it lacks.
        let wants_cuda = fs::read_to_string(&path).unwrap().lines().any(|l| l.trim() == "device: cuda");
        if wants_cuda && !cfg!(feature = "cuda") {
            assert_eq!(r.code, 1, "{}: {}{}", path.display(), r.stdout, r.stderr);
            assert!(r.stderr.contains("needs r1pipe built with `--features cuda`"), "{}", r.stderr);
            continue;
        }
        assert_eq!(r.code, 0, "{}: {}{}", path.display(), r.stdout, r.stderr);
        assert!(r.stdout.contains("dry run: nothing was executed"), "{}", r.stdout);
    }
    assert!(!cache.path().join("index").exists(), "a dry run created an index");
}

const PARALLEL: &str = r#"
name: par
stages:
  a: { kind: test.counter, with: { steps: 10, step_ms: 60, text: a } }
  b: { kind: test.counter, resources: { gpus: 1 }, with: { steps: 10, step_ms: 60, text: b } }
  c: { kind: test.counter, with: { steps: 1, text: c, inputs: { a: "${a.result}", b: "${b.result}" } } }
"#;

/// (event, stage) of the run log's decisions and finishes, in order.
fn events(p: &Project) -> Vec<(String, String)> {
    let dir = p.cache().join("runs");
    let mut logs: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    logs.sort();
    fs::read_to_string(logs.last().unwrap())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let f = &v["fields"];
            let m = f["message"].as_str()?;
            let stage = f["stage"].as_str()?;
            (m == "stage decided" || m == "stage finished").then(|| (m.to_string(), stage.to_string()))
        })
        .collect()
}

#[test]
fn with_jobs_stages_whose_inputs_are_ready_run_at_the_same_time_and_give_the_same_results() {
    let p = Project::new();
    p.write("pipe.yaml", PARALLEL);
    p.run(&["run", "pipe.yaml", "--jobs", "2"]).ok();
    let ev = events(&p);
    let at = |m: &str, s: &str| ev.iter().position(|(e, x)| e.contains(m) && x == s).unwrap();
    assert!(at("decided", "b") < at("finished", "a"), "b waited for a: {ev:?}");
    assert!(at("decided", "a") < at("finished", "b"), "a waited for b: {ev:?}");
    assert!(at("decided", "c") > at("finished", "a").max(at("finished", "b")), "c ran before its inputs: {ev:?}");
    let parallel = fs::read_to_string(p.run(&["show", "c.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();

    let q = Project::new();
    q.write("pipe.yaml", PARALLEL);
    q.run(&["run", "pipe.yaml"]).ok();
    let sequential = fs::read_to_string(q.run(&["show", "c.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert_eq!(parallel, sequential);
    assert!(parallel.contains("a: a\ncount=10") && parallel.contains("b: b\ncount=10"), "{parallel}");
}

#[test]
fn with_jobs_a_failing_stage_lets_the_running_ones_finish_and_keeps_them() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        &PARALLEL.replace("steps: 10, step_ms: 60, text: a", "steps: 10, step_ms: 10, text: a, fail_at: 2"),
    );
    let r = p.run(&["run", "pipe.yaml", "--jobs", "2"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("a: failed"), "{}", r.stderr);
    assert!(r.stdout.contains("b: done"), "the running stage was not finished and kept: {}", r.stdout);
    assert!(!r.stdout.contains("c: run"), "{}", r.stdout);
    let again = p.run(&["run", "pipe.yaml", "--jobs", "2"]);
    assert!(again.skipped("b"), "{}", again.stdout);
}
