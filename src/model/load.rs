//! Finding and loading a model: a local Hugging Face folder (safetensors,
//! sharded safetensors, or a GGUF beside config.json and the tokenizer files),
//! a `.gguf` file, or a hub repo id. Saving writes the Hugging Face layout.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::Config;
use super::family::FamilyInfo;
use super::tokenizer::ChatTokenizer;
use super::transformer::Transformer;
use crate::hub::HubRepo;

/// Where a model comes from, as a pipeline or the command line names it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelRef {
    Dir(PathBuf),
    Gguf(PathBuf),
    Hub { id: String, revision: String },
}

impl ModelRef {
    /// A local folder or `.gguf` when the path exists; `owner/name[@revision]` otherwise.
    pub fn parse(s: &str, base: &Path) -> Result<ModelRef> {
        let p = if Path::new(s).is_absolute() { PathBuf::from(s) } else { base.join(s) };
        if p.is_dir() {
            return Ok(ModelRef::Dir(p));
        }
        if p.is_file() && s.ends_with(".gguf") {
            return Ok(ModelRef::Gguf(p));
        }
        if s.ends_with(".gguf") || s.starts_with('.') || s.starts_with('/') {
            bail!("model `{s}`: {} does not exist", p.display());
        }
        let (id, revision) = s.split_once('@').unwrap_or((s, "main"));
        if id.split('/').count() != 2 || id.split('/').any(str::is_empty) {
            bail!("model `{s}` is neither an existing folder, a .gguf file, nor a hub id (OWNER/NAME)");
        }
        // `models/missing` has a hub id's shape, but a local folder `models/` says it is a path.
        let owner = id.split('/').next().unwrap_or_default();
        if base.join(owner).is_dir() {
            bail!(
                "model `{s}`: {} does not exist (`{owner}/` is a folder here, so this is a path, not a hub id)",
                p.display()
            );
        }
        Ok(ModelRef::Hub { id: id.to_string(), revision: revision.to_string() })
    }

    /// Whether the reference names local files (which then enter fingerprints by content).
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            ModelRef::Dir(p) | ModelRef::Gguf(p) => Some(p),
            ModelRef::Hub { .. } => None,
        }
    }
}

/// A model with its tokenizer, and the folder its config and tokenizer files came from.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: ChatTokenizer,
    pub files_dir: PathBuf,
}

/// The one way to open a model named by a user (stage parameter, `r1pipe
/// infer`, `r1pipe bench`): parse the reference against `base`, pick the device
/// and compute dtype from their specs (`auto`, `cpu`, `cuda:1`; `auto`, `bf16`, …), load.
pub fn open(reference: &str, base: &Path, device_spec: &str, dtype_spec: &str) -> Result<LoadedModel> {
    let dev = super::device::select(device_spec)?;
    let dtype = super::device::compute_dtype(dtype_spec, &dev)?;
    let r = ModelRef::parse(reference, base)?;
    let t0 = std::time::Instant::now();
    let m = load(&r, &dev, dtype).with_context(|| format!("loading model `{reference}`"))?;
    tracing::info!(
        model = reference,
        device = %super::device::describe(&dev),
        ?dtype,
        params = m.model.num_parameters(),
        secs = t0.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(m)
}

/// The tokenizer and chat template of a model reference without its weights:
/// for sampling on a server that holds them.
pub fn open_tokenizer(reference: &str, base: &Path) -> Result<ChatTokenizer> {
    let dir = match ModelRef::parse(reference, base)? {
        ModelRef::Dir(d) => d,
        ModelRef::Gguf(f) => gguf_files_dir(&f)?,
        ModelRef::Hub { id, revision } => fetch_hub(&id, &revision)?,
    };
    ChatTokenizer::from_dir(&dir).with_context(|| format!("the tokenizer of `{reference}`"))
}

/// The folder with a GGUF's config and tokenizer: beside it, or made from its metadata.
fn gguf_files_dir(f: &Path) -> Result<PathBuf> {
    let beside = f.parent().map(Path::to_path_buf).unwrap_or_default();
    if beside.join("config.json").exists() && beside.join("tokenizer.json").exists() {
        Ok(beside)
    } else {
        // A bare GGUF: config, tokenizer and chat template come from its metadata.
        super::gguf_meta::materialize(f)
    }
}

/// Resolve `r` to a local folder (downloading from the hub when needed) and load it.
pub fn load(r: &ModelRef, device: &Device, compute_dtype: DType) -> Result<LoadedModel> {
    let dir = match r {
        ModelRef::Dir(d) => d.clone(),
        ModelRef::Gguf(f) => {
            let dir = gguf_files_dir(f)?;
            let cfg = read_config(&dir)?;
            let weights = load_gguf(f, &cfg)?;
            let model = Transformer::new(cfg, weights, device, compute_dtype)?;
            return Ok(LoadedModel { model, tokenizer: ChatTokenizer::from_dir(&dir)?, files_dir: dir });
        }
        ModelRef::Hub { id, revision } => fetch_hub(id, revision)?,
    };
    let cfg = read_config(&dir)?;
    let weights = load_dir_weights(&dir, &cfg)?;
    let model = Transformer::new(cfg, weights, device, compute_dtype)
        .with_context(|| format!("building the model from {}", dir.display()))?;
    Ok(LoadedModel { model, tokenizer: ChatTokenizer::from_dir(&dir)?, files_dir: dir })
}

pub fn read_config(dir: &Path) -> Result<Config> {
    let p = dir.join("config.json");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Config::from_json(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?)
        .with_context(|| format!("in {}", p.display()))
}

/// The shard files a `model.safetensors.index.json` names, each checked to be a
/// plain file name in the model's own folder (an index may come from anywhere).
pub(crate) fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let idx: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = idx
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{} has no `weight_map`", index.display()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(f) = file.as_str() else { bail!("{}: weight_map.{tensor} is not a file name", index.display()) };
        let plain =
            matches!(Path::new(f).components().collect::<Vec<_>>().as_slice(), [std::path::Component::Normal(_)]);
        if !plain || !f.ends_with(".safetensors") {
            bail!("{}: weight_map.{tensor} names `{f}`, not a .safetensors file beside the index", index.display());
        }
        files.push(f.to_string());
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn load_dir_weights(dir: &Path, cfg: &Config) -> Result<BTreeMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return read_safetensors(&single);
    }
    if index.exists() {
        let files = shard_files(&index)?;
        let mut out = BTreeMap::new();
        for f in files {
            out.extend(read_safetensors(&dir.join(f))?);
        }
        return Ok(out);
    }
    let ggufs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => load_gguf(one, cfg),
        [] => bail!("{} has no model.safetensors, model.safetensors.index.json or .gguf", dir.display()),
        _ => bail!("{} holds several .gguf files; name one of them as the model", dir.display()),
    }
}

fn read_safetensors(p: &Path) -> Result<BTreeMap<String, Tensor>> {
    let m = candle_core::safetensors::load(p, &Device::Cpu).with_context(|| format!("reading {}", p.display()))?;
    Ok(m.into_iter().collect())
}

/// Dequantized weights of a llama.cpp GGUF under their Hugging Face names.
pub fn load_gguf(path: &Path, cfg: &Config) -> Result<BTreeMap<String, Tensor>> {
    use candle_core::quantized::gguf_file;
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a GGUF file", path.display()))?;
    let gguf_arch =
        content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let mut out = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let t = content
            .tensor(&mut f, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .with_context(|| format!("{}: reading tensor `{name}` (is the file truncated?)", path.display()))?;
        // llama.cpp permutes q and k of Llama models for its rotary layout; undo it.
        let permuted = FamilyInfo::of_gguf_arch(&gguf_arch).is_some_and(|f| f.gguf_permutes_qk);
        let t = if permuted {
            if hf.ends_with("q_proj.weight") {
                unpermute(&t, cfg.num_heads)?
            } else if hf.ends_with("k_proj.weight") {
                unpermute(&t, cfg.num_kv_heads)?
            } else {
                t
            }
        } else {
            t
        };
        out.insert(hf, t);
    }
    if cfg.tie_word_embeddings {
        out.remove("lm_head.weight");
    }
    Ok(out)
}

/// Inverse of llama.cpp's `permute`: rows grouped (head, pair, half) back to (head, half, pair).
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let p = format!("model.layers.{layer}");
            let mapped = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_q_norm.weight" => "self_attn.q_norm.weight",
                "attn_k_norm.weight" => "self_attn.k_norm.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("{p}.{mapped}")
        }
    })
}

/// Download a model's files from the hub (or take them from the hub cache) and return their folder.
fn fetch_hub(id: &str, revision: &str) -> Result<PathBuf> {
    fetch_hub_files(id, revision, true).map(|(dir, _)| dir)
}

/// A hub model's files in the hub cache: config, tokenizer, the optional files
/// beside them and (with `weights`) the safetensors, single or sharded. Returns
/// the snapshot folder and the names fetched.
pub fn fetch_hub_files(id: &str, revision: &str, weights: bool) -> Result<(PathBuf, Vec<String>)> {
    let repo = HubRepo::model(id, revision);
    let config = repo.get("config.json")?;
    let dir = config.parent().context("hub cache path")?.to_path_buf();
    let mut names = vec!["config.json".to_string()];
    repo.get("tokenizer.json")?;
    names.push("tokenizer.json".into());
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        match repo.get(optional) {
            Ok(_) => names.push(optional.into()),
            Err(e) => tracing::debug!(file = optional, error = %e, "optional model file not fetched"),
        }
    }
    if !weights {
        return Ok((dir, names));
    }
    match repo.get("model.safetensors") {
        Ok(_) => names.push("model.safetensors".into()),
        Err(single) => {
            let index = repo.get("model.safetensors.index.json").map_err(|_| single)?;
            names.push("model.safetensors.index.json".into());
            for f in shard_files(&index)? {
                repo.get(&f)?;
                names.push(f);
            }
        }
    }
    Ok((dir, names))
}

/// Write `model` in the Hugging Face layout: model.safetensors (f32, tied
/// weights stored once), config.json, and the tokenizer files copied from `files_dir`.
pub fn save(model: &Transformer, files_dir: &Path, out: &Path) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tensors: HashMap<String, Tensor> = model
        .tensors()
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::common::fsutil::save_safetensors(&tensors, &out.join("model.safetensors"))?;
    let mut cfg = model.cfg.raw.clone();
    if let Some(m) = cfg.as_object_mut() {
        m.insert("torch_dtype".into(), Value::String("float32".into()));
        m.insert("dtype".into(), Value::String("float32".into()));
        m.insert("tie_word_embeddings".into(), Value::Bool(model.cfg.tie_word_embeddings));
    }
    crate::common::fsutil::write_file(&out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = files_dir.join(f);
        let dst = out.join(f);
        // Saving over the model's own folder: the file is already there (copying onto itself would empty it).
        let same = matches!((fs::canonicalize(&src), fs::canonicalize(&dst)), (Ok(a), Ok(b)) if a == b);
        if src.exists() && !same {
            fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, r/h/2, c).swapaxes(1, 2).reshape(r, c)
        let (h, r, c) = (3usize, 12usize, 2usize);
        let w = Tensor::arange(0f32, (r * c) as f32, &Device::Cpu).unwrap().reshape((r, c)).unwrap();
        let permuted = w
            .reshape((h, 2, r / h / 2, c))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((r, c))
            .unwrap();
        let back = unpermute(&permuted, h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn model_refs_distinguish_folders_gguf_and_hub_ids() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("m")).unwrap();
        fs::write(tmp.path().join("x.gguf"), b"").unwrap();
        assert_eq!(ModelRef::parse("m", tmp.path()).unwrap(), ModelRef::Dir(tmp.path().join("m")));
        assert_eq!(ModelRef::parse("x.gguf", tmp.path()).unwrap(), ModelRef::Gguf(tmp.path().join("x.gguf")));
        assert_eq!(
            ModelRef::parse("Qwen/Qwen2.5-0.5B-Instruct", tmp.path()).unwrap(),
            ModelRef::Hub { id: "Qwen/Qwen2.5-0.5B-Instruct".into(), revision: "main".into() }
        );
        assert!(ModelRef::parse("missing.gguf", tmp.path()).is_err());
        assert!(ModelRef::parse("./models/missing", tmp.path()).is_err());
        assert!(ModelRef::parse("not-a-hub-id", tmp.path()).is_err());
    }
}
