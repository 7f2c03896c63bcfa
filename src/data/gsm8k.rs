//! GSM8K's conventions: the final answer follows `####`, the rationale carries
//! calculator notes in `<<…>>`.

use std::sync::LazyLock;

use regex::Regex;

/// The R1 recipe's system prompt: the think/answer format.
pub const R1_SYSTEM_PROMPT: &str =
    "Respond in the following format:\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n";

static CALC_NOTE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<<[^>]*>>").expect("static regex"));

/// The reference answer after the last `####`, without commas, `$` and spaces.
/// `None` when the text has no `####` or nothing after it.
pub fn reference_answer(answer: &str) -> Option<String> {
    let (_, tail) = answer.rsplit_once("####")?;
    let a: String = tail.chars().filter(|c| !matches!(c, ',' | '$') && !c.is_whitespace()).collect();
    (!a.is_empty()).then_some(a)
}

/// The worked solution before `####`, with the `<<48/2=24>>` calculator notes removed.
pub fn rationale(answer: &str) -> String {
    let body = answer.rsplit_once("####").map(|(b, _)| b).unwrap_or(answer);
    CALC_NOTE.replace_all(body, "").trim().to_string()
}

/// The worked solution before `####` with its calculator notes kept as the
/// inline tool calls they are (`48/2 = <<48/2=24>>24`): what SFT trains a model
/// that samples with a calculator on (the `24>>` a tool writes is masked there).
pub fn rationale_with_calls(answer: &str) -> String {
    answer.rsplit_once("####").map(|(b, _)| b).unwrap_or(answer).trim().to_string()
}

/// Byte ranges of `text` that a tool writes after an inline call: each
/// `<<expr=` is the model's, the `result>>` after it the tool's.
pub fn tool_result_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    CALC_NOTE
        .find_iter(text)
        .filter_map(|m| {
            let eq = m.as_str().find('=')?;
            Some(m.start() + eq + 1..m.end())
        })
        .collect()
}

/// The calculator notes of a text (`<<48/2=24>>`): where each is, its
/// expression and its result.
pub fn calculator_notes(text: &str) -> Vec<(std::ops::Range<usize>, &str, &str)> {
    CALC_NOTE
        .find_iter(text)
        .filter_map(|m| {
            let (expression, result) = m.as_str()[2..m.as_str().len() - 2].split_once('=')?;
            Some((m.range(), expression.trim(), result.trim()))
        })
        .collect()
}

/// The R1 answer format for a rationale and its final answer.
pub fn think_answer(rationale: &str, answer: &str) -> String {
    format!("<think>\n{rationale}\n</think>\n<answer>\n{answer}\n</answer>")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATALIA: &str = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";

    #[test]
    fn extracts_and_normalizes_the_reference() {
        assert_eq!(reference_answer(NATALIA).as_deref(), Some("72"));
        assert_eq!(reference_answer("x\n#### $1,000").as_deref(), Some("1000"));
        assert_eq!(reference_answer("x\n#### -3.5 ").as_deref(), Some("-3.5"));
        assert_eq!(reference_answer("no marker"), None);
        assert_eq!(reference_answer("x ####  "), None);
    }

    #[test]
    fn strips_calculator_notes_from_the_rationale() {
        assert_eq!(
            rationale(NATALIA),
            "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
        );
        assert_eq!(think_answer("r", "72"), "<think>\nr\n</think>\n<answer>\n72\n</answer>");
    }

    #[test]
    fn calls_are_kept_and_their_results_found() {
        let kept = rationale_with_calls(NATALIA);
        assert!(kept.contains("<<48/2=24>>24") && !kept.contains("####"));
        let spans = tool_result_spans(&kept);
        let results: Vec<&str> = spans.iter().map(|r| &kept[r.clone()]).collect();
        assert_eq!(results, vec!["24>>", "72>>"]);
    }
}
