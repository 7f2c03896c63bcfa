//! `grpo`: group relative policy optimization of a model against a reward set
//! (the algorithm is `train::grpo`; this file is its parameters and outputs).

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::model_common::check_known_keys;
use super::reward_param::reward_set;
use super::rollout_param;
use super::training::{self, open_trainable, TrainingArgs};
use crate::common::{typed, ParamError};
use crate::data::jsonl;
use crate::data::PromptRow;
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::rollout::{Client, ServerConfig};
use crate::train::grpo::{truncate_prompt, GrpoAlgorithm, GrpoConfig, GrpoPrompt};
use crate::train::optim::Schedule;
use crate::train::rollout_sync::RolloutServer;
use crate::train::trainer::Hyper;

// No deny_unknown_fields: serde does not support it with `flatten`; `check` lists the keys.
#[derive(Debug, Clone, Deserialize)]
pub struct Params {
    #[serde(flatten)]
    pub training: TrainingArgs,
    /// A reward-set file or an inline list of {name, weight, params}.
    pub rewards: Value,
    #[serde(flatten)]
    pub grpo: GrpoConfig,
    /// Sample on an OpenAI-compatible server (vLLM) instead of the local model.
    #[serde(default)]
    pub rollout: Option<ServerConfig>,
}

/// Code defaults of the shared parameters for GRPO: TRL's GRPOConfig (batch 8 ×
/// accumulation 1, no warmup-less surprises) with the R1 recipe's optimizer
/// settings; `stages/grpo.yaml` is the recipe's preset on top.
pub const DEFAULTS: Hyper = Hyper {
    learning_rate: 1e-6,
    lr_scheduler_type: Schedule::Cosine,
    warmup_ratio: 0.1,
    adam_beta1: 0.9,
    adam_beta2: 0.99,
    weight_decay: 0.1,
    max_grad_norm: 0.1,
    per_device_train_batch_size: 8,
    gradient_accumulation_steps: 1,
    max_steps: None,
    num_train_epochs: 1.0,
    save_steps: 500,
    save_total_limit: 2,
    gradient_checkpointing: true,
};

pub struct Grpo;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "model",
        file_name: "model",
        is_dir: true,
        description: "the trained model, Hugging Face layout",
    },
    OutputSpec { name: "metrics", file_name: "metrics.json", is_dir: false, description: "summary of the run" },
    OutputSpec { name: "log", file_name: "log.jsonl", is_dir: false, description: "per-step metrics with TRL's names" },
    OutputSpec {
        name: "plots",
        file_name: "plots",
        is_dir: true,
        description: "SVG curves of the log and an index.html",
    },
    training::ADAPTER_OUTPUT,
];

impl StageKind for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }
    fn version(&self) -> u32 {
        // 3: LoRA runs also write `adapter`.
        3
    }
    fn description(&self) -> &'static str {
        "group relative policy optimization against a reward set"
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
    fn fingerprint_params(&self, params: &Value) -> Value {
        rollout_param::fingerprint_params(params, "rollout")
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        check_known_keys(params, &[TrainingArgs::KEYS, GrpoConfig::KEYS, &["rewards", "rollout"]])?;
        let server = rollout_param::check(params, "rollout")?;
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let hp = p.training.resolve(&DEFAULTS);
        let (mut req, mut errors) = p.training.check(&hp, project);
        let g = &p.grpo;
        match reward_set(&p.rewards, project) {
            Ok((_, Some(file))) => req.local_paths.push(("rewards".into(), file)),
            Ok((_, None)) => {}
            Err(es) => errors.extend(es.into_iter().map(|mut e| {
                e.path = if e.path.is_empty() { "rewards".into() } else { format!("rewards.{}", e.path) };
                e
            })),
        }
        for (k, v) in [
            ("num_iterations", g.num_iterations),
            ("max_completion_length", g.max_completion_length),
            ("max_prompt_length", g.max_prompt_length),
        ] {
            if v == 0 {
                errors.push(ParamError::new(k, "must be at least 1"));
            }
        }
        if g.num_generations < 2 {
            errors.push(ParamError::new(
                "num_generations",
                "must be at least 2: advantages compare completions of one prompt",
            ));
        } else if !hp.per_step().is_multiple_of(g.num_generations) {
            errors.push(
                ParamError::new(
                    "num_generations",
                    format!(
                        "per_device_train_batch_size × gradient_accumulation_steps = {} is not a multiple of num_generations = {}",
                        hp.per_step(),
                        g.num_generations
                    ),
                )
                .hint("each optimizer step takes whole groups of completions"),
            );
        }
        if g.temperature.is_nan() || g.temperature <= 0.0 {
            errors.push(ParamError::new("temperature", "GRPO samples: temperature must be > 0"));
        }
        for (field, message) in g.sampling().problems() {
            let field = if field == "max_new_tokens" { "max_completion_length" } else { field };
            if field != "temperature" {
                errors.push(ParamError::new(field, message));
            }
        }
        if server.is_some() && p.training.lora.is_none() {
            errors.push(
                ParamError::new(
                    "rollout",
                    "a rollout server samples from its own copy of the weights, and full fine-tuning has no \
                     way to send it the updated ones",
                )
                .hint("add `lora: { r: 16 }`: after each step the adapters are handed to the server (PEFT layout)"),
            );
        }
        if g.vllm_importance_sampling_correction && server.is_none() {
            errors.push(ParamError::new(
                "vllm_importance_sampling_correction",
                "corrects for sampling on a server; this stage samples locally (no `rollout:`)",
            ));
        }
        if g.epsilon < 0.0 || g.epsilon_high.is_some_and(|e| e < 0.0) {
            errors.push(ParamError::new("epsilon", "clipping ranges must be ≥ 0"));
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
        let (rewards, _) = reward_set(&p.rewards, &ctx.project).map_err(|e| {
            anyhow::anyhow!("rewards: {}", e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; "))
        })?;
        let mut loaded = open_trainable(ctx, &p.training)?;
        let train_path = p.training.train_path(&ctx.project);
        let mut prompts = Vec::new();
        for (line, row) in jsonl::read::<PromptRow>(&train_path)? {
            let ids = loaded
                .tokenizer
                .encode_chat(&row.prompt, true)
                .map_err(|e| anyhow::anyhow!("{}:{line}: {e:#}", train_path.display()))?;
            prompts.push(GrpoPrompt {
                ids: truncate_prompt(ids, p.grpo.max_prompt_length),
                question: row.question,
                answer: row.answer,
            });
        }
        if prompts.is_empty() {
            bail!("{} has no prompts: GRPO needs at least one (is the train split empty?)", train_path.display());
        }
        let tok = loaded.tokenizer.clone();
        let mut algo = GrpoAlgorithm::new(p.grpo, hp.clone(), &loaded.model, &tok, &rewards, prompts, ctx.env.seed)?;
        if let Some(rc) = &p.rollout {
            let server = RolloutServer::new(
                Client::new(rc, ctx.cancel.clone())?,
                rollout_param::adapter_dir(ctx, rc)?,
                rollout_param::adapter_prefix(ctx),
                p.training.model.clone(),
            );
            eprintln!("{}: rollouts from {} (model `{}`)", ctx.stage, rc.url, rc.model);
            algo = algo.with_server(server);
        }
        training::run(ctx, &mut loaded, &p.training.model, &mut algo, &hp, json!({}))?;
        Ok(())
    }
}
