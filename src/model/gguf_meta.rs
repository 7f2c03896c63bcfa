//! A bare `.gguf` file as a Hugging Face model folder: config.json,
//! tokenizer.json (byte-level BPE from `tokenizer.ggml.*`), tokenizer_config.json
//! (chat template, special tokens) and generation_config.json, written from
//! the GGUF metadata into a folder under the temp directory, so the rest of
//! the loader (and saving) treats it like any other model.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};

use super::family::{FamilyInfo, FAMILIES};

fn get<'a>(meta: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    meta.get(key).with_context(|| format!("the GGUF metadata has no `{key}`"))
}

fn u(meta: &HashMap<String, Value>, key: &str) -> Result<u64> {
    let v = get(meta, key)?;
    Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64))?)
}

fn f(meta: &HashMap<String, Value>, key: &str) -> Option<f64> {
    meta.get(key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

/// Write the Hugging Face files for `gguf` (once per file version) and return their folder.
pub fn materialize(gguf: &Path) -> Result<PathBuf> {
    let meta_fs = fs::metadata(gguf)?;
    let mtime = meta_fs.modified()?.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let key = blake3::hash(
        format!("r1pipe-gguf-v2\\0{}\\0{}\\0{mtime}", fs::canonicalize(gguf)?.display(), meta_fs.len()).as_bytes(),
    );
    let dir = std::env::temp_dir().join("r1pipe-gguf").join(&key.to_hex()[..16]);
    if dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let mut file = fs::File::open(gguf)?;
    let content = Content::read(&mut file).with_context(|| format!("{} is not a GGUF file", gguf.display()))?;
    let m = &content.metadata;
    let arch = get(m, "general.architecture")?.to_string()?.clone();
    let Some(family) = FamilyInfo::of_gguf_arch(&arch) else {
        bail!(
            "{}: GGUF architecture `{arch}` is not supported ({})",
            gguf.display(),
            FAMILIES.iter().map(|f| f.gguf_arch).collect::<Vec<_>>().join(", ")
        );
    };
    let (model_type, architecture) = (family.model_type, family.architecture);
    let tokens: Vec<String> = get(m, "tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let merges: Vec<String> = match m.get("tokenizer.ggml.merges") {
        Some(v) => v.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<candle_core::Result<_>>()?,
        None => Vec::new(),
    };
    let types: Vec<i64> = match m.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32().map(i64::from)).collect::<candle_core::Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let tok_model = m.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if tok_model != "gpt2" {
        bail!("{}: tokenizer model `{tok_model}` is not supported (gpt2-style byte-level BPE only)", gguf.display());
    }
    let bos = u(m, "tokenizer.ggml.bos_token_id").ok();
    let eos = u(m, "tokenizer.ggml.eos_token_id").ok();
    let pad = u(m, "tokenizer.ggml.padding_token_id").ok();
    let a = |k: &str| format!("{arch}.{k}");
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": u(m, &a("embedding_length"))?,
        "intermediate_size": u(m, &a("feed_forward_length"))?,
        "num_hidden_layers": u(m, &a("block_count"))?,
        "num_attention_heads": u(m, &a("attention.head_count"))?,
        "num_key_value_heads": u(m, &a("attention.head_count_kv")).or_else(|_| u(m, &a("attention.head_count")))?,
        "rms_norm_eps": f(m, &a("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": f(m, &a("rope.freq_base")).unwrap_or(10_000.0),
        "max_position_embeddings": u(m, &a("context_length")).unwrap_or(4096),
        "vocab_size": tokens.len(),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "head_dim": u(m, &a("attention.key_length")).ok(),
        "bos_token_id": bos,
        "eos_token_id": eos,
    });

    // Control (3) and user-defined (4) tokens are added special tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, t))| **t == 3 || **t == 4)
        .map(|(id, (content, t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": *t == 4, "special": *t == 3})
        })
        .collect();
    let vocab: Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let pre = m.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let pre_tokenizer = pre_tokenizer(&pre);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let name = |id: Option<u64>| id.and_then(|i| tokens.get(i as usize)).cloned();
    let tokenizer_config = json!({
        "chat_template": m.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()),
        "bos_token": name(bos),
        "eos_token": name(eos),
        "pad_token": name(pad.or(eos)),
    });
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    use crate::common::fsutil::write_file;
    write_file(&tmp.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    write_file(&tmp.join("tokenizer.json"), serde_json::to_string(&tokenizer)?)?;
    write_file(&tmp.join("tokenizer_config.json"), serde_json::to_string_pretty(&tokenizer_config)?)?;
    write_file(
        &tmp.join("generation_config.json"),
        serde_json::to_string_pretty(&json!({"eos_token_id": eos, "bos_token_id": bos}))?,
    )?;
    fs::create_dir_all(dir.parent().expect("under the temp dir"))?;
    if fs::rename(&tmp, &dir).is_err() {
        // Another process materialized it first.
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

/// The pre-tokenizer of a `tokenizer.ggml.pre` name, as tokenizer.json writes it.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match pre {
        // SmolLM splits digits one by one before the GPT-2 byte-level split.
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}),
        _ => byte_level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre_tokenizer(pre)).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(w, _, _)| w.to_string()).collect()
    }

    #[test]
    fn the_qwen2_pre_tokenizer_splits_words_numbers_and_spaces() {
        // Byte-level pieces: Ġ is a space. Words keep their leading space, digits go one by one.
        assert_eq!(split("qwen2", "Hi there 42!"), vec!["Hi", "Ġthere", "Ġ", "4", "2", "!"]);
        // One non-letter attaches to the letters after it, as in Qwen2's own tokenizer.json.
        assert_eq!(split("qwen2", "a\\b"), vec!["a", "\\b"]);
    }
}
