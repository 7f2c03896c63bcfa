//! `infer`: answer questions with a model: a list in the YAML, or a JSONL file
//! of `{question}` (or `{prompt: [messages]}`) rows.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::model_common::{check_model_ref, open_for_sampling, sampling_errors};
use super::rollout_param;
use crate::common::params::{checked, with_defaults};
use crate::common::Host;
use crate::common::ParamError;
use crate::data::gsm8k::R1_SYSTEM_PROMPT;
use crate::data::jsonl;
use crate::model::tool_call::CallFormat;
use crate::model::tool_call::ToolCall;
use crate::model::Completion;
use crate::model::{FinishReason, Message, SamplingParams};
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::rewards::answer::xml_answer;
use crate::rollout::tools::{ToolSettings, Toolbox};
use crate::rollout::ServerConfig;

/// The stage's parameters (every one with a default; the required ones are checked).
#[derive(Debug, Serialize, Deserialize)]
struct Params {
    model: String,
    questions: Questions,
    system_prompt: String,
    batch_size: usize,
    /// Ask a server (OpenAI-compatible) instead of loading the weights; `model` gives the tokenizer.
    rollout: Option<ServerConfig>,
    #[serde(flatten)]
    sampling: SamplingParams,
    /// Tools that answer the model's calls (inline or Hermes).
    #[serde(flatten)]
    tools: ToolSettings,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            model: String::new(),
            questions: Questions::Inline(Vec::new()),
            system_prompt: R1_SYSTEM_PROMPT.into(),
            batch_size: 8,
            rollout: None,
            sampling: SamplingParams::default(),
            tools: ToolSettings::default(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged, expecting = "a list of questions or the path of a file of them")]
enum Questions {
    Inline(Vec<String>),
    File(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    question: String,
    prompt: Vec<Message>,
    completion: String,
    answer: Option<String>,
    tokens: usize,
    finish_reason: FinishReason,
    /// Seconds from the stage's first question until this answer finished.
    time_s: f64,
    /// The tool calls the answer made, each with its result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
}

pub struct Infer;

const OUTPUTS: &[OutputSpec] =
    &[OutputSpec::file("answers", "answers.jsonl", "question, completion, extracted answer")];

impl StageKind for Infer {
    fn info(&self) -> &'static KindInfo {
        &KindInfo { name: "infer", version: 1, description: "answer questions with a model", outputs: OUTPUTS }
    }

    fn fingerprint_params(&self, params: &Value) -> Value {
        rollout_param::fingerprint_params(params, "rollout")
    }

    fn parameters(&self) -> Value {
        serde_json::to_value(Params::default()).unwrap_or_default()
    }
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        rollout_param::check(params, "rollout")?;
        let p: Params = with_defaults(params)?;
        let mut errors = sampling_errors(&p.sampling);
        errors.extend(crate::common::params::batch_problem("batch_size", p.batch_size));
        errors.extend(p.tools.problems().into_iter().map(|(k, m)| ParamError::new(k, m)));
        if p.tools.enabled() && p.rollout.is_some() && p.tools.tool_call_format == CallFormat::Inline {
            errors.push(ParamError::new("tools", "a server cannot stop at an inline call (`<<expr=` has no closing string to stop on)").hint("set `tool_call_format: hermes` (its calls end at `</tool_call>`, which the server stops on), or sample here without `rollout:`"));
        }
        let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
        if p.model.trim().is_empty() {
            errors.push(ParamError::new("model", "required parameter is missing").hint("add `model:` under `with:`"));
        }
        match check_model_ref("model", &p.model, project) {
            Ok(Some(local)) => req.local_paths.push(local),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
        match &p.questions {
            Questions::Inline(q) if q.is_empty() => errors.push(ParamError::new("questions", "no questions")),
            Questions::Inline(_) => {}
            Questions::File(f) => {
                if let Some(local) = project.local_path(f) {
                    req.local_paths.push(("questions".into(), local));
                }
            }
        }
        checked(req, errors)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params_with_defaults()?;
        let system = Message::new("system", &p.system_prompt);
        let prompts: Vec<(String, Vec<Message>)> = match &p.questions {
            Questions::Inline(q) => {
                q.iter().map(|q| (q.clone(), vec![system.clone(), Message::new("user", q)])).collect()
            }
            Questions::File(f) => {
                let path = ctx.project.local_path(f).unwrap_or_else(|| f.into());
                let mut out = Vec::new();
                for (line, v) in jsonl::read::<Value>(&path)? {
                    if let Some(msgs) = v.get("prompt").filter(|p| p.is_array()) {
                        let msgs: Vec<Message> = serde_json::from_value(msgs.clone())?;
                        let q = v.get("question").and_then(Value::as_str).unwrap_or_default().to_string();
                        out.push((q, msgs));
                    } else if let Some(q) = v.get("question").and_then(Value::as_str) {
                        out.push((q.to_string(), vec![system.clone(), Message::new("user", q)]));
                    } else {
                        bail!("{}:{line}: expected {{\"question\": …}} or {{\"prompt\": [messages]}}", path.display());
                    }
                }
                out
            }
        };
        let m = open_for_sampling(ctx, &p.model, p.rollout.as_ref())?;
        let bar = ctx.progress(prompts.len() as u64, "questions");
        let ids: Vec<Vec<u32>> =
            prompts.iter().map(|(_, msgs)| m.tokenizer().encode_chat(msgs, true)).collect::<Result<_>>()?;
        let t0 = Instant::now();
        let mut done: Vec<Option<Answer>> = prompts.iter().map(|_| None).collect();
        let seed = ctx.env.seed;
        let mut on_done = |i: usize, c: Completion| {
            let (q, msgs) = &prompts[i];
            done[i] = Some(Answer {
                question: q.clone(),
                prompt: msgs.clone(),
                answer: xml_answer(&c.text).map(str::to_string),
                tokens: c.tokens.len() - c.tool_spans.iter().map(|r| r.len()).sum::<usize>(),
                completion: c.text,
                finish_reason: c.finish_reason,
                time_s: t0.elapsed().as_secs_f64(),
                tool_calls: c.tool_calls,
            });
            bar.inc(1);
            Ok(())
        };
        let sampler = m.sampler();
        let seed_of = |i: usize| seed.wrapping_add(i as u64);
        match Toolbox::new(&p.tools, &ctx.project.root) {
            Some(mut toolbox) => {
                let (tok, params, cancel) = (m.tokenizer(), &p.sampling, Some(&ctx.cancel));
                let tools = &p.tools;
                sampler.complete_each_with_tools(
                    tok,
                    &ids,
                    p.batch_size,
                    params,
                    &seed_of,
                    cancel,
                    tools,
                    &mut toolbox,
                    &mut on_done,
                )?
            }
            None => sampler.complete_each(
                m.tokenizer(),
                &ids,
                p.batch_size,
                &p.sampling,
                &seed_of,
                Some(&ctx.cancel),
                &mut on_done,
            )?,
        }
        bar.finish_and_clear();
        let answers: Vec<Answer> = done.into_iter().flatten().collect();
        jsonl::write(&ctx.output_path("answers"), &answers)?;
        ctx.set_metrics(json!({ "questions": answers.len(), "mean_tokens": answers.iter().map(|a| a.tokens as f64).sum::<f64>() / answers.len().max(1) as f64 }));
        Ok(())
    }

    fn summary(&self, outputs: &std::collections::BTreeMap<String, std::path::PathBuf>) -> Option<String> {
        let rows = jsonl::read::<Answer>(outputs.get("answers")?).ok()?;
        let shown: Vec<String> =
            rows.iter().take(3).map(|(_, a)| format!("Q: {}\nA: {}", a.question.trim(), a.completion.trim())).collect();
        let more = rows.len().saturating_sub(3);
        Some(
            shown.join("\n\n")
                + &if more > 0 { format!("\n(and {more} more in the answers artifact)") } else { String::new() },
        )
    }
}
