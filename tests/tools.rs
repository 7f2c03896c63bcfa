//! Tool calls in sampling: the wave loop assembles a completion from the model's
//! segments and the tool's results (which are marked, to be masked from
//! training), honours `max_tool_calling_iterations` and the token budget, and a
//! tool program that hangs, crashes or answers nonsense gives the model an error
//! result, never a failed run.

mod common;

use r1pipe::model::{ChatTokenizer, Completion, FinishReason, SamplingParams};
use r1pipe::rollout::tools::{
    sample_with_tools, BuiltinTool, CallFormat, OnSegment, Tool, ToolSettings, ToolSpec, Toolbox, Wave,
};

fn tok() -> ChatTokenizer {
    ChatTokenizer::from_dir(&common::shared().join("models/smollm2-135m-instruct")).unwrap()
}

fn segment(tok: &ChatTokenizer, context: usize, text: &str, reason: FinishReason) -> Completion {
    Completion {
        prompt_index: context,
        tokens: tok.encode(text).unwrap(),
        text: text.into(),
        finish_reason: reason,
        eos: reason == FinishReason::Stop,
        sampling_logprobs: None,
        tool_spans: Vec::new(),
        tool_calls: Vec::new(),
    }
}

fn calculator(max_tool_calling_iterations: Option<usize>) -> ToolSettings {
    ToolSettings {
        tools: vec![ToolSpec::Builtin(BuiltinTool::Calculator)],
        max_tool_calling_iterations,
        ..ToolSettings::default()
    }
}

/// A model that writes `script[wave]` for every row, stopping at calls only when allowed.
fn scripted<'a>(
    tok: &'a ChatTokenizer,
    script: &'a [&'a str],
    waves: &'a mut Vec<(usize, bool, usize)>,
) -> impl FnMut(&Wave, &SamplingParams, &mut OnSegment) -> anyhow::Result<()> + 'a {
    move |wave, params, on_segment| {
        waves.push((wave.contexts.len(), params.tool_call.is_some(), params.max_new_tokens));
        for j in 0..wave.contexts.len() {
            let text = script[wave.iteration];
            let reason = if params.tool_call.is_some_and(|f| f.pending(text).is_some()) {
                FinishReason::ToolCall
            } else {
                FinishReason::Stop
            };
            on_segment(j, segment(tok, j, text, reason))?;
        }
        Ok(())
    }
}

#[test]
fn a_completion_is_the_models_segments_and_the_tools_results_marked_as_context() {
    let tok = tok();
    let prompts = vec![tok.encode("Q: how many clips?").unwrap(), tok.encode("Q: and now?").unwrap()];
    let tools = calculator(None);
    let mut tool = Toolbox::new(&tools, std::path::Path::new(".")).unwrap();
    let script = ["She sold 48/2 = <<48/2=", " clips, then <<1/0=", " so done."];
    let mut waves = Vec::new();
    let mut done = Vec::new();
    let params = SamplingParams { max_new_tokens: 200, ..Default::default() };
    sample_with_tools(&tok, &prompts, &params, &tools, &mut tool, &mut scripted(&tok, &script, &mut waves), &mut |c| {
        done.push(c);
        Ok(())
    })
    .unwrap();
    assert_eq!(done.len(), 2);
    for c in &done {
        assert_eq!(c.text, "She sold 48/2 = <<48/2=24>> clips, then <<1/0=error: division by zero>> so done.");
        assert_eq!(c.finish_reason, FinishReason::Stop);
        let results: Vec<String> = c.tool_spans.iter().map(|r| tok.decode(&c.tokens[r.clone()]).unwrap()).collect();
        assert_eq!(results, vec!["24>>", "error: division by zero>>"]);
        assert_eq!(c.tool_calls.len(), 2);
        assert!(!c.tool_calls[0].error && c.tool_calls[1].error);
    }
    // Three waves of both rows; every wave may stop at a call (no limit set).
    assert_eq!(waves.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(), vec![(2, true), (2, true), (2, true)]);
}

#[test]
fn the_call_limit_and_the_token_budget_hold() {
    let tok = tok();
    let prompts = vec![tok.encode("Q").unwrap()];
    let tools = calculator(Some(1));
    let mut tool = Toolbox::new(&tools, std::path::Path::new(".")).unwrap();
    let script = ["a <<2+2=", " b <<3+3=", " c"];
    let mut waves = Vec::new();
    let mut done = Vec::new();
    let params = SamplingParams { max_new_tokens: 200, ..Default::default() };
    sample_with_tools(&tok, &prompts, &params, &tools, &mut tool, &mut scripted(&tok, &script, &mut waves), &mut |c| {
        done.push(c);
        Ok(())
    })
    .unwrap();
    // One call answered; the second segment may not stop for a tool, so it is the last.
    assert_eq!(done[0].text, "a <<2+2=4>> b <<3+3=");
    assert_eq!(done[0].tool_calls.len(), 1);
    assert_eq!(waves.iter().map(|w| w.1).collect::<Vec<_>>(), vec![true, false]);

    // A budget of 8 tokens: the completion, results included, never passes it.
    let mut waves = Vec::new();
    let mut done = Vec::new();
    let params = SamplingParams { max_new_tokens: 8, ..Default::default() };
    let tools = ToolSettings { max_tool_calling_iterations: None, ..tools };
    sample_with_tools(&tok, &prompts, &params, &tools, &mut tool, &mut scripted(&tok, &script, &mut waves), &mut |c| {
        done.push(c);
        Ok(())
    })
    .unwrap();
    assert!(done[0].tokens.len() <= 8, "{} tokens", done[0].tokens.len());
    assert_eq!(done[0].finish_reason, FinishReason::Length);
    assert!(done[0].tool_spans.iter().all(|r| r.end <= done[0].tokens.len()));
}

#[test]
fn a_tool_program_that_hangs_crashes_or_answers_nonsense_gives_an_error_result() {
    let dir = tempfile::tempdir().unwrap();
    let program = |body: &str| {
        std::fs::write(dir.path().join("tool.py"), body).unwrap();
        ToolSpec::Program { command: vec!["python3".into(), "tool.py".into()], timeout_s: 1.0, name: None }
    };
    // A working one: JSON lines in, {"result"} out.
    let ok = program(
        "import sys, json\nfor line in sys.stdin:\n    e = json.loads(line)['expression']\n    print(json.dumps({'result': str(eval(e, {'__builtins__': {}}))}), flush=True)\n",
    );
    let mut t = Tool::new(&ok, dir.path());
    assert_eq!(t.call("6*7").result, "42");
    assert_eq!(t.call("1+1").result, "2", "the program is kept between calls");
    for (body, _what) in [
        ("import time\ntime.sleep(30)\n", "hangs"),
        ("import sys\nsys.stdin.readline()\nsys.exit(3)\n", "crashes"),
        ("import sys\nsys.stdin.readline()\nprint('not json', flush=True)\n", "nonsense"),
        ("import sys\nsys.stdin.readline()\nsys.stdout.write('x' * 200000)\n", "floods"),
    ] {
        let spec = program(body);
        let mut t = Tool::new(&spec, dir.path());
        let start = std::time::Instant::now();
        let call = t.call("1+1");
        assert!(call.error && call.result.starts_with("error:"), "{body}: {call:?}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{body}: {:?}", start.elapsed());
    }
    // A program that says `error` passes it on.
    let says = program(
        "import sys, json\nfor line in sys.stdin:\n    print(json.dumps({'error': 'no such variable'}), flush=True)\n",
    );
    let call = Tool::new(&says, dir.path()).call("x+1");
    assert_eq!(call.result, "error: no such variable");
}

#[test]
fn grpo_and_evaluate_sample_with_tools_and_report_what_the_tools_did() {
    let p = common::tiny_project(5, 12);
    p.write(
        "pipe.yaml",
        r#"
name: t
stages:
  gsm8k: { kind: download, with: { dataset: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", tool_calls: true } }
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${prompts.train}
      rewards: [ { name: tool_calls }, { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]
      tools: [calculator]
      max_tool_calling_iterations: 4
      per_device_train_batch_size: 4
      num_generations: 4
      max_completion_length: 8
      max_steps: 2
  evaluate:
    kind: evaluate
    with: { models: { grpo: "${grpo.model}" }, test: "${prompts.test}", tools: [calculator], max_new_tokens: 8 }
  hermes:
    kind: format
    with: { data: "${gsm8k.dataset}", tool_calls: true, tool_call_format: hermes }
  evaluate_hermes:
    kind: evaluate
    with:
      models: { grpo: "${grpo.model}" }
      test: "${hermes.test}"
      tools: [calculator]
      tool_call_format: hermes
      max_new_tokens: 8
"#,
    );
    p.run(&["run", "pipe.yaml", "-q"]).ok();
    let log = p.run(&["show", "grpo.log", "-p", "pipe.yaml"]).ok().stdout;
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(log.trim()).unwrap().lines().next().unwrap()).unwrap();
    assert!(first["tools/call_frequency"].is_number() && first["tools/failure_frequency"].is_number(), "{first}");
    let metrics = p.run(&["show", "evaluate.metrics", "-p", "pipe.yaml"]).ok().stdout;
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(metrics.trim()).unwrap()).unwrap();
    for key in ["tool_calls_per_completion", "tool_error_rate", "used_tool_rate"] {
        assert!(m["models"]["grpo"][key].is_number(), "{key}: {m}");
    }
    // The SFT data keeps GSM8K's notes as calls.
    let sft = p.run(&["show", "prompts.sft", "-p", "pipe.yaml"]).ok().stdout;
    assert!(std::fs::read_to_string(sft.trim()).unwrap().contains("<<"), "the rationales keep their calls");
    // Hermes SFT rows: the answer split at its calls into assistant turns ending in
    // a call and `tool` turns holding the results.
    let sft = p.run(&["show", "hermes.sft", "-p", "pipe.yaml"]).ok().stdout;
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(sft.trim()).unwrap().lines().next().unwrap()).unwrap();
    let turns = row["messages"].as_array().unwrap();
    let roles: Vec<&str> = turns.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert!(roles.contains(&"tool") && roles.last() == Some(&"assistant"), "{roles:?}");
    let call_turn = turns.iter().position(|m| m["role"] == "tool").unwrap() - 1;
    assert!(turns[call_turn]["content"].as_str().unwrap().ends_with("</tool_call>"), "{row}");
    let m = p.run(&["show", "evaluate_hermes.metrics", "-p", "pipe.yaml"]).ok().stdout;
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.trim()).unwrap()).unwrap();
    assert!(m["models"]["grpo"]["tool_calls_per_completion"].is_number(), "{m}");
}

#[test]
fn tools_that_cannot_work_here_are_refused_at_validation() {
    let p = common::tiny_project(5, 4);
    let grpo = |extra: &str| {
        format!("name: t\nstages:\n  g:\n    kind: grpo\n    with:\n      model: models/tiny\n      train: data/gsm8k/train.jsonl\n      rewards: [ {{ name: tool_calls }} ]\n{extra}")
    };
    for (extra, says) in [
        ("      tools: [calculator, calculator]\n", "inline calls (`<<expr=`) name no tool"),
        ("      tools: [calculator, calculator]\n      tool_call_format: hermes\n", "two tools are named `calculator`"),
        ("      tools: [abacus]\n", "a built-in tool's name (calculator)"),
        ("      max_tool_calling_iterations: 3\n", "set without `tools`"),
        ("      tools: [calculator]\n      tool_call_format: json\n", "valid values: `inline`, `hermes`"),
        (
            "      tools: [calculator]\n      lora: { r: 4 }\n      rollout: { url: \"http://localhost:1/v1\", model: m }\n",
            "a server cannot stop at an inline call",
        ),
    ] {
        p.write("p.yaml", &grpo(extra));
        let r = p.run(&["run", "p.yaml", "--dry-run"]);
        assert_eq!(r.code, 2, "{extra}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(says), "{extra}: {}", r.stderr);
    }
    p.write(
        "f.yaml",
        "name: f\nstages:\n  f: { kind: format, with: { data: data/gsm8k, tool_call_format: hermes } }\n",
    );
    let r = p.run(&["run", "f.yaml", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("tool_call_format") && r.stderr.contains("tool_calls: true"), "{}", r.stderr);
}

#[test]
fn sft_trains_on_the_call_and_not_on_what_the_tool_would_write() {
    use r1pipe::model::Message;
    let tok = tok();
    let messages = vec![Message::new("user", "How many?"), Message::new("assistant", "48/2 = <<48/2=24>>24 clips.")];
    let ex = r1pipe::train::sft::tokenize(&tok, &messages, 1024).unwrap();
    let trained: String =
        ex.ids.iter().zip(&ex.targets).filter(|(_, &t)| t).map(|(&id, _)| tok.decode(&[id]).unwrap()).collect();
    let skipped: Vec<String> =
        ex.ids.iter().zip(&ex.targets).filter(|(_, &t)| !t).map(|(&id, _)| tok.decode(&[id]).unwrap()).collect();
    assert!(trained.contains("<<48/2=") && trained.contains("24 clips."), "{trained:?}");
    // The tool's `24>>` is context; the `24` the model writes after it is trained on.
    assert!(skipped.windows(3).any(|w| w == ["2", "4", ">>"]), "{skipped:?}");
    assert!(!trained.contains(">>"), "{trained:?}");
}

#[test]
fn hermes_calls_are_answered_through_the_chat_templates_tool_message() {
    // SmolLM2's template renders any role, `tool` included: a call's result comes
    // back as `<|im_end|>\n<|im_start|>tool\n24<|im_end|>\n<|im_start|>assistant\n`,
    // all of it context, and the model's next segment continues after it.
    let tok = tok();
    let prompts = vec![tok.encode_chat(&[r1pipe::model::Message::new("user", "Q: 48/2?")], true).unwrap()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("units.py"),
        "import sys, json\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
         print(json.dumps({'result': r['name'] + ':' + r['arguments']['unit']}), flush=True)\n",
    )
    .unwrap();
    let tools = ToolSettings {
        tools: vec![
            ToolSpec::Builtin(BuiltinTool::Calculator),
            ToolSpec::Program { command: vec!["python3".into(), "units.py".into()], timeout_s: 5.0, name: None },
        ],
        tool_call_format: CallFormat::Hermes,
        max_tool_calling_iterations: None,
    };
    assert!(tools.problems().is_empty(), "{:?}", tools.problems());
    let mut toolbox = Toolbox::new(&tools, dir.path()).unwrap();
    let calc = r#"<tool_call>{"name": "calculator", "arguments": {"expression": "48/2"}}</tool_call>"#;
    let openai = r#"<tool_call>{"name": "units", "arguments": "{\"unit\": \"clips\"}"}</tool_call>"#;
    let unknown = r#"<tool_call>{"name": "abacus", "arguments": {}}</tool_call>"#;
    let script = [calc, openai, unknown, "<tool_call>{not json</tool_call>", "So 24 clips."];
    let mut waves = Vec::new();
    let mut done = Vec::new();
    let params = SamplingParams { max_new_tokens: 400, ..Default::default() };
    sample_with_tools(
        &tok,
        &prompts,
        &params,
        &tools,
        &mut toolbox,
        &mut scripted(&tok, &script, &mut waves),
        &mut |c| {
            done.push(c);
            Ok(())
        },
    )
    .unwrap();
    let c = &done[0];
    let results: Vec<&str> = c.tool_calls.iter().map(|t| t.result.as_str()).collect();
    assert_eq!(results[..2], ["24", "units:clips"]);
    assert!(results[2].starts_with("error: no tool named `abacus` (tools: calculator, units)"), "{results:?}");
    assert!(results[3].starts_with("error: the tool call is not JSON"), "{results:?}");
    assert_eq!(c.tool_calls.iter().map(|t| t.error).collect::<Vec<_>>(), [false, false, true, true]);
    // Each result is the template's tool message, marked as context, in the token stream.
    assert_eq!(c.tool_spans.len(), 4);
    let first = &c.tokens[c.tool_spans[0].clone()];
    assert_eq!(first, tok.encode("<|im_end|>\n<|im_start|>tool\n24<|im_end|>\n<|im_start|>assistant\n").unwrap());
    // The model's own tokens are exactly its segments, in order.
    let model_written: Vec<u32> =
        (0..c.tokens.len()).filter(|i| !c.tool_spans.iter().any(|r| r.contains(i))).map(|i| c.tokens[i]).collect();
    let want: Vec<u32> = script.iter().flat_map(|t| tok.encode(t).unwrap()).collect();
    assert_eq!(model_written, want);
    assert_eq!(waves.len(), 5, "one wave per call, then the answer");
}

#[test]
fn a_template_without_a_tool_role_is_refused_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::shared().join("models/smollm2-135m-instruct");
    std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    // A template that renders only user and assistant turns.
    let template = "{% for m in messages %}{% if m.role in ['user', 'assistant'] %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": template, "eos_token": "<|im_end|>" }).to_string(),
    )
    .unwrap();
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    let tools = ToolSettings { tool_call_format: CallFormat::Hermes, ..calculator(None) };
    let mut toolbox = Toolbox::new(&tools, dir.path()).unwrap();
    let mut waves = Vec::new();
    let err = sample_with_tools(
        &tok,
        &[tok.encode("Q").unwrap()],
        &SamplingParams::default(),
        &tools,
        &mut toolbox,
        &mut scripted(&tok, &["x"], &mut waves),
        &mut |_| Ok(()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("template drops it"), "{err:#}");
    assert!(waves.is_empty(), "nothing sampled");
}
