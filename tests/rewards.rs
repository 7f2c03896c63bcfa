//! Reward functions on hand-written completions (including the awkward ones),
//! reward sets from YAML, property tests, and `r1pipe rewards`.

mod common;

use proptest::prelude::*;
use r1pipe::rewards::{lookup, RewardFn, RewardSet, Sample, CATALOG};
use serde_json::json;

fn f(name: &str, params: serde_json::Value) -> Box<dyn RewardFn> {
    (lookup(name).unwrap().build)(&params).unwrap()
}

fn score(name: &str, completion: &str, answer: &str) -> f32 {
    with_tokens(name, json!({}), completion, answer, completion.split_whitespace().count())
}

fn with_tokens(name: &str, params: serde_json::Value, completion: &str, answer: &str, tokens: usize) -> f32 {
    let s = Sample { prompt: "", completion, answer, tokens, tool_results: None };
    f(name, params).score_one(&s).unwrap().expect("a built-in applies to every sample")
}

const GOOD: &str = "<think>\n48/2 = 24, 48 + 24 = 72\n</think>\n<answer>\n72\n</answer>\n";

#[test]
fn correctness_compares_the_last_answer_block_after_normalization() {
    assert_eq!(score("correctness", GOOD, "72"), 2.0);
    assert_eq!(score("correctness", "<answer>71</answer> no wait <answer>72</answer>", "72"), 2.0);
    assert_eq!(score("correctness", "<answer>72</answer> no wait <answer>71</answer>", "72"), 0.0);
    assert_eq!(score("correctness", "<answer> $1,000. </answer>", "1000"), 2.0);
    assert_eq!(score("correctness", "<answer>18.0</answer>", "18"), 2.0);
    assert_eq!(score("correctness", "<answer>-5</answer>", "-5"), 2.0);
    assert_eq!(score("correctness", "<answer>0.5</answer>", "0.50"), 2.0);
    assert_eq!(score("correctness", "<answer>18 dollars</answer>", "18"), 0.0, "unit words are not stripped");
    assert_eq!(score("correctness", "<answer>\n72", "72"), 2.0, "an unclosed last block runs to the end");
    assert_eq!(score("correctness", "72", "72"), 0.0, "no answer block, no reward");
    assert_eq!(score("correctness", "", "72"), 0.0);
    assert_eq!(score("correctness", "<answer></answer>", ""), 0.0, "an empty answer is never correct");
    assert_eq!(with_tokens("correctness", json!({"correct": 1.0}), GOOD, "72", 9), 1.0);
}

#[test]
fn integer_rewards_integer_answers_only() {
    assert_eq!(score("integer", GOOD, "x"), 0.5);
    assert_eq!(score("integer", "<answer>-12</answer>", "x"), 0.5);
    assert_eq!(score("integer", "<answer>1,200</answer>", "x"), 0.5);
    assert_eq!(score("integer", "<answer>3.5</answer>", "x"), 0.0);
    assert_eq!(score("integer", "<answer>3/4</answer>", "x"), 0.0);
    assert_eq!(score("integer", "<answer>twelve</answer>", "x"), 0.0);
    assert_eq!(score("integer", "12", "x"), 0.0);
}

#[test]
fn strict_format_is_anchored_at_both_ends() {
    assert_eq!(score("strict_format", GOOD, ""), 0.5);
    assert_eq!(score("strict_format", GOOD.trim_end(), ""), 0.5, "the final newline is optional");
    assert_eq!(score("strict_format", &format!("Sure! {GOOD}"), ""), 0.0, "text before");
    assert_eq!(score("strict_format", &format!("{GOOD}more"), ""), 0.0, "text after");
    assert_eq!(
        score("strict_format", "<think>x</think>\n<answer>\n1\n</answer>", ""),
        0.0,
        "newlines inside tags are required"
    );
    assert_eq!(
        score("strict_format", "<think>\nmulti\nline\n</think>\n<answer>\n1\n</answer>", ""),
        0.5,
        "dot matches newline"
    );
    assert_eq!(
        score("strict_format", "<think>\r\nx\r\n</think>\r\n<answer>\r\n1\r\n</answer>", ""),
        0.0,
        "CRLF is not the format"
    );
}

#[test]
fn soft_format_finds_the_pattern_anywhere() {
    assert_eq!(score("soft_format", "Okay. <think>x</think>  <answer>1</answer> bye", ""), 0.5);
    assert_eq!(score("soft_format", "<think>x</think> text <answer>1</answer>", ""), 0.0, "only whitespace between");
    assert_eq!(score("soft_format", "<answer>1</answer><think>x</think>", ""), 0.0, "order matters");
    assert_eq!(score("soft_format", "<think>unclosed <answer>1</answer>", ""), 0.0);
}

#[test]
fn xml_count_counts_tags_and_punishes_trailing_text() {
    assert!((score("xml_count", GOOD, "") - 0.5).abs() < 1e-6, "{}", score("xml_count", GOOD, ""));
    let trailing = format!("{}\nabc", GOOD.trim_end());
    // "\n</answer>\n" splits off "abc" (−0.003); "\n</answer>" splits off "\nabc" (−(4−1)·0.001).
    assert!(
        (score("xml_count", &trailing, "") - (0.5 - 0.003 - 0.003)).abs() < 1e-6,
        "{}",
        score("xml_count", &trailing, "")
    );
    assert_eq!(score("xml_count", "", ""), 0.0);
    let doubled = format!("{GOOD}{GOOD}");
    assert_eq!(score("xml_count", &doubled, ""), 0.0, "every tag twice: nothing counts");
    assert!((score("xml_count", "<think>\nonly think", "") - 0.125).abs() < 1e-6);
}

#[test]
fn length_is_logarithmic_up_to_the_target_and_flat_beyond() {
    let p = json!({"target_tokens": 100, "scale": 1.0});
    assert_eq!(with_tokens("length", p.clone(), "", "", 0), 0.0);
    let at = |n| with_tokens("length", p.clone(), "", "", n);
    assert!((at(100) - 1.0).abs() < 1e-6);
    assert_eq!(at(100), at(5000), "no pay beyond the target");
    assert!((at(10) - (11f64.ln() / 101f64.ln()) as f32).abs() < 1e-6);
    assert!(at(10) < at(50) && at(50) < at(100));
}

/// TRL's own docstring example (100 tokens, cache 20: 90 tokens → −0.5) and the
/// three pieces of DAPO's Eq. 13 at their edges.
#[test]
fn soft_overlong_is_zero_then_linear_then_minus_one_as_trl() {
    let p = serde_json::json!({"max_completion_len": 100, "soft_punish_cache": 20});
    let at = |n| with_tokens("soft_overlong", p.clone(), "", "", n);
    assert_eq!(at(90), -0.5);
    assert_eq!((at(0), at(80)), (0.0, 0.0));
    assert_eq!((at(81), at(100)), (-1.0 / 20.0, -1.0));
    assert_eq!(at(101), -1.0);
    let no_cache = serde_json::json!({"max_completion_len": 100, "soft_punish_cache": 0});
    assert_eq!(with_tokens("soft_overlong", no_cache.clone(), "", "", 100), 0.0);
    assert_eq!(with_tokens("soft_overlong", no_cache, "", "", 101), -1.0);
    let too_big = RewardSet::from_value(
        &serde_json::json!([{"name": "soft_overlong", "params": {"max_completion_len": 10, "soft_punish_cache": 11}}]),
        std::path::Path::new("."),
    );
    let e = too_big.err().expect("a cache beyond the length is refused")[0].to_string();
    assert!(e.contains("soft_punish_cache") && e.contains("at most max_completion_len (10)"), "{e}");
}

#[test]
fn accuracy_checks_mathematical_equivalence() {
    assert_eq!(score("accuracy", "<answer>3/4</answer>", "0.75"), 1.0);
    assert_eq!(score("accuracy", "so \\boxed{\\frac{3}{4}}", "0.75"), 1.0);
    assert_eq!(score("accuracy", "<answer>$\\frac{3}{4}$</answer>", "3/4"), 1.0);
    assert_eq!(score("accuracy", "<answer>1,000</answer>", "1000"), 1.0);
    assert_eq!(score("accuracy", "<answer>-2.50</answer>", "-5/2"), 1.0);
    assert_eq!(score("accuracy", "<answer>0.7</answer>", "3/4"), 0.0);
    assert_eq!(score("accuracy", "\\boxed{12} <answer>13</answer>", "12"), 1.0, "\\boxed wins over <answer>");
    assert_eq!(score("accuracy", "no answer", "12"), 0.0);
    assert_eq!(score("accuracy", "<answer>½</answer>", "0.5"), 0.0, "Unicode fractions are not parsed");
}

#[test]
fn format_requires_exactly_think_then_answer() {
    assert_eq!(score("format", GOOD, ""), 1.0);
    assert_eq!(score("format", "<think>a</think><answer>b</answer>", ""), 1.0);
    assert_eq!(score("format", "hi <think>a</think><answer>b</answer>", ""), 0.0);
    assert_eq!(score("format", "<think>a</think><answer>b</answer> extra", ""), 0.0);
    assert_eq!(score("format", "<answer>b</answer>", ""), 0.0);
}

#[test]
fn reasoning_steps_counts_markers_up_to_three() {
    assert_eq!(score("reasoning_steps", "Step 1: a. Step 2: b. Step 3: c. Step 4: d.", ""), 1.0);
    assert!((score("reasoning_steps", "First, add. Finally, done.", "") - 2.0 / 3.0).abs() < 1e-6);
    assert!((score("reasoning_steps", "1. add\n2. multiply", "") - 2.0 / 3.0).abs() < 1e-6);
    assert!((score("reasoning_steps", "list:\n- a\n* b", "") - 2.0 / 3.0).abs() < 1e-6);
    assert_eq!(score("reasoning_steps", "just an answer", ""), 0.0);
}

#[test]
fn cosine_scales_correct_and_wrong_answers_by_length() {
    let right = "<answer>4</answer>";
    let wrong = "<answer>5</answer>";
    let c = |text: &str, n: usize| with_tokens("cosine", json!({}), text, "4", n);
    assert!((c(right, 0) - 1.0).abs() < 1e-6, "short and right: max_value_correct");
    assert!((c(right, 1000) - 0.8).abs() < 1e-6, "long and right: min_value_correct");
    assert!((c(right, 500) - 0.9).abs() < 1e-6, "halfway: the midpoint");
    assert!((c(wrong, 0) - -0.5).abs() < 1e-6, "short and wrong: min_value_wrong");
    assert!((c(wrong, 1000) - -0.1).abs() < 1e-6, "long and wrong: max_value_wrong");
    assert_eq!(c(right, 5000), c(right, 1000), "length is capped at max_len");
    assert!(c(right, 100) > c(right, 900) && c(wrong, 100) < c(wrong, 900));
}

#[test]
fn repetition_penalty_measures_repeated_ngrams() {
    assert_eq!(score("repetition_penalty", "", ""), 0.0);
    assert_eq!(score("repetition_penalty", "too short", ""), 0.0);
    assert_eq!(score("repetition_penalty", "a b c d e f", ""), 0.0);
    // "a b c a b c": 4 trigrams, 3 unique → (1 − 3/4)·−0.1
    assert!((score("repetition_penalty", "a b c A B C", "") - -0.025).abs() < 1e-6);
    assert!(score("repetition_penalty", &"the same thing ".repeat(50), "") < -0.09);
    assert!((lookup("repetition_penalty").unwrap().build)(&json!({"max_penalty": 0.5})).is_err());
}

#[test]
fn regex_match_rewards_a_pattern_and_rejects_a_bad_one() {
    let f = |c: &str| with_tokens("regex_match", json!({"pattern": "^<think>", "value": 0.3}), c, "", 1);
    assert_eq!(f("<think>x"), 0.3);
    assert_eq!(f("x<think>"), 0.0);
    assert!((lookup("regex_match").unwrap().build)(&json!({"pattern": "("})).is_err());
    assert!((lookup("regex_match").unwrap().build)(&json!({})).is_err());
}

#[test]
fn unicode_text_is_handled() {
    let t = "<think>\n数学 → 🚀 é\n</think>\n<answer>\n42\n</answer>\n";
    assert_eq!(score("strict_format", t, ""), 0.5);
    assert_eq!(score("correctness", t, "42"), 2.0);
    let trailing = format!("{}\nπ", t.trim_end());
    // Characters, not bytes: "π" costs 0.001 twice over.
    assert!((score("xml_count", &trailing, "") - (0.5 - 0.001 - 0.001)).abs() < 1e-6);
}

#[test]
fn the_shipped_reward_sets_load_and_weight_their_terms() {
    let root = env!("CARGO_MANIFEST_DIR");
    let gsm = RewardSet::from_file(
        &std::path::Path::new(root).join("stages/rewards/r1-gsm8k.yaml"),
        std::path::Path::new(root),
    )
    .unwrap();
    assert_eq!(gsm.names(), ["xml_count", "soft_format", "strict_format", "integer", "correctness", "length"]);
    let b = RewardSet::from_file(
        &std::path::Path::new(root).join("stages/rewards/building-r1.yaml"),
        std::path::Path::new(root),
    )
    .unwrap();
    assert_eq!(b.names(), ["accuracy", "format", "reasoning_steps", "cosine", "repetition_penalty"]);

    let set = RewardSet::from_value(
        &json!([
            {"name": "correctness", "weight": 0.5},
            {"name": "strict_format", "weight": 2.0},
        ]),
        std::path::Path::new("."),
    )
    .unwrap();
    let s = set
        .score(&[
            Sample { prompt: "", completion: GOOD, answer: "72", tokens: 10, tool_results: None },
            Sample { prompt: "", completion: "x", answer: "72", tokens: 1, tool_results: None },
        ])
        .unwrap();
    assert_eq!(s.total, vec![0.5 * 2.0 + 2.0 * 0.5, 0.0]);
    let stats = s.stats();
    assert_eq!(stats[0].0, "correctness");
    assert_eq!(stats[0].1, 1.0);
    assert!((stats[0].2 - 2f32.sqrt()).abs() < 1e-6, "sample std of [2, 0]");
}

#[test]
fn a_reward_set_file_may_be_a_mapping_with_a_rewards_list() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("set.yaml");
    std::fs::write(&p, "rewards:\n  - name: correctness\n  - name: strict_format\n    weight: 0.5\n").unwrap();
    let set = RewardSet::from_file(&p, std::path::Path::new(".")).unwrap();
    assert_eq!(set.names(), vec!["correctness", "strict_format"]);
    std::fs::write(&p, "rewards:\n  - name: correctness\n  - name: strict_fromat\n").unwrap();
    let e = RewardSet::from_file(&p, std::path::Path::new(".")).err().unwrap().to_string();
    assert!(e.contains("set.yaml:3:") && e.contains("did you mean `strict_format`?"), "{e}");
    std::fs::write(&p, "other: 1\n").unwrap();
    assert!(RewardSet::from_file(&p, std::path::Path::new("."))
        .err()
        .unwrap()
        .to_string()
        .contains("under a `rewards:` key"));
}

#[test]
fn reward_set_errors_name_the_line_and_the_valid_choices() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("set.yaml");
    std::fs::write(&p, "- name: correctness\n- name: corectness\n- name: cosine\n  params: {max_lenght: 3}\n").unwrap();
    let e = RewardSet::from_file(&p, std::path::Path::new(".")).err().unwrap().to_string();
    assert!(e.contains("set.yaml:2: parameter `1.name`: unknown reward function `corectness`"), "{e}");
    assert!(e.contains("did you mean `correctness`?"), "{e}");
    assert!(
        e.contains("set.yaml:4:")
            && e.contains("unknown parameter `max_lenght`")
            && e.contains("did you mean `max_len`?"),
        "{e}"
    );
}

#[test]
fn a_time_limit_on_a_built_in_reward_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("set.yaml");
    std::fs::write(&p, "- name: correctness\n  timeout_s: 5\n").unwrap();
    let e = RewardSet::from_file(&p, std::path::Path::new(".")).err().unwrap().to_string();
    assert!(e.contains("set.yaml:2: parameter `0.timeout_s`: `correctness` is a built-in reward"), "{e}");
}

#[test]
fn the_rewards_command_scores_a_file_and_lists_functions() {
    let p = common::Project::new();
    p.write(
        "c.jsonl",
        &format!(
            "{}\n{}\n",
            json!({"completion": GOOD, "answer": "72"}),
            json!({"prompt": "q", "completion": "I think 72", "answer": "72"})
        ),
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let set = format!("{root}/stages/rewards/r1-gsm8k.yaml");
    let r = p.run(&["rewards", "--set", &set, "c.jsonl"]).ok();
    assert!(r.stdout.contains("correctness ×1") && r.stdout.lines().any(|l| l.starts_with("mean")), "{}", r.stdout);
    let r = p.run(&["rewards", "--set", &set, "c.jsonl", "--json"]).ok();
    let first: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["rewards"]["correctness"], 2.0);
    assert_eq!(first["rewards"]["strict_format"], 0.5);
    let second: serde_json::Value = serde_json::from_str(r.stdout.lines().nth(1).unwrap()).unwrap();
    assert_eq!(second["rewards"]["correctness"], 0.0);
    let list = p.run(&["rewards", "--list"]).ok().stdout;
    for f in CATALOG {
        assert!(list.contains(f.name), "{list}");
    }
    assert!(list.contains("min_value_wrong=-0.5") && list.contains("max_value_wrong=-0.1"), "{list}");
}

/// Text built from fragments that matter to the rewards, plus arbitrary Unicode.
fn completion_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<answer>".to_string()),
        Just("</answer>".to_string()),
        Just("\n".to_string()),
        Just("\\boxed{".to_string()),
        Just("\\frac{3}{4}".to_string()),
        Just("}".to_string()),
        Just("Step 1:".to_string()),
        Just(" 1,000.5 ".to_string()),
        Just("-7/0".to_string()),
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn no_function_panics_and_every_value_is_finite_and_in_range(
        text in completion_text(),
        answer in prop_oneof![Just("72".to_string()), Just("3/4".to_string()), any::<String>()],
        tokens in 0usize..5000,
    ) {
        for info in CATALOG {
            let params = if info.name == "regex_match" { json!({"pattern": "[0-9]+"}) } else { serde_json::Value::Null };
            let func = (info.build)(&params).unwrap();
            let v = func.score_one(&Sample { prompt: "", completion: &text, answer: &answer, tokens, tool_results: None }).unwrap().unwrap();
            let (lo, hi) = func.range();
            prop_assert!(v.is_finite(), "{} gave {v}", info.name);
            prop_assert!(v >= lo - 1e-6 && v <= hi + 1e-6, "{} gave {v} outside [{lo}, {hi}]", info.name);
        }
    }
}

/// The shipped example program scores through `r1pipe rewards --set`: a correct short
/// answer earns more than a correct long one, a wrong one 0, no answer block null.
#[test]
fn a_reward_program_scores_batches_over_json_lines() {
    let p = common::Project::new();
    let root = env!("CARGO_MANIFEST_DIR");
    p.write(
        "c.jsonl",
        &[
            json!({"completion": "<answer>72</answer>", "answer": "72", "tokens": 16}),
            json!({"completion": "<answer>72</answer>", "answer": "72", "tokens": 192}),
            json!({"completion": "<answer>7</answer>", "answer": "72", "tokens": 16}),
            json!({"completion": "no block", "answer": "72", "tokens": 16}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>(),
    );
    let r = p
        .run(&["rewards", "--set", &format!("{root}/stages/rewards/examples/with-program.yaml"), "c.jsonl", "--json"])
        .ok();
    let got: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .take(4)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["rewards"]["concise_correct"].clone())
        .collect();
    assert_eq!(got, vec![json!(1.0 - 16.0 / 256.0), json!(0.25), json!(0.0), serde_json::Value::Null], "{}", r.stdout);
}

/// A program that crashes, answers the wrong count or malformed JSON, or takes too
/// long ends the scoring with the program named and what went wrong.
#[test]
fn a_failing_reward_program_is_named_with_what_went_wrong() {
    let p = common::Project::new();
    p.write(
        "c.jsonl",
        &format!("{}\n{}\n", json!({"completion": "a", "answer": "1"}), json!({"completion": "b", "answer": "2"})),
    );
    let cases = [
        (
            "import sys; sys.stdin.readline(); sys.stderr.write('boom: bad state\\n'); sys.exit(3)",
            "it exited with status 3",
            Some("boom: bad state"),
        ),
        ("import sys; sys.stdin.readline(); print('{\"rewards\": [1]}', flush=True)", "1 rewards for 2 samples", None),
        ("import sys; sys.stdin.readline(); print('not json', flush=True)", "`not json`", None),
        ("import sys, time; sys.stdin.readline(); time.sleep(30)", "did not answer within the time limit (0.5 s", None),
    ];
    for (i, (program, says, stderr)) in cases.iter().enumerate() {
        let set = format!("set{i}.yaml");
        p.write(
            &set,
            &format!(
                "- name: custom\n  command: [python3, -c, {}]\n  timeout_s: {}\n",
                serde_json::to_string(program).unwrap(),
                // Only the hanging program meets its limit: the others answer at once, and
                // a busy machine must not turn a crash into a timeout.
                if says.starts_with("did not answer") { "0.5" } else { "30" }
            ),
        );
        let r = p.run(&["rewards", "--set", &set, "c.jsonl"]);
        assert_eq!(r.code, 1, "{program}: {}", r.stderr);
        assert!(r.stderr.contains("reward program `python3 -c") && r.stderr.contains(says), "{program}: {}", r.stderr);
        if let Some(line) = stderr {
            assert!(r.stderr.contains(line), "its stderr is shown: {}", r.stderr);
        }
    }
    // A program with a typo in its name is refused when the set is read, before anything runs.
    p.write("set9.yaml", "- name: custom\n  command: [no-such-program-r1pipe]\n");
    let r = p.run(&["rewards", "--set", "set9.yaml", "c.jsonl"]);
    assert!(r.code != 0 && r.stderr.contains("set9.yaml:2:"), "{}", r.stderr);
    assert!(r.stderr.contains("the program `no-such-program-r1pipe` is not on PATH nor a file"), "{}", r.stderr);
    // An entry cannot be a command and take params, or be a command and a URL.
    p.write("set10.yaml", "- name: custom\n  command: [python3]\n  url: http://localhost:1/\n");
    let r = p.run(&["rewards", "--set", "set10.yaml", "c.jsonl"]);
    assert!(r.code != 0 && r.stderr.contains("set10.yaml:") && r.stderr.contains("not both"), "{}", r.stderr);
}

/// A reward-model server gets the batch as a JSON POST and its `rewards` are the
/// scores; an error status is named with the address, and its body (which may echo
/// the request's headers) is not printed.
#[test]
fn a_reward_server_scores_a_posted_batch_and_its_errors_are_named() {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", server.server_addr().to_ip().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (i, mut req) in server.incoming_requests().take(2).enumerate() {
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            seen.push(body);
            let reply = if i == 0 {
                tiny_http::Response::from_string(r#"{"rewards": [0.25, null]}"#)
            } else {
                tiny_http::Response::from_string("Authorization: Bearer sk-secret").with_status_code(401)
            };
            req.respond(reply).unwrap();
        }
        seen
    });
    let p = common::Project::new();
    p.write(
        "c.jsonl",
        &format!("{}\n{}\n", json!({"completion": "a", "answer": "1"}), json!({"completion": "b", "answer": "2"})),
    );
    p.write("set.yaml", &format!("- name: judge\n  url: {url}\n  timeout_s: 10\n"));
    let r = p.run(&["rewards", "--set", "set.yaml", "c.jsonl", "--json"]).ok();
    let first: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["rewards"]["judge"], 0.25);
    let second: serde_json::Value = serde_json::from_str(r.stdout.lines().nth(1).unwrap()).unwrap();
    assert!(second["rewards"]["judge"].is_null(), "{second}");
    let r = p.run(&["rewards", "--set", "set.yaml", "c.jsonl"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&url) && r.stderr.contains("HTTP 401"), "{}", r.stderr);
    assert!(!r.stderr.contains("sk-secret"), "{}", r.stderr);
    let seen = handle.join().unwrap();
    let batch: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(batch["samples"][1]["completion"], "b");
    assert!(batch["samples"][0]["completion_tokens"].is_u64(), "{batch}");
}

#[test]
fn tool_call_rewards_read_the_calls_and_their_results() {
    let two = "48/2 = <<48/2=24>>24 and <<24+48=72>>72\n<answer>\n72\n</answer>";
    let one_bad = "<<1/0=error: division by zero>> then <<2+2=4>>\n<answer>\n5\n</answer>";
    assert_eq!(score("tool_calls", two, "72"), 0.5);
    assert_eq!(score("tool_calls", one_bad, "5"), 0.25, "half the calls worked");
    assert_eq!(score("tool_calls", "<answer>\n72\n</answer>", "72"), 0.0, "no calls");
    assert_eq!(score("tool_result_used", two, "72"), 0.5, "the answer is the last call's result");
    assert_eq!(score("tool_result_used", one_bad, "5"), 0.0, "5 is no call's result");
    assert_eq!(score("tool_result_used", "<<3*4=12>> so 12", "12"), 0.5, "without <answer>, the last number");

    // Hermes calls leave no inline notes in the text: the results the sampler
    // recorded are what these rewards read, whatever the call format.
    let hermes = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"48/2\"}}</tool_call>\
                  tool\n24\nassistant\nso\n<answer>\n24\n</answer>";
    let recorded = |results: Vec<&'static str>, func: &str, answer: &str| {
        let s = Sample { prompt: "", completion: hermes, answer, tokens: 9, tool_results: Some(results) };
        f(func, json!({})).score_one(&s).unwrap().unwrap()
    };
    assert_eq!(score("tool_calls", hermes, "24"), 0.0, "read from the text: no inline calls");
    assert_eq!(recorded(vec!["24"], "tool_calls", "24"), 0.5);
    assert_eq!(recorded(vec!["24", "error: no tool named `abacus`"], "tool_calls", "24"), 0.25);
    assert_eq!(recorded(vec!["24"], "tool_result_used", "24"), 0.5);
    assert_eq!(recorded(vec!["7"], "tool_result_used", "24"), 0.0);
}
