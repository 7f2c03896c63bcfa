//! Bad user files end the run with exit 1 and a message that names the file
//! (and the line or field), without a panic, and leave nothing recorded.

mod common;

use std::fs;

use common::{gsm8k_rows, tiny_model, Project};

const INFER: &str = "device: cpu\nstages:\n  infer:\n    kind: infer\n    with: { model: models/m, questions: [hi], max_new_tokens: 2 }\n";

/// The run fails at `stage`, naming what `needles` say, and `stage` is not recorded.
fn fails(p: &Project, stage: &str, what: &str, needles: &[&str]) {
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{what}: exit {}\n{}\n{}", r.code, r.stdout, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{what}: a panic:\n{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "{what}: `{n}` not in:\n{}", r.stderr);
    }
    let st = p.run(&["status", "pipe.yaml"]).ok();
    let line = st.stdout.lines().find(|l| l.starts_with(stage)).unwrap_or_else(|| panic!("{}", st.stdout));
    assert!(!line.contains("cached"), "{what}: {stage} was recorded:\n{}", st.stdout);
}

#[test]
fn broken_model_files_are_named() {
    let p = Project::new();
    p.write("pipe.yaml", INFER);
    let m = p.root().join("models/m");
    tiny_model(&m, 1);
    let cfg = fs::read_to_string(m.join("config.json")).unwrap();

    fs::write(m.join("config.json"), cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0")).unwrap();
    fails(&p, "infer", "zero heads", &["config.json", "`num_attention_heads` is 0"]);
    fs::write(m.join("config.json"), cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3")).unwrap();
    fails(&p, "infer", "non-dividing heads", &["config.json", "not a multiple of `num_key_value_heads` = 3"]);
    fs::write(m.join("config.json"), &cfg).unwrap();

    let weights = m.join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    fails(&p, "infer", "truncated safetensors", &["model.safetensors"]);
    fs::write(&weights, &bytes).unwrap();

    fs::write(m.join("tokenizer.json"), "{ not json").unwrap();
    fails(&p, "infer", "tokenizer", &["tokenizer.json"]);
}

#[test]
fn broken_data_files_are_named_with_their_line() {
    let p = Project::new();
    tiny_model(&p.root().join("models/m"), 2);
    let pipe = "device: cpu\nstages:\n  gsm8k: { kind: download, with: { path: data/gsm8k } }\n  prompts: { kind: format, with: { data: \"${gsm8k.dataset}\" } }\n  sft:\n    kind: sft\n    with: { model: models/m, train: \"${prompts.sft}\", max_steps: 1 }\n";
    p.write("pipe.yaml", pipe);
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(1));
    let mut bad = gsm8k_rows(2).into_bytes();
    bad.extend_from_slice(b"{\"question\": \"\xff\xfe\", \"answer\": \"#### 1\"}\n");
    fs::write(p.root().join("data/gsm8k/train.jsonl"), bad).unwrap();
    fails(&p, "gsm8k", "non-UTF-8 line", &["train.jsonl:3"]);

    // A 100 MB line: refused at the cap, without reading it all.
    let mut long = gsm8k_rows(1).into_bytes();
    long.extend_from_slice(b"{\"question\": \"");
    long.resize(long.len() + (100 << 20), b'x');
    long.extend_from_slice(b"\", \"answer\": \"#### 1\"}\n");
    fs::write(p.root().join("data/gsm8k/train.jsonl"), long).unwrap();
    fails(&p, "gsm8k", "100 MB line", &["train.jsonl:2", "longer than 16 MiB"]);

    p.write("data/gsm8k/train.jsonl", "");
    fails(&p, "sft", "empty train split", &["has no examples", "is the train split empty?"]);
}
