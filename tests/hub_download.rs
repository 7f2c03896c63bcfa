//! The `download` stage's hub path against a local stand-in for the Hugging
//! Face Hub (never the internet): listing, parquet download, reading, caching
//! and HF_HUB_OFFLINE.

mod common;

use std::fs;
use std::path::Path;

use common::{write_parquet, Project};

#[test]
fn download_reads_gsm8k_parquet_from_the_hub_and_then_works_offline() {
    let p = Project::new();
    let rows = |n: usize, tag: &str| -> Vec<(String, String)> {
        (0..n).map(|i| (format!("{tag} question {i}?"), format!("{tag} reasoning {i}\n#### {i}"))).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    write_parquet(&dir.path().join("train.parquet"), &rows(7, "train"));
    write_parquet(&dir.path().join("test.parquet"), &rows(3, "test"));
    let files = vec![
        ("main/train-00000-of-00001.parquet".to_string(), fs::read(dir.path().join("train.parquet")).unwrap()),
        ("main/test-00000-of-00001.parquet".to_string(), fs::read(dir.path().join("test.parquet")).unwrap()),
        ("socratic/train-00000-of-00001.parquet".to_string(), b"not for us".to_vec()),
    ];
    // info + (metadata + body) per file, listed once per split.
    let (endpoint, server) = common::hub_server("datasets/openai/gsm8k", files, 6);
    let hf_home = p.root().join("hf-home");
    p.write("pipe.yaml", "stages:\n  gsm8k:\n    kind: download\n    with: {dataset: openai/gsm8k, config: main}\n");

    let out = p
        .cmd(&["run", "pipe.yaml"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &hf_home)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let r = common::Run::from(out).ok();
    assert!(r.decision("gsm8k").starts_with("run"), "{}", r.stdout);
    let log = server.join().unwrap();
    assert!(log.iter().any(|u| u.ends_with("main/train-00000-of-00001.parquet")), "{log:?}");
    assert!(!log.iter().any(|u| u.contains("socratic")), "another config was downloaded: {log:?}");

    let ds = p.run(&["show", "gsm8k.dataset"]).ok().stdout.trim().to_string();
    let train = fs::read_to_string(Path::new(&ds).join("train.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = train.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[6], serde_json::json!({"question": "train question 6?", "answer": "train reasoning 6\n#### 6"}));
    assert_eq!(fs::read_to_string(Path::new(&ds).join("test.jsonl")).unwrap().lines().count(), 3);

    // Offline, from the hub cache alone (no server is listening any more).
    let out = p
        .cmd(&["run", "pipe.yaml", "--force", "gsm8k"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let r = common::Run::from(out).ok();
    assert!(r.decision("gsm8k").contains("forced"), "{}", r.stdout);
    assert_eq!(p.run(&["show", "gsm8k.dataset"]).ok().stdout.trim(), ds, "the same bytes give the same artifact");
}

#[test]
fn offline_without_a_cached_copy_fails_with_a_clear_message() {
    let p = Project::new();
    p.write("pipe.yaml", "stages:\n  gsm8k:\n    kind: download\n    with: {dataset: openai/gsm8k}\n");
    let out = p
        .cmd(&["run", "pipe.yaml"])
        .env("HF_HOME", p.root().join("empty"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let r = common::Run::from(out);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("HF_HUB_OFFLINE is set and datasets/openai/gsm8k at revision main is not in the hub cache"),
        "{}",
        r.stderr
    );
}
