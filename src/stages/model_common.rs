//! What the model stages share: model references in parameters, loading on
//! the pipeline's device, and models to sample from (local or served).

use std::path::PathBuf;

use anyhow::Result;

use crate::common::ParamError;
use crate::model::{self, ChatTokenizer, LoadedModel, ModelRef, SamplingParams};
use crate::pipeline::{Project, StageContext};
use crate::rollout::{Client, Sampler, ServerConfig};

/// A model reference in a parameter: local files enter the fingerprint (returned),
/// hub ids by name; artifact references are checked by the runner.
pub fn check_model_ref(param: &str, value: &str, project: &Project) -> Result<Option<(String, PathBuf)>, ParamError> {
    if value.contains("${") {
        return Ok(None);
    }
    match ModelRef::parse(value, &project.root) {
        Ok(r) => Ok(r.local_path().map(|p| (param.to_string(), p.to_path_buf()))),
        Err(e) => Err(ParamError::new(param, e.to_string())
            .hint("a model is a local folder (config.json, weights, tokenizer), a .gguf file, or a hub id like Qwen/Qwen2.5-0.5B-Instruct")),
    }
}

/// Load a model named by a (bound) parameter on the run's device and dtype, and say so.
pub fn open_model(ctx: &StageContext, reference: &str) -> Result<LoadedModel> {
    let m = model::open(reference, &ctx.project.root, &ctx.env.device, &ctx.env.dtype)?;
    eprintln!(
        "{}: {reference} ({:.0}M parameters) on {}, {:?}, kernels: {}",
        ctx.stage,
        m.model.num_parameters() as f64 / 1e6,
        model::device::describe(&m.model.device),
        m.model.compute_dtype,
        crate::kernels::describe(m.model.device.is_cpu(), m.model.compute_dtype)
    );
    Ok(m)
}

/// A model to sample from: loaded here, or served elsewhere (`rollout:`), in
/// which case only its tokenizer and chat template are read (the prompts sent
/// are token ids rendered as for the local model, so the two compare fairly).
// One per stage: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum SamplingModel {
    Local(LoadedModel),
    Served { tokenizer: ChatTokenizer, client: Client },
}

impl SamplingModel {
    pub fn tokenizer(&self) -> &ChatTokenizer {
        match self {
            SamplingModel::Local(m) => &m.tokenizer,
            SamplingModel::Served { tokenizer, .. } => tokenizer,
        }
    }

    pub fn sampler(&self) -> Sampler<'_> {
        match self {
            SamplingModel::Local(m) => Sampler::Local(&m.model),
            SamplingModel::Served { client, .. } => Sampler::Server { client, model: client.model().to_string() },
        }
    }
}

/// Open `reference` for sampling, locally or (with `rollout`) on a server.
pub fn open_for_sampling(ctx: &StageContext, reference: &str, rollout: Option<&ServerConfig>) -> Result<SamplingModel> {
    match rollout {
        None => {
            let mut m = open_model(ctx, reference)?;
            // Sampling stages never train the model: its weights can be packed for the
            // CPU's inference product (twice the decode rate of the unpacked kernel).
            m.model.pack_for_inference()?;
            Ok(SamplingModel::Local(m))
        }
        Some(rc) => {
            let tokenizer = model::load::open_tokenizer(reference, &ctx.project.root)?;
            eprintln!("{}: `{}` served at {} (tokenizer from {reference})", ctx.stage, rc.model, rc.url);
            Ok(SamplingModel::Served { tokenizer, client: Client::new(rc, ctx.cancel.clone())? })
        }
    }
}

/// Sampling parameters' problems as parameter errors.
pub fn sampling_errors(s: &SamplingParams) -> Vec<ParamError> {
    s.problems().into_iter().map(|(k, m)| ParamError::new(k, m)).collect()
}
