//! Tokenizer, chat template and stop tokens of a model, from its Hugging Face
//! files: tokenizer.json (the `tokenizers` crate), the Jinja chat template in
//! tokenizer_config.json (rendered by minijinja, Python methods included),
//! and EOS ids from generation_config.json / config.json / tokenizer_config.json.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub use crate::data::Message;

#[derive(Clone)]
pub struct ChatTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Any of these ends a generation.
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

/// A special token field: a plain string or `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

/// Instructions a chat template may run for one prompt: real templates take thousands.
const TEMPLATE_FUEL: u64 = 10_000_000;
/// Bytes a chat template may write for one prompt.
const TEMPLATE_OUTPUT_CAP: usize = 16 << 20;

/// A writer that refuses to grow past `cap` bytes.
struct CappedText {
    text: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            self.text.resize(self.cap, 0);
            return Err(std::io::Error::other("output cap reached"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Start the process that renders chat templates, before anything large is
/// loaded (`template_sandbox`): what `r1pipe`'s `main` does first.
pub fn start_template_process() {
    super::template_sandbox::start_early(render_template);
}

/// Render a chat template here (in the sandbox's process): fuel bounds its
/// instructions, `template_limits` its filters, and the output is capped.
fn render_template(r: &super::template_sandbox::Request) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| chrono::Local::now().format(&fmt).to_string());
    env.set_fuel(Some(TEMPLATE_FUEL));
    super::template_limits::install(&mut env);
    env.add_template("chat", &r.template).context("the chat template does not parse")?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from_serialize(&r.messages),
        add_generation_prompt => r.add_generation_prompt,
        bos_token => r.bos_token.clone(),
        eos_token => r.eos_token.clone(),
    };
    let mut out = CappedText { text: Vec::new(), cap: TEMPLATE_OUTPUT_CAP };
    let rendered = env.get_template("chat")?.render_captured_to(ctx, &mut out).map(|_| ());
    match rendered {
        Ok(_) => Ok(String::from_utf8(out.text).context("the chat template wrote invalid UTF-8")?),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => bail!(
            "the chat template ran out of its budget of {TEMPLATE_FUEL} instructions (a loop too long for a prompt)"
        ),
        Err(_) if out.text.len() >= out.cap => {
            bail!("the chat template wrote more than {} MiB for one prompt", TEMPLATE_OUTPUT_CAP >> 20)
        }
        Err(e) => Err(e).context("rendering the chat template"),
    }
}

/// A tokenizer.json, checked to be JSON first: the tokenizers library panics on
/// some malformed files (a truncated decoder, found by fuzzing) instead of
/// answering an error, so what still panics is caught and named too.
fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(anyhow!("reading {}: {e}", path.display())),
        Err(_) => Err(anyhow!("{} is not a tokenizer the tokenizers library can read", path.display())),
    }
}

impl ChatTokenizer {
    /// From a model folder holding tokenizer.json (and optionally tokenizer_config.json,
    /// generation_config.json, config.json).
    pub fn from_dir(dir: &Path) -> Result<ChatTokenizer> {
        let tj = dir.join("tokenizer.json");
        let tokenizer = read_tokenizer(&tj)?;
        if tokenizer.get_vocab_size(true) == 0 {
            bail!("{} has an empty vocabulary: no text can be tokenized with it", tj.display());
        }
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let template = template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let eos_token = token_string(tc.get("eos_token"));
        let mut eos_ids = ids(gc.get("eos_token_id"));
        for id in ids(cfg.get("eos_token_id")) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = token_string(tc.get("pad_token"))
            .and_then(|t| tokenizer.token_to_id(&t))
            .or_else(|| eos_ids.first().copied())
            .unwrap_or(0);
        Ok(ChatTokenizer {
            tokenizer,
            template,
            bos_token: token_string(tc.get("bos_token")),
            eos_token,
            eos_ids,
            pad_id,
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The model's own chat template applied to `messages`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.template else {
            // No template: plain role-prefixed turns, so base models still work.
            let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
            if add_generation_prompt {
                s.push_str("assistant: ");
            }
            return Ok(s);
        };
        let request = super::template_sandbox::Request {
            template: template.clone(),
            messages: serde_json::to_value(messages)?,
            add_generation_prompt,
            bos_token: self.bos_token.clone().unwrap_or_default(),
            eos_token: self.eos_token.clone().unwrap_or_default(),
        };
        super::template_sandbox::render(&request, render_template)
    }

    /// The chat template applied to `messages`, tokenized: the one way a
    /// conversation becomes model input.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?)
    }

    /// Token ids of text that already holds its special tokens (as a rendered template does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    /// Token ids of `text` with the byte range of `text` each came from.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(e.get_ids().iter().zip(e.get_offsets()).map(|(&id, &(a, b))| (id, a..b)).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Decodes a growing list of ids one token at a time, returning what each
    /// new token adds: a few tokens are decoded per step, not the whole list
    /// again (which made generation quadratic in the completion's length).
    pub fn text_stream(&self) -> TextStream<'_> {
        TextStream { inner: self.tokenizer.decode_stream(true) }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// See [`ChatTokenizer::text_stream`].
pub struct TextStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::models::ModelWrapper,
        tokenizers::normalizers::NormalizerWrapper,
        tokenizers::pre_tokenizers::PreTokenizerWrapper,
        tokenizers::processors::PostProcessorWrapper,
        tokenizers::decoders::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    /// The text `id` adds (`None` while it ends inside a character).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(|e| anyhow!("decoding: {e}"))
    }
}
