//! `grpo`: group relative policy optimization of a model against a reward set.
//! The algorithm and its settings are `train::grpo`; this file is the stage's
//! inputs (model, data, rewards, an optional rollout server) and the wiring.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::reward_param::reward_set;
use super::rollout_param;
use super::training::{self, open_trainable};
use super::trl_compat::{self, Trainer};
use crate::common::params::{checked, known_keys, with_defaults};
use crate::common::ParamError;
use crate::data::{jsonl, PromptRow};
use crate::model::tool_call::CallFormat;
use crate::model::ChatTokenizer;
use crate::pipeline::{KindInfo, Project, Requirements, StageContext, StageKind};
use crate::rewards::set::RewardSet;
use crate::rollout::{Client, ServerConfig};
use crate::train::grpo::{truncate_prompt, GrpoAlgorithm, GrpoConfig, GrpoPrompt, RolloutDtype};
use crate::train::rollout_sync::RolloutServer;
use crate::train::task_eval::TaskEvaluator;
use crate::train::trainer::Evaluation;

/// The stage's parameters: its inputs, and GRPO's settings (TRL's names) flattened in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Params {
    /// The policy to start from: a model folder, a .gguf, a hub id, or `${stage.model}`.
    pub model: String,
    /// Training prompts: `${prompts.train}` or a local JSONL of prompt rows.
    pub train: String,
    /// A reward-set file or an inline list of {name, weight, params}.
    pub rewards: Value,
    /// Sample on an OpenAI-compatible server (vLLM) instead of the local model.
    pub rollout: Option<ServerConfig>,
    /// Held-out prompts to evaluate the policy on while it trains (`${prompts.test}`,
    /// or a JSONL of prompt rows): after the last step, and every `eval_steps`.
    pub eval_dataset: Option<String>,
    #[serde(flatten)]
    pub grpo: GrpoConfig,
}

pub struct Grpo;

impl StageKind for Grpo {
    fn info(&self) -> &'static KindInfo {
        // 3: LoRA runs also write `adapter`. 4: TRL 1.16's defaults (bias-corrected KL, sampler IS correction on).
        &KindInfo {
            name: "grpo",
            version: 4,
            description: "group relative policy optimization against a reward set",
            outputs: training::OUTPUTS_WITH_EVAL,
        }
    }
    fn absent_outputs(&self, params: &Value) -> Vec<(&'static str, &'static str)> {
        training::absent_outputs(training::OUTPUTS_WITH_EVAL, params)
    }
    fn normalize(&self, params: &mut serde_json::Map<String, Value>) -> Vec<ParamError> {
        trl_compat::normalize(params, Trainer::Grpo, &known_keys::<Params>())
    }
    fn fingerprint_params(&self, params: &Value) -> Value {
        let mut p = training::fingerprint_params(&rollout_param::fingerprint_params(params, "rollout"));
        rollout_param::mark_tool_sampler(&mut p, 1.0);
        p
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
        let server = rollout_param::check(params, "rollout")?;
        let p: Params = with_defaults(params)?;
        let (mut req, mut errors) = training::check_inputs(&p.model, &p.train, project);
        errors.extend(p.grpo.problems());
        match p.eval_dataset.as_deref().filter(|d| !d.trim().is_empty()) {
            Some(d) => {
                if let Some(local) = project.local_path(d) {
                    if let Some(problem) = training::jsonl_file_problem(&local) {
                        errors.push(ParamError::new("eval_dataset", problem));
                    }
                    req.local_paths.push(("eval_dataset".into(), local));
                }
            }
            None if p.grpo.evaluates() => {
                errors.push(ParamError::new("eval_dataset", "evaluation during training needs held-out prompts").hint(
                    "add `eval_dataset: ${prompts.test}` (a format stage's test split), or drop the eval_* settings",
                ))
            }
            None => {}
        }
        if p.rewards.is_null() {
            errors.push(ParamError::new("rewards", "required parameter is missing").hint(
                "a built-in reward set (r1-gsm8k), a reward-set file, or an inline list of {name, weight, params}",
            ));
        } else {
            match reward_set(&p.rewards, project) {
                Ok((set, content)) => {
                    if let Some(hash) = content {
                        req.content.push(("rewards".into(), hash));
                    }
                    for f in set.files() {
                        req.local_paths.push((format!("rewards: {}", f.display()), f));
                    }
                    if let Err(e) = weighted(set, p.grpo.reward_weights.as_deref()) {
                        errors.push(e);
                    }
                }
                Err(es) => errors.extend(es.into_iter().map(|mut e| {
                    e.path = if e.path.is_empty() { "rewards".into() } else { format!("rewards.{}", e.path) };
                    e
                })),
            }
        }
        if server.is_some() && p.grpo.tools.enabled() && p.grpo.tools.tool_call_format == CallFormat::Inline {
            errors.push(ParamError::new("tools", "a server cannot stop at an inline call (`<<expr=` has no closing string to stop on)").hint("set `tool_call_format: hermes` (its calls end at `</tool_call>`, which the server stops on), or sample here without `rollout:`"));
        }
        if server.is_some() && p.grpo.rollout_dtype == RolloutDtype::Bf16 {
            errors.push(
                ParamError::new("rollout_dtype", "applies to rollouts sampled here, and `rollout:` samples on a server")
                    .hint("drop `rollout_dtype` (the server's own dtype decides, e.g. vLLM's --dtype), or sample here without `rollout:`"),
            );
        }
        if server.is_some() && p.grpo.training.lora.is_none() {
            errors.push(
                ParamError::new(
                    "rollout",
                    "a rollout server samples from its own copy of the weights, and full fine-tuning has no \
                     way to send it the updated ones",
                )
                .hint("add `lora: { r: 16 }`: after each step the adapters are handed to the server (PEFT layout)"),
            );
        }
        checked(req, errors)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params_with_defaults()?;
        training::apply_stage_settings(ctx, &p.grpo.training);
        let (rewards, _) = reward_set(&p.rewards, &ctx.project).map_err(|e| {
            anyhow::anyhow!("rewards: {}", e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; "))
        })?;
        let rewards = weighted(rewards, p.grpo.reward_weights.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut loaded = open_trainable(ctx, &p.model, p.grpo.training.lora.as_ref())?;
        let train_path = training::data_path(&p.train, &ctx.project);
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
        let training_cfg = p.grpo.training.clone();
        let mut evaluator = match &p.eval_dataset {
            Some(d) => Some(evaluator(
                &p.grpo,
                &ctx.project.root,
                &training::data_path(d, &ctx.project),
                &tok,
                &rewards,
                ctx.env.seed,
            )?),
            None => None,
        };
        let evaluation = match evaluator.as_mut() {
            Some(e) => Some(Evaluation {
                every: p.grpo.eval_steps,
                best: p.grpo.best_metric().map_err(|e| anyhow::anyhow!("metric_for_best_model: {e}"))?,
                load_best_at_end: p.grpo.load_best_model_at_end,
                evaluator: e,
            }),
            None => None,
        };
        let mut algo = GrpoAlgorithm::new(p.grpo, &loaded.model, &tok, &rewards, prompts, ctx.env.seed)?
            .with_tools(&ctx.project.root);
        if let Some(rc) = &p.rollout {
            let server = RolloutServer::new(
                Client::new(rc, ctx.cancel.clone())?,
                rollout_param::adapter_dir(ctx, rc)?,
                rollout_param::adapter_prefix(ctx),
                p.model.clone(),
            );
            eprintln!("{}: rollouts from {} (model `{}`)", ctx.stage, rc.url, rc.model);
            algo = algo.with_server(server);
        }
        training::run(ctx, &mut loaded, &p.model, &mut algo, &training_cfg, json!({}), evaluation)?;
        Ok(())
    }
}

/// The evaluation during training: the first `eval_limit` rows of `path`,
/// greedy (or `num_generations_eval` samples each), at most
/// `max_completion_length` new tokens, as the `evaluate` stage judges them.
fn evaluator<'a>(
    cfg: &GrpoConfig,
    dir: &std::path::Path,
    path: &std::path::Path,
    tok: &'a ChatTokenizer,
    rewards: &'a RewardSet,
    seed: u64,
) -> Result<TaskEvaluator<'a>> {
    let mut rows: Vec<PromptRow> = jsonl::read(path)?.into_iter().map(|(_, r)| r).collect();
    if let Some(n) = cfg.eval_limit {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("eval_dataset: {} has no prompts to evaluate on", path.display());
    }
    let generations = cfg.num_generations_eval.unwrap_or(1);
    Ok(TaskEvaluator::new(tok, rows, generations, rewards, cfg.sampling(), cfg.per_device_eval_batch_size, seed)
        .with_tools(cfg.tools.clone(), dir))
}

/// The reward set with TRL's `reward_weights` in place of its own weights, one
/// per function in the set's order.
fn weighted(mut set: RewardSet, weights: Option<&[f32]>) -> std::result::Result<RewardSet, ParamError> {
    let Some(weights) = weights else { return Ok(set) };
    if weights.len() != set.terms.len() {
        return Err(ParamError::new(
            "reward_weights",
            format!("{} weights for {} reward functions ({})", weights.len(), set.terms.len(), set.names().join(", ")),
        )
        .hint(
            "give one weight per function, in the reward set's order, or drop `reward_weights` to keep the set's own",
        ));
    }
    for (t, &w) in set.terms.iter_mut().zip(weights) {
        t.weight = w;
    }
    Ok(set)
}
