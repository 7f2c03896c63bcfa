//! The CPU kernels of a training step and a decode step, alone, at the shapes
//! the GRPO and SFT benchmarks give them: attention forward and backward
//! (`kernels::attention`) on a packed GRPO row (a shared prompt then its
//! completions, each seeing the prompt and itself) and on causal SFT rows, and
//! the `x @ Wᵀ` of decoding (the unpacked dot-product kernel and the packed
//! one evaluation and inference use), and candle's general f32 matmul (the gemm
//! crate) for scale: the rate a training step's products run at, which bounds
//! the step from below. Prints one table: time per call and the useful
//! arithmetic rate (visible query-key pairs only for attention), and the MLP's
//! gated activation fused and as candle's ops.
//!
//! `cargo bench --bench kernels`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use r1pipe::kernels::{attention as cpu_attention, matmul_t as skinny_matmul, row_exp, swiglu};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Mean seconds per call of `f` (after one warm-up call), over at least `min_s` seconds.
fn time(min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let (t, mut n) = (Instant::now(), 0);
    while n < 3 || t.elapsed().as_secs_f64() < min_s {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// An additive mask [1, 1, T, T] for one packed row: `prompt` tokens, then
/// completions of `completion` tokens each seeing the prompt and themselves.
fn packed_mask(prompt: usize, completions: usize, completion: usize) -> (Tensor, usize) {
    let t = prompt + completions * completion;
    let seg = |i: usize| if i < prompt { None } else { Some((i - prompt) / completion) };
    let mut m = Vec::with_capacity(t * t);
    let mut visible = 0;
    for i in 0..t {
        for j in 0..t {
            let ok = j <= i && (seg(j).is_none() || seg(j) == seg(i));
            visible += ok as usize;
            m.push(if ok { 0.0f32 } else { -1e9 });
        }
    }
    (Tensor::from_vec(m, (1, 1, t, t), &Device::Cpu).unwrap(), visible)
}

fn causal_mask(b: usize, t: usize) -> (Tensor, usize) {
    let m: Vec<f32> = (0..b * t * t).map(|x| if (x % t) <= (x / t) % t { 0.0 } else { -1e9 }).collect();
    (Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap(), b * t * (t + 1) / 2)
}

fn main() {
    r1pipe::common::memory::tune_allocator();
    println!("{:<58} {:>10} {:>9}", "kernel (shape)", "ms/call", "GFLOP/s");
    // SmolLM2: 3 key/value heads of 3 query heads, head_dim 64; Qwen2.5-0.5B: 2 of 7.
    let cases = [
        ("GRPO packed row, SmolLM2 heads (130 + 4 × 128)", 1, 3, 3, packed_mask(130, 4, 128)),
        ("GRPO packed row, Qwen2.5-0.5B heads (150 + 4 × 256)", 1, 2, 7, packed_mask(150, 4, 256)),
        ("SFT causal rows, SmolLM2 heads (4 × 256)", 4, 3, 3, causal_mask(4, 256)),
    ];
    for (name, b, hkv, rep, (mask, visible)) in cases {
        let t = mask.dim(2).unwrap();
        let d = 64;
        let q = Var::from_tensor(&rand(&[b, hkv, rep * t, d], 1)).unwrap();
        let k = Var::from_tensor(&rand(&[b, hkv, t, d], 2)).unwrap();
        let v = Var::from_tensor(&rand(&[b, hkv, t, d], 3)).unwrap();
        let up = rand(&[b, hkv, rep * t, d], 4);
        let pairs = (visible / b * b * hkv * rep) as f64; // visible (query, key) pairs over all heads
        let fwd = time(1.0, || {
            cpu_attention::attention(&q, &k, &v, &mask, 0.125).unwrap();
        });
        // QKᵀ and PV: 2 · 2·D flops per visible pair.
        println!(
            "{:<58} {:>10.2} {:>9.1}",
            format!("attention forward, {name}"),
            fwd * 1e3,
            pairs * 4.0 * d as f64 / fwd / 1e9
        );
        let out = cpu_attention::attention(&q, &k, &v, &mask, 0.125).unwrap();
        let loss = (out * &up).unwrap().sum_all().unwrap();
        let bwd = time(1.0, || {
            loss.backward().unwrap();
        });
        // The backward recomputes the scores (2·D) and does dP, dV, dQ, dK (4 · 2·D) per pair.
        println!(
            "{:<58} {:>10.2} {:>9.1}",
            format!("attention backward, {name}"),
            bwd * 1e3,
            pairs * 10.0 * d as f64 / bwd / 1e9
        );
    }
    // The products of a training step go through candle's matmul (the gemm crate):
    // a square one for the machine's rate, and a SmolLM2 MLP projection over a
    // packed GRPO micro-batch (2 rows of 130 + 4 × 128 tokens).
    for (name, m, k, n) in [("square", 2048, 2048, 2048), ("SmolLM2 MLP up, 2 packed rows", 1284, 576, 1536)] {
        let (a, b) = (rand(&[m, k], 5), rand(&[k, n], 6));
        let s = time(1.0, || {
            a.matmul(&b).unwrap();
        });
        println!(
            "{:<58} {:>10.2} {:>9.1}",
            format!("candle matmul (gemm), {name} [{m} × {k}] @ [{k} × {n}]"),
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
    // The MLP's gated activation over the same micro-batch (1284 tokens × 1536):
    // fused and threaded (kernels::swiglu) against candle's ops, which run it on one thread.
    let (gate, up) = (Var::from_tensor(&rand(&[1284, 1536], 8)).unwrap(), rand(&[1284, 1536], 9));
    let weight = rand(&[1284, 1536], 10);
    for mode in [r1pipe::kernels::Mode::Cpu, r1pipe::kernels::Mode::Portable] {
        let form = if mode == r1pipe::kernels::Mode::Cpu { "fused (swiglu)" } else { "candle ops" };
        r1pipe::kernels::with_mode(mode, || {
            let fwd = time(1.0, || {
                swiglu::silu_mul(gate.as_tensor(), &up).unwrap();
            });
            let both = time(1.0, || {
                let y = swiglu::silu_mul(gate.as_tensor(), &up).unwrap();
                (y * &weight).unwrap().sum_all().unwrap().backward().unwrap();
            });
            for (pass, s) in [("forward", fwd), ("forward + backward", both)] {
                println!("{:<58} {:>10.2} {:>9}", format!("silu(gate)·up {pass}, {form}, [1284 × 1536]"), s * 1e3, "-");
            }
        });
    }
    // The vocabulary log-softmax's arithmetic over one 64 MiB chunk of Qwen's logits
    // (110 rows of 151,936): the max and Σ exp of each row (forward), then the
    // exponentials written out (backward), vectorized and with libm's scalar expf.
    let (rows, v) = (110, 151_936);
    let logits: Vec<f32> = rand(&[rows * v], 7).to_vec1::<f32>().unwrap().iter().map(|x| x * 8.0).collect();
    let mut out = vec![0f32; rows * v];
    type Max = fn(&[f32]) -> f32;
    type SumExp = fn(&[f32], f32, f32) -> f32;
    type WriteExp = fn(&[f32], f32, f32, f32, &mut [f32]);
    let impls: [(&str, Max, SumExp, WriteExp); 2] = [
        ("AVX2 exp (row_exp)", row_exp::max, row_exp::sum_exp, row_exp::write_exp),
        (
            "libm expf, one running sum",
            row_exp::portable::max,
            row_exp::portable::sum_exp,
            row_exp::portable::write_exp,
        ),
    ];
    for (name, max, sum_exp, write_exp) in impls {
        let s = time(1.0, || {
            for (row, o) in logits.chunks(v).zip(out.chunks_mut(v)) {
                let m = max(row);
                let lse = m + sum_exp(row, 1.0, m).ln();
                write_exp(row, 1.0, lse, -1.0, o);
            }
        });
        println!(
            "{:<58} {:>10.2} {:>9}",
            format!("log-softmax rows fwd+bwd, {name}, [{rows} × {v}], 1 thread"),
            s * 1e3,
            "-"
        );
    }
    for (name, n, k) in [
        ("SmolLM2 q/o", 576, 576),
        ("SmolLM2 k/v", 192, 576),
        ("SmolLM2 MLP up", 1536, 576),
        ("SmolLM2 MLP down", 576, 1536),
        ("SmolLM2 vocabulary", 49152, 576),
        ("Qwen2.5-0.5B MLP up", 4864, 896),
    ] {
        let w: Vec<f32> = (0..n * k).map(|i| (i % 97) as f32 * 0.01).collect();
        let w = w.as_slice();
        let packed = r1pipe::kernels::packed::PackedWeight::pack(w, n, k);
        let bf16 = r1pipe::kernels::packed::PackedWeight::pack_as(w, n, k, r1pipe::kernels::packed::Precision::Bf16);
        for m in [1, 8, 16, 32] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let x = x.as_slice();
            let mut out = vec![0f32; m * n];
            let s = time(0.5, || skinny_matmul::matmul_t_slices(x, w, m, n, k, &mut out));
            println!(
                "{:<58} {:>10.3} {:>9.1}",
                format!("skinny x @ Wᵀ, {name} [{m} × {k}] @ [{n} × {k}]ᵀ"),
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
            let s = time(0.5, || r1pipe::kernels::packed::matmul_packed(x, m, &packed, &mut out));
            println!(
                "{:<58} {:>10.3} {:>9.1}",
                format!("packed x @ Wᵀ, {name} [{m} × {k}] @ [{n} × {k}]ᵀ"),
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
            let s = time(0.5, || r1pipe::kernels::packed::matmul_packed(x, m, &bf16, &mut out));
            println!(
                "{:<58} {:>10.3} {:>9.1}",
                format!("packed bf16 x @ Wᵀ, {name} [{m} × {k}] @ [{n} × {k}]ᵀ"),
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
