//! The row schemas that pass between stages as JSONL lines: chat messages,
//! prompts (GRPO's training prompts and evaluation's test questions), and SFT
//! examples, in the two shapes TRL's SFTTrainer reads.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A prompt to sample from (GRPO's training prompts, evaluation's test questions):
/// the chat to render, the question alone, its reference answer and GSM8K's rationale.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptRow {
    pub prompt: Vec<Message>,
    pub question: String,
    pub answer: String,
    pub rationale: String,
}

/// An SFT example as `format` writes it: the conversation, assistant turn included.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftRow {
    pub messages: Vec<Message>,
    pub answer: String,
}

/// The messages of an SFT row: `{messages: [...]}` (conversational), or
/// `{prompt, completion}` (each a string or a list of messages; prompt-completion).
pub fn sft_messages(row: &Value) -> Result<Vec<Message>> {
    let as_messages = |v: &Value, role: &str| -> Result<Vec<Message>> {
        Ok(match v {
            Value::String(s) => vec![Message::new(role, s)],
            Value::Array(_) => serde_json::from_value(v.clone())?,
            _ => bail!("expected a string or a list of messages"),
        })
    };
    if let Some(m) = row.get("messages") {
        return Ok(serde_json::from_value(m.clone())?);
    }
    match (row.get("prompt"), row.get("completion")) {
        (Some(p), Some(c)) => {
            let mut m = as_messages(p, "user")?;
            m.extend(as_messages(c, "assistant")?);
            Ok(m)
        }
        _ => bail!("an SFT row needs `messages`, or `prompt` and `completion`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_rows_in_both_shapes_become_messages() {
        let m = sft_messages(&serde_json::json!({"prompt": "q", "completion": "a"})).unwrap();
        assert_eq!(m, vec![Message::new("user", "q"), Message::new("assistant", "a")]);
        let m = sft_messages(&serde_json::json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(m.len(), 1);
        assert!(sft_messages(&serde_json::json!({"text": "x"})).is_err());
    }
}
