//! Tool calls as a model writes them, in two formats: inline as GSM8K's
//! rationales write arithmetic (`<<48/2=24>>`), and Hermes's `<tool_call>{json}
//! </tool_call>` (the chat templates of Qwen2.5 and Qwen3; vLLM's `hermes`
//! parser), whose result comes back as the template's `tool` message. Here:
//! how sampling recognizes a call the text ends with, and what a completion
//! records of each. What answers a call (the calculator, a program) and how its
//! result is appended is `rollout::tools`.

use serde::{Deserialize, Serialize};

use crate::data::Message;

pub const OPEN: &str = "<<";
pub const SEPARATOR: &str = "=";
pub const CLOSE: &str = ">>";

pub const HERMES_OPEN: &str = "<tool_call>";
pub const HERMES_CLOSE: &str = "</tool_call>";

/// The longest expression an inline call may have (a longer one is not a call).
const MAX_CALL_CHARS: usize = 256;
/// The longest JSON body a Hermes call may have.
const MAX_HERMES_CHARS: usize = 4096;

/// How the model writes a call (`tool_call_format` in a stage's YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFormat {
    /// `<<expression=`, answered with `result>>` inside the same turn.
    #[default]
    Inline,
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, answered with the
    /// chat template's rendering of a `tool` message and the next assistant turn.
    Hermes,
}

impl CallFormat {
    /// The call the text ends with, if any: an inline call's expression, or a
    /// Hermes call's JSON body (not yet parsed: a malformed one is answered
    /// with an error the model reads).
    pub fn pending(self, text: &str) -> Option<&str> {
        match self {
            CallFormat::Inline => pending_call(text),
            CallFormat::Hermes => pending_hermes_call(text),
        }
    }
}

/// The JSON body of a `<tool_call>…</tool_call>` the text ends with.
pub fn pending_hermes_call(text: &str) -> Option<&str> {
    let body = text.trim_end().strip_suffix(HERMES_CLOSE)?;
    let open = body.rfind(HERMES_OPEN)?;
    let json = body[open + HERMES_OPEN.len()..].trim();
    (!json.is_empty() && !json.contains(HERMES_CLOSE) && json.chars().count() <= MAX_HERMES_CHARS).then_some(json)
}

/// The expression of a call the text ends with: an open `<<`, no `>>` after it,
/// and the text ending in `=`, all on one line.
pub fn pending_call(text: &str) -> Option<&str> {
    let body = text.strip_suffix(SEPARATOR)?;
    let open = body.rfind(OPEN)?;
    let expr = &body[open + OPEN.len()..];
    let plain = !expr.contains(CLOSE) && !expr.contains(SEPARATOR) && !expr.contains('\n');
    (plain && !expr.trim().is_empty() && expr.chars().count() <= MAX_CALL_CHARS).then_some(expr)
}

/// An assistant's text with inline calls (`48/2 = <<48/2=24>>24 clips`) as the
/// turns of a model that calls the calculator the Hermes way: an assistant turn
/// up to and with the call (`48/2 = <tool_call>{"name": "calculator",
/// "arguments": {"expression": "48/2"}}</tool_call>`), a `tool` turn with its
/// result (`24`), and the next assistant turn from after the note (`24 clips`).
/// SFT trains on the assistant turns only, so the results stay context.
pub fn hermes_turns(text: &str) -> Vec<Message> {
    let mut turns = Vec::new();
    let mut from = 0;
    for (at, expression, result) in crate::data::gsm8k::calculator_notes(text) {
        let call = serde_json::json!({ "expression": expression });
        let said = format!(
            "{}{HERMES_OPEN}{{\"name\": \"calculator\", \"arguments\": {call}}}{HERMES_CLOSE}",
            &text[from..at.start]
        );
        turns.push(Message::new("assistant", &said));
        turns.push(Message::new("tool", result));
        from = at.end;
    }
    turns.push(Message::new("assistant", &text[from..]));
    turns
}

/// One call a completion made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// What the model wrote: an inline call's expression, a Hermes call's JSON.
    pub expression: String,
    /// What the model was shown after `=` (an error text starts with `error:`).
    pub result: String,
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::gsm8k;

    #[test]
    fn a_call_is_an_open_expression_ending_in_the_separator() {
        assert_eq!(pending_call("She has 48/2 = <<48/2="), Some("48/2"));
        assert_eq!(pending_call("<<3+4>>7 and x="), None, "no open call");
        assert_eq!(pending_call("a = "), None);
        assert_eq!(pending_call("<<1+\n2="), None, "one line");
        assert_eq!(pending_call("<<="), None, "empty");
        assert_eq!(pending_call("<<a=b="), None, "one separator");
    }

    const NATALIA: &str = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";

    #[test]
    fn calls_become_hermes_turns_with_the_results_as_tool_messages() {
        let turns = hermes_turns(&gsm8k::think_answer(&gsm8k::rationale_with_calls(NATALIA), "72"));
        let roles: Vec<&str> = turns.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["assistant", "tool", "assistant", "tool", "assistant"]);
        assert_eq!(
            turns[0].content,
            "<think>\nNatalia sold 48/2 = <tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\":\"48/2\"}}</tool_call>"
        );
        assert_eq!((turns[1].content.as_str(), turns[3].content.as_str()), ("24", "72"));
        assert!(turns[2].content.starts_with("24 clips in May.\nNatalia sold 48+24 = <tool_call>"));
        assert!(turns[4].content.starts_with("72 clips altogether") && turns[4].content.ends_with("</answer>"));
        // What the model writes parses as the call the sampler answers.
        let body = pending_hermes_call(&turns[0].content).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["arguments"]["expression"], "48/2");
        // Without notes, one assistant turn.
        assert_eq!(hermes_turns("plain").len(), 1);
    }

    #[test]
    fn a_hermes_call_is_a_closed_tool_call_element_the_text_ends_with() {
        let call = r#"{"name": "calculator", "arguments": {"expression": "48/2"}}"#;
        let h = |t: &str| CallFormat::Hermes.pending(t).map(str::to_string);
        let want = Some(call.to_string());
        assert_eq!(h(&format!("Half: <tool_call>\n{call}\n</tool_call>")), want);
        assert_eq!(h(&format!("<tool_call>{call}</tool_call>\n")), want, "trailing space is fine");
        assert_eq!(h(&format!("<tool_call>{call}")), None, "not closed yet");
        assert_eq!(h("<tool_call> </tool_call>"), None, "empty");
        assert_eq!(h("text </tool_call>"), None, "never opened");
        assert_eq!(h(&format!("<tool_call>{call}</tool_call> and more")), None, "not at the end");
        assert_eq!(CallFormat::Inline.pending("x <<2+2="), Some("2+2"));
        assert_eq!(CallFormat::Hermes.pending("x <<2+2="), None, "each format its own syntax");
    }
}
