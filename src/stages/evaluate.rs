//! `evaluate`: one or several models side by side on the GSM8K test prompts:
//! strict and flexible accuracy with 95% intervals, format adherence,
//! completion length, truncation, and paired tests between the models
//! (`eval::metrics`). Optionally few-shot, with exemplars from the train split.
//! Finished samples are kept in the work folder, so an interrupted evaluation continues.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::format::PromptRow;
use super::model_common::{check_known_keys, check_model_ref, open_for_sampling, sampling_errors};
use super::rollout_param;
use crate::common::{typed, ParamError};
use crate::data::gsm8k::think_answer;
use crate::data::jsonl::{self, Appender};
use crate::eval::extract::last_number;
use crate::eval::metrics::{EvalMetrics, Verdict};
use crate::model::{FinishReason, Message, SamplingParams};
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::rewards::answer::{gsm8k_equal, xml_answer};
use crate::rewards::{lookup, Sample};
use crate::rollout::ServerConfig;

// No deny_unknown_fields: serde does not support it with `flatten`; `check` lists the keys.
#[derive(Debug, Deserialize)]
struct Params {
    /// Name → model reference, or `{model: REF, rollout: {url, model}}` for a
    /// model served elsewhere (REF gives the tokenizer). Evaluated and shown in name order.
    models: BTreeMap<String, ModelEntry>,
    /// The `test` output of a `format` stage (or JSONL of the same shape).
    test: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default = "default_batch")]
    batch_size: usize,
    /// Worked examples before each question (0: none), taken from `train`.
    #[serde(default)]
    num_fewshot: usize,
    /// Where few-shot exemplars come from: the `train` output of a `format` stage (never the test split).
    #[serde(default)]
    train: Option<String>,
    #[serde(flatten)]
    sampling: SamplingParams,
}

const OWN_KEYS: &[&str] = &["models", "test", "limit", "batch_size", "num_fewshot", "train"];

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModelEntry {
    Local(String),
    Served { model: String, rollout: ServerConfig },
}

impl ModelEntry {
    fn reference(&self) -> &str {
        match self {
            ModelEntry::Local(r) | ModelEntry::Served { model: r, .. } => r,
        }
    }
    fn rollout(&self) -> Option<&ServerConfig> {
        match self {
            ModelEntry::Local(_) => None,
            ModelEntry::Served { rollout, .. } => Some(rollout),
        }
    }
}

/// A served entry's keys and `rollout:` settings, checked with their paths
/// (serde's untagged enums only say that nothing matched).
fn check_served_entries(params: &Value) -> Vec<ParamError> {
    let mut errors = Vec::new();
    for (name, entry) in params.get("models").and_then(Value::as_object).into_iter().flatten() {
        let Some(obj) = entry.as_object() else { continue };
        let at = |k: &str| format!("models.{name}.{k}");
        for k in obj.keys().filter(|k| !["model", "rollout"].contains(&k.as_str())) {
            errors
                .push(ParamError::new(at(k), format!("unknown key `{k}`")).hint("a served model is {model, rollout}"));
        }
        if !obj.get("model").is_some_and(Value::is_string) {
            errors.push(
                ParamError::new(at("model"), "a served model needs `model`: where its tokenizer and chat template are")
                    .hint("the same model folder or hub id the server serves"),
            );
        }
        match rollout_param::check(entry, "rollout") {
            Ok(Some(_)) => {}
            Ok(None) => errors.push(ParamError::new(at("rollout"), "missing: the server to ask ({url, model})")),
            Err(es) => errors.extend(es.into_iter().map(|mut e| {
                e.path = format!("models.{name}.{}", e.path);
                e
            })),
        }
    }
    errors
}

fn default_batch() -> usize {
    8
}

/// One evaluated test question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSample {
    pub model: String,
    pub index: usize,
    pub question: String,
    pub reference: String,
    pub completion: String,
    /// The recipe's strict extraction: the last `<answer>…</answer>`.
    pub extracted: Option<String>,
    pub correct: bool,
    /// lm-eval-harness's flexible extraction: the last number of the completion.
    #[serde(default)]
    pub extracted_flexible: Option<String>,
    #[serde(default)]
    pub correct_flexible: bool,
    pub strict_format: bool,
    pub soft_format: bool,
    pub tokens: usize,
    pub finish_reason: FinishReason,
}

pub struct Evaluate;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "metrics",
        file_name: "metrics.json",
        is_dir: false,
        description: "per-model accuracy and format adherence",
    },
    OutputSpec {
        name: "samples",
        file_name: "samples.jsonl",
        is_dir: false,
        description: "every completion with its verdict",
    },
];

impl StageKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        3
    }
    fn description(&self) -> &'static str {
        "GSM8K accuracy and format adherence of one or several models"
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        OUTPUTS
    }

    fn fingerprint_params(&self, params: &Value) -> Value {
        let mut p = params.clone();
        if let Some(Value::Object(models)) = p.get_mut("models") {
            for entry in models.values_mut() {
                *entry = rollout_param::fingerprint_params(entry, "rollout");
            }
        }
        p
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        check_known_keys(params, &[OWN_KEYS, SamplingParams::FIELDS])?;
        let served = check_served_entries(params);
        if !served.is_empty() {
            return Err(served);
        }
        let p: Params = typed(params).map_err(|e| vec![e])?;
        let mut errors = sampling_errors(&p.sampling);
        let mut req = Requirements { uses_device: true, uses_seed: true, ..Default::default() };
        if p.models.is_empty() {
            errors.push(
                ParamError::new("models", "no models to evaluate")
                    .hint("e.g. models: { base: Qwen/Qwen2.5-0.5B-Instruct }"),
            );
        }
        for (name, r) in &p.models {
            let at = match r {
                ModelEntry::Local(_) => format!("models.{name}"),
                ModelEntry::Served { .. } => format!("models.{name}.model"),
            };
            match check_model_ref(&at, r.reference(), project) {
                Ok(Some(local)) => req.local_paths.push(local),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        if let Some(local) = project.local_path(&p.test) {
            req.local_paths.push(("test".into(), local));
        }
        if p.batch_size == 0 {
            errors.push(ParamError::new("batch_size", "must be at least 1"));
        }
        match (&p.train, p.num_fewshot) {
            (None, k) if k > 0 => errors.push(
                ParamError::new("num_fewshot", format!("{k}-shot needs exemplars: give `train`"))
                    .hint("train: ${prompts.train} (the train split; exemplars never come from the test split)"),
            ),
            (Some(t), _) => {
                if let Some(local) = project.local_path(t) {
                    req.local_paths.push(("train".into(), local));
                }
            }
            _ => {}
        }
        if errors.is_empty() {
            Ok(req)
        } else {
            Err(errors)
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let test_path = ctx.project.local_path(&p.test).unwrap_or_else(|| p.test.clone().into());
        let mut rows: Vec<PromptRow> = jsonl::read(&test_path)?.into_iter().map(|(_, r)| r).collect();
        if let Some(n) = p.limit {
            rows.truncate(n);
        }
        let sampling = p.sampling.clone();
        let shots = match (&p.train, p.num_fewshot) {
            (Some(t), k) if k > 0 => fewshot(&ctx.project.local_path(t).unwrap_or_else(|| t.into()), k, ctx.env.seed)?,
            _ => Vec::new(),
        };
        // The verdicts are the reward catalog's functions with their defaults: one
        // definition of "correct" and "formatted" for training and evaluation.
        let verdict = |name: &str| (lookup(name).expect("a catalog function").build)(&Value::Null);
        let (correctness, strict, soft) = (verdict("correctness")?, verdict("strict_format")?, verdict("soft_format")?);
        let mut all = Vec::new();
        let mut verdicts = BTreeMap::new();
        for (name, reference) in &p.models {
            // Samples already evaluated by an interrupted attempt are kept.
            let partial = ctx.work_dir.join(samples_file(name));
            let mut done: Vec<EvalSample> = if partial.exists() {
                jsonl::read(&partial)?.into_iter().map(|(_, s)| s).collect()
            } else {
                Vec::new()
            };
            let seen: BTreeSet<usize> = done.iter().map(|s| s.index).collect();
            if !seen.is_empty() {
                eprintln!("{}: {name}: kept {} finished samples of an interrupted run", ctx.stage, seen.len());
            }
            let todo: Vec<usize> = (0..rows.len()).filter(|i| !seen.contains(i)).collect();
            if !todo.is_empty() {
                let m = open_for_sampling(ctx, reference.reference(), reference.rollout())?;
                let mut out = Appender::open(&partial)?;
                let bar = ctx.progress_bar(rows.len() as u64, &format!("questions ({name})"));
                bar.set_position(seen.len() as u64);
                for chunk in todo.chunks(p.batch_size) {
                    if let Err(e) = ctx.cancel.check() {
                        bar.abandon();
                        return Err(e.into());
                    }
                    let prompts: Vec<Vec<u32>> = chunk
                        .iter()
                        .map(|&i| m.tokenizer().encode_chat(&with_shots(&rows[i].prompt, &shots), true))
                        .collect::<Result<_>>()?;
                    // Seeded by question index, so a resumed run samples exactly as an uninterrupted one.
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ctx.env.seed ^ (chunk[0] as u64) << 20);
                    let comps = m.sampler().sample(m.tokenizer(), &prompts, 1, &sampling, &mut rng, false)?;
                    for (c, &i) in comps.iter().zip(chunk) {
                        let row = &rows[i];
                        let extracted = xml_answer(&c.text).map(str::to_string);
                        let extracted_flexible = last_number(&c.text);
                        let sample =
                            Sample { prompt: "", completion: &c.text, answer: &row.answer, tokens: c.tokens.len() };
                        let s = EvalSample {
                            model: name.clone(),
                            index: i,
                            question: row.question.clone(),
                            reference: row.answer.clone(),
                            completion: c.text.clone(),
                            correct: correctness.score(&sample) > 0.0,
                            extracted,
                            correct_flexible: extracted_flexible
                                .as_deref()
                                .is_some_and(|a| gsm8k_equal(a, &row.answer)),
                            extracted_flexible,
                            strict_format: strict.score(&sample) > 0.0,
                            soft_format: soft.score(&sample) > 0.0,
                            tokens: c.tokens.len(),
                            finish_reason: c.finish_reason,
                        };
                        out.append(&s)?;
                        done.push(s);
                    }
                    bar.inc(chunk.len() as u64);
                }
                bar.finish_and_clear();
            }
            done.sort_by_key(|s| s.index);
            verdicts.insert(name.clone(), done.iter().map(verdict_of).collect::<Vec<_>>());
            all.extend(done);
        }
        jsonl::write(&ctx.output_path("samples"), &all)?;
        let metrics = EvalMetrics::of(rows.len(), p.num_fewshot, &verdicts);
        let value = serde_json::to_value(&metrics)?;
        std::fs::write(ctx.output_path("metrics"), serde_json::to_string_pretty(&value)?)?;
        ctx.set_metrics(value);
        Ok(())
    }

    fn summary(&self, outputs: &BTreeMap<String, std::path::PathBuf>) -> Option<String> {
        let text = std::fs::read_to_string(outputs.get("metrics")?).ok()?;
        Some(EvalMetrics::from_json(&serde_json::from_str(&text).ok()?).ok()?.table())
    }

    /// Per model, the current schema's numbers (files of any version read through
    /// it); the paired comparisons are left out.
    fn metrics_view(&self, metrics: &Value) -> Option<Value> {
        Some(match EvalMetrics::from_json(metrics) {
            Ok(e) => serde_json::json!({ "models": e.models }),
            Err(_) => metrics.clone(),
        })
    }
}

fn verdict_of(s: &EvalSample) -> Verdict {
    Verdict {
        index: s.index,
        correct_strict: s.correct,
        correct_flexible: s.correct_flexible,
        strict_format: s.strict_format,
        soft_format: s.soft_format,
        tokens: s.tokens,
        truncated: s.finish_reason == FinishReason::Length,
    }
}

/// `k` worked examples from the train split (a seeded choice), as user/assistant turns
/// whose answers are in the recipe's think/answer format.
fn fewshot(train: &std::path::Path, k: usize, seed: u64) -> Result<Vec<Message>> {
    use rand::seq::SliceRandom;
    let mut rows: Vec<PromptRow> = jsonl::read(train)?.into_iter().map(|(_, r)| r).collect();
    if rows.len() < k {
        anyhow::bail!("{}: {k}-shot needs {k} exemplars, the file has {}", train.display(), rows.len());
    }
    rows.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xf3e5));
    Ok(rows[..k]
        .iter()
        .flat_map(|r| {
            [Message::new("user", &r.question), Message::new("assistant", &think_answer(&r.rationale, &r.answer))]
        })
        .collect())
}

/// The prompt with the exemplars after its system message (if any), before the question.
fn with_shots(prompt: &[Message], shots: &[Message]) -> Vec<Message> {
    if shots.is_empty() {
        return prompt.to_vec();
    }
    let split = prompt.iter().take_while(|m| m.role == "system").count();
    prompt[..split].iter().chain(shots).chain(&prompt[split..]).cloned().collect()
}

/// The work-folder file of a model's finished samples: readable, and distinct for
/// distinct names (`a.b` and `a_b` must not share one).
fn samples_file(name: &str) -> String {
    let readable: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("samples-{readable}-{}.jsonl", &blake3::hash(name.as_bytes()).to_hex()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exemplars_go_between_the_system_prompt_and_the_question() {
        let prompt = vec![Message::new("system", "S"), Message::new("user", "Q")];
        let shots = vec![Message::new("user", "q1"), Message::new("assistant", "a1")];
        let roles: Vec<String> = with_shots(&prompt, &shots).into_iter().map(|m| m.content).collect();
        assert_eq!(roles, vec!["S", "q1", "a1", "Q"]);
        assert_eq!(with_shots(&prompt, &[]), prompt);
    }

    #[test]
    fn model_names_that_sanitize_alike_get_their_own_samples_file() {
        assert_ne!(samples_file("a.b"), samples_file("a_b"));
        assert!(samples_file("base").starts_with("samples-base-"));
    }
}
