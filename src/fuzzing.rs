//! Fuzz harnesses: every parser that a user's file or a server's reply
//! reaches, each behind one function of arbitrary bytes that runs the parser
//! as r1pipe does and says whether the parser accepted them. What a harness
//! may never do is panic, abort, hang or allocate without bound: that is what
//! the fuzzers look for. `tests/fuzz.rs` drives them from the committed seed
//! corpus (`tests/fuzz/corpus/<target>/`) with mutations, in the test suite;
//! `fuzz/` has cargo-fuzz targets calling the same functions for long runs
//! (`bench/fuzz.sh`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::data::{jsonl, Message, PromptRow};
use crate::model::{ChatTokenizer, Config};
use crate::rewards::RewardSet;

/// A fuzz target: its name (the corpus folder's) and its harness.
pub struct Target {
    pub name: &'static str,
    /// Whether the parser accepted the bytes.
    pub run: fn(&[u8]) -> bool,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "pipeline_yaml", run: pipeline_yaml },
    Target { name: "reward_set", run: reward_set },
    Target { name: "jsonl_rows", run: jsonl_rows },
    Target { name: "model_config", run: model_config },
    Target { name: "tokenizer_json", run: tokenizer_json },
    Target { name: "chat_template", run: chat_template },
    Target { name: "gguf", run: gguf },
    Target { name: "safetensors", run: safetensors },
    Target { name: "shard_index", run: shard_index },
    Target { name: "server_reply", run: server_reply },
];

/// A pipeline file, validated as `r1pipe run` does before running anything.
pub fn pipeline_yaml(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    let _ = std::fs::create_dir_all(dir.0.join("stages"));
    let file = dir.write("pipe.yaml", bytes);
    crate::pipeline::spec::load(&file, &[], &crate::stages::registry()).is_ok()
}

/// A reward-set file (no program in it is started: that happens when a stage scores).
pub fn reward_set(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    // The program the corpus's set names must exist: a set is checked for it before anything runs.
    dir.write("stages/rewards/examples/concise_correct.py", b"");
    let file = dir.write("set.yaml", bytes);
    RewardSet::from_file(&file, &dir.0).is_ok()
}

/// A JSONL file of prompt rows (a format stage's output, or a user's).
pub fn jsonl_rows(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    jsonl::read::<PromptRow>(&dir.write("rows.jsonl", bytes)).is_ok()
}

/// A model's config.json: parsed, sized, and its weight list made when it is accepted.
pub fn model_config(bytes: &[u8]) -> bool {
    let Ok(raw) = serde_json::from_slice(bytes) else { return false };
    match Config::from_json(raw) {
        Ok(cfg) => !cfg.weight_shapes().is_empty(),
        Err(_) => false,
    }
}

/// A tokenizer.json (with a plain chat template), loaded and used on a prompt.
pub fn tokenizer_json(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    dir.write("tokenizer.json", bytes);
    dir.write("tokenizer_config.json", br#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#);
    let Ok(tok) = ChatTokenizer::from_dir(&dir.0) else { return false };
    tok.encode_chat(&prompt(), true).and_then(|ids| tok.decode(&ids)).is_ok()
}

/// A chat template (tokenizer_config.json's `chat_template`), rendered for a prompt.
pub fn chat_template(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    dir.write("tokenizer.json", TINY_TOKENIZER.as_bytes());
    let config = serde_json::json!({ "chat_template": String::from_utf8_lossy(bytes), "eos_token": "b" });
    dir.write("tokenizer_config.json", config.to_string().as_bytes());
    ChatTokenizer::from_dir(&dir.0).and_then(|tok| tok.encode_chat(&prompt(), true)).is_ok()
}

/// A .gguf file's header and metadata, turned into Hugging Face files.
pub fn gguf(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    let file = dir.write("model.gguf", bytes);
    match crate::model::gguf_meta::materialize(&file) {
        Ok(files) => std::fs::remove_dir_all(files).is_ok(),
        Err(_) => false,
    }
}

/// A .safetensors file's header and tensors.
pub fn safetensors(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    let file = dir.write("model.safetensors", bytes);
    candle_core::safetensors::load(&file, &candle_core::Device::Cpu).is_ok()
}

/// A sharded model's model.safetensors.index.json.
pub fn shard_index(bytes: &[u8]) -> bool {
    let dir = Scratch::new();
    crate::model::load::shard_files(&dir.write("model.safetensors.index.json", bytes)).is_ok()
}

/// A completions server's reply body, as the rollout client reads it.
pub fn server_reply(bytes: &[u8]) -> bool {
    crate::rollout::client::parse_completions(&String::from_utf8_lossy(bytes), 2, true).is_ok()
}

fn prompt() -> Vec<Message> {
    vec![Message::new("system", "Answer."), Message::new("user", "What is 2 + 3?")]
}

/// A word-level tokenizer of five tokens: enough for a chat template to be tokenized.
const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"a":1,"b":2,"2":3,"3":4},"unk_token":"[UNK]"}}"#;

/// A folder of its own for one harness call, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("r1pipe-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        Scratch(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&path, bytes);
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The corpus folder of a target under `root` (the seeds committed in the repository).
pub fn corpus_dir(root: &Path, target: &str) -> PathBuf {
    root.join("tests/fuzz/corpus").join(target)
}
