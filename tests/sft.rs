//! The `sft` stage on a tiny random model: the loss falls, only assistant
//! tokens are trained on, padding changes nothing, packing keeps examples
//! apart, and a killed run resumes to bitwise identical weights.

mod common;

use std::fs;
use std::time::Duration;

use candle_core::{DType, Device};
use common::{tiny_model, Project};
use r1pipe::model::{load, Batch, Message, ModelRef};
use r1pipe::train::sft;

fn project() -> Project {
    common::tiny_project(6, 8)
}

const PIPE: &str = r#"
name: sft-test
device: cpu
dtype: DTYPE
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", system_prompt: "Answer." } }
  sft:
    kind: sft
    with:
      model: models/tiny
      train: ${prompts.sft}
      learning_rate: 0.01
      warmup_ratio: 0.0
      per_device_train_batch_size: 2
      gradient_accumulation_steps: 2
      max_steps: STEPS
      save_steps: 1
      PACKING
"#;

fn log_of(p: &Project) -> Vec<serde_json::Value> {
    let path = p.run(&["show", "sft.log", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn the_sft_loss_falls_well_below_its_start() {
    for packing in ["packing: false", "packing: true"] {
        let p = project();
        p.write("pipe.yaml", &PIPE.replace("DTYPE", "auto").replace("STEPS", "30").replace("PACKING", packing));
        p.run(&["run", "pipe.yaml"]).ok();
        let log = log_of(&p);
        assert_eq!(log.len(), 30);
        let first = log[0]["loss"].as_f64().unwrap();
        let last = log[29]["loss"].as_f64().unwrap();
        println!("{packing}: loss {first:.3} → {last:.3}");
        assert!(first > 9.0, "a random model starts near ln(49152) ≈ 10.8: {first}");
        assert!(last < 0.5 * first, "{packing}: the loss did not fall: {first} → {last}");
        for k in ["loss", "learning_rate", "grad_norm", "tokens_per_second"] {
            assert!(log[0][k].is_number(), "{k} missing");
        }
    }
}

/// bf16 compute with f32 master weights (CUDA's default), on the portable ops:
/// the loss falls as in f32.
#[test]
fn the_sft_loss_falls_in_bf16_compute_with_f32_masters() {
    let p = project();
    p.write("pipe.yaml", &PIPE.replace("DTYPE", "bf16").replace("STEPS", "30").replace("PACKING", "packing: true"));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains("BF16, kernels: portable"), "{}", r.stderr);
    let log = log_of(&p);
    let (first, last) = (log[0]["loss"].as_f64().unwrap(), log[29]["loss"].as_f64().unwrap());
    println!("bf16: loss {first:.3} → {last:.3}");
    assert!(last < 0.5 * first, "the loss did not fall in bf16: {first} → {last}");
}

#[test]
fn only_the_assistant_turn_is_a_target() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 7);
    let m = load::load(&ModelRef::Dir(dir.path().into()), &Device::Cpu, DType::F32).unwrap();
    let msgs = [
        Message::new("system", "S"),
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "<answer>4</answer>"),
    ];
    let ex = sft::tokenize(&m.tokenizer, &msgs, 1024).unwrap();
    let target_ids: Vec<u32> = ex.ids.iter().zip(&ex.targets).filter(|(_, t)| **t).map(|(i, _)| *i).collect();
    let text = m.tokenizer.tokenizer.decode(&target_ids, false).unwrap();
    assert_eq!(text, "<answer>4</answer><|im_end|>\n", "targets: {text:?}");
    let short = sft::tokenize(&m.tokenizer, &msgs, 5).unwrap();
    assert!(short.truncated && short.ids.len() == 5);
}

#[test]
fn padding_tokens_do_not_change_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 8);
    let m = load::load(&ModelRef::Dir(dir.path().into()), &Device::Cpu, DType::F32).unwrap();
    let long: Vec<u32> = vec![1, 500, 600, 700, 800, 2];
    let short: Vec<u32> = vec![1, 900, 2];
    let loss_with_pad = |pad: u32| {
        let ids = vec![long.clone(), short.iter().copied().chain([pad, pad, pad]).collect()];
        let valid = vec![vec![true; 6], vec![true, true, true, false, false, false]];
        let b = Batch::from_rows(ids, valid, &Device::Cpu).unwrap();
        let mask = candle_core::Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 0., 0., 0.]], &Device::Cpu).unwrap();
        let lp = m.model.next_token_logprobs(&b).unwrap();
        sft::loss(&lp, &mask, 7.0).unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(loss_with_pad(0), loss_with_pad(4000));
}

#[test]
fn packed_sequences_give_the_logits_they_have_alone() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 9);
    let m = load::load(&ModelRef::Dir(dir.path().into()), &Device::Cpu, DType::F32).unwrap();
    let a: Vec<u32> = vec![1, 11, 12, 13];
    let bseq: Vec<u32> = vec![1, 21, 22];
    let packed = Batch::packed(&[vec![a.clone(), bseq.clone()]], 0, &Device::Cpu).unwrap();
    let lp = m.model.next_token_logprobs(&packed).unwrap().to_vec2::<f32>().unwrap();
    let alone = |s: &Vec<u32>| {
        m.model
            .next_token_logprobs(&Batch::left_padded(std::slice::from_ref(s), 0, &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let (la, lb) = (alone(&a), alone(&bseq));
    for i in 0..3 {
        assert!((lp[0][i] - la[0][i]).abs() < 1e-5, "a, position {i}");
    }
    for i in 0..2 {
        assert!((lp[0][4 + i] - lb[0][i]).abs() < 1e-5, "b, position {i}");
    }
}

#[test]
fn a_diverging_run_stops_with_the_step_and_a_hint_and_keeps_its_last_good_checkpoint() {
    let p = project();
    // A learning rate no model survives: the weights overflow within a few steps.
    p.write(
        "pipe.yaml",
        &PIPE
            .replace("DTYPE", "auto")
            .replace("STEPS", "30")
            .replace("PACKING", "")
            .replace("learning_rate: 0.01", "learning_rate: 1.0e30\n      max_grad_norm: 0.0"),
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let msg =
        r.stderr.lines().find(|l| l.contains("sft: failed")).unwrap_or_else(|| panic!("{}", r.stderr)).to_string();
    assert!(
        msg.contains("lower learning_rate") && (msg.contains("the loss is") || msg.contains("gradient norm is")),
        "{msg}"
    );
    let step: u64 = msg.split("step ").nth(1).and_then(|x| x.split(':').next()).and_then(|x| x.parse().ok()).unwrap();
    let kept = p.checkpoint_step().unwrap_or(0);
    assert!(kept < step, "checkpoint {kept} is not before the failing step {step}");
    assert!(msg.contains(&format!("last good checkpoint is at step {kept}")), "{msg}");
}

#[test]
fn a_newest_checkpoint_with_changed_bytes_is_named_and_the_run_resumes_from_the_one_before() {
    let whole = project();
    whole.write("pipe.yaml", &PIPE.replace("DTYPE", "auto").replace("STEPS", "30").replace("PACKING", ""));
    whole.run(&["run", "pipe.yaml"]).ok();
    let reference =
        fs::read(format!("{}/model.safetensors", whole.run(&["show", "sft.model"]).ok().stdout.trim())).unwrap();

    let p = project();
    p.write("pipe.yaml", &PIPE.replace("DTYPE", "auto").replace("STEPS", "30").replace("PACKING", ""));
    let mut child = p.spawn(&["run", "pipe.yaml"]);
    p.wait_for_checkpoint(4, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    // Change bytes of the newest checkpoint's weights without changing its size (a
    // safetensors reader cannot notice this; its manifest's hash does).
    let work = fs::read_dir(p.cache().join("work")).unwrap().flatten().next().unwrap().path();
    let mut cps: Vec<_> = fs::read_dir(work.join("checkpoints")).unwrap().flatten().map(|e| e.path()).collect();
    cps.sort();
    let newest = cps.last().unwrap().clone();
    let weights = newest.join("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&weights, bytes).unwrap();
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains(&format!("checkpoint {} is damaged", newest.display())), "{}", r.stderr);
    assert!(r.stderr.contains("model.safetensors has changed since it was written"), "{}", r.stderr);
    let resumed = fs::read(format!("{}/model.safetensors", p.run(&["show", "sft.model"]).ok().stdout.trim())).unwrap();
    assert!(resumed == reference, "resuming from the checkpoint before the damaged one changed the result");
}

#[test]
fn packed_rows_restart_positions_and_segments_per_example() {
    let b = Batch::packed(&[vec![vec![1, 2, 3], vec![4, 5]], vec![vec![6]]], 0, &Device::Cpu).unwrap();
    let pos: Vec<Vec<u32>> = b.positions.to_vec2().unwrap();
    assert_eq!(pos, vec![vec![0, 1, 2, 0, 1], vec![0, 0, 0, 0, 0]]);
    assert_eq!(b.segments.as_ref().unwrap()[0], vec![0, 0, 0, 1, 1]);
    assert_eq!(b.valid[1], vec![true, false, false, false, false]);
}

#[test]
fn a_killed_sft_run_resumes_to_bitwise_identical_weights() {
    let whole = project();
    whole.write("pipe.yaml", &PIPE.replace("DTYPE", "auto").replace("STEPS", "40").replace("PACKING", ""));
    whole.run(&["run", "pipe.yaml"]).ok();
    let reference =
        fs::read(format!("{}/model.safetensors", whole.run(&["show", "sft.model"]).ok().stdout.trim())).unwrap();

    let p = project();
    p.write("pipe.yaml", &PIPE.replace("DTYPE", "auto").replace("STEPS", "40").replace("PACKING", ""));
    let mut child = p.spawn(&["run", "pipe.yaml"]);
    let at = p.wait_for_checkpoint(3, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(at < 40, "finished before it could be killed");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("sft").starts_with("resume from step"), "{}", r.stdout);
    // Only the remaining steps ran: a restart from step 0 would report resumed_from_step 0.
    let m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.run(&["show", "sft.metrics"]).ok().stdout.trim()).unwrap()).unwrap();
    let resumed = m["resumed_from_step"].as_u64().unwrap();
    assert!(resumed >= at, "resumed at {resumed}, a checkpoint at {at} existed");
    assert_eq!(m["steps_run"].as_u64().unwrap(), 40 - resumed);
    assert!(r.stderr.contains(&format!("sft: resumed at step {resumed} of 40")), "{}", r.stderr);
    let resumed = fs::read(format!("{}/model.safetensors", p.run(&["show", "sft.model"]).ok().stdout.trim())).unwrap();
    assert!(resumed == reference, "resumed weights differ from the uninterrupted run's");
    let steps: Vec<u64> = log_of(&p).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
}
