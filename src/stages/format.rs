//! `format`: GSM8K rows → chat prompts with a system prompt, the reference
//! answer after `####`, and SFT examples in the think/answer format.

use std::path::Path;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::common::{typed, ParamError};
use crate::data::{gsm8k, jsonl, Message, PromptRow, SftRow};
use crate::model::tool_call::{self, CallFormat};
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `dataset` output of a `download` stage.
    pub data: String,
    #[serde(default = "default_system_prompt")]
    pub system_prompt: String,
    /// Keep at most this many rows per split (a number for every split, or `{train: N, test: M}`).
    #[serde(default)]
    pub limit: Option<Limit>,
    /// Shuffle each split with this seed before `limit`; unshuffled when absent.
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
    /// Fail on a bad row instead of dropping it.
    #[serde(default)]
    pub strict: bool,
    /// Hold out this many rows of the train split (after `shuffle_seed`, before
    /// `limit`) as the `valid` output, kept out of `train` and `sft`: what
    /// hyperparameters are chosen on, so the test split is only ever reported.
    #[serde(default)]
    pub validation: usize,
    /// Keep GSM8K's calculator notes in the rationales as inline tool calls
    /// (`<<48/2=24>>`), so that SFT teaches a model to call the calculator
    /// (`tools: [calculator]` on the stages that sample); else they are removed.
    #[serde(default)]
    pub tool_calls: bool,
    /// How the SFT examples write the calls (with `tool_calls: true`): `inline`
    /// (`<<48/2=24>>`), or `hermes`: `<tool_call>{json}</tool_call>` ending an
    /// assistant turn, the result in a `tool` turn, the answer going on in the
    /// next assistant turn (for stages sampling with `tool_call_format: hermes`).
    #[serde(default)]
    pub tool_call_format: CallFormat,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: String::new(),
            system_prompt: default_system_prompt(),
            limit: None,
            shuffle_seed: None,
            strict: false,
            validation: 0,
            tool_calls: false,
            tool_call_format: CallFormat::Inline,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy)]
#[serde(untagged, expecting = "a row count for every split (e.g. 200) or one per split (e.g. {train: 200, test: 16})")]
pub enum Limit {
    All(usize),
    PerSplit {
        #[serde(default)]
        train: Option<usize>,
        #[serde(default)]
        test: Option<usize>,
    },
}

impl Limit {
    fn for_split(&self, split: &str) -> Option<usize> {
        match *self {
            Limit::All(n) => Some(n),
            Limit::PerSplit { train, test } => match split {
                "train" => train,
                "test" => test,
                _ => None,
            },
        }
    }
}

fn default_system_prompt() -> String {
    gsm8k::R1_SYSTEM_PROMPT.into()
}

pub struct Format;

const OUTPUTS: &[OutputSpec] = &[
    OutputSpec::file("train", "train.jsonl", "training prompts"),
    OutputSpec::file("test", "test.jsonl", "test prompts"),
    OutputSpec::file("sft", "sft.jsonl", "think/answer chat examples from the train split"),
    OutputSpec::file("valid", "valid.jsonl", "prompts held out of the train split (`validation` rows)"),
];

impl StageKind for Format {
    fn info(&self) -> &'static KindInfo {
        &KindInfo {
            name: "format",
            // 2: the `valid` output (rows held out of the train split).
            version: 2,
            description: "build chat prompts, reference answers and think/answer SFT examples from GSM8K rows",
            outputs: OUTPUTS,
        }
    }

    fn parameters(&self) -> Value {
        serde_json::to_value(Params::default()).unwrap_or_default()
    }
    fn check(&self, params: &Value, project: &Project) -> Result<Requirements, Vec<ParamError>> {
        let p: Params = typed(params).map_err(|e| vec![e])?;
        if p.tool_call_format == CallFormat::Hermes && !p.tool_calls {
            return Err(vec![ParamError::new("tool_call_format", "says how calls are written, and there are none")
                .hint("add `tool_calls: true` to keep GSM8K's calculator notes as calls")]);
        }
        let mut req = Requirements::default();
        if let Some(local) = project.local_path(&p.data) {
            req.local_paths.push(("data".into(), local));
        }
        Ok(req)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let data = ctx.project.local_path(&p.data).unwrap_or_else(|| p.data.clone().into());
        let mut metrics = serde_json::Map::new();
        for split in ["train", "test"] {
            let file = data.join(format!("{split}.jsonl"));
            let (rows, dropped) = format_split(&file, &p, split)?;
            if split == "train" {
                let valid = &rows[..p.validation.min(rows.len())];
                if valid.len() < p.validation {
                    anyhow::bail!(
                        "validation: {} rows asked for, the train split has {} (after dropping bad rows)",
                        p.validation,
                        rows.len()
                    );
                }
                jsonl::write(&ctx.output_path("valid"), valid)?;
                metrics.insert("valid".into(), json!({ "rows": valid.len() }));
            }
            let rows = if split == "train" { limited(rows[p.validation..].to_vec(), &p, split) } else { rows };
            if split == "train" {
                let sft = rows.iter().map(|r| {
                    let mut messages = r.prompt.clone();
                    let said = gsm8k::think_answer(&r.rationale, &r.answer);
                    match p.tool_call_format {
                        CallFormat::Hermes => messages.extend(tool_call::hermes_turns(&said)),
                        CallFormat::Inline => messages.push(Message::new("assistant", &said)),
                    }
                    SftRow { messages, answer: r.answer.clone() }
                });
                jsonl::write(&ctx.output_path("sft"), sft)?;
            }
            jsonl::write(&ctx.output_path(split), &rows)?;
            metrics
                .insert(split.into(), json!({ "rows": rows.len(), "dropped": dropped.len(), "dropped_rows": dropped }));
        }
        ctx.set_metrics(Value::Object(metrics));
        Ok(())
    }
}

/// A dropped row: where and why.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    pub line: usize,
    pub reason: String,
}

fn format_split(file: &Path, p: &Params, split: &str) -> Result<(Vec<PromptRow>, Vec<Dropped>)> {
    let raw = jsonl::read::<Value>(file)?;
    let mut rows = Vec::new();
    let mut dropped = Vec::new();
    for (line, v) in raw {
        let question = v.get("question").and_then(Value::as_str).unwrap_or("").trim().to_string();
        let answer_text = v.get("answer").and_then(Value::as_str).unwrap_or("");
        let reason = if question.is_empty() {
            Some("empty or missing `question`")
        } else if answer_text.is_empty() {
            Some("empty or missing `answer`")
        } else if gsm8k::reference_answer(answer_text).is_none() {
            Some("no final answer after `####`")
        } else {
            None
        };
        if let Some(reason) = reason {
            if p.strict {
                bail!("{}:{line}: {reason} (strict: true; set `strict: false` to drop bad rows)", file.display());
            }
            tracing::warn!(file = %file.display(), line, reason, "dropping a bad row");
            dropped.push(Dropped { line, reason: reason.into() });
            continue;
        }
        let answer = gsm8k::reference_answer(answer_text).expect("checked above");
        rows.push(PromptRow {
            prompt: vec![Message::new("system", &p.system_prompt), Message::new("user", &question)],
            question,
            answer,
            rationale: if p.tool_calls {
                gsm8k::rationale_with_calls(answer_text)
            } else {
                gsm8k::rationale(answer_text)
            },
        });
    }
    if !dropped.is_empty() {
        let lines: Vec<String> = dropped.iter().take(10).map(|d| d.line.to_string()).collect();
        eprintln!(
            "format: dropped {} bad row(s) of {} (lines {}{})",
            dropped.len(),
            file.display(),
            lines.join(", "),
            if dropped.len() > 10 { ", …" } else { "" }
        );
    }
    if let Some(seed) = p.shuffle_seed {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rows.shuffle(&mut rng);
    }
    if split != "train" {
        rows = limited(rows, p, split);
    }
    Ok((rows, dropped))
}

/// At most `limit` rows of the split (the train split's after its held-out rows).
fn limited(mut rows: Vec<PromptRow>, p: &Params, split: &str) -> Vec<PromptRow> {
    if let Some(n) = p.limit.and_then(|l| l.for_split(split)) {
        rows.truncate(n);
    }
    rows
}
