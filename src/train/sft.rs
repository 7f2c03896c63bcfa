//! SFT's data and loss: chat examples tokenized with the model's own template,
//! a mask that keeps only the assistant's tokens, and the token cross-entropy
//! averaged over the unmasked tokens of the whole accumulated batch.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::Value;

use crate::model::{ChatTokenizer, Message};

/// One tokenized example: `targets[i]` says whether token i is trained on.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
    pub truncated: bool,
}

/// The messages of an SFT row: `{messages: [...]}` or `{prompt, completion}`
/// (each a string or a list of messages).
pub fn messages_of(row: &Value) -> Result<Vec<Message>> {
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

/// Tokenize a conversation; only assistant turns are targets. Each assistant
/// turn's tokens are found as the difference between the conversation rendered
/// up to that turn (with the generation prompt) and including it.
pub fn tokenize(tok: &ChatTokenizer, messages: &[Message], max_len: usize) -> Result<Example> {
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("the conversation has no assistant turn to train on");
    }
    let full = tok.encode(&tok.apply_chat_template(messages, false)?)?;
    let mut targets = vec![false; full.len()];
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.encode(&tok.apply_chat_template(&messages[..k], true)?)?;
        let upto = tok.encode(&tok.apply_chat_template(&messages[..=k], false)?)?;
        // Templates are prefix-stable in practice; where one is not, train from the first difference.
        let start = before.iter().zip(&upto).take_while(|(a, b)| a == b).count();
        for t in targets.iter_mut().take(upto.len().min(full.len())).skip(start) {
            *t = true;
        }
    }
    let truncated = full.len() > max_len;
    let n = full.len().min(max_len);
    Ok(Example { ids: full[..n].to_vec(), targets: targets[..n].to_vec(), truncated })
}

/// Sum of −log π over target tokens divided by `normalizer` (the number of target
/// tokens in the whole accumulated batch, so micro-batches add up to the mean).
/// `logp`: [B, T] log-probabilities of each position's token; `mask`: [B, T].
pub fn loss(logp: &Tensor, mask: &Tensor, normalizer: f64) -> candle_core::Result<Tensor> {
    (logp * mask)?.sum_all()?.neg()? / normalizer.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn masked_positions_contribute_nothing_to_loss_or_gradient() {
        let mask = Tensor::new(&[[0f32, 1.0, 1.0], [0.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let a = Var::new(&[[-5f32, -1.0, -2.0], [-7.0, -9.0, -0.5]], &Device::Cpu).unwrap();
        let b = Var::new(&[[-0.1f32, -1.0, -2.0], [-3.0, -0.2, -0.5]], &Device::Cpu).unwrap();
        let la = loss(a.as_tensor(), &mask, 3.0).unwrap();
        let lb = loss(b.as_tensor(), &mask, 3.0).unwrap();
        assert_eq!(la.to_scalar::<f32>().unwrap(), lb.to_scalar::<f32>().unwrap());
        assert!((la.to_scalar::<f32>().unwrap() - 3.5 / 3.0).abs() < 1e-6);
        let g = la.backward().unwrap();
        let g: Vec<Vec<f32>> = g.get(a.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(g, vec![vec![0.0, -1.0 / 3.0, -1.0 / 3.0], vec![0.0, 0.0, -1.0 / 3.0]]);
    }

    #[test]
    fn rows_in_both_shapes_become_messages() {
        let m = messages_of(&serde_json::json!({"prompt": "q", "completion": "a"})).unwrap();
        assert_eq!(m, vec![Message::new("user", "q"), Message::new("assistant", "a")]);
        let m = messages_of(&serde_json::json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(m.len(), 1);
        assert!(messages_of(&serde_json::json!({"text": "x"})).is_err());
    }
}
