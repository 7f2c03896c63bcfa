//! Inline tool calls as GSM8K's rationales write them (`<<48/2=24>>`): where a
//! call opens, what ends its expression and closes its result, how sampling
//! recognizes one, and what a completion records of each. What answers a call
//! (the calculator, a program) is `rollout::tools`.

use serde::{Deserialize, Serialize};

pub const OPEN: &str = "<<";
pub const SEPARATOR: &str = "=";
pub const CLOSE: &str = ">>";

/// The longest expression a call may have (a longer one is not a call).
const MAX_CALL_CHARS: usize = 256;

/// The expression of a call the text ends with: an open `<<`, no `>>` after it,
/// and the text ending in `=`, all on one line.
pub fn pending_call(text: &str) -> Option<&str> {
    let body = text.strip_suffix(SEPARATOR)?;
    let open = body.rfind(OPEN)?;
    let expr = &body[open + OPEN.len()..];
    let plain = !expr.contains(CLOSE) && !expr.contains(SEPARATOR) && !expr.contains('\n');
    (plain && !expr.trim().is_empty() && expr.chars().count() <= MAX_CALL_CHARS).then_some(expr)
}

/// One call a completion made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub expression: String,
    /// What the model was shown after `=` (an error text starts with `error:`).
    pub result: String,
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_an_open_expression_ending_in_the_separator() {
        assert_eq!(pending_call("She has 48/2 = <<48/2="), Some("48/2"));
        assert_eq!(pending_call("<<3+4>>7 and x="), None, "no open call");
        assert_eq!(pending_call("a = "), None);
        assert_eq!(pending_call("<<1+\n2="), None, "one line");
        assert_eq!(pending_call("<<="), None, "empty");
        assert_eq!(pending_call("<<a=b="), None, "one separator");
    }
}
