//! Peak memory and step time of GRPO and SFT, each run as its own `r1pipe`
//! process under `/usr/bin/time -v` (peak RSS as the kernel counts it):
//!
//! 1. SmolLM2-135M-Instruct at the issue's table config: 2 prompts × 4
//!    completions × ≤128 tokens, β 0.04, lr 3e-6, temperature 0.9, 3 steps.
//! 2. The Qwen2.5-0.5B shape (random weights from ../shared's config.json,
//!    SmolLM2's tokenizer) at the seeds' shape: 16 completions × ≤256 tokens,
//!    8 per prompt (per_device 4 × accumulation 4), β 0.04, one step.
//! 3. SFT on the Qwen shape: one step of 4 packed rows of ≤1024 tokens.
//!
//! Each row also shows the resident set once the stage has ended (the run
//! log's "memory after stage": what an evaluation after training starts from).
//! Each row also runs with `gradient_checkpointing: false` (and, for β > 0,
//! the exact f32 reference copy) so the table shows what each saving is worth.
//!
//! `cargo bench --bench grpo_memory` (needs scripts/fetch-smollm2.sh and ../shared);
//! `R1PIPE_BENCH_ONLY=reference|smollm2|qwen|sft` runs one group (`reference`:
//! the KL error of the bf16 reference copy).

use std::fs;
use std::path::Path;
use std::process::Command;

struct Row {
    label: String,
    peak_rss_gb: f64,
    /// Resident memory once the stage has ended and handed its freed memory back
    /// (the runner's "memory after stage" event), what the next stage starts from.
    after_gb: f64,
    steady_step_s: f64,
    wall_s: f64,
    extra: String,
}

fn run(dir: &Path, label: &str, pipeline: &str, stage: &str) -> Row {
    let file = format!("{}.yaml", label.replace([' ', ',', '=', '(', ')'], "_"));
    fs::write(dir.join(&file), pipeline).unwrap();
    let t = std::time::Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-v", env!("CARGO_BIN_EXE_r1pipe"), "run", &file])
        .current_dir(dir)
        .output()
        .expect("running /usr/bin/time (apt-get install time)");
    let wall_s = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kb: f64 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes): "))
        .and_then(|v| v.trim().parse().ok())
        .expect("/usr/bin/time -v prints the peak RSS");
    if !out.status.success() {
        // A run the kernel killed for memory is a result too (the point of the comparison).
        let why = if stderr.contains("signal 9") { "killed by the kernel (out of memory)" } else { "failed" };
        eprintln!("{label} {why}:\n{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
        return Row {
            label: label.into(),
            peak_rss_gb: kb / (1024.0 * 1024.0),
            after_gb: f64::NAN,
            steady_step_s: f64::NAN,
            wall_s,
            extra: why.into(),
        };
    }
    let show = Command::new(env!("CARGO_BIN_EXE_r1pipe"))
        .args(["show", &format!("{stage}.log"), "-p", &file])
        .current_dir(dir)
        .output()
        .unwrap();
    let log = fs::read_to_string(String::from_utf8_lossy(&show.stdout).trim()).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The first step also pays for first-touch allocation: report the median of the rest when there is one.
    let mut times: Vec<f64> = lines.iter().map(|v| v["step_time"].as_f64().unwrap_or(f64::NAN)).collect();
    let steady = if times.len() > 1 { times.split_off(1) } else { times };
    let mut steady = steady;
    steady.sort_by(f64::total_cmp);
    let last = lines.last().unwrap();
    let f = |k: &str| last[k].as_f64().unwrap_or(f64::NAN);
    let extra = if stage == "grpo" {
        format!(
            "gen {:.1} s, ref {:.1} s, policy {:.1} s, opt {:.2} s, len {:.0}",
            f("timing/generation"),
            f("timing/reference"),
            f("timing/policy_forward_backward"),
            f("timing/optimizer"),
            f("completions/mean_length")
        )
    } else {
        format!("{:.0} tokens/s", f("tokens_per_second"))
    };
    Row {
        label: label.into(),
        peak_rss_gb: kb / (1024.0 * 1024.0),
        after_gb: rss_after_stage(&dir.join("cache/runs"), stage),
        steady_step_s: steady[steady.len() / 2],
        wall_s,
        extra,
    }
}

/// The resident set (GB) the run log records when `stage` ended, from the newest run log.
fn rss_after_stage(runs: &Path, stage: &str) -> f64 {
    let newest = fs::read_dir(runs).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).max().unwrap();
    fs::read_to_string(&newest)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "memory after stage" && v["fields"]["stage"] == stage)
        .find_map(|v| v["fields"]["rss_mib"].as_f64())
        .map_or(f64::NAN, |mib| mib / 1024.0)
}

fn grpo_pipeline(data: &Path, model: &Path, rewards: &Path, body: &str) -> String {
    format!(
        r#"
name: bench
device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ path: "{data}" }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}", limit: {{ train: 32, test: 1 }}, shuffle_seed: 0 }} }}
  grpo:
    kind: grpo
    with:
      model: "{model}"
      train: ${{prompts.train}}
      rewards: "{rewards}"
      learning_rate: 3.0e-6
      temperature: 0.9
      beta: 0.04
      save_steps: 1000
{body}"#,
        data = data.display(),
        model = model.display(),
        rewards = rewards.display(),
    )
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let smol = root.join("models/smollm2-135m-instruct");
    let shared = std::env::var_os("R1PIPE_SHARED").map(Into::into).unwrap_or_else(|| root.join("../shared"));
    let data = Path::new(&shared).join("data/gsm8k");
    let qcfg = Path::new(&shared).join("models/qwen2.5-0.5b-instruct/config.json");
    if !smol.exists() || !data.exists() || !qcfg.exists() {
        println!(
            "grpo_memory: skipped: needs {} (scripts/fetch-smollm2.sh), {} and {}",
            smol.display(),
            data.display(),
            qcfg.display()
        );
        return;
    }
    let only = std::env::var("R1PIPE_BENCH_ONLY").ok();
    let want = |g: &str| only.as_deref().is_none_or(|o| o == g);
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("stages")).unwrap();
    let rewards = root.join("stages/rewards/r1-gsm8k.yaml");
    if want("reference") {
        reference_precision(&smol, &data);
    }
    println!(
        "{:<44} {:>13} {:>14} {:>15} {:>9}  split",
        "run", "peak RSS GB", "RSS after GB", "step s (steady)", "wall s"
    );
    let mut rows = Rows;

    if want("smollm2") {
        for ck in [true, false] {
            let body = format!(
                "      per_device_train_batch_size: 4\n      gradient_accumulation_steps: 2\n      num_generations: 4\n      max_completion_length: 128\n      max_steps: 3\n      gradient_checkpointing: {ck}\n"
            );
            let label = format!("SmolLM2 2×4×128 β0.04 ckpt={ck}");
            rows.push(run(dir.path(), &label, &grpo_pipeline(&data, &smol, &rewards, &body), "grpo"));
        }
    }
    if want("qwen") || want("sft") {
        // The Qwen2.5-0.5B shape with random weights, beside SmolLM2's tokenizer files.
        let qdir = dir.path().join("qwen-shape");
        let cfg = r1pipe::model::Config::from_json(serde_json::from_str(&fs::read_to_string(&qcfg).unwrap()).unwrap())
            .unwrap();
        let m = r1pipe::model::Transformer::random(cfg, 0, &candle_core::Device::Cpu).unwrap();
        r1pipe::model::load::save(&m, &smol, &qdir).unwrap();
        drop(m);
        if want("qwen") {
            for (ck, reference) in [(true, "bf16"), (false, "bf16"), (true, "f32")] {
                let body = format!(
                    "      per_device_train_batch_size: 4\n      gradient_accumulation_steps: 4\n      num_generations: 8\n      max_completion_length: 256\n      max_steps: 1\n      gradient_checkpointing: {ck}\n      reference_dtype: {reference}\n"
                );
                let label = format!("Qwen0.5B 16×256 β0.04 ckpt={ck} ref={reference}");
                rows.push(run(dir.path(), &label, &grpo_pipeline(&data, &qdir, &rewards, &body), "grpo"));
            }
        }
        if want("sft") {
            for ck in [true, false] {
                let pipeline = format!(
                    r#"
name: bench
device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ path: "{data}" }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}", limit: {{ train: 64, test: 1 }}, shuffle_seed: 0 }} }}
  sft:
    kind: sft
    with:
      model: "{model}"
      train: ${{prompts.sft}}
      packing: true
      max_length: 1024
      per_device_train_batch_size: 18
      max_steps: 2
      save_steps: 1000
      gradient_checkpointing: {ck}
"#,
                    data = data.display(),
                    model = qdir.display(),
                );
                rows.push(run(dir.path(), &format!("Qwen0.5B SFT 4×≤1024 packed ckpt={ck}"), &pipeline, "sft"));
            }
        }
    }
}

/// What holding GRPO's reference copy in bf16 costs in KL accuracy: at step 0 the
/// policy *is* the reference, so the true KL is 0 and whatever the bf16 copy
/// reports is its error. SmolLM2, 8 GSM8K prompts with 64 sampled tokens each.
fn reference_precision(model: &Path, data: &Path) {
    use candle_core::DType;
    use r1pipe::model::{generate, load, Batch, ModelRef, Pass, SamplingParams};
    use rand::SeedableRng;
    let m = load::load(&ModelRef::Dir(model.to_path_buf()), &candle_core::Device::Cpu, DType::F32).unwrap();
    let text = fs::read_to_string(data.join("train.jsonl")).unwrap();
    let prompts: Vec<Vec<u32>> = text
        .lines()
        .take(8)
        .map(|l| {
            let q = serde_json::from_str::<serde_json::Value>(l).unwrap()["question"].as_str().unwrap().to_string();
            let msgs = [
                r1pipe::model::Message::new("system", r1pipe::data::gsm8k::R1_SYSTEM_PROMPT),
                r1pipe::model::Message::new("user", &q),
            ];
            m.tokenizer.encode_chat(&msgs, true).unwrap()
        })
        .collect();
    let params = SamplingParams { temperature: 0.9, max_new_tokens: 64, ..Default::default() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let comps = generate(&m.model, &m.tokenizer, &prompts, 1, &params, &mut rng, None).unwrap();
    let specs: Vec<r1pipe::train::grpo::RowSpec> = comps
        .iter()
        .map(|c| r1pipe::train::grpo::RowSpec {
            prompt: &prompts[c.prompt_index],
            tokens: &c.tokens,
            eos: c.eos,
            tool_spans: &c.tool_spans,
        })
        .collect();
    let rows = r1pipe::train::grpo::build_rows(&specs, m.tokenizer.eos_ids[0], 64, false);
    let packed = rows.pack(0..rows.len());
    let b = Batch::shared_prefix(&packed.rows, m.tokenizer.pad_id, &candle_core::Device::Cpu).unwrap();
    let lp = |t: &r1pipe::model::Transformer| -> Vec<Vec<f32>> {
        t.logprobs_at(&b, &packed.at, &packed.targets, 0.9, Pass::SCORE)
            .unwrap()
            .reshape((rows.len(), rows.completion_len))
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let policy = lp(&m.model);
    let exact = lp(&m.model.frozen_copy(DType::F32, DType::F32).unwrap());
    let half = lp(&m.model.frozen_copy(DType::BF16, DType::F32).unwrap());
    let (mut max_d, mut sum_d, mut kl_exact, mut kl_bf16, mut n) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for i in 0..policy.len() {
        for j in 0..rows.completion_len {
            if rows.masks[i][j] == 0.0 {
                continue;
            }
            let k3 = |r: f32, p: f32| {
                let d = (r - p) as f64;
                d.exp() - d - 1.0
            };
            let d = (half[i][j] - policy[i][j]).abs() as f64;
            max_d = max_d.max(d);
            sum_d += d;
            kl_exact += k3(exact[i][j], policy[i][j]);
            kl_bf16 += k3(half[i][j], policy[i][j]);
            n += 1.0;
        }
    }
    println!(
        "reference precision (SmolLM2, {n} sampled tokens, step 0 where the true KL is 0): f32 copy KL {:.2e}; \
         bf16 copy KL {:.2e}, |Δ log p| mean {:.2e}, max {:.2e}",
        kl_exact / n,
        kl_bf16 / n,
        sum_d / n,
        max_d
    );
}

/// The table, a row printed as soon as its run ends.
struct Rows;

impl Rows {
    fn push(&mut self, r: Row) {
        println!(
            "{:<44} {:>13.2} {:>14.2} {:>15.1} {:>9.0}  {}",
            r.label, r.peak_rss_gb, r.after_gb, r.steady_step_s, r.wall_s, r.extra
        );
    }
}
