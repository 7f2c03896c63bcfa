//! The quickstart end to end (pipelines/quickstart.yaml: SmolLM2-135M-Instruct
//! and GSM8K from the shared folder, offline, CPU, as scripts/quickstart.sh runs it there): the run ends by printing the
//! evaluation table and the trained model's answer, and that answer is in the
//! think/answer format, not a loop.

mod common;

use std::fs;
use std::path::Path;

/// Exactly one `<think>…</think>` followed by one `<answer>…</answer>`, nothing but
/// whitespace around them, and something inside each.
fn formatted(text: &str) -> Result<(), String> {
    for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
        let n = text.matches(tag).count();
        if n != 1 {
            return Err(format!("{tag} occurs {n} times"));
        }
    }
    let at = |tag: &str| text.find(tag).expect("counted above");
    let (t0, t1, a0, a1) = (at("<think>"), at("</think>"), at("<answer>"), at("</answer>"));
    if !(t0 < t1 && t1 < a0 && a0 < a1) {
        return Err("tags out of order".into());
    }
    if !text[..t0].trim().is_empty() || !text[t1 + 8..a0].trim().is_empty() || !text[a1 + 9..].trim().is_empty() {
        return Err("text outside the tags".into());
    }
    if text[t0 + 7..t1].trim().is_empty() || text[a0 + 8..a1].trim().is_empty() {
        return Err("an empty section".into());
    }
    Ok(())
}

#[test]
fn the_format_check_itself_tells_good_from_bad() {
    assert!(formatted("<think>\n2+2\n</think>\n<answer>\n4\n</answer>").is_ok());
    assert!(formatted("<think>\n<think>\n<think>").is_err());
    assert!(formatted("<think>a</think><answer>4</answer> and more").is_err());
    assert!(formatted("<answer>4</answer><think>a</think>").is_err());
    assert!(formatted("<think></think>\n<answer>4</answer>").is_err());
}

#[test]
fn the_quickstart_ends_with_the_table_and_an_answer_in_the_format() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gsm8k = format!("vars.gsm8k={}", common::shared().join("data/gsm8k").display()); // fails loudly without it
    assert!(
        root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "run scripts/fetch-smollm2.sh first (scripts/test.sh does)"
    );
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_r1pipe"))
            .args(args)
            .arg("--cache")
            .arg(cache.path())
            .current_dir(root)
            .output()
            .unwrap();
        common::Run::from(out)
    };
    let offline = ["-S", &gsm8k, "-S", "vars.model=models/smollm2-135m-instruct"];
    let r = run(&[&["run", "pipelines/quickstart.yaml"][..], &offline].concat()).ok();
    let summary =
        r.stdout.split("── evaluate ──").nth(1).unwrap_or_else(|| panic!("no evaluation table:\n{}", r.stdout));
    assert!(summary.contains("accuracy, strict (95% CI)") && summary.contains("sft"), "{}", r.stdout);
    let answer_block = r.stdout.split("── infer ──").nth(1).unwrap_or_else(|| panic!("no answer:\n{}", r.stdout));
    assert!(answer_block.contains("Q: Natalia sold clips"), "{answer_block}");
    let path = run(&[&["show", "infer.answers", "-p", "pipelines/quickstart.yaml"][..], &offline].concat())
        .ok()
        .stdout
        .trim()
        .to_string();
    let line = fs::read_to_string(path).unwrap();
    let a: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let completion = a["completion"].as_str().unwrap();
    println!("the quickstart's answer:\n{completion}");
    if let Err(why) = formatted(completion) {
        panic!("the trained model's answer is not in the format ({why}):\n{completion}");
    }
}
