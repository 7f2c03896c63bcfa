//! Tool calls inside completions, the way GSM8K's rationales write arithmetic:
//! the model writes `<<48/2=`, sampling stops there, the tool computes the
//! expression, its result and `>>` are appended (`<<48/2=24>>`), and the same
//! row goes on, up to `max_tool_calling_iterations` calls per completion.
//!
//! One mechanism serves every sampler: a row that reaches a call finishes its
//! segment ([`FinishReason::ToolCall`]); the tool runs; the row's next segment
//! is sampled from the prompt, everything written so far and the result, in the
//! next wave (with continuous batching, a row at its tool never holds the
//! others, and the tools of one wave run at the same time). Segment k of row i
//! samples with a generator seeded from (i, k), so a completion does not depend
//! on the others sampled beside it.
//!
//! The result's tokens are context, not the model's: each completion carries
//! where they are ([`Completion::tool_spans`]), and training masks them out of
//! the loss, the KL and the entropy.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::common::supervised::{Limits, Supervised};
pub use crate::model::tool_call::{pending_call, ToolCall, CLOSE, OPEN, SEPARATOR};
use crate::model::{ChatTokenizer, Completion, FinishReason, SamplingParams};

/// A sampling stage's tool settings (TRL's names), flattened into its parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolSettings {
    /// What answers the model's inline calls (`<<expr=`): `calculator` (built in),
    /// or a program speaking JSON lines (`{command: [...], timeout_s}`). Empty: no
    /// tool calls (at most one: the inline syntax names no tool).
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Calls a completion may make; unset (TRL's default), as many as its length
    /// allows. After the last, the model writes any result itself.
    #[serde(default)]
    pub max_tool_calling_iterations: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a built-in tool's name (calculator) or a program: {command: [program, args…]}")]
pub enum ToolSpec {
    Builtin(BuiltinTool),
    Program {
        command: Vec<String>,
        #[serde(default = "default_tool_timeout")]
        timeout_s: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinTool {
    Calculator,
}

fn default_tool_timeout() -> f64 {
    10.0
}

impl ToolSettings {
    /// The tool the model's calls go to, if any.
    pub fn tool(&self) -> Option<&ToolSpec> {
        self.tools.first()
    }

    /// Problems, as (key, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.tools.len() > 1 {
            out.push((
                "tools".into(),
                "inline calls (`<<expr=`) name no tool: give one (the calculator, or one program that reads every \
                 expression)"
                    .into(),
            ));
        }
        if self.max_tool_calling_iterations.is_some() && self.tools.is_empty() {
            out.push(("max_tool_calling_iterations".into(), "set without `tools`".into()));
        }
        for (i, t) in self.tools.iter().enumerate() {
            if let ToolSpec::Program { command, timeout_s } = t {
                if command.is_empty() || command[0].is_empty() {
                    out.push((format!("tools.{i}.command"), "the command is empty".into()));
                }
                if !(timeout_s.is_finite() && *timeout_s > 0.0 && *timeout_s <= 3600.0) {
                    out.push((
                        format!("tools.{i}.timeout_s"),
                        format!("{timeout_s} is not between 0 and 3600 seconds"),
                    ));
                }
            }
        }
        out
    }
}

/// A running tool: the calculator, or a supervised program.
pub struct Tool {
    spec: ToolSpec,
    dir: PathBuf,
    program: Option<Supervised>,
}

impl Tool {
    pub fn new(spec: &ToolSpec, dir: &std::path::Path) -> Tool {
        Tool { spec: spec.clone(), dir: dir.to_path_buf(), program: None }
    }

    /// The result text of a call (an error is a result the model reads, `error: …`).
    pub fn call(&mut self, expression: &str) -> ToolCall {
        let result = match &self.spec {
            ToolSpec::Builtin(BuiltinTool::Calculator) => super::calculator::evaluate(expression),
            ToolSpec::Program { command, timeout_s } => self.call_program(command.clone(), *timeout_s, expression),
        };
        let error = result.is_err();
        ToolCall { expression: expression.to_string(), result: result.unwrap_or_else(|e| e), error }
    }

    /// A program answers `{"expression": …}` with `{"result": "…"}` (or `{"error": "…"}`).
    fn call_program(&mut self, command: Vec<String>, timeout_s: f64, expression: &str) -> Result<String, String> {
        if self.program.is_none() {
            let limits = Limits { line_bytes: 64 << 10, ..Limits::default() };
            match Supervised::spawn(&command, &self.dir, limits) {
                Ok(p) => self.program = Some(p),
                Err(e) => return Err(format!("error: the tool could not start ({e:#})")),
            }
        }
        let Some(p) = self.program.as_mut() else { return Err("error: the tool is not running".into()) };
        let line = serde_json::json!({ "expression": expression }).to_string();
        let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
        let reply = p.exchange(&line, deadline, &format!("{timeout_s} s"));
        let answer = reply.and_then(|r| {
            let v: serde_json::Value =
                serde_json::from_str(&r).map_err(|_| anyhow::anyhow!("its reply is not a JSON object"))?;
            match (v.get("result").and_then(|x| x.as_str()), v.get("error").and_then(|x| x.as_str())) {
                (Some(r), _) => Ok(Ok(r.chars().take(200).collect::<String>())),
                (None, Some(e)) => Ok(Err(format!("error: {}", e.chars().take(200).collect::<String>()))),
                _ => bail!("its reply has no `result` or `error`"),
            }
        });
        match answer {
            Ok(result) => result,
            Err(e) => {
                // A tool that failed is restarted for the next call; the model reads an error.
                let stderr = p.stop();
                self.program = None;
                tracing::warn!(tool = %command.join(" "), error = %e, stderr = %stderr.join(" | "), "tool program failed");
                Err("error: the tool failed".into())
            }
        }
    }
}

/// A completion being assembled from its segments.
#[derive(Debug, Clone)]
pub struct Assembly {
    pub prompt_index: usize,
    /// Everything after the prompt so far: the model's tokens and the tools' results.
    pub tokens: Vec<u32>,
    pub tool_spans: Vec<Range<usize>>,
    pub calls: Vec<ToolCall>,
    pub sampling_logprobs: Option<Vec<f32>>,
}

impl Assembly {
    pub fn new(prompt_index: usize) -> Assembly {
        Assembly {
            prompt_index,
            tokens: Vec::new(),
            tool_spans: Vec::new(),
            calls: Vec::new(),
            sampling_logprobs: None,
        }
    }

    /// Take a segment's tokens (and log-probabilities, when the sampler gave them).
    pub fn extend(&mut self, segment: &Completion) {
        self.tokens.extend_from_slice(&segment.tokens);
        if let Some(lp) = &segment.sampling_logprobs {
            self.sampling_logprobs.get_or_insert_with(Vec::new).extend_from_slice(lp);
        }
    }

    /// Append a tool's result (context: no log-probability of the model's).
    pub fn append_result(&mut self, tok: &ChatTokenizer, call: ToolCall) -> Result<()> {
        let ids = tok.encode(&format!("{}{CLOSE}", call.result))?;
        let at = self.tokens.len();
        self.tokens.extend_from_slice(&ids);
        self.tool_spans.push(at..self.tokens.len());
        if let Some(lp) = &mut self.sampling_logprobs {
            lp.extend(std::iter::repeat_n(0.0, ids.len()));
        }
        self.calls.push(call);
        Ok(())
    }

    /// Cut to `n` tokens (a result that ran past the budget), its spans with it.
    fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.tool_spans.retain(|r| r.start < n);
        if let Some(last) = self.tool_spans.last_mut() {
            last.end = last.end.min(n);
        }
        if let Some(lp) = &mut self.sampling_logprobs {
            lp.truncate(n);
        }
    }

    /// The finished completion: the last segment's ending, the whole text.
    pub fn finish(self, tok: &ChatTokenizer, last: &Completion) -> Result<Completion> {
        let text = tok.decode(&self.tokens)?;
        Ok(Completion {
            prompt_index: self.prompt_index,
            tokens: self.tokens,
            text,
            finish_reason: last.finish_reason,
            eos: last.eos,
            sampling_logprobs: self.sampling_logprobs,
            tool_spans: self.tool_spans,
            tool_calls: self.calls,
        })
    }
}

/// What the sampler of one wave is asked for: the contexts (prompt plus what
/// was written and appended so far), the rows they continue, and the wave's
/// number (a segment's sampler is seeded from its row and the wave).
pub struct Wave {
    pub contexts: Vec<Vec<u32>>,
    pub rows: Vec<usize>,
    pub iteration: usize,
}

/// A seed for segment `iteration` of a row whose first segment is seeded `seed`
/// (SplitMix64's finalizer: segments of one row draw unrelated numbers).
pub fn segment_seed(seed: u64, iteration: usize) -> u64 {
    if iteration == 0 {
        return seed;
    }
    let mut z = seed.wrapping_add((iteration as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Receives a wave's segments: (context index, segment).
pub type OnSegment<'a> = dyn FnMut(usize, Completion) -> Result<()> + 'a;

/// Samples one segment per context of a wave, with the wave's parameters.
pub type SampleWave<'a> = dyn FnMut(&Wave, &SamplingParams, &mut OnSegment) -> Result<()> + 'a;

/// Sample a completion of each of `prompts` with tool calls, wave by wave:
/// `sample(wave, params, on_segment)` samples one segment per context and hands
/// each to `on_segment(context index, segment)`. A row whose segment ends at a
/// call gets the tool's result and waits for the next wave; a finished row is
/// handed to `on_done` at once (its `prompt_index` is its index in `prompts`).
pub fn sample_with_tools(
    tok: &ChatTokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    tools: &ToolSettings,
    tool: &mut Tool,
    sample: &mut SampleWave,
    on_done: &mut dyn FnMut(Completion) -> Result<()>,
) -> Result<()> {
    let mut assemblies: Vec<Assembly> = (0..prompts.len()).map(Assembly::new).collect();
    let mut pending: Vec<usize> = (0..prompts.len()).collect();
    let mut iteration = 0;
    while !pending.is_empty() {
        let wave = Wave {
            contexts: pending
                .iter()
                .map(|&r| prompts[r].iter().chain(&assemblies[r].tokens).copied().collect())
                .collect(),
            rows: pending.clone(),
            iteration,
        };
        // The wave's budget is the largest a row has left; a segment past its own
        // row's budget is cut below. After the last allowed call, nothing stops for a tool.
        let used = pending.iter().map(|&r| assemblies[r].tokens.len()).min().unwrap_or(0);
        let mut wave_params = params.clone();
        wave_params.max_new_tokens = params.max_new_tokens.saturating_sub(used).max(1);
        wave_params.tool_call = tools.max_tool_calling_iterations.is_none_or(|m| iteration < m);
        let mut next = Vec::new();
        let mut on_segment = |j: usize, seg: Completion| -> Result<()> {
            let Some(&row) = wave.rows.get(j) else { bail!("a segment of an unknown context {j}") };
            let a = &mut assemblies[row];
            let mut seg = seg;
            let budget = params.max_new_tokens.saturating_sub(a.tokens.len());
            if seg.tokens.len() > budget {
                seg.tokens.truncate(budget);
                seg.finish_reason = FinishReason::Length;
                seg.eos = false;
                if let Some(lp) = &mut seg.sampling_logprobs {
                    lp.truncate(budget);
                }
            }
            a.extend(&seg);
            let expression = if seg.finish_reason == FinishReason::ToolCall {
                tok.decode(&a.tokens).ok().and_then(|text| pending_call(&text).map(|e| e.trim().to_string()))
            } else {
                None
            };
            if let Some(expr) = expression.filter(|_| a.tokens.len() < params.max_new_tokens) {
                a.append_result(tok, tool.call(&expr))?;
                if a.tokens.len() < params.max_new_tokens {
                    next.push(row);
                    return Ok(());
                }
                a.truncate(params.max_new_tokens);
                seg.finish_reason = FinishReason::Length;
                seg.eos = false;
            }
            if seg.finish_reason == FinishReason::ToolCall {
                seg.finish_reason = FinishReason::Length;
            }
            let finished = std::mem::replace(a, Assembly::new(row));
            on_done(finished.finish(tok, &seg)?)
        };
        sample(&wave, &wave_params, &mut on_segment)?;
        next.sort_unstable();
        pending = next;
        iteration += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calculator_answers_and_errors_are_results() {
        let mut t = Tool::new(&ToolSpec::Builtin(BuiltinTool::Calculator), std::path::Path::new("."));
        assert_eq!(t.call("48/2"), ToolCall { expression: "48/2".into(), result: "24".into(), error: false });
        let bad = t.call("1/0");
        assert!(bad.error && bad.result == "error: division by zero", "{bad:?}");
    }
}
