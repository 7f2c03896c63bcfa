//! Matrix stages: one member per combination, each its own stage (fingerprint,
//! record, rerun), `${stage@*.output}` gathering a sweep for one downstream stage.

mod common;

use common::Project;

const SWEEP: &str = r#"
name: sweep
stages:
  train:
    kind: test.counter
    matrix:
      steps: [1, 2]
      text: { hello: "hi", bye: "so long" }
    with: { steps: "${item.steps}", text: "${item.text} after ${item.steps}" }
  compare:
    kind: test.counter
    with: { steps: 1, text: "all", inputs: "${train@*.result}" }
  one:
    kind: test.counter
    with: { steps: 1, text: "one", input: "${train@steps-2-bye.result}" }
"#;

#[test]
fn a_matrix_stage_runs_each_member_and_a_downstream_stage_gathers_them_by_name() {
    let p = Project::new();
    p.write("pipe.yaml", SWEEP);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    for m in ["train@steps-1-hello", "train@steps-1-bye", "train@steps-2-hello", "train@steps-2-bye"] {
        assert!(r.decision(m).contains("run"), "{m}: {}", r.stdout);
    }
    let compare =
        std::fs::read_to_string(p.run(&["show", "compare.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(compare.contains("train@steps-2-bye: so long after 2\ncount=2"), "{compare}");
    assert!(compare.contains("train@steps-1-hello: hi after 1\ncount=1"), "{compare}");
    let one = std::fs::read_to_string(p.run(&["show", "one.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(one.ends_with("so long after 2\ncount=2\n"), "{one}");
    let status = p.run(&["status", "pipe.yaml"]).ok().stdout;
    assert_eq!(status.matches("train@").count(), 4, "{status}");
    let dag = p.run(&["dag", "pipe.yaml"]).ok().stdout;
    assert!(dag.contains("train@steps-2-bye"), "{dag}");

    // A member whose value changes reruns alone (and what reads it); the others stay cached.
    p.write("pipe.yaml", &SWEEP.replace("bye: \"so long\"", "bye: \"farewell\""));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.skipped("train@steps-1-hello") && r.skipped("train@steps-2-hello"), "{}", r.stdout);
    assert!(!r.skipped("train@steps-2-bye") && !r.skipped("compare") && !r.skipped("one"), "{}", r.stdout);
}

#[test]
fn references_to_a_matrix_stage_must_name_a_member_or_gather_them_all() {
    let p = Project::new();
    p.write("pipe.yaml", &SWEEP.replace("${train@steps-2-bye.result}", "${train.result}"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`${train.result}`: `train` is a matrix stage of 4 members"), "{}", r.stderr);
    assert!(r.stderr.contains("`${train@*.result}`"), "the hint shows the gathering form: {}", r.stderr);
}

/// A matrix of `keys` (YAML flow mappings of the axes) on a test stage whose text is `text`.
fn matrix(axes: &str, text: &str) -> String {
    format!("name: m\nvars: {{ model: secret-model }}\nstages:\n  t:\n    kind: test.counter\n    matrix: {axes}\n    with: {{ steps: 1, text: \"{text}\" }}\n")
}

#[test]
fn a_matrix_is_bounded_and_its_member_names_are_unique() {
    let p = Project::new();
    // 1000 × 1000 members (an 8 KB file) is refused before any member is made.
    let thousand: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    p.write("big.yaml", &matrix(&format!("{{ a: [{0}], b: [{0}] }}", thousand.join(", ")), "x"));
    let t = std::time::Instant::now();
    let r = p.run(&["run", "big.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("this matrix makes 1000000 members (a: 1000 × b: 1000); at most 1024"), "{}", r.stderr);
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // `x` + `y-z` and `x-y` + `z` would both be `t@x-y-z`.
    p.write("clash.yaml", &matrix("{ a: { x: 1, x-y: 2 }, s: { y-z: 3, z: 4 } }", "x"));
    let r = p.run(&["run", "clash.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("two members would both be named `t@x-y-z`"), "{}", r.stderr);
    // `1` and `"1"` are one name.
    p.write("twice.yaml", &matrix("{ a: { 1: 1, \"1\": 2 } }", "x"));
    let r = p.run(&["run", "twice.yaml", "--dry-run"]);
    assert!(r.code == 2 && r.stderr.contains("the value name `1` appears twice"), "{}", r.stderr);
    // Keys are shown as written, not in Rust's Debug form.
    p.write("key.yaml", &matrix("{ \"a@b\": [1] }", "x"));
    let r = p.run(&["run", "key.yaml", "--dry-run"]);
    assert!(r.code == 2 && r.stderr.contains("matrix key `a@b`") && !r.stderr.contains("String("), "{}", r.stderr);
}

#[test]
fn matrix_values_are_data_and_a_doubled_dollar_escapes() {
    let p = Project::new();
    p.write("pipe.yaml", &matrix("{ s: { a: \"${vars.model}\" } }", "$${item.s} is ${item.s}"));
    p.run(&["run", "pipe.yaml"]).ok();
    let text = std::fs::read_to_string(p.run(&["show", "t@a.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(text.starts_with("${item.s} is ${vars.model}\n"), "{text}");
}

#[test]
fn identical_stages_never_share_a_work_folder_at_once() {
    let p = Project::new();
    // Two stages with one fingerprint under --jobs 2: the second waits and is then cached.
    p.write(
        "twins.yaml",
        "name: twins\nstages:\n  a: { kind: test.counter, with: { steps: 10, step_ms: 40, text: same } }\n  b: { kind: test.counter, with: { steps: 10, step_ms: 40, text: same } }\n",
    );
    let r = p.run(&["run", "twins.yaml", "--jobs", "2"]).ok();
    let (a, b) = (r.decision("a"), r.decision("b"));
    assert!(a.starts_with("run") != b.starts_with("run"), "one runs, the other waits for it:\n{}", r.stdout);
    assert!(a.starts_with("skip (cached)") || b.starts_with("skip (cached)"), "{}", r.stdout);
    let result = |s: &str| {
        std::fs::read_to_string(p.run(&["show", &format!("{s}.result"), "-p", "twins.yaml"]).ok().stdout.trim())
            .unwrap()
    };
    assert_eq!(result("a"), result("b"));
    assert!(result("a").starts_with("same\ncount=10"), "{}", result("a"));
    // A -S on the key a matrix sweeps makes its members one: refused, naming them.
    p.write("pipe.yaml", SWEEP);
    let r = p.run(&["run", "pipe.yaml", "--dry-run", "-S", "train.text=x", "-S", "train.steps=1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("the members `train@steps-1-hello` and `train@steps-1-bye` of `train` are identical"),
        "{}",
        r.stderr
    );
}
