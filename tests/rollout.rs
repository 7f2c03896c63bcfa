//! GRPO with its rollouts on an OpenAI-compatible server: a stand-in server
//! (tiny_http) checks the requests, answers with scripted completions (token
//! ids and log-probabilities, as vLLM does) and records the LoRA adapters it is
//! handed. Also: transient failures survived, a dead server ending the stage
//! with its URL and the checkpoint kept, and the validation rules.

mod common;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::{gsm8k_rows, tiny_model, Project};
use r1pipe::model::ChatTokenizer;
use serde_json::{json, Value};

/// What the stand-in server saw.
#[derive(Default)]
struct Seen {
    /// Each completions request's body.
    completions: Vec<Value>,
    /// (adapter name, tensor names in its safetensors at load time).
    loads: Vec<(String, Vec<String>)>,
    unloads: Vec<String>,
}

struct StandIn {
    url: String,
    seen: Arc<Mutex<Seen>>,
    /// Completions answered before the server goes down (503 to everything).
    answer_at_most: Arc<AtomicU32>,
    /// Completions requests to fail (503, then malformed JSON, alternating) before answering.
    fail_next: Arc<AtomicU32>,
    /// 0: answer as vLLM does (token ids, log-probabilities); 1: text only, like a plain OpenAI server;
    /// 2: token ids beyond the vocabulary, as a server of another model would; 3: a Hermes
    /// calculator call first (stopped at `</tool_call>`), the usual answer once the prompt
    /// holds the tool's result.
    text_only: Arc<AtomicU32>,
}

/// Scripted completions: alternately starting with a capital (reward 1 under
/// `^[A-Z]`) and not, ending with EOS, each token at log-probability −1.5.
fn answer(tok: &ChatTokenizer, n: usize) -> Value {
    let texts = ["Yes, 4", "no idea", "It is 6", "maybe 3"];
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let text = texts[i % texts.len()];
            let mut ids = tok.encode(text).unwrap();
            ids.push(tok.eos_ids[0]);
            let lps = vec![-1.5f32; ids.len()];
            json!({"index": i, "text": text, "finish_reason": "stop", "stop_reason": null,
                   "token_ids": ids, "logprobs": {"token_logprobs": lps}})
        })
        .collect();
    json!({ "id": "cmpl-1", "object": "text_completion", "choices": choices })
}

/// A Hermes call to the calculator, ended by the stop string as vLLM ends it
/// (`include_stop_str_in_output`: the closing tag in the text and the ids).
const CALL: &str = r#"<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>"#;

fn tool_call(tok: &ChatTokenizer, n: usize) -> Value {
    let ids = tok.encode(CALL).unwrap();
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            json!({"index": i, "text": CALL, "finish_reason": "stop", "stop_reason": "</tool_call>",
                   "token_ids": ids, "logprobs": {"token_logprobs": vec![-0.5f32; ids.len()]}})
        })
        .collect();
    json!({ "id": "cmpl-2", "object": "text_completion", "choices": choices })
}

fn stand_in(model_dir: PathBuf) -> StandIn {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let answer_at_most = Arc::new(AtomicU32::new(u32::MAX));
    let fail_next = Arc::new(AtomicU32::new(0));
    let text_only = Arc::new(AtomicU32::new(0));
    let (s, most, f, plain) = (seen.clone(), answer_at_most.clone(), fail_next.clone(), text_only.clone());
    std::thread::spawn(move || {
        let tok = ChatTokenizer::from_dir(&model_dir).unwrap();
        for mut rq in server.incoming_requests() {
            let mut body = String::new();
            rq.as_reader().read_to_string(&mut body).unwrap();
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let down = s.lock().unwrap().completions.len() as u32 >= most.load(Ordering::SeqCst);
            let (status, text) = if down {
                (503, "server is down".to_string())
            } else {
                match rq.url() {
                    "/v1/completions" => {
                        let left = f.load(Ordering::SeqCst);
                        if left > 0 {
                            f.store(left - 1, Ordering::SeqCst);
                            if left % 2 == 0 {
                                (503, "busy".into())
                            } else {
                                (200, "{\"choices\": [".into())
                            }
                        } else {
                            let n = v["n"].as_u64().unwrap() as usize;
                            let mode = plain.load(Ordering::SeqCst);
                            let prompt: Vec<u32> = serde_json::from_value(v["prompt"].clone()).unwrap_or_default();
                            let answered = tok.decode(&prompt).unwrap_or_default().contains("</tool_call>");
                            s.lock().unwrap().completions.push(v);
                            let mut a = if mode == 3 && !answered { tool_call(&tok, n) } else { answer(&tok, n) };
                            for c in a["choices"].as_array_mut().unwrap() {
                                let c = c.as_object_mut().unwrap();
                                if mode == 1 {
                                    c.remove("token_ids");
                                    c.remove("logprobs");
                                } else if mode == 2 {
                                    c["token_ids"][0] = json!(4_000_000_000u32);
                                }
                            }
                            (200, a.to_string())
                        }
                    }
                    "/v1/load_lora_adapter" => {
                        let dir = PathBuf::from(v["lora_path"].as_str().unwrap());
                        let cfg: Value =
                            serde_json::from_str(&fs::read_to_string(dir.join("adapter_config.json")).unwrap())
                                .unwrap();
                        assert_eq!(cfg["peft_type"], "LORA");
                        let names: Vec<String> = candle_core::safetensors::load(
                            dir.join("adapter_model.safetensors"),
                            &candle_core::Device::Cpu,
                        )
                        .unwrap()
                        .into_keys()
                        .collect();
                        s.lock().unwrap().loads.push((v["lora_name"].as_str().unwrap().to_string(), names));
                        (200, "Success: LoRA adapter added successfully.".into())
                    }
                    "/v1/unload_lora_adapter" => {
                        s.lock().unwrap().unloads.push(v["lora_name"].as_str().unwrap().to_string());
                        (200, "Success".into())
                    }
                    other => (404, format!("no route {other}")),
                }
            };
            let _ = rq.respond(tiny_http::Response::from_string(text).with_status_code(status));
        }
    });
    StandIn { url, seen, answer_at_most, fail_next, text_only }
}

fn project() -> Project {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 5);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(8));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(1));
    p
}

fn pipeline(url: &str, steps: u64, extra: &str) -> String {
    format!(
        r#"device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ path: data/gsm8k }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}" }} }}
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${{prompts.train}}
      rewards: [ {{ name: regex_match, params: {{ pattern: "^[A-Z]" }} }} ]
      learning_rate: 0.05
      per_device_train_batch_size: 8
      num_generations: 4
      max_completion_length: 16
      max_steps: {steps}
      save_steps: 1
      log_completions: 1
      lora: {{ r: 4, alpha: 8, target_modules: [q_proj, v_proj] }}
      rollout: {{ url: "{url}", model: served-base, retry_backoff_s: 0.01, max_retries: 3 }}
{extra}"#
    )
}

fn log(p: &Project) -> Vec<Value> {
    fs::read_to_string(p.run(&["show", "grpo.log"]).ok().stdout.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn grpo_takes_every_completion_from_the_server_and_hands_it_an_adapter_per_update() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    p.write("pipe.yaml", &pipeline(&server.url, 3, ""));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stderr.contains(&format!("rollouts from {}", server.url)), "{}", r.stderr);

    let seen = server.seen.lock().unwrap();
    // 3 rounds × 2 prompts, one request per prompt asking for the whole group.
    assert_eq!(seen.completions.len(), 6);
    let tok = ChatTokenizer::from_dir(&p.root().join("models/tiny")).unwrap();
    for (i, c) in seen.completions.iter().enumerate() {
        assert_eq!((c["n"].as_u64(), c["max_tokens"].as_u64()), (Some(4), Some(16)), "{c}");
        let prompt: Vec<u32> = serde_json::from_value(c["prompt"].clone()).unwrap();
        let text = tok.decode(&prompt).unwrap();
        assert!(text.contains("apples"), "request {i}: the prompt is the chat-templated question: {text:?}");
        assert!(c["seed"].is_u64() && c["return_token_ids"] == true && c["logprobs"] == 0, "{c}");
    }
    // Round 0 samples the base (fresh adapters are the identity); each later round, the adapter of its step.
    let models: Vec<&str> = seen.completions.iter().map(|c| c["model"].as_str().unwrap()).collect();
    assert_eq!(models[..2], ["served-base", "served-base"]);
    assert!(models[2].ends_with("-step1") && models[3] == models[2], "{models:?}");
    assert!(models[4].ends_with("-step2") && models[5] == models[4], "{models:?}");
    let loaded: Vec<&str> = seen.loads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(loaded, [models[2], models[4]]);
    assert_eq!(seen.unloads, [models[2]], "the adapter before the current one is unloaded");
    let names = &seen.loads[0].1;
    assert_eq!(names.len(), 2 * 2 * 2, "2 layers × q, v × A, B: {names:?}");
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()));

    // Training saw the server's completions and their log-probabilities.
    let l = log(&p);
    assert_eq!(l.len(), 3);
    let logged: Vec<&str> =
        l[0]["completions"].as_array().unwrap().iter().map(|c| c["completion"].as_str().unwrap()).collect();
    assert_eq!(logged, ["Yes, 4", "no idea", "It is 6", "maybe 3"]);
    assert_eq!(l[0]["reward"].as_f64(), Some(0.5));
    for s in &l {
        let d = s["sampling/sampling_logp_difference/mean"].as_f64().expect("the mismatch is logged");
        assert!(d > 0.0 && d.is_finite(), "{s}");
        let w = s["sampling/importance_sampling_ratio/mean"].as_f64().expect("the correction is on by default (TRL's)");
        assert!(w > 0.0 && w.is_finite(), "{s}");
    }
    // The stage's own outputs: the merged model and the last adapter.
    let adapter = PathBuf::from(p.run(&["show", "grpo.adapter"]).ok().stdout.trim());
    assert!(adapter.join("adapter_config.json").exists());
}

#[test]
fn the_importance_sampling_correction_weights_tokens_when_asked() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    let mut text = pipeline(&server.url, 1, "");
    text = text.replace(
        "      log_completions: 1\n",
        "      log_completions: 1\n      vllm_importance_sampling_correction: true\n      vllm_importance_sampling_clip_max: 2.0\n",
    );
    p.write("pipe.yaml", &text);
    p.run(&["run", "pipe.yaml"]).ok();
    let l = log(&p);
    let (lo, mean, hi) = (
        l[0]["sampling/importance_sampling_ratio/min"].as_f64().unwrap(),
        l[0]["sampling/importance_sampling_ratio/mean"].as_f64().unwrap(),
        l[0]["sampling/importance_sampling_ratio/max"].as_f64().unwrap(),
    );
    // The stand-in claims −1.5 per token; a random tiny model over 49k tokens gives ≈ −10.8,
    // so exp(πold − πsampler) is far below 1 and never reaches the cap.
    assert!(0.0 < lo && lo <= mean && mean <= hi && hi <= 2.0, "{lo} {mean} {hi}");
}

#[test]
fn a_server_that_fails_twice_then_answers_is_survived() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    server.fail_next.store(2, Ordering::SeqCst);
    p.write("pipe.yaml", &pipeline(&server.url, 1, ""));
    p.run(&["run", "pipe.yaml"]).ok();
    assert_eq!(server.seen.lock().unwrap().completions.len(), 2);
    assert_eq!(server.fail_next.load(Ordering::SeqCst), 0);
}

#[test]
fn a_server_that_stops_answering_ends_the_stage_naming_it_and_the_run_resumes_later() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    p.write("pipe.yaml", &pipeline(&server.url, 3, ""));
    // Up for the first two rounds (steps 0 and 1, checkpointed), then down.
    server.answer_at_most.store(4, Ordering::SeqCst);
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&format!("{}/", server.url)) && r.stderr.contains("server is down"), "{}", r.stderr);
    assert_eq!(p.stage_checkpoint_step("grpo"), Some(2), "the checkpoint of the last finished step is kept");

    server.answer_at_most.store(u32::MAX, Ordering::SeqCst);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.decision("grpo").starts_with("resume from step 2"), "{}", r.stdout);
    let seen = server.seen.lock().unwrap();
    // The resumed run hands over its restored adapters before its first round.
    assert!(seen.loads.last().unwrap().0.ends_with("-step2"), "{:?}", seen.loads);
    assert_eq!(log(&p).len(), 3);
}

#[test]
fn rollout_settings_are_validated_and_transport_settings_do_not_rerun() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    let good = pipeline(&server.url, 1, "");

    let full = good.replace("      lora: { r: 4, alpha: 8, target_modules: [q_proj, v_proj] }\n", "");
    p.write("pipe.yaml", &full);
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("full fine-tuning has no way to send it the updated ones") && r.stderr.contains("lora:"),
        "{}",
        r.stderr
    );

    p.write("pipe.yaml", &good.replace("model: served-base,", "model: served-base, api_key: sk-123,"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("rollout.api_key") && r.stderr.contains("api_key_env"), "{}", r.stderr);
    assert!(!r.stderr.contains("sk-123"), "the key is not echoed");

    p.write("pipe.yaml", &good.replace(&server.url, "localhost:8000"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("rollout.url") && r.stderr.contains("http://localhost:8000/v1"), "{}", r.stderr);

    p.write("pipe.yaml", &good);
    p.run(&["run", "pipe.yaml"]).ok();
    let tuned = good.replace("max_retries: 3", "max_retries: 9, timeout_s: 30, max_concurrency: 2");
    p.write("pipe.yaml", &tuned);
    assert!(p.run(&["run", "pipe.yaml"]).ok().skipped("grpo"), "transport settings are not in the fingerprint");
    p.write("pipe.yaml", &tuned.replace("served-base", "another-base"));
    let r = p.run(&["run", "--dry-run", "pipe.yaml"]).ok();
    assert!(!r.skipped("grpo"), "the served model is: {}", r.stdout);
}

#[test]
fn evaluate_and_infer_ask_a_served_model() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(3));
    let url = &server.url;
    p.write(
        "pipe.yaml",
        &format!(
            r#"device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ path: data/gsm8k }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}" }} }}
  evaluate:
    kind: evaluate
    with:
      test: ${{prompts.test}}
      max_new_tokens: 8
      models:
        local: models/tiny
        served: {{ model: models/tiny, rollout: {{ url: "{url}", model: served-base }} }}
  infer:
    kind: infer
    with:
      model: models/tiny
      questions: [What is 2 + 2?]
      rollout: {{ url: "{url}", model: served-base }}
"#
        ),
    );
    p.run(&["run", "pipe.yaml"]).ok();
    let samples: Vec<Value> = fs::read_to_string(p.run(&["show", "evaluate.samples"]).ok().stdout.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let served: Vec<&str> =
        samples.iter().filter(|s| s["model"] == "served").map(|s| s["completion"].as_str().unwrap()).collect();
    assert_eq!(served, ["Yes, 4", "Yes, 4", "Yes, 4"], "the served model's answers");
    assert_eq!(samples.iter().filter(|s| s["model"] == "local").count(), 3, "and the local model's beside them");
    let answers = fs::read_to_string(p.run(&["show", "infer.answers"]).ok().stdout.trim()).unwrap();
    assert!(answers.contains("\"completion\":\"Yes, 4\""), "{answers}");
    let seen = server.seen.lock().unwrap();
    // 3 questions for evaluate (one request each, n = 1, greedy) and 1 for infer.
    assert_eq!(seen.completions.len(), 4);
    assert!(seen.completions.iter().all(|c| c["n"] == 1 && c["temperature"] == 0.0 && c["max_tokens"].is_u64()));
    assert!(
        seen.completions.iter().all(|c| c.get("logprobs").is_none()),
        "no log-probabilities asked outside training"
    );

    // A served entry without its server is named with its path.
    let text = fs::read_to_string(p.root().join("pipe.yaml")).unwrap();
    p.write("pipe.yaml", &text.replace(&format!(", rollout: {{ url: \"{url}\", model: served-base }} }}"), " }"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("models.served.rollout"), "{}", r.stderr);
}

#[test]
fn a_server_that_returns_only_text_has_it_tokenized_for_training() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    server.text_only.store(1, Ordering::SeqCst);
    p.write("pipe.yaml", &pipeline(&server.url, 1, ""));
    p.run(&["run", "pipe.yaml"]).ok();
    let l = log(&p);
    let tok = ChatTokenizer::from_dir(&p.root().join("models/tiny")).unwrap();
    let lengths: Vec<usize> =
        ["Yes, 4", "no idea", "It is 6", "maybe 3"].iter().map(|t| tok.encode(t).unwrap().len()).collect();
    let want = lengths.iter().sum::<usize>() as f64 / 4.0;
    assert_eq!(l[0]["completions/mean_length"].as_f64(), Some(want), "{}", l[0]);
    assert_eq!(
        l[0]["completions/clipped_ratio"].as_f64(),
        Some(0.0),
        "finish_reason stop without a stop string is EOS"
    );
    assert!(l[0].get("sampling/sampling_logp_difference/mean").is_none(), "no log-probabilities, no mismatch to log");

    // The correction (on by default) cannot run without them: the run says so once and goes on.
    let r = p.run(&["run", "pipe.yaml", "--force", "grpo"]).ok();
    let said = r.stderr.matches("vllm_importance_sampling_correction is skipped").count();
    assert_eq!(said, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&server.url), "{}", r.stderr);
}

#[test]
fn a_token_id_outside_the_vocabulary_ends_the_stage_naming_the_server() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    server.text_only.store(2, Ordering::SeqCst);
    p.write("pipe.yaml", &pipeline(&server.url, 1, ""));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("rollout server {}", server.url)), "{}", r.stderr);
    assert!(r.stderr.contains("returned token id 4000000000, outside the tokenizer's"), "{}", r.stderr);
}

#[test]
fn hermes_tool_calls_are_answered_here_on_a_servers_rollouts() {
    let p = project();
    let server = stand_in(p.root().join("models/tiny"));
    server.text_only.store(3, Ordering::SeqCst);
    let text = pipeline(&server.url, 1, "      tools: [calculator]\n      tool_call_format: hermes\n")
        .replace("max_completion_length: 16", "max_completion_length: 64");
    p.write("pipe.yaml", &text);
    p.run(&["run", "pipe.yaml"]).ok();

    let seen = server.seen.lock().unwrap();
    let tok = ChatTokenizer::from_dir(&p.root().join("models/tiny")).unwrap();
    let prompts: Vec<String> = seen
        .completions
        .iter()
        .map(|c| tok.decode(&serde_json::from_value::<Vec<u32>>(c["prompt"].clone()).unwrap()).unwrap())
        .collect();
    // Every request stops at a call's end and keeps it; the calls' rows come back with
    // the calculator's result after the call, rendered by the chat template.
    for c in seen.completions.iter() {
        assert_eq!(c["stop"], json!(["</tool_call>"]), "{c}");
        assert_eq!(c["include_stop_str_in_output"], true, "{c}");
    }
    let (first, second): (Vec<&String>, Vec<&String>) = prompts.iter().partition(|t| !t.contains("</tool_call>"));
    assert_eq!(first.len(), second.len(), "each row: one call, then its continuation");
    assert!(!second.is_empty());
    for t in &second {
        assert!(t.ends_with("</tool_call>\ntool\n42\nassistant\n"), "{t:?}");
    }
    let l = log(&p);
    assert_eq!(l[0]["tools/call_frequency"].as_f64(), Some(1.0), "{}", l[0]);
    assert_eq!(l[0]["tools/failure_frequency"].as_f64(), Some(0.0), "{}", l[0]);
    let logged = l[0]["completions"][0]["completion"].as_str().unwrap();
    assert!(logged.starts_with(CALL) && logged.contains("42") && logged.ends_with("Yes, 4"), "{logged:?}");
    drop(seen);

    // An inline call has no end a server can stop on: refused, saying what to use.
    p.write("inline.yaml", &pipeline(&server.url, 1, "      tools: [calculator]\n"));
    let r = p.run(&["run", "inline.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("tool_call_format: hermes"), "{}", r.stderr);
}

#[test]
fn a_run_killed_during_a_tool_call_resumes_to_the_same_model_bytes() {
    // A tool program that logs each call, then takes a while to answer: the run is
    // killed (SIGKILL) while the first call after a checkpoint is in progress.
    let tool = "import sys, json, time\nfor line in sys.stdin:\n    open(sys.argv[1], 'a').write(line)\n    \
                time.sleep(0.3)\n    print(json.dumps({'result': '42'}), flush=True)\n";
    let run = |kill_during_call: bool| -> (Vec<u8>, usize) {
        let p = project();
        let server = stand_in(p.root().join("models/tiny"));
        server.text_only.store(3, Ordering::SeqCst);
        p.write("slow_calc.py", tool);
        let calls = p.root().join("calls.log");
        let extra = format!(
            "      tools: [ {{ command: [python3, slow_calc.py, \"{}\"], name: calculator, timeout_s: 30 }} ]\n      \
             tool_call_format: hermes\n",
            calls.display()
        );
        p.write(
            "pipe.yaml",
            &pipeline(&server.url, 3, &extra).replace("max_completion_length: 16", "max_completion_length: 64"),
        );
        if kill_during_call {
            let mut child = p.spawn(&["run", "pipe.yaml"]);
            p.wait_for_checkpoint(1, std::time::Duration::from_secs(120));
            let start = std::time::Instant::now();
            // 8 rows call once per round: the 9th call is the next round's first.
            while fs::read_to_string(&calls).map_or(0, |t| t.lines().count()) < 9 {
                assert!(start.elapsed().as_secs() < 60, "no tool call after the checkpoint");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            child.kill().unwrap();
            child.wait().unwrap();
            // The tool program dies with r1pipe (its parent-death signal), mid-call or not.
            let alive = || {
                fs::read_dir("/proc").unwrap().flatten().any(|e| {
                    fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*calls.to_string_lossy()))
                })
            };
            let start = std::time::Instant::now();
            while alive() {
                assert!(start.elapsed().as_secs() < 10, "the tool program outlived the killed run");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let r = p.run(&["run", "pipe.yaml"]).ok();
            assert!(r.decision("grpo").starts_with("resume from step"), "{}", r.stdout);
        } else {
            p.run(&["run", "pipe.yaml"]).ok();
        }
        let n = fs::read_to_string(&calls).unwrap().lines().count();
        (common::grpo_weights(&p), n)
    };
    let (whole, whole_calls) = run(false);
    let (resumed, resumed_calls) = run(true);
    assert_eq!(whole_calls, 24, "3 rounds × 8 rows, one call each");
    assert!(resumed_calls > whole_calls, "the interrupted round's calls were made again: {resumed_calls}");
    assert!(whole == resumed, "a run killed during a tool call resumed to other weights");
}
