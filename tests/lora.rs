//! LoRA: adapters start as the identity, only they get gradients, turning them
//! off gives the base model, saving merges them, and both training stages run with them.

mod common;

use std::fs;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{gsm8k_rows, tiny_model, Project};
use r1pipe::model::lora::LoraConfig;
use r1pipe::model::{load, Batch, ModelRef, Ops, Pass};

fn logits(m: &r1pipe::model::Transformer) -> Vec<f32> {
    let b = Batch::left_padded(&[vec![1, 300, 4000, 20000, 7]], 0, &Device::Cpu).unwrap();
    m.forward(&b, Ops::Differentiable).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn lora_cfg() -> LoraConfig {
    serde_json::from_value(
        serde_json::json!({"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    )
    .unwrap()
}

#[test]
fn adapters_train_alone_switch_off_to_the_base_and_merge_on_save() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 10);
    let mut m = load::load(&ModelRef::Dir(dir.path().into()), &Device::Cpu, DType::F32).unwrap();
    let base = logits(&m.model);
    m.model.add_lora(lora_cfg(), 1).unwrap();
    assert_eq!(logits(&m.model), base, "B = 0: a new adapter changes nothing");
    let trainable = m.model.trainable();
    assert_eq!(trainable.len(), 2 * 3 * m.model.cfg.num_layers, "A and B for 3 modules per layer");

    // One backward: gradients for the adapters only, none computed for the frozen base.
    let b = Batch::left_padded(&[vec![1, 300, 4000, 20000, 7]], 0, &Device::Cpu).unwrap();
    let grads = m.model.next_token_logprobs(&b).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in &trainable {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
    for (name, v) in &m.model.weights {
        assert!(grads.get(v.as_tensor()).is_none(), "the frozen {name} got a gradient");
    }

    // Move B off zero: the model changes, adapters off gives the base back.
    for (name, v) in &trainable {
        if name.ends_with("lora_B") {
            v.set(&Tensor::ones(v.shape(), DType::F32, &Device::Cpu).unwrap().affine(0.01, 0.0).unwrap()).unwrap();
        }
    }
    let adapted = logits(&m.model);
    assert_ne!(adapted, base);
    let b = Batch::left_padded(&[vec![1, 300, 4000, 20000, 7]], 0, &Device::Cpu).unwrap();
    let without: Vec<f32> =
        m.model.logits(&b, Pass { adapters: false, ..Pass::TRAIN }).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(without, base);

    let out = tempfile::tempdir().unwrap();
    load::save(&m.model, &m.files_dir, out.path()).unwrap();
    let merged = load::load(&ModelRef::Dir(out.path().into()), &Device::Cpu, DType::F32).unwrap();
    let got = logits(&merged.model);
    let max = got.iter().zip(&adapted).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max < 1e-4, "merged model differs from the adapted one by {max}");
}

#[test]
fn lora_settings_are_validated() {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 11);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(4));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(1));
    p.write(
        "pipe.yaml",
        "stages:\n  gsm8k: {kind: download, with: {path: data/gsm8k}}\n  prompts: {kind: format, with: {data: \"${gsm8k.dataset}\"}}\n  sft:\n    kind: sft\n    with:\n      model: models/tiny\n      train: ${prompts.sft}\n      lora: {r: 4, dropout: 0.1, target_modules: [q_proj, qkv]}\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("lora.dropout") && r.stderr.contains("unknown module `qkv`"), "{}", r.stderr);
}

#[test]
fn grpo_with_lora_and_a_kl_penalty_and_sft_with_lora_train() {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 12);
    // With the (frozen) embedding at std 0.02, a 32-wide model cannot make its
    // logits peaky whatever its adapters do; SFT gets a copy with a larger one.
    {
        let m = load::load(&ModelRef::Dir(p.root().join("models/tiny")), &Device::Cpu, DType::F32).unwrap();
        let e = &m.model.weights["model.embed_tokens.weight"];
        e.set(&(e.as_tensor() * 25.0).unwrap()).unwrap();
        load::save(&m.model, &m.files_dir, &p.root().join("models/tiny-peaky")).unwrap();
    }
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(8));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(1));
    p.write(
        "pipe.yaml",
        r#"
device: cpu
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}" } }
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${prompts.train}
      rewards: [ { name: regex_match, params: { pattern: "^[A-Z]" } } ]
      learning_rate: 0.05
      beta: 0.1
      per_device_train_batch_size: 16
      num_generations: 8
      max_completion_length: 8
      max_steps: 8
      lora: { r: 4, alpha: 8, target_modules: [q_proj, v_proj, o_proj, down_proj] }
  sft:
    kind: sft
    with:
      model: models/tiny-peaky
      train: ${prompts.sft}
      learning_rate: 0.05
      max_grad_norm: 1.0
      warmup_ratio: 0.0
      per_device_train_batch_size: 4
      max_steps: 12
      lora: { r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
"#,
    );
    p.run(&["run", "pipe.yaml"]).ok();
    let log: Vec<serde_json::Value> = fs::read_to_string(p.run(&["show", "grpo.log"]).ok().stdout.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 8);
    assert_eq!(log[0]["kl"].as_f64().unwrap(), 0.0, "the first step's policy is the reference");
    let learned = log
        .iter()
        .position(|l| l["frac_reward_zero_std"].as_f64().unwrap() < 1.0)
        .expect("no group had reward variance");
    let later_kl = log[learned + 1..].iter().map(|l| l["kl"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(later_kl > 0.0, "after an update the adapters must move the policy off the base (reference)");
    let sft: Vec<serde_json::Value> = fs::read_to_string(p.run(&["show", "sft.log"]).ok().stdout.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (first, last) = (sft[0]["loss"].as_f64().unwrap(), sft[11]["loss"].as_f64().unwrap());
    println!("LoRA SFT loss {first:.3} → {last:.3}");
    assert!(last < first - 1.0, "LoRA SFT loss did not fall: {first} → {last}");
    // The saved model is plain Hugging Face weights (adapters merged).
    let names: Vec<String> = candle_core::safetensors::load(
        format!("{}/model.safetensors", p.run(&["show", "sft.model"]).ok().stdout.trim()),
        &Device::Cpu,
    )
    .unwrap()
    .into_keys()
    .collect();
    assert!(names.iter().all(|n| !n.contains("lora")), "{names:?}");

    // Beside it, the adapters in PEFT layout: on the base model they give the merged model's logits.
    let adapter = PathBuf::from(p.run(&["show", "sft.adapter"]).ok().stdout.trim());
    let merged =
        load::load(&ModelRef::Dir(p.run(&["show", "sft.model"]).ok().stdout.trim().into()), &Device::Cpu, DType::F32)
            .unwrap();
    let mut base = load::load(&ModelRef::Dir(p.root().join("models/tiny-peaky")), &Device::Cpu, DType::F32).unwrap();
    r1pipe::model::peft::load_adapter(&mut base.model, &adapter).unwrap();
    let ids = vec![vec![1u32, 5, 9, 13, 2, 7]];
    let b = Batch::left_padded(&ids, 0, &Device::Cpu).unwrap();
    let k = Ops::Fused;
    let (x, y) = (base.model.forward(&b, k).unwrap(), merged.model.forward(&b, k).unwrap());
    let moved = (&y - base.model.logits(&b, Pass { adapters: false, ..Pass::INFERENCE }).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-2, "training moved the logits by only {moved}: the check would see nothing");
    assert!(d < 1e-4, "base + saved adapter vs merged model: max |Δ logit| = {d}");
    assert!(PathBuf::from(p.run(&["show", "grpo.adapter"]).ok().stdout.trim())
        .join("adapter_model.safetensors")
        .exists());
}

#[test]
fn only_lora_runs_have_an_adapter_to_refer_to() {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 2);
    p.write(
        "pipe.yaml",
        "stages:\n  sft: {kind: sft, with: {model: models/tiny, train: data/sft.jsonl}}\n  infer: {kind: infer, with: {model: \"${sft.adapter}\", questions: [hi]}}\n",
    );
    p.write("data/sft.jsonl", "");
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr.contains("`sft` writes no `adapter` here") && r.stderr.contains("only LoRA runs (`lora:`)"),
        "{}",
        r.stderr
    );
}
