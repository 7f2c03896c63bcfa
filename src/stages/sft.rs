//! `sft`: supervised fine-tuning on the assistant turns of chat examples
//! (the algorithm is `train::sft`; this file is its parameters and outputs).

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::model_common::check_known_keys;
use super::training::{self, open_trainable, TrainingArgs};
use crate::common::{typed, ParamError};
use crate::data::jsonl;
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::train::optim::Schedule;
use crate::train::sft::{self, SftAlgorithm};
use crate::train::trainer::Hyper;

// No deny_unknown_fields: serde does not support it with `flatten`; `check` lists the keys.
#[derive(Debug, Clone, Deserialize)]
pub struct Params {
    #[serde(flatten)]
    pub training: TrainingArgs,
    #[serde(default = "d_len")]
    pub max_seq_length: usize,
    /// Pack several examples per sequence; attention never crosses examples.
    #[serde(default)]
    pub packing: bool,
}

fn d_len() -> usize {
    1024
}

const OWN_KEYS: &[&str] = &["max_seq_length", "packing"];

/// Code defaults of the shared parameters for SFT (TRL's SFTConfig names, full fine-tuning).
pub const DEFAULTS: Hyper = Hyper {
    learning_rate: 2e-5,
    lr_scheduler_type: Schedule::Cosine,
    warmup_ratio: 0.1,
    adam_beta1: 0.9,
    adam_beta2: 0.999,
    weight_decay: 0.0,
    max_grad_norm: 1.0,
    per_device_train_batch_size: 8,
    gradient_accumulation_steps: 1,
    max_steps: None,
    num_train_epochs: 1.0,
    save_steps: 500,
    save_total_limit: 2,
    gradient_checkpointing: true,
};

pub struct Sft;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "model",
        file_name: "model",
        is_dir: true,
        description: "the fine-tuned model, Hugging Face layout",
    },
    OutputSpec {
        name: "metrics",
        file_name: "metrics.json",
        is_dir: false,
        description: "final loss, tokens seen, time",
    },
    OutputSpec {
        name: "log",
        file_name: "log.jsonl",
        is_dir: false,
        description: "per-step loss, learning rate, grad norm",
    },
    OutputSpec {
        name: "plots",
        file_name: "plots",
        is_dir: true,
        description: "SVG curves of the log and an index.html",
    },
    training::ADAPTER_OUTPUT,
];

impl StageKind for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        // 3: LoRA runs also write `adapter`.
        3
    }
    fn description(&self) -> &'static str {
        "supervised fine-tuning on the assistant turns of chat examples"
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        OUTPUTS
    }
    fn absent_outputs(&self, params: &Value) -> Vec<(&'static str, &'static str)> {
        training::absent_outputs(params)
    }
    fn render(
        &self,
        artifacts: &std::collections::BTreeMap<String, std::path::PathBuf>,
        work_dir: Option<&std::path::Path>,
        out: &std::path::Path,
        title: &str,
    ) -> Option<Result<std::path::PathBuf>> {
        training::render(artifacts, work_dir, out, title)
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        check_known_keys(params, &[TrainingArgs::KEYS, OWN_KEYS])?;
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let hp = p.training.resolve(&DEFAULTS);
        let (req, mut errors) = p.training.check(&hp, project);
        if p.max_seq_length < 2 {
            errors.push(ParamError::new("max_seq_length", "must be at least 2 (a token and the one it predicts)"));
        }
        if errors.is_empty() {
            Ok(req)
        } else {
            Err(errors)
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let hp = p.training.resolve(&DEFAULTS);
        let mut loaded = open_trainable(ctx, &p.training)?;
        let path = p.training.train_path(&ctx.project);
        let mut examples = Vec::new();
        for (line, row) in jsonl::read::<Value>(&path)? {
            let messages =
                crate::data::rows::sft_messages(&row).map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
            examples.push(
                sft::tokenize(&loaded.tokenizer, &messages, p.max_seq_length)
                    .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?,
            );
        }
        if examples.is_empty() {
            bail!("{} has no examples: SFT needs at least one (is the train split empty?)", path.display());
        }
        let truncated = examples.iter().filter(|e| e.truncated).count();
        if truncated > 0 {
            eprintln!(
                "sft: {truncated} of {} examples were longer than max_seq_length = {} and were truncated",
                examples.len(),
                p.max_seq_length
            );
        }
        let pad = loaded.tokenizer.pad_id;
        let mut algo = SftAlgorithm::new(hp.clone(), p.max_seq_length, p.packing, pad, &examples, ctx.env.seed);
        training::run(ctx, &mut loaded, &p.training.model, &mut algo, &hp, json!({ "truncated_examples": truncated }))?;
        Ok(())
    }
}
