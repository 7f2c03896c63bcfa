//! Pulling the final answer out of a completion and deciding whether two
//! answers are the same number.

use std::sync::LazyLock;

use regex::Regex;

/// The text inside the last `<answer>…</answer>`. An unclosed last `<answer>`
/// yields the rest of the text (what the original recipe's split does).
pub fn xml_answer(text: &str) -> Option<&str> {
    let start = text.rfind("<answer>")? + "<answer>".len();
    let rest = &text[start..];
    Some(match rest.find("</answer>") {
        Some(end) => rest[..end].trim(),
        None => rest.trim(),
    })
}

/// The content of the last `\boxed{…}`, braces balanced.
pub fn boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].trim());
                }
            }
            _ => {}
        }
    }
    None
}

/// GSM8K-style normalization: trim; drop commas, `$` and `%`; drop a trailing `.`.
/// Unit words are kept: `18 dollars` stays different from `18`.
pub fn normalize(answer: &str) -> String {
    let s: String = answer.trim().chars().filter(|c| !matches!(c, ',' | '$' | '%')).collect();
    let s = s.trim();
    s.strip_suffix('.').unwrap_or(s).trim().to_string()
}

/// The value of a plain number (`-3`, `18.0`, `.5`, `1e3`), if it is one.
pub fn number(s: &str) -> Option<f64> {
    static NUM: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$").expect("static regex"));
    if !NUM.is_match(s) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Same number within a relative tolerance that absorbs float formatting.
pub fn same_number(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// GSM8K answer equality: normalized strings equal, or both numbers and numerically equal.
pub fn gsm8k_equal(predicted: &str, reference: &str) -> bool {
    let (p, r) = (normalize(predicted), normalize(reference));
    if p.is_empty() {
        return false;
    }
    p == r || matches!((number(&p), number(&r)), (Some(a), Some(b)) if same_number(a, b))
}

/// The value of a simple mathematical answer: a number, a fraction `a/b`,
/// `\frac{a}{b}` (`\dfrac`, `\tfrac`), a percentage, possibly inside `\boxed{}`
/// or `$…$`, with commas and a leading `\$` or `$` allowed.
pub fn math_value(s: &str) -> Option<f64> {
    let mut t = s.trim();
    if let Some(b) = boxed(t) {
        t = b;
    }
    let t = t.trim_matches('$').trim();
    let t = t.strip_prefix("\\(").and_then(|x| x.strip_suffix("\\)")).unwrap_or(t).trim();
    let t = t.replace("\\!", "").replace("\\,", "").replace("\\$", "").replace(['$', ','], "").replace(' ', "");
    let t = t.strip_suffix('.').unwrap_or(&t);
    let (t, scale) = match t.strip_suffix("\\%").or_else(|| t.strip_suffix('%')) {
        Some(x) => (x, 0.01),
        None => (t, 1.0),
    };
    if let Some(v) = number(t) {
        return Some(v * scale);
    }
    static FRAC: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$").expect("static regex"));
    if let Some(c) = FRAC.captures(t) {
        let (n, d) = (number(&c[2])?, number(&c[3])?);
        let sign = if &c[1] == "-" { -1.0 } else { 1.0 };
        return (d != 0.0).then(|| sign * n / d * scale);
    }
    if let Some((n, d)) = t.split_once('/') {
        let (n, d) = (number(n)?, number(d)?);
        return (d != 0.0).then(|| n / d * scale);
    }
    None
}

/// Mathematical equivalence of a predicted and a reference answer.
pub fn math_equal(predicted: &str, reference: &str) -> bool {
    match (math_value(predicted), math_value(reference)) {
        (Some(a), Some(b)) => same_number(a, b),
        _ => {
            let (p, r) = (normalize(predicted), normalize(reference));
            !p.is_empty() && p == r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_answer_takes_the_last_block() {
        assert_eq!(xml_answer("<answer>1</answer> then <answer> 2 </answer>"), Some("2"));
        assert_eq!(xml_answer("<answer>\n7"), Some("7"));
        assert_eq!(xml_answer("no tags"), None);
    }

    #[test]
    fn gsm8k_equality_handles_formatting_but_not_units() {
        assert!(gsm8k_equal(" $1,000. ", "1000"));
        assert!(gsm8k_equal("18.0", "18"));
        assert!(gsm8k_equal("50%", "50"));
        assert!(gsm8k_equal("-3", "-3"));
        assert!(!gsm8k_equal("18 dollars", "18"));
        assert!(!gsm8k_equal("", ""));
        assert!(!gsm8k_equal("17", "18"));
    }

    #[test]
    fn math_values_of_fractions_latex_and_boxes() {
        assert_eq!(math_value("3/4"), Some(0.75));
        assert_eq!(math_value("\\frac{3}{4}"), Some(0.75));
        assert_eq!(math_value("-\\dfrac{1}{2}"), Some(-0.5));
        assert_eq!(math_value("\\boxed{\\frac{3}{4}}"), Some(0.75));
        assert_eq!(math_value("$\\boxed{12}$"), Some(12.0));
        assert_eq!(math_value("1/0"), None);
        assert!(math_equal("0.75", "\\frac{3}{4}"));
        assert!(math_equal("75\\%", "0.75"));
        assert!(!math_equal("0.7", "3/4"));
    }
}
