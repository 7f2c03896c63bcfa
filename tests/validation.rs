//! Every validation error is reported before anything runs: file, line, a
//! hint, exit code 2, and no cache created.

mod common;

use common::Project;

/// Runs `r1pipe run` on `yaml` and returns stderr, asserting exit code 2 and an untouched cache.
fn invalid(yaml: &str) -> String {
    let p = Project::new();
    p.write("pipe.yaml", yaml);
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "expected a validation error\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(!p.cache().exists(), "a failed validation created the cache");
    assert!(r.stdout.is_empty(), "nothing may be planned: {}", r.stdout);
    r.stderr
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with: {steps: 1\n  b: x\n");
    assert!(e.contains("pipe.yaml:5: YAML syntax error"), "{e}");
}

#[test]
fn a_reference_in_a_flow_mapping_gets_a_hint_to_quote_it() {
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with: { steps: 1, input: ${b.result} }\n");
    assert!(e.contains("pipe.yaml:4: YAML syntax error"), "{e}");
    assert!(e.contains("must be quoted") && e.contains("block style"), "{e}");
}

#[test]
fn unknown_kind_names_the_nearest_kind() {
    let e = invalid("stages:\n  data:\n    kind: downlaod\n    with: {path: x}\n");
    assert!(e.contains("pipe.yaml:3: stage `data`: unknown kind `downlaod`"), "{e}");
    assert!(e.contains("hint: did you mean `download`?"), "{e}");
}

#[test]
fn unknown_parameter_names_the_line_and_the_nearest_key() {
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with:\n      steps: 2\n      step_sm: 5\n");
    assert!(
        e.contains("pipe.yaml:6: stage `a` (test.counter): parameter `step_sm`: unknown parameter `step_sm`"),
        "{e}"
    );
    assert!(e.contains("hint: did you mean `step_ms`?"), "{e}");
}

#[test]
fn mistyped_parameter_says_what_was_expected() {
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with:\n      steps: many\n");
    assert!(e.contains("pipe.yaml:5:"), "{e}");
    assert!(e.contains("parameter `steps`: expected a whole number ≥ 0 (e.g. 100), not \"many\""), "{e}");
}

#[test]
fn missing_required_parameter_is_named() {
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with: {text: x}\n");
    assert!(e.contains("parameter `steps`: required parameter is missing"), "{e}");
}

#[test]
fn references_to_unknown_stages_and_outputs_are_errors() {
    let e = invalid("stages:\n  a: {kind: test.counter, with: {steps: 1}}\n  b:\n    kind: test.counter\n    with: {steps: 1, input: \"${aa.result}\"}\n");
    assert!(e.contains("pipe.yaml:3: stage `b` refers to `${aa.result}`, but there is no stage `aa`"), "{e}");
    assert!(e.contains("did you mean `a`?"), "{e}");
    let e = invalid("stages:\n  a: {kind: test.counter, with: {steps: 1}}\n  b:\n    kind: test.counter\n    with: {steps: 1, input: \"${a.results}\"}\n");
    assert!(e.contains("a `test.counter` stage has no output `results`"), "{e}");
    assert!(e.contains("did you mean `result`?"), "{e}");
}

#[test]
fn undefined_vars_and_needs_are_errors() {
    let e = invalid(
        "vars: {prompt: hi}\nstages:\n  a:\n    kind: test.counter\n    with: {steps: 1, text: \"${vars.promt}\"}\n",
    );
    assert!(e.contains("pipe.yaml:5:") && e.contains("`${vars.promt}` is not defined"), "{e}");
    assert!(e.contains("did you mean `${vars.prompt}`?"), "{e}");
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    with: {steps: 1}\n    needs: [b]\n");
    assert!(e.contains("pipe.yaml:5: stage `a` needs `b`, but there is no such stage"), "{e}");
}

#[test]
fn cycles_name_every_stage_on_the_cycle() {
    let e = invalid(
        "stages:\n  a: {kind: test.counter, with: {steps: 1, input: \"${c.result}\"}}\n  b: {kind: test.counter, with: {steps: 1, input: \"${a.result}\"}}\n  c: {kind: test.counter, with: {steps: 1}, needs: [b]}\n",
    );
    assert!(e.contains("pipe.yaml:2: the stages form a cycle: a → b → c → a"), "{e}");
}

#[test]
fn missing_local_files_are_errors() {
    let e = invalid("stages:\n  data:\n    kind: download\n    with:\n      path: nowhere/gsm8k\n");
    assert!(
        e.contains("pipe.yaml:5: stage `data`: `path` names") && e.contains("nowhere/gsm8k, which does not exist"),
        "{e}"
    );
}

#[test]
fn unknown_top_level_and_stage_keys_are_errors() {
    let e = invalid("name: x\nstagse:\n  a: {kind: test.counter}\n");
    assert!(e.contains("pipe.yaml:2: unknown top-level key `stagse`") && e.contains("did you mean `stages`?"), "{e}");
    let e = invalid("stages:\n  a:\n    kind: test.counter\n    wiht: {steps: 1}\n");
    assert!(e.contains("pipe.yaml:4: stage `a`: unknown key `wiht`") && e.contains("did you mean `with`?"), "{e}");
}

#[test]
fn all_errors_are_reported_at_once() {
    let e = invalid("stages:\n  a: {kind: nope}\n  b: {kind: test.counter, with: {stepz: 1}}\n");
    assert!(e.contains("unknown kind `nope`") && e.contains("unknown parameter `stepz`"), "{e}");
}

#[test]
fn presets_are_merged_under_with_and_their_errors_point_into_the_preset() {
    let p = Project::new();
    p.write("stages/counter.yaml", "steps: 3\ntext: from-preset\n");
    p.write(
        "pipe.yaml",
        "stages:\n  a:\n    kind: test.counter\n    use: stages/counter.yaml\n    with: {text: from-with}\n",
    );
    p.run(&["run", "pipe.yaml"]).ok();
    let out = p.run(&["show", "a.result", "-p", "pipe.yaml"]).ok();
    let text = std::fs::read_to_string(out.stdout.trim()).unwrap();
    assert_eq!(text, "from-with\ncount=3\n", "`with` overrides the preset, the preset fills the rest");

    p.write("stages/counter.yaml", "steps: 3\nstep_msec: 1\n");
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("stages/counter.yaml:2: stage `a` (test.counter): parameter `step_msec`: unknown parameter"),
        "{}",
        r.stderr
    );
}

#[test]
fn overrides_must_name_a_stage() {
    let p = Project::new();
    p.write("pipe.yaml", "stages:\n  a: {kind: test.counter, with: {steps: 1}}\n");
    let r = p.run(&["run", "pipe.yaml", "-S", "b.steps=2"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("override `-S b.steps=2`: no stage `b`"), "{}", r.stderr);
}
