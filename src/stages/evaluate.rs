//! `evaluate`: one or several models side by side on the GSM8K test prompts:
//! accuracy, strict and soft format adherence, completion length, truncation.
//! Finished samples are kept in the work folder, so an interrupted evaluation continues.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::format::PromptRow;
use super::model_common::{check_known_keys, check_model_ref, open_model, sampling_errors};
use crate::common::{typed, ParamError};
use crate::data::jsonl::{self, Appender};
use crate::model::{generate, FinishReason, SamplingParams};
use crate::pipeline::status::render_table;
use crate::pipeline::{OutputSpec, Project, Requirements, StageContext, StageKind};
use crate::rewards::answer::xml_answer;
use crate::rewards::{lookup, Sample};

// No deny_unknown_fields: serde does not support it with `flatten`; `check` lists the keys.
#[derive(Debug, Deserialize)]
struct Params {
    /// Name → model reference (evaluated and shown in name order).
    models: BTreeMap<String, String>,
    /// The `test` output of a `format` stage (or JSONL of the same shape).
    test: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(flatten)]
    sampling: SamplingParams,
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
    pub extracted: Option<String>,
    pub correct: bool,
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
        2
    }
    fn description(&self) -> &'static str {
        "GSM8K accuracy and format adherence of one or several models"
    }
    fn outputs(&self) -> &'static [OutputSpec] {
        OUTPUTS
    }

    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        check_known_keys(params, &[&["models", "test", "limit", "batch_size"], SamplingParams::FIELDS])?;
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
            match check_model_ref(&format!("models.{name}"), r, project) {
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
        // The verdicts are the reward catalog's functions with their defaults: one
        // definition of "correct" and "formatted" for training and evaluation.
        let verdict = |name: &str| (lookup(name).expect("a catalog function").build)(&Value::Null);
        let (correctness, strict, soft) = (verdict("correctness")?, verdict("strict_format")?, verdict("soft_format")?);
        let mut all = Vec::new();
        let mut metrics = serde_json::Map::new();
        for (name, reference) in &p.models {
            // Samples already evaluated by an interrupted attempt are kept.
            let partial = ctx.work_dir.join(samples_file(name));
            let mut done: Vec<EvalSample> = if partial.exists() {
                jsonl::read(&partial)?.into_iter().map(|(_, s)| s).collect()
            } else {
                Vec::new()
            };
            let seen: BTreeSet<usize> = done.iter().map(|s| s.index).collect();
            let todo: Vec<usize> = (0..rows.len()).filter(|i| !seen.contains(i)).collect();
            if !todo.is_empty() {
                let m = open_model(ctx, reference)?;
                let mut out = Appender::open(&partial)?;
                let bar = ctx.progress_bar(rows.len() as u64, &format!("questions ({name})"));
                bar.set_position(seen.len() as u64);
                for chunk in todo.chunks(p.batch_size) {
                    if let Err(e) = ctx.cancel.check() {
                        bar.abandon();
                        return Err(e.into());
                    }
                    let prompts: Vec<Vec<u32>> =
                        chunk.iter().map(|&i| m.tokenizer.encode_chat(&rows[i].prompt, true)).collect::<Result<_>>()?;
                    // Seeded by question index, so a resumed run samples exactly as an uninterrupted one.
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ctx.env.seed ^ (chunk[0] as u64) << 20);
                    let comps = generate(&m.model, &m.tokenizer, &prompts, 1, &sampling, &mut rng, None)?;
                    for (c, &i) in comps.iter().zip(chunk) {
                        let row = &rows[i];
                        let extracted = xml_answer(&c.text).map(str::to_string);
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
            metrics.insert(name.clone(), summarize(&done));
            all.extend(done);
        }
        jsonl::write(&ctx.output_path("samples"), &all)?;
        let metrics = json!({ "questions": rows.len(), "models": metrics });
        std::fs::write(ctx.output_path("metrics"), serde_json::to_string_pretty(&metrics)?)?;
        println!("{}", side_by_side(&metrics));
        ctx.set_metrics(metrics);
        Ok(())
    }
}

/// The work-folder file of a model's finished samples: readable, and distinct for
/// distinct names (`a.b` and `a_b` must not share one).
fn samples_file(name: &str) -> String {
    let readable: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("samples-{readable}-{}.jsonl", &blake3::hash(name.as_bytes()).to_hex()[..8])
}

fn summarize(s: &[EvalSample]) -> Value {
    let n = s.len().max(1) as f64;
    let frac = |f: &dyn Fn(&EvalSample) -> bool| s.iter().filter(|x| f(x)).count() as f64 / n;
    json!({
        "n": s.len(),
        "accuracy": frac(&|x| x.correct),
        "strict_format": frac(&|x| x.strict_format),
        "soft_format": frac(&|x| x.soft_format),
        "mean_completion_tokens": s.iter().map(|x| x.tokens as f64).sum::<f64>() / n,
        "truncation_rate": frac(&|x| x.finish_reason == FinishReason::Length),
    })
}

/// The models side by side, one column each.
pub fn side_by_side(metrics: &Value) -> String {
    let models = metrics["models"].as_object().cloned().unwrap_or_default();
    let mut headers = vec!["metric".to_string()];
    headers.extend(models.keys().cloned());
    let rows: Vec<Vec<String>> =
        ["accuracy", "strict_format", "soft_format", "mean_completion_tokens", "truncation_rate"]
            .iter()
            .map(|k| {
                let mut r = vec![k.to_string()];
                r.extend(models.values().map(|m| match m[*k].as_f64() {
                    Some(v) if k.ends_with("tokens") => format!("{v:.1}"),
                    Some(v) => format!("{:.1}%", 100.0 * v),
                    None => "-".into(),
                }));
                r
            })
            .collect();
    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
    render_table(&h, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_that_sanitize_alike_get_their_own_samples_file() {
        assert_ne!(samples_file("a.b"), samples_file("a_b"));
        assert!(samples_file("base").starts_with("samples-base-"));
    }
}
