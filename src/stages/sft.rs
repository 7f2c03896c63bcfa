//! `sft`: supervised fine-tuning on the assistant turns of chat examples. The
//! algorithm and its settings are `train::sft`; this file is the stage's
//! inputs (model, data) and the wiring.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::training::{self, open_trainable};
use super::trl_compat::{self, Trainer};
use crate::common::params::{checked, known_keys, with_defaults};
use crate::common::ParamError;
use crate::data::{jsonl, rows::sft_messages};
use crate::pipeline::{KindInfo, Project, Requirements, StageContext, StageKind};
use crate::train::sft::{self, SftAlgorithm, SftConfig};

/// The stage's parameters: its inputs, and SFT's settings (TRL's names) flattened in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Params {
    /// The model to fine-tune: a model folder, a .gguf, a hub id, or `${stage.model}`.
    pub model: String,
    /// Examples: `${prompts.sft}`, or a local JSONL of `{messages}` or `{prompt, completion}`.
    pub train: String,
    #[serde(flatten)]
    pub sft: SftConfig,
}

pub struct Sft;

impl StageKind for Sft {
    fn info(&self) -> &'static KindInfo {
        // 3: LoRA runs also write `adapter`.
        &KindInfo {
            name: "sft",
            version: 3,
            description: "supervised fine-tuning on the assistant turns of chat examples",
            outputs: training::OUTPUTS,
        }
    }
    fn normalize(&self, params: &mut serde_json::Map<String, Value>) -> Vec<ParamError> {
        trl_compat::normalize(params, Trainer::Sft, &known_keys::<Params>())
    }
    fn fingerprint_params(&self, params: &Value) -> Value {
        training::fingerprint_params(params)
    }
    fn absent_outputs(&self, params: &Value) -> Vec<(&'static str, &'static str)> {
        training::absent_outputs(training::OUTPUTS, params)
    }
    fn exp_view(&self, params: &Value, metrics: Option<&Value>) -> Option<crate::pipeline::kind::ExpView> {
        training::exp_view(params, metrics)
    }
    fn draws_curves(&self) -> bool {
        true
    }
    fn render(
        &self,
        runs: &[crate::pipeline::kind::PlotRun],
        out: &std::path::Path,
        title: &str,
        options: crate::pipeline::kind::PlotOptions,
    ) -> Result<std::path::PathBuf> {
        training::render(runs, out, title, options)
    }

    fn parameters(&self) -> Value {
        serde_json::to_value(Params::default()).unwrap_or_default()
    }
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = with_defaults(params)?;
        let (req, mut errors) = training::check_inputs(&p.model, &p.train, project);
        errors.extend(p.sft.problems());
        checked(req, errors)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params_with_defaults()?;
        training::apply_stage_settings(ctx, &p.sft.training);
        let mut loaded = open_trainable(ctx, &p.model, p.sft.training.lora.as_ref())?;
        let path = training::data_path(&p.train, &ctx.project);
        let mut examples = Vec::new();
        for (line, row) in jsonl::read::<Value>(&path)? {
            let messages = sft_messages(&row).map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
            examples.push(
                sft::tokenize(&loaded.tokenizer, &messages, p.sft.max_length)
                    .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?,
            );
        }
        if examples.is_empty() {
            bail!("{} has no examples: SFT needs at least one (is the train split empty?)", path.display());
        }
        let truncated = examples.iter().filter(|e| e.truncated).count();
        if truncated > 0 {
            eprintln!(
                "{}: {truncated} of {} examples were longer than max_length = {} and were truncated",
                ctx.stage,
                examples.len(),
                p.sft.max_length
            );
        }
        let pad = loaded.tokenizer.pad_id;
        let training_cfg = p.sft.training.clone();
        let mut algo = SftAlgorithm::new(p.sft, pad, &examples, ctx.env.seed);
        training::run(
            ctx,
            &mut loaded,
            &p.model,
            &mut algo,
            &training_cfg,
            json!({ "truncated_examples": truncated }),
            None,
        )?;
        Ok(())
    }
}
