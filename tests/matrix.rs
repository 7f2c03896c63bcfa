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
    with: { steps: 1, text: "one", input: "${train@1-bye.result}" }
"#;

#[test]
fn a_matrix_stage_runs_each_member_and_a_downstream_stage_gathers_them_by_name() {
    let p = Project::new();
    p.write("pipe.yaml", SWEEP);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    for m in ["train@0-hello", "train@0-bye", "train@1-hello", "train@1-bye"] {
        assert!(r.decision(m).contains("run"), "{m}: {}", r.stdout);
    }
    let compare =
        std::fs::read_to_string(p.run(&["show", "compare.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(compare.contains("train@1-bye: so long after 2\ncount=2"), "{compare}");
    assert!(compare.contains("train@0-hello: hi after 1\ncount=1"), "{compare}");
    let one = std::fs::read_to_string(p.run(&["show", "one.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(one.ends_with("so long after 2\ncount=2\n"), "{one}");
    let status = p.run(&["status", "pipe.yaml"]).ok().stdout;
    assert_eq!(status.matches("train@").count(), 4, "{status}");
    let dag = p.run(&["dag", "pipe.yaml"]).ok().stdout;
    assert!(dag.contains("train@1-bye"), "{dag}");

    // A member whose value changes reruns alone (and what reads it); the others stay cached.
    p.write("pipe.yaml", &SWEEP.replace("bye: \"so long\"", "bye: \"farewell\""));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.skipped("train@0-hello") && r.skipped("train@1-hello"), "{}", r.stdout);
    assert!(!r.skipped("train@1-bye") && !r.skipped("compare") && !r.skipped("one"), "{}", r.stdout);
}

#[test]
fn references_to_a_matrix_stage_must_name_a_member_or_gather_them_all() {
    let p = Project::new();
    p.write("pipe.yaml", &SWEEP.replace("${train@1-bye.result}", "${train.result}"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`${train.result}`: `train` is a matrix stage of 4 members"), "{}", r.stderr);
    assert!(r.stderr.contains("`${train@*.result}`"), "the hint shows the gathering form: {}", r.stderr);
}
