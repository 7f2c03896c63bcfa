//! Answers out of completions: the recipe's strict `<answer>` extraction (in
//! `rewards::answer`) and lm-eval-harness's GSM8K "flexible-extract": the last
//! number-like token of the whole completion.

use std::sync::LazyLock;

use regex::Regex;

/// lm-eval-harness gsm8k `flexible-extract`: `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match.
static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("static regex"));

/// The last number in `text`, with `$`, `,` and a trailing `.` removed (as the
/// harness's answer filters do); `None` when there is none.
pub fn last_number(text: &str) -> Option<String> {
    let m = NUMBER.find_iter(text).last()?;
    let s: String = m.as_str().chars().filter(|c| !matches!(c, '$' | ',')).collect();
    let s = s.trim_end_matches('.').to_string();
    // A match of only separators (",." or "$$") carries no number.
    s.chars().any(|c| c.is_ascii_digit()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_last_number_as_the_harness_does() {
        assert_eq!(last_number("She sells 16 - 3 - 4 = 9 eggs, so 9 * 2 = $18.").as_deref(), Some("18"));
        assert_eq!(last_number("The answer is 1,234.").as_deref(), Some("1234"));
        assert_eq!(last_number("<answer>-5</answer>").as_deref(), Some("-5"));
        assert_eq!(last_number("3.5 apples").as_deref(), Some("3.5"));
        assert_eq!(last_number("no digits here, ok.").as_deref(), None);
        assert_eq!(last_number("x = 7").as_deref(), Some("7"));
    }
}
