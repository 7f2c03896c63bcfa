//! The model core's loading and saving, and the `evaluate` and `infer` stages
//! and `r1pipe infer`, on a tiny random model (fast) with SmolLM2's tokenizer.

mod common;

use std::fs;
use std::time::Duration;

use candle_core::{DType, Device};
use common::{gsm8k_rows, tiny_model, Project};
use r1pipe::model::{load, Batch, ModelRef, Ops};

fn logits(m: &r1pipe::model::Transformer) -> Vec<f32> {
    let b = Batch::left_padded(&[vec![1, 200, 3000, 45000]], 0, &Device::Cpu).unwrap();
    m.forward(&b, Ops::Fused).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_saved_model_is_in_the_hugging_face_layout_and_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 1);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let names: Vec<String> = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(names.contains(&"model.layers.1.self_attn.q_proj.weight".to_string()));
    assert!(!names.contains(&"lm_head.weight".to_string()), "a tied lm_head is stored once, as the embedding");
    let a = load::load(&ModelRef::Dir(dir.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    let again = tempfile::tempdir().unwrap();
    load::save(&a.model, &a.files_dir, again.path()).unwrap();
    let b = load::load(&ModelRef::Dir(again.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&a.model), logits(&b.model));
    assert_eq!(a.tokenizer.eos_ids, vec![2]);
    // Saving over the folder a model came from keeps its tokenizer files intact.
    load::save(&b.model, &b.files_dir, again.path()).unwrap();
    let c = load::load(&ModelRef::Dir(again.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&c.model), logits(&a.model));
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 2);
    let all = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(k.clone(), file.into());
        if i % 2 == 0 {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    let sharded = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs::copy(dir.path().join(f), sharded.path().join(f)).unwrap();
    }
    candle_core::safetensors::save(&a, sharded.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    fs::write(sharded.path().join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
        .unwrap();
    let one = load::load(&ModelRef::Dir(dir.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    let two = load::load(&ModelRef::Dir(sharded.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&one.model), logits(&two.model));
}

#[test]
fn a_hub_model_id_downloads_through_hf_hub_and_then_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 3);
    let files: Vec<(String, Vec<u8>)> = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), fs::read(dir.path().join(f)).unwrap()))
        .collect();
    // 2 requests per file (metadata, body) + 1 for the missing generation_config.json.
    let (endpoint, server) = common::hub_server("tiny/model", files, 9);
    let home = tempfile::tempdir().unwrap();
    let p = Project::new();
    let run = |offline: bool| {
        let mut c = p.cmd(&["infer", "--model", "tiny/model", "--max-new-tokens", "4", "hello"]);
        c.env("HF_ENDPOINT", &endpoint).env("HF_HOME", home.path());
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        common::Run::from(c.output().unwrap()).ok()
    };
    let online = run(false);
    let log = server.join().unwrap();
    assert!(log.iter().any(|u| u == "/tiny/model/resolve/main/model.safetensors"), "{log:?}");
    let offline = run(true);
    assert_eq!(online.stdout, offline.stdout, "the cached copy is the same model");
    assert!(offline.stderr.contains("tokens/s"), "{}", offline.stderr);
}

fn eval_project(n_test: usize) -> Project {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 4);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(4));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(n_test));
    p
}

const EVAL: &str = r#"
name: eval
device: cpu
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}" } }
  evaluate:
    kind: evaluate
    with:
      models: { base: models/tiny, again: models/tiny }
      test: ${prompts.test}
      batch_size: BATCH
      max_new_tokens: 12
  infer:
    kind: infer
    with: { model: models/tiny, questions: ["What is 2 + 2?", "Name a prime."], max_new_tokens: 5 }
"#;

#[test]
fn evaluate_reports_every_model_side_by_side_and_infer_answers() {
    let p = eval_project(5);
    p.write("pipe.yaml", &EVAL.replace("BATCH", "2"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    // The run ends with what the final stages produced: the table and the answers.
    let summary = r.stdout.split("── evaluate ──").nth(1).unwrap_or_else(|| panic!("no summary:\n{}", r.stdout));
    assert!(
        summary.contains("accuracy, strict (95% CI)") && summary.contains("base") && summary.contains("again"),
        "{}",
        r.stdout
    );
    assert!(
        summary.contains("base vs again, accuracy_strict: +0.0 points") && summary.contains("p = 1.000"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("── infer ──\nQ: What is 2 + 2?\nA: "), "{}", r.stdout);
    let metrics: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.run(&["show", "evaluate.metrics"]).ok().stdout.trim()).unwrap())
            .unwrap();
    assert_eq!(metrics["version"], 2);
    for m in ["base", "again"] {
        let x = &metrics["models"][m];
        assert_eq!(x["n"], 5);
        for k in [
            "accuracy_strict",
            "accuracy_flexible",
            "strict_format",
            "soft_format",
            "mean_completion_tokens",
            "truncation_rate",
        ] {
            assert!(x[k].is_number(), "{k} missing: {x}");
        }
        assert_eq!(x["accuracy_strict_ci95"].as_array().map(Vec::len), Some(2), "{x}");
    }
    assert_eq!(metrics["models"]["base"], metrics["models"]["again"], "the same model evaluates the same");
    let samples = fs::read_to_string(p.run(&["show", "evaluate.samples"]).ok().stdout.trim()).unwrap();
    assert_eq!(samples.lines().count(), 10);
    let s: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    for k in [
        "question",
        "reference",
        "completion",
        "extracted",
        "correct",
        "extracted_flexible",
        "correct_flexible",
        "tokens",
        "finish_reason",
    ] {
        assert!(s.get(k).is_some(), "sample lacks {k}: {s}");
    }
    let answers = fs::read_to_string(p.run(&["show", "infer.answers"]).ok().stdout.trim()).unwrap();
    assert_eq!(answers.lines().count(), 2);
    let a: serde_json::Value = serde_json::from_str(answers.lines().next().unwrap()).unwrap();
    assert_eq!(a["question"], "What is 2 + 2?");
    assert!(a["tokens"].as_u64().unwrap() <= 5);
}

#[test]
fn few_shot_exemplars_come_from_train_and_metrics_diff_compares_runs() {
    let p = eval_project(3);
    p.write("pipe.yaml", &EVAL.replace("BATCH", "3"));
    p.run(&["run", "pipe.yaml", "--until", "evaluate"]).ok();
    // 2-shot: exemplars from the train split (validated: few-shot needs `train`).
    let fewshot = EVAL
        .replace("BATCH", "3")
        .replace("      max_new_tokens: 12", "      max_new_tokens: 12\n      num_fewshot: 2");
    p.write("pipe.yaml", &fewshot);
    let r = p.run(&["run", "pipe.yaml", "--until", "evaluate"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("2-shot needs exemplars: give `train`"), "{}", r.stderr);
    p.write("pipe.yaml", &fewshot.replace("num_fewshot: 2", "num_fewshot: 2\n      train: ${prompts.train}"));
    p.run(&["run", "pipe.yaml", "--until", "evaluate"]).ok();
    let samples =
        fs::read_to_string(p.run(&["show", "evaluate.samples", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert_eq!(samples.lines().count(), 6);
    let metrics =
        fs::read_to_string(p.run(&["show", "evaluate.metrics", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert!(metrics.contains("\"num_fewshot\": 2"), "{metrics}");
    // The 2-shot evaluation against the previous (0-shot) record of the stage.
    let d = p.run(&["metrics", "diff", "pipe.yaml"]).ok();
    assert!(d.stdout.contains("against the previous record of each stage"), "{}", d.stdout);
    let row = d
        .stdout
        .lines()
        .find(|l| l.contains("models.base.mean_completion_tokens"))
        .unwrap_or_else(|| panic!("{}", d.stdout));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.len(), 5, "{row}");
    let (old, new, delta): (f64, f64, f64) =
        (cells[2].parse().unwrap(), cells[3].parse().unwrap(), cells[4].parse().unwrap());
    assert!((new - old - delta).abs() < 1e-3, "{row}");
    // Against another pipeline file: the 0-shot one, whose results are still in the cache.
    p.write("zero.yaml", &EVAL.replace("BATCH", "3"));
    let d = p.run(&["metrics", "diff", "pipe.yaml", "--against", "zero.yaml"]).ok();
    assert!(d.stdout.contains("models.again.accuracy_strict"), "{}", d.stdout);
    // The two runs' samples question by question: the 0-shot file and the 2-shot one.
    let zero = p.run(&["show", "evaluate.samples", "-p", "zero.yaml"]).ok().stdout.trim().to_string();
    let two = p.run(&["show", "evaluate.samples", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    let e = p.run(&["metrics", "paired", &zero, &two]);
    assert_eq!(e.code, 1, "{}", e.stderr);
    assert!(e.stderr.contains("several models (`again`, `base`)"), "{}", e.stderr);
    let r = p.run(&["metrics", "paired", &zero, &two, "--model", "base"]).ok();
    assert!(r.stdout.contains("3 questions in both"), "{}", r.stdout);
    let row = |metric: &str| {
        let line = r.stdout.lines().find(|l| l.contains(metric)).unwrap_or_else(|| panic!("{}", r.stdout));
        line.split_whitespace().map(str::to_string).collect::<Vec<_>>()
    };
    // Each side's accuracy agrees with what its own evaluation measured.
    let measured = |pipeline: &str| -> serde_json::Value {
        let file = p.run(&["show", "evaluate.metrics", "-p", pipeline]).ok().stdout.trim().to_string();
        serde_json::from_str(&fs::read_to_string(file).unwrap()).unwrap()
    };
    let pct = |v: &serde_json::Value| format!("{:.1}%", 100.0 * v.as_f64().unwrap());
    let strict = row("accuracy_strict");
    assert_eq!(strict[1], pct(&measured("zero.yaml")["models"]["base"]["accuracy_strict"]), "{}", r.stdout);
    assert_eq!(strict[2], pct(&measured("pipe.yaml")["models"]["base"]["accuracy_strict"]), "{}", r.stdout);
}

#[test]
fn an_interrupted_evaluation_keeps_its_samples_and_ends_as_an_uninterrupted_one() {
    let p = eval_project(120);
    p.write("pipe.yaml", &EVAL.replace("BATCH", "1"));
    let mut child = p.spawn(&["run", "pipe.yaml", "--until", "evaluate"]);
    // Wait until some samples of the first model are on disk, then kill -9.
    let t0 = std::time::Instant::now();
    let done_before = loop {
        let n: usize = fs::read_dir(p.cache().join("work"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|e| fs::read_dir(e.path()).into_iter().flatten().flatten())
            .filter(|f| f.file_name().to_string_lossy().starts_with("samples-base-"))
            .filter_map(|f| fs::read_to_string(f.path()).ok())
            .map(|s| s.lines().count())
            .sum();
        if n >= 5 {
            break n;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no samples appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done_before < 240, "the evaluation finished before it could be interrupted");
    let r = p.run(&["run", "pipe.yaml", "--until", "evaluate"]).ok();
    assert!(r.decision("evaluate").starts_with("run"), "{}", r.stdout);
    // The finished samples were reused, not recomputed.
    let kept: usize = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("evaluate: base: kept ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no samples kept:\n{}", r.stderr));
    assert!(kept >= done_before, "kept {kept}, {done_before} were on disk");
    let resumed =
        fs::read_to_string(p.run(&["show", "evaluate.samples", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    let indices: Vec<(String, u64)> = resumed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["model"].as_str().unwrap().to_string(), v["index"].as_u64().unwrap()))
        .collect();
    assert_eq!(indices.len(), 240, "every question once per model");

    let fresh = eval_project(120);
    fresh.write("pipe.yaml", &EVAL.replace("BATCH", "1"));
    fresh.run(&["run", "pipe.yaml", "--until", "evaluate"]).ok();
    let uninterrupted =
        fs::read_to_string(fresh.run(&["show", "evaluate.samples", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
    assert_eq!(resumed, uninterrupted, "resumed samples differ from an uninterrupted run");
}

#[test]
fn model_parameters_are_validated_before_anything_runs() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "stages:\n  infer:\n    kind: infer\n    with:\n      model: ./models/nothing\n      questions: [hi]\n      temprature: 0.5\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("pipe.yaml:7:") && r.stderr.contains("did you mean `temperature`?"), "{}", r.stderr);
    p.write(
        "pipe.yaml",
        "stages:\n  infer:\n    kind: infer\n    with:\n      model: ./models/nothing\n      questions: [hi]\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("pipe.yaml:5:") && r.stderr.contains("does not exist"), "{}", r.stderr);
}
