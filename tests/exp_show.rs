//! `r1pipe exp show`: a 2×2 sweep is four rows, each with its two swept
//! parameters (by value in the member names too) and its metrics, including
//! what the evaluate stage measured of its model; CSV and JSON read back.

mod common;

const SWEEP: &str = r#"
name: sweep
seed: 3
device: cpu
stages:
  gsm8k: { kind: download, with: { dataset: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}" } }
  sft:
    kind: sft
    matrix:
      lr: [1.0e-4, 3.0e-4]
      steps: [1, 2]
    with: { model: models/tiny, train: "${prompts.sft}", learning_rate: "${item.lr}", max_steps: "${item.steps}", max_length: 64 }
  evaluate:
    kind: evaluate
    with: { models: "${sft@*.model}", test: "${prompts.test}", max_new_tokens: 4 }
"#;

#[test]
fn a_sweep_is_a_row_per_member_with_its_parameters_and_metrics() {
    let p = common::tiny_project(6, 8);
    p.write("p.yaml", SWEEP);
    p.run(&["run", "p.yaml", "-q"]).ok();
    let csv = p.run(&["exp", "show", "p.yaml", "--csv"]).ok().stdout;
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name} in {header:?}"));
    let (run, lr, steps, loss, acc) =
        (col("run"), col("learning_rate"), col("max_steps"), col("final_loss"), col("eval.accuracy_strict"));
    assert_eq!(rows.len(), 5, "{csv}");
    let mut seen: Vec<(&str, &str, &str)> = rows[1..].iter().map(|r| (r[run], r[lr], r[steps])).collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("sft@lr-1e-4-steps-1", "0.0001", "1"),
            ("sft@lr-1e-4-steps-2", "0.0001", "2"),
            ("sft@lr-3e-4-steps-1", "0.0003", "1"),
            ("sft@lr-3e-4-steps-2", "0.0003", "2"),
        ]
    );
    for r in &rows[1..] {
        assert!(r[loss].parse::<f64>().is_ok() && r[acc].parse::<f64>().is_ok(), "{r:?}");
    }
    // Parameters every row shares are left out; --all-params shows them.
    assert!(!header.contains(&"max_length"));
    let all = p.run(&["exp", "show", "p.yaml", "--all-params", "--keep", "max_length"]).ok().stdout;
    assert!(all.contains("max_length") && all.contains("64"), "{all}");
    // JSON: the same rows; --sort orders them by a metric, largest first.
    let json = p.run(&["exp", "show", "p.yaml", "--json", "--sort", "final_loss"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let losses: Vec<f64> = v.as_array().unwrap().iter().map(|r| r["metrics"]["final_loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.windows(2).all(|w| w[0] >= w[1]), "{losses:?}");
    // A member is found without naming its pipeline, as any stage is.
    let model = p.run(&["show", "sft@lr-1e-4-steps-1.model"]).ok().stdout;
    assert!(std::path::Path::new(model.trim()).join("model.safetensors").exists(), "{model}");
    // --only selects runs as `run --only` selects stages.
    let some = p.run(&["exp", "show", "p.yaml", "--csv", "--only", "sft@lr-1e-4-*"]).ok().stdout;
    assert_eq!(some.lines().count(), 3, "{some}");
    assert!(!some.contains("sft@lr-3e-4"), "{some}");
    let r = p.run(&["exp", "show", "p.yaml", "--sort", "nope"]);
    assert!(r.code != 0 && r.stderr.contains("no column `nope`"), "{}", r.stderr);
}

#[test]
fn a_run_made_with_overrides_is_found_by_every_command_given_them() {
    let p = common::tiny_project(6, 8);
    p.write(
        "p.yaml",
        r#"
name: single
seed: 3
device: cpu
stages:
  gsm8k: { kind: download, with: { dataset: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}" } }
  sft: { kind: sft, with: { model: models/tiny, train: "${prompts.sft}", max_steps: 2, max_length: 64 } }
  evaluate: { kind: evaluate, with: { models: { sft: "${sft.model}" }, test: "${prompts.test}", max_new_tokens: 4 } }
"#,
    );
    p.run(&["run", "p.yaml", "-q"]).ok();
    let set = ["-S", "sft.learning_rate=3e-4"];
    p.run(&["run", "p.yaml", "-q", set[0], set[1]]).ok();
    let with_set = |args: &[&str]| {
        let all: Vec<&str> = args.iter().chain(&set).copied().collect();
        p.run(&all).ok().stdout
    };

    let default_model = p.run(&["show", "sft.model", "-p", "p.yaml"]).ok().stdout;
    let set_model = with_set(&["show", "sft.model", "-p", "p.yaml"]);
    assert_ne!(default_model, set_model, "show -S found the default run");

    let csv = with_set(&["exp", "show", "p.yaml", "--csv", "--all-params", "--keep", "learning_rate"]);
    assert!(csv.contains("0.0003"), "{csv}");

    // metrics diff: the run with -S against the run before it (the default).
    let d = with_set(&["metrics", "diff", "p.yaml"]);
    assert!(d.contains("accuracy_strict"), "{d}");
    let only_sft = with_set(&["metrics", "diff", "p.yaml", "--all", "--only", "sft"]);
    assert!(only_sft.contains("final_loss") && !only_sft.contains("accuracy_strict"), "{only_sft}");

    let page = with_set(&["plot", "sft", "-p", "p.yaml"]);
    let html = std::fs::read_to_string(page.trim()).unwrap();
    assert!(html.contains("0.0003"), "the page shows another run's settings");
}
