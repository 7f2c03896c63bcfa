//! The transformer against a float64 reference written with plain loops, the
//! KV-cache path against the full forward, padding against no padding, and
//! gradients against finite differences.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use r1pipe::model::{Batch, Config, KvCache, Ops, Transformer};

/// A tiny config of a family: `qwen2` (q/k/v bias), `llama`, or `qwen3` (q/k norm and an
/// explicit head_dim of 8, twice hidden_size / heads).
fn tiny_config_of(family: &str, tied: bool) -> Config {
    let mut c = serde_json::json!({
        "model_type": family,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied, "max_position_embeddings": 64
    });
    if family == "qwen3" {
        c["head_dim"] = 8.into();
    }
    Config::from_json(c).unwrap()
}

fn tiny_config(qwen: bool, tied: bool) -> Config {
    tiny_config_of(if qwen { "qwen2" } else { "llama" }, tied)
}

fn model(qwen: bool, tied: bool, seed: u64) -> Transformer {
    model_of(tiny_config(qwen, tied), seed)
}

fn model_of(cfg: Config, seed: u64) -> Transformer {
    // std 0.02 makes a tiny model nearly constant; scale weights up so the test has teeth.
    let m = Transformer::random(cfg, seed, &Device::Cpu).unwrap();
    for (name, v) in &m.weights {
        if !name.ends_with("norm.weight") {
            v.set(&(v.as_tensor() * 20.0).unwrap()).unwrap();
        } else {
            let n = v.elem_count();
            let jitter: Vec<f32> = (0..n).map(|i| 1.0 + 0.1 * ((i * 7 % 5) as f32 - 2.0)).collect();
            v.set(&Tensor::from_vec(jitter, n, &Device::Cpu).unwrap()).unwrap();
        }
    }
    m
}

fn w1(m: &Transformer, name: &str) -> Vec<f64> {
    m.weights[name].as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn w2(m: &Transformer, name: &str) -> Vec<Vec<f64>> {
    m.weights[name].as_tensor().to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let ang = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
        let (c, s) = (ang.cos(), ang.sin());
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// Logits of one unpadded sequence at every position, in f64 with plain loops.
fn reference(m: &Transformer, ids: &[u32]) -> Vec<Vec<f64>> {
    let c = &m.cfg;
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let emb = w2(m, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&i| emb[i as usize].clone()).collect();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let bias = |n: &str| {
            m.weights.get(&format!("{p}.self_attn.{n}.bias")).map(|_| w1(m, &format!("{p}.self_attn.{n}.bias")))
        };
        let add = |v: Vec<f64>, b: Option<Vec<f64>>| match b {
            Some(b) => v.iter().zip(&b).map(|(x, y)| x + y).collect(),
            None => v,
        };
        let (wq, wk, wv, wo) = (
            w2(m, &format!("{p}.self_attn.q_proj.weight")),
            w2(m, &format!("{p}.self_attn.k_proj.weight")),
            w2(m, &format!("{p}.self_attn.v_proj.weight")),
            w2(m, &format!("{p}.self_attn.o_proj.weight")),
        );
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (t, x) in xs.iter().enumerate() {
            let h = rmsnorm(x, &w1(m, &format!("{p}.input_layernorm.weight")), c.rms_norm_eps);
            let mut q = add(matvec(&wq, &h), bias("q_proj"));
            let mut k = add(matvec(&wk, &h), bias("k_proj"));
            // Qwen3: RMSNorm over each head of q and k, before the rotary embedding.
            if c.qk_norm {
                let (qn, kn) =
                    (w1(m, &format!("{p}.self_attn.q_norm.weight")), w1(m, &format!("{p}.self_attn.k_norm.weight")));
                for head in 0..nh {
                    let r = rmsnorm(&q[head * hd..(head + 1) * hd], &qn, c.rms_norm_eps);
                    q[head * hd..(head + 1) * hd].copy_from_slice(&r);
                }
                for head in 0..nkv {
                    let r = rmsnorm(&k[head * hd..(head + 1) * hd], &kn, c.rms_norm_eps);
                    k[head * hd..(head + 1) * hd].copy_from_slice(&r);
                }
            }
            for head in 0..nh {
                rope(&mut q[head * hd..(head + 1) * hd], t, c.rope_theta);
            }
            for head in 0..nkv {
                rope(&mut k[head * hd..(head + 1) * hd], t, c.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(add(matvec(&wv, &h), bias("v_proj")));
        }
        for t in 0..xs.len() {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[t][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &attn);
            for (x, y) in xs[t].iter_mut().zip(o) {
                *x += y;
            }
            let h = rmsnorm(&xs[t], &w1(m, &format!("{p}.post_attention_layernorm.weight")), c.rms_norm_eps);
            let g = matvec(&w2(m, &format!("{p}.mlp.gate_proj.weight")), &h);
            let u = matvec(&w2(m, &format!("{p}.mlp.up_proj.weight")), &h);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = matvec(&w2(m, &format!("{p}.mlp.down_proj.weight")), &act);
            for (x, y) in xs[t].iter_mut().zip(d) {
                *x += y;
            }
        }
    }
    let head = if c.tie_word_embeddings { emb } else { w2(m, "lm_head.weight") };
    xs.iter().map(|x| matvec(&head, &rmsnorm(x, &w1(m, "model.norm.weight"), c.rms_norm_eps))).collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    let scale = want.iter().map(|v| v.abs()).fold(1.0, f64::max);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * scale, "{what}: element {i}: {g} vs reference {w} (scale {scale})");
    }
}

const IDS: [u32; 7] = [3, 17, 5, 39, 0, 22, 8];

#[test]
fn logits_match_a_float64_reference_for_qwen2_and_llama_shapes() {
    for (qwen, tied) in [(true, false), (false, true)] {
        let m = model(qwen, tied, 11);
        let want = reference(&m, &IDS);
        let batch = Batch::left_padded(&[IDS.to_vec()], 0, &Device::Cpu).unwrap();
        for k in [Ops::Differentiable, Ops::Fused] {
            let got: Vec<Vec<Vec<f32>>> = m.forward(&batch, k).unwrap().to_vec3().unwrap();
            for t in 0..IDS.len() {
                assert_close(&got[0][t], &want[t], 1e-4, &format!("qwen={qwen} {k:?} position {t}"));
            }
        }
    }
}

#[test]
fn qwen3_logits_match_the_float64_reference_with_qk_norm_and_explicit_head_dim() {
    let m = model_of(tiny_config_of("qwen3", true), 21);
    assert!(m.cfg.qk_norm && !m.cfg.attention_bias && m.cfg.head_dim == 8);
    assert!(m.weights.contains_key("model.layers.1.self_attn.k_norm.weight"));
    let want = reference(&m, &IDS);
    let batch = Batch::left_padded(&[IDS.to_vec()], 0, &Device::Cpu).unwrap();
    for k in [Ops::Differentiable, Ops::Fused] {
        let got: Vec<Vec<Vec<f32>>> = m.forward(&batch, k).unwrap().to_vec3().unwrap();
        for t in 0..IDS.len() {
            assert_close(&got[0][t], &want[t], 1e-4, &format!("qwen3 {k:?} position {t}"));
        }
    }
    // The KV-cache path (generation) agrees with the full forward too.
    let mut cache = KvCache::new(m.cfg.num_layers, 16);
    let first = m.forward_cached(&[IDS.to_vec()], &mut cache).unwrap().to_vec2::<f32>().unwrap();
    assert_close(&first[0], &want[IDS.len() - 1], 1e-4, "qwen3 cached");
}

#[test]
fn checkpointed_layers_give_the_same_loss_and_gradients() {
    for family in ["qwen2", "qwen3"] {
        let mut m = model_of(tiny_config_of(family, false), 22);
        let batch = Batch::left_padded(&[IDS.to_vec(), IDS[2..].to_vec()], 1, &Device::Cpu).unwrap();
        let run = |m: &Transformer| {
            let l = loss(m, &batch);
            m.backward(&l).unwrap();
            (l.to_scalar::<f32>().unwrap(), m.take_grads())
        };
        let (plain_loss, plain) = run(&m);
        m.gradient_checkpointing = true;
        let (ck_loss, ck) = run(&m);
        assert_eq!(plain_loss, ck_loss, "{family}: the forward is the same computation");
        assert_eq!(plain.len(), m.weights.len(), "{family}: every parameter has a gradient");
        assert_eq!(ck.len(), plain.len());
        for (name, g) in &plain {
            let d = (g - &ck[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            assert!(d <= 1e-5 * scale, "{family}: {name} differs by {d} (scale {scale})");
        }
    }
}

#[test]
fn left_padding_does_not_change_a_sequence_s_logits() {
    let m = model(true, false, 12);
    let short = IDS[..4].to_vec();
    let batch = Batch::left_padded(&[IDS.to_vec(), short.clone()], 7, &Device::Cpu).unwrap();
    let got: Vec<Vec<Vec<f32>>> = m.forward(&batch, Ops::Differentiable).unwrap().to_vec3().unwrap();
    let want = reference(&m, &short);
    for t in 0..short.len() {
        assert_close(&got[1][3 + t], &want[t], 1e-4, &format!("padded row, position {t}"));
    }
}

#[test]
fn the_kv_cache_path_equals_the_full_forward() {
    let m = model(true, false, 13);
    let full: Vec<Vec<Vec<f32>>> = m
        .forward(&Batch::left_padded(&[IDS.to_vec()], 0, &Device::Cpu).unwrap(), Ops::Differentiable)
        .unwrap()
        .to_vec3()
        .unwrap();
    let mut cache = KvCache::new(m.cfg.num_layers, 16);
    let first = m.forward_cached(&[IDS[..3].to_vec()], &mut cache).unwrap().to_vec2::<f32>().unwrap();
    assert_close(&first[0], &full[0][2].iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-5, "prefill");
    for t in 3..IDS.len() {
        let step = m.forward_cached(&[vec![IDS[t]]], &mut cache).unwrap().to_vec2::<f32>().unwrap();
        assert_close(&step[0], &full[0][t].iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-5, &format!("step {t}"));
    }
}

/// A scalar loss over next-token log-probabilities with fixed weights.
fn loss(m: &Transformer, batch: &Batch) -> Tensor {
    let lp = m.next_token_logprobs(batch).unwrap();
    let n = lp.elem_count();
    let coef: Vec<f64> = (0..n).map(|i| ((i * 13 % 7) as f64 - 3.0) / 3.0).collect();
    let coef = Tensor::from_vec(coef, lp.shape(), &Device::Cpu).unwrap().to_dtype(lp.dtype()).unwrap();
    (lp * coef).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let mut m = model(true, false, 14);
    m.set_compute_dtype(DType::F64).unwrap();
    let batch = Batch::left_padded(&[IDS.to_vec(), IDS[2..].to_vec()], 1, &Device::Cpu).unwrap();
    m.backward(&loss(&m, &batch)).unwrap();
    let grads = m.take_grads();
    let probes = [
        ("model.embed_tokens.weight", 5 * 16 + 3),
        ("model.layers.0.self_attn.q_proj.weight", 17),
        ("model.layers.0.self_attn.k_proj.bias", 2),
        ("model.layers.1.self_attn.v_proj.weight", 40),
        ("model.layers.1.mlp.down_proj.weight", 100),
        ("model.layers.0.input_layernorm.weight", 4),
        ("model.norm.weight", 9),
        ("lm_head.weight", 33),
    ];
    // The loss with one master weight moved by `delta` (the f64 compute weights recast after the change).
    fn at(m: &mut Transformer, batch: &Batch, name: &str, orig: &[f32], idx: usize, delta: f32) -> (f64, f64) {
        let mut v = orig.to_vec();
        v[idx] += delta;
        let real = v[idx] as f64 - orig[idx] as f64;
        let var = m.weights[name].clone();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
        m.refresh_compute_weights().unwrap();
        (loss(m, batch).to_scalar::<f64>().unwrap(), real)
    }
    for (name, idx) in probes {
        let analytic = grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        let analytic: f64 =
            analytic.to_dtype(DType::F64).unwrap().flatten_all().unwrap().get(idx).unwrap().to_scalar().unwrap();
        let orig: Vec<f32> = m.weights[name].as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // The weights are stored in f32: use the perturbation f32 can actually represent.
        let eps = 2e-4f32;
        let ((plus, dp), (minus, dm)) =
            (at(&mut m, &batch, name, &orig, idx, eps), at(&mut m, &batch, name, &orig, idx, -eps));
        at(&mut m, &batch, name, &orig, idx, 0.0);
        let numeric = (plus - minus) / (dp - dm);
        let tol = 1e-3 * numeric.abs().max(1e-2);
        assert!((analytic - numeric).abs() <= tol, "{name}[{idx}]: backward {analytic} vs finite difference {numeric}");
    }
}

#[test]
fn one_backward_reaches_every_trainable_parameter() {
    for (family, tied) in [("qwen2", false), ("llama", true), ("qwen3", true)] {
        let m = model_of(tiny_config_of(family, tied), 15);
        let batch = Batch::left_padded(&[IDS.to_vec(), IDS[1..5].to_vec()], 0, &Device::Cpu).unwrap();
        m.backward(&loss(&m, &batch)).unwrap();
        let grads = m.take_grads();
        let mut missing = BTreeMap::new();
        for name in m.weights.keys() {
            let nonzero = grads
                .get(name)
                .map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
                .unwrap_or(false);
            if !nonzero {
                missing.insert(name.clone(), ());
            }
        }
        assert!(missing.is_empty(), "{family}: parameters without gradient: {:?}", missing.keys().collect::<Vec<_>>());
        assert_eq!(m.weights.len(), m.cfg.weight_shapes().len());
    }
}

#[test]
fn temperature_scaled_logprobs_are_log_softmax_of_scaled_logits() {
    let m = model(true, false, 16);
    let batch = Batch::left_padded(&[IDS.to_vec()], 0, &Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = m.forward(&batch, Ops::Differentiable).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let got: Vec<f32> = m
        .next_token_logprobs_range(&batch, 2, 3, 2.0, r1pipe::model::Pass::TRAIN)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (k, g) in got.iter().enumerate() {
        let row: Vec<f64> = logits[2 + k].iter().map(|&x| x as f64 / 2.0).collect();
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let want = row[IDS[3 + k] as usize] - lse;
        assert!((*g as f64 - want).abs() < 1e-4, "position {k}: {g} vs {want}");
    }
}

/// Relative L2 error of `got` against `want`.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_dtype(DType::F64).unwrap(), want.to_dtype(DType::F64).unwrap());
    let d = (&g - &w).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    d / w.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt().max(1e-30)
}

/// bf16 compute with f32 master weights (CUDA's default), tied embeddings and
/// activation checkpointing on: every parameter's gradient against the same
/// model computed in f64 (whose gradients match finite differences, above).
///
/// Tolerance: bf16 keeps 8 significant bits, a relative rounding of 2⁻⁹ ≈ 0.2%
/// per value; a gradient here passes through some 30 rounded ops (two layers
/// forward, recomputed, and back), whose errors add up to 1–1.6% of its norm
/// (measured: the worst parameter of either family). 5% (relative L2, per
/// parameter) bounds that with room for another CPU's float order; a wrong
/// gradient (a missing term, a dropped path) is off by far more.
#[test]
fn bf16_compute_gradients_stay_within_bf16_precision_of_the_f64_reference() {
    for family in ["qwen2", "llama"] {
        // Weights at their initialization scale (std 0.02), as a trained model's are:
        // scaled up, the logits saturate and bf16's rounding of the weights alone moves
        // the gradient by tens of percent, a property of bf16, not of the code.
        let mut m = Transformer::random(tiny_config_of(family, true), 16, &Device::Cpu).unwrap();
        m.gradient_checkpointing = true;
        let batch = Batch::left_padded(&[IDS.to_vec(), IDS[2..].to_vec()], 1, &Device::Cpu).unwrap();
        let grads = |m: &mut Transformer, dt: DType| {
            m.set_compute_dtype(dt).unwrap();
            m.backward(&loss(m, &batch)).unwrap();
            m.take_grads()
        };
        let want = grads(&mut m, DType::F64);
        let got = grads(&mut m, DType::BF16);
        assert_eq!(got.len(), want.len(), "{family}: every parameter has a gradient");
        let mut worst = (0.0, String::new());
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(g.dtype(), DType::F32, "{family}: {name}'s gradient accumulates in f32");
            let e = rel_err(g, w);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        assert!(worst.0 < 0.05, "{family}: {} is {:.2}% off the f64 gradient", worst.1, 100.0 * worst.0);
    }
}

/// The tied embedding's gradient in bf16 compute sums the head's contribution
/// and every position's lookup of a token: with a token repeated over a long
/// sequence that is hundreds of terms, which a bf16 sum rounds away (its
/// running total has 8 significant bits). Gathered from the f32 master and
/// summed in f32, it stays within bf16's rounding of the activations: 0.24%
/// measured, where the bf16 lookup and head gradient it replaced were 41% off.
#[test]
fn a_repeated_tokens_tied_embedding_gradient_accumulates_in_f32() {
    // No decoder layer: the embedding feeds the tied head through the final norm, so
    // the gradient's error is its accumulation's, not the layers' bf16 noise.
    let mut cfg = tiny_config_of("llama", true);
    cfg.num_layers = 0;
    let mut m = Transformer::random(cfg, 17, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..600).map(|i| [3u32, 7, 3, 11][i % 4]).collect();
    let batch = Batch::left_padded(&[ids.clone(), ids[5..].to_vec()], 0, &Device::Cpu).unwrap();
    let grads = |m: &mut Transformer, dt: DType| {
        m.set_compute_dtype(dt).unwrap();
        // Every position's log-probability counts with the same sign: the terms add up.
        m.backward(&m.next_token_logprobs(&batch).unwrap().sum_all().unwrap()).unwrap();
        m.take_grads()
    };
    let want = grads(&mut m, DType::F64);
    let got = grads(&mut m, DType::BF16);
    let e = rel_err(&got["model.embed_tokens.weight"], &want["model.embed_tokens.weight"]);
    assert!(e < 0.02, "the tied embedding's gradient is {:.2}% off in bf16", 100.0 * e);
}

/// The reference policy of GRPO: an f32 frozen copy owns its storage (the
/// optimizer updates the policy in place), and a sync blends in f32 as float64 says.
#[test]
fn a_frozen_copy_owns_its_weights_and_blends_toward_another_model_as_float64_says() {
    let policy = model(true, true, 31);
    let mut reference = policy.frozen_copy(DType::F32, DType::F32).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let before: Vec<f32> = reference.weights[name].flatten_all().unwrap().to_vec1().unwrap();
    policy.weights[name].set(&(policy.weights[name].as_tensor() + 1.0).unwrap()).unwrap();
    let after: Vec<f32> = reference.weights[name].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(before, after, "changing the policy changed its frozen copy");

    let other = model(true, true, 32);
    let theirs = other.tensors();
    let alpha = 0.6;
    let want: Vec<f64> = before
        .iter()
        .zip(theirs[name].flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(|(&w, t)| (1.0 - alpha) * w as f64 + alpha * t as f64)
        .collect();
    reference.blend_weights(&theirs, alpha).unwrap();
    let got: Vec<f32> = reference.weights[name].flatten_all().unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
    }
    // The blended weights are what the model computes with: α = 1 makes it the other model.
    reference.blend_weights(&theirs, 1.0).unwrap();
    let batch = Batch::left_padded(&[vec![1u32, 5, 7, 2]], 0, &Device::Cpu).unwrap();
    let a: Vec<f32> =
        reference.logits(&batch, r1pipe::model::Pass::SCORE).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> =
        other.logits(&batch, r1pipe::model::Pass::SCORE).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

/// The size check counts weights without listing them: it must count what a model has.
#[test]
fn the_parameter_count_of_a_config_is_what_the_model_holds() {
    for family in ["qwen2", "llama", "qwen3"] {
        for tied in [true, false] {
            let cfg = tiny_config_of(family, tied);
            let want = cfg.parameter_count().unwrap();
            let m = Transformer::random(cfg, 1, &Device::Cpu).unwrap();
            assert_eq!(m.num_parameters() as u128, want, "{family}, tied {tied}");
        }
    }
}
