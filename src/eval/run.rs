//! The evaluation loop, written once: a model (local or served) answers test
//! prompts in batches, each answer is judged (the recipe's strict `<answer>`,
//! lm-eval-harness's flexible last number, format adherence, length,
//! truncation), and the samples are appended to a file in the host's work
//! folder as they finish, so an interrupted evaluation continues where it
//! stopped. The `evaluate` stage and evaluation during training both call it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::extract::last_number;
use super::metrics::Verdict;
use crate::common::Host;
use crate::data::gsm8k::think_answer;
use crate::data::jsonl::{self, Appender};
use crate::data::{Message, PromptRow};
use crate::model::tool_call::ToolCall;
use crate::model::{ChatTokenizer, Completion, FinishReason, SamplingParams};
use crate::rewards::answer::{gsm8k_equal, xml_answer};
use crate::rewards::functions::{Correctness, SoftFormat, StrictFormat};
use crate::rewards::{Sample, Scorer};
use crate::rollout::tools::{ToolSettings, Toolbox};
use crate::rollout::Sampler;

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
    /// The tool calls the completion made (with tools), each with what it was shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

impl EvalSample {
    pub fn verdict(&self) -> Verdict {
        Verdict {
            index: self.index,
            correct_strict: self.correct,
            correct_flexible: self.correct_flexible,
            strict_format: self.strict_format,
            soft_format: self.soft_format,
            tokens: self.tokens,
            truncated: self.finish_reason == FinishReason::Length,
            tool_calls: self.tool_calls.len(),
            tool_errors: self.tool_calls.iter().filter(|c| c.error).count(),
        }
    }
}

/// How a model is evaluated.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub sampling: SamplingParams,
    pub batch_size: usize,
    /// Worked examples put before each question (after the system prompt).
    pub shots: Vec<Message>,
    /// Seeds each batch's sampler by its first question's index, so a resumed
    /// evaluation samples exactly as an uninterrupted one.
    pub seed: u64,
    /// Tools that answer the model's calls, and the folder programs run in.
    pub tools: ToolSettings,
    pub tool_dir: PathBuf,
}

/// The samples of `model` an interrupted run already finished (in `host`'s work
/// folder), and the indices of the `n` rows still to evaluate.
pub fn resume(host: &dyn Host, model: &str, n: usize) -> Result<(Vec<EvalSample>, Vec<usize>)> {
    let partial = samples_path(host, model);
    let done: Vec<EvalSample> =
        if partial.exists() { jsonl::read(&partial)?.into_iter().map(|(_, s)| s).collect() } else { Vec::new() };
    let seen: BTreeSet<usize> = done.iter().map(|s| s.index).collect();
    Ok((done, (0..n).filter(|i| !seen.contains(i)).collect()))
}

/// Evaluate rows `todo` of `rows` with `sampler`, `batch_size` in flight at a
/// time (continuous batching on a local model), appending each sample to the
/// work folder's file as it finishes; returns the new samples. Stops (with
/// `Cancelled`) between steps when the host is cancelled: what finished is kept.
pub fn evaluate(
    model: &str,
    sampler: &Sampler,
    tokenizer: &ChatTokenizer,
    rows: &[PromptRow],
    todo: &[usize],
    settings: &EvalSettings,
    host: &dyn Host,
) -> Result<Vec<EvalSample>> {
    let judge = Judge::default();
    let mut out = Appender::open(&samples_path(host, model))?;
    let bar = host.progress(rows.len() as u64, &format!("questions ({model})"));
    bar.set_position((rows.len() - todo.len()) as u64);
    let prompts: Vec<Vec<u32>> = todo
        .iter()
        .map(|&i| tokenizer.encode_chat(&with_shots(&rows[i].prompt, &settings.shots), true))
        .collect::<Result<_>>()?;
    // Seeded by question, so a question samples alike whatever batch it runs in.
    let seed_of = |k: usize| settings.seed ^ (todo[k] as u64) << 20;
    let mut samples = Vec::with_capacity(todo.len());
    let mut on_done = |k: usize, c: Completion| {
        let i = todo[k];
        let model_tokens = c.tokens.len() - c.tool_spans.iter().map(|r| r.len()).sum::<usize>();
        let mut s = judge.sample(model, i, &rows[i], &c.text, model_tokens, c.finish_reason);
        s.tool_calls = c.tool_calls;
        out.append(&s)?;
        samples.push(s);
        bar.inc(1);
        Ok(())
    };
    let (slots, params, cancel) = (settings.batch_size, &settings.sampling, Some(host.cancel()));
    let result = match Toolbox::new(&settings.tools, &settings.tool_dir) {
        Some(mut toolbox) => {
            let tools = &settings.tools;
            sampler.complete_each_with_tools(
                tokenizer,
                &prompts,
                slots,
                params,
                &seed_of,
                cancel,
                tools,
                &mut toolbox,
                &mut on_done,
            )
        }
        None => sampler.complete_each(tokenizer, &prompts, slots, params, &seed_of, cancel, &mut on_done),
    };
    match result {
        Ok(()) => bar.finish_and_clear(),
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    }
    samples.sort_by_key(|s| s.index);
    Ok(samples)
}

/// The verdicts: the reward catalog's functions with their defaults, so that
/// "correct" and "formatted" mean the same in training and in evaluation.
#[derive(Default)]
struct Judge {
    correctness: Correctness,
    strict: StrictFormat,
    soft: SoftFormat,
}

impl Judge {
    fn sample(
        &self,
        model: &str,
        index: usize,
        row: &PromptRow,
        text: &str,
        tokens: usize,
        finish_reason: FinishReason,
    ) -> EvalSample {
        let sample = Sample { prompt: "", completion: text, answer: &row.answer, tokens, tool_results: None };
        let extracted_flexible = last_number(text);
        EvalSample {
            model: model.to_string(),
            index,
            question: row.question.clone(),
            reference: row.answer.clone(),
            completion: text.to_string(),
            extracted: xml_answer(text).map(str::to_string),
            correct: self.correctness.score(&sample) > 0.0,
            correct_flexible: extracted_flexible.as_deref().is_some_and(|a| gsm8k_equal(a, &row.answer)),
            extracted_flexible,
            strict_format: self.strict.score(&sample) > 0.0,
            soft_format: self.soft.score(&sample) > 0.0,
            tokens,
            finish_reason,
            tool_calls: Vec::new(),
        }
    }
}

/// `k` worked examples from the train split's rows (a seeded choice), as
/// user/assistant turns whose answers are in the recipe's think/answer format.
pub fn fewshot(train: &Path, k: usize, seed: u64) -> Result<Vec<Message>> {
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
fn samples_path(host: &dyn Host, model: &str) -> PathBuf {
    let readable: String =
        model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    host.work_dir().join(format!("samples-{readable}-{}.jsonl", &blake3::hash(model.as_bytes()).to_hex()[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{CancelToken, FolderHost};

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
        let host = FolderHost { dir: PathBuf::from("/w"), cancel: CancelToken::default() };
        assert_ne!(samples_path(&host, "a.b"), samples_path(&host, "a_b"));
        assert!(samples_path(&host, "base").file_name().unwrap().to_string_lossy().starts_with("samples-base-"));
    }

    #[test]
    fn a_judged_sample_uses_the_recipes_strict_and_flexible_extraction() {
        let judge = Judge::default();
        let row = PromptRow { prompt: vec![], question: "q".into(), answer: "72".into(), rationale: String::new() };
        let s = judge.sample("m", 3, &row, "<think>\n48+24\n</think>\n<answer>\n72\n</answer>", 9, FinishReason::Stop);
        assert!(s.correct && s.correct_flexible && s.strict_format && s.soft_format);
        let s = judge.sample("m", 3, &row, "so the total is 72 clips", 6, FinishReason::Length);
        assert!(!s.correct && s.correct_flexible && !s.strict_format);
        assert!(s.verdict().truncated);
    }
}
