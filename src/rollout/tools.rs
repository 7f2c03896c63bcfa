//! Tool calls inside completions, in two formats (`tool_call_format`). Inline,
//! the way GSM8K's rationales write arithmetic: the model writes `<<48/2=`,
//! sampling stops there, the tool computes the expression, its result and `>>`
//! are appended (`<<48/2=24>>`), and the same row goes on. Hermes, the way
//! Qwen's chat templates call tools: the model writes `<tool_call>{"name": …,
//! "arguments": {…}}</tool_call>`, sampling stops there, the named tool runs,
//! and what the chat template renders for a `tool` message with its result
//! (and the next assistant turn's opening) is appended. Either way, up to
//! `max_tool_calling_iterations` calls per completion.
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
pub use crate::model::tool_call::{pending_call, CallFormat, ToolCall, CLOSE, OPEN, SEPARATOR};
use crate::model::{ChatTokenizer, Completion, FinishReason, Message, SamplingParams};

/// A sampling stage's tool settings (TRL's names), flattened into its parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolSettings {
    /// What answers the model's calls: `calculator` (built in), or a program
    /// speaking JSON lines (`{command: [...], timeout_s, name}`). Empty: no tool
    /// calls. Inline calls name no tool, so they take exactly one.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// How the model writes a call: `inline` (`<<expr=`) or `hermes`
    /// (`<tool_call>{json}</tool_call>`, answered through the chat template's
    /// `tool` message).
    #[serde(default)]
    pub tool_call_format: CallFormat,
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
        /// The name a Hermes call gives (default: the program's file name without its extension).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl ToolSpec {
    /// The name a Hermes call gives this tool.
    pub fn name(&self) -> String {
        match self {
            ToolSpec::Builtin(BuiltinTool::Calculator) => "calculator".into(),
            ToolSpec::Program { name: Some(n), .. } => n.clone(),
            ToolSpec::Program { command, .. } => {
                // The script an interpreter runs (`python3 calc.py` → `calc`), else the program.
                let stem = |a: &String| {
                    std::path::Path::new(a).file_stem().map_or(String::new(), |s| s.to_string_lossy().into_owned())
                };
                let first = command.first().map(stem).unwrap_or_default();
                let interpreters = ["python", "node", "bash", "sh", "ruby", "perl", "deno", "bun"];
                // `python3`, `python3.12`: the name, then a version.
                let interpreted = interpreters
                    .iter()
                    .any(|i| first.strip_prefix(i).is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.')));
                match command.get(1) {
                    Some(script) if interpreted => stem(script),
                    _ => first,
                }
            }
        }
    }
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
    /// Whether the model's calls are answered.
    pub fn enabled(&self) -> bool {
        !self.tools.is_empty()
    }

    /// Problems, as (key, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.tools.len() > 1 && self.tool_call_format == CallFormat::Inline {
            out.push((
                "tools".into(),
                "inline calls (`<<expr=`) name no tool: give one (the calculator, or one program that reads every \
                 expression), or set `tool_call_format: hermes`, whose calls name their tool"
                    .into(),
            ));
        }
        // Hermes calls name their tool; inline calls never do, so only there must names be unique.
        let named = if self.tool_call_format == CallFormat::Hermes { &self.tools[..] } else { &[] };
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in named.iter().enumerate() {
            let name = t.name();
            if name.is_empty() {
                out.push((format!("tools.{i}.name"), "this tool has no name: give `name:`".into()));
            } else if !seen.insert(name.clone()) {
                out.push((
                    format!("tools.{i}.name"),
                    format!("two tools are named `{name}`: give each its own `name:`"),
                ));
            }
        }
        if self.max_tool_calling_iterations.is_some() && self.tools.is_empty() {
            out.push(("max_tool_calling_iterations".into(), "set without `tools`".into()));
        }
        for (i, t) in self.tools.iter().enumerate() {
            if let ToolSpec::Program { command, timeout_s, .. } = t {
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

    /// Answer an inline call's expression (an error is a result the model reads, `error: …`).
    pub fn call(&mut self, expression: &str) -> ToolCall {
        let result = self.answer(Request::Expression(expression));
        let error = result.is_err();
        ToolCall { expression: expression.to_string(), result: result.unwrap_or_else(|e| e), error }
    }

    fn answer(&mut self, request: Request) -> Result<String, String> {
        match (&self.spec, request) {
            (ToolSpec::Builtin(BuiltinTool::Calculator), Request::Expression(e)) => super::calculator::evaluate(e),
            (ToolSpec::Builtin(BuiltinTool::Calculator), Request::Arguments(args)) => {
                match args.get("expression").and_then(|e| e.as_str()) {
                    Some(e) => super::calculator::evaluate(e),
                    None => Err(r#"error: the calculator takes {"expression": "…"}"#.into()),
                }
            }
            (ToolSpec::Program { command, timeout_s, .. }, request) => {
                let line = match request {
                    Request::Expression(e) => serde_json::json!({ "expression": e }),
                    Request::Arguments(args) => serde_json::json!({ "name": self.spec.name(), "arguments": args }),
                };
                self.call_program(command.clone(), *timeout_s, &line.to_string())
            }
        }
    }

    /// A program answers each request line (`{"expression": …}` for an inline call,
    /// `{"name": …, "arguments": {…}}` for a Hermes call) with `{"result": "…"}`
    /// (or `{"error": "…"}`).
    fn call_program(&mut self, command: Vec<String>, timeout_s: f64, line: &str) -> Result<String, String> {
        if self.program.is_none() {
            let limits = Limits { line_bytes: 64 << 10, ..Limits::default() };
            match Supervised::spawn(&command, &self.dir, limits) {
                Ok(p) => self.program = Some(p),
                Err(e) => return Err(format!("error: the tool could not start ({e:#})")),
            }
        }
        let Some(p) = self.program.as_mut() else { return Err("error: the tool is not running".into()) };
        let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
        let reply = p.exchange(line, deadline, &format!("{timeout_s} s"));
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

/// What a call asks of a tool.
enum Request<'a> {
    /// An inline call's expression.
    Expression(&'a str),
    /// A Hermes call's arguments.
    Arguments(&'a serde_json::Map<String, serde_json::Value>),
}

/// A stage's tools, answering the calls of its format.
pub struct Toolbox {
    format: CallFormat,
    tools: Vec<Tool>,
}

/// A result that marks where a template puts a `tool` message's content.
const PROBE: &str = "r1pipe-tool-result-probe";
/// Stands for the assistant's text so far when rendering what follows it.
const ASSISTANT_MARK: &str = "\u{E000}r1pipe-assistant-so-far\u{E000}";

impl Toolbox {
    /// The tools of `settings` (none: `None`), programs run in `dir`.
    pub fn new(settings: &ToolSettings, dir: &std::path::Path) -> Option<Toolbox> {
        settings.enabled().then(|| Toolbox {
            format: settings.tool_call_format,
            tools: settings.tools.iter().map(|spec| Tool::new(spec, dir)).collect(),
        })
    }

    pub fn format(&self) -> CallFormat {
        self.format
    }

    /// Refuse, before sampling, a model whose chat template cannot carry a tool's
    /// result (a Hermes call is answered through the template's `tool` message).
    pub fn check_template(&self, tok: &ChatTokenizer) -> Result<()> {
        if self.format == CallFormat::Hermes {
            let suffix = hermes_suffix(tok, PROBE)?;
            if !suffix.contains(PROBE) {
                bail!(
                    "tool_call_format: hermes answers a call with the chat template's `tool` message, and this \
                     model's template drops it (rendered after the call: {suffix:?}); use a model whose template \
                     has a tool role (Qwen2.5, Qwen3), or `tool_call_format: inline`"
                );
            }
        }
        Ok(())
    }

    /// Answer the call the model wrote (an inline expression, or a Hermes call's
    /// JSON): a malformed call or an unknown tool is an error result the model reads.
    pub fn answer(&mut self, call: &str) -> ToolCall {
        let result = match self.format {
            CallFormat::Inline => match self.tools.first_mut() {
                Some(tool) => tool.answer(Request::Expression(call)),
                None => Err("error: no tool".into()),
            },
            CallFormat::Hermes => self.answer_hermes(call),
        };
        let error = result.is_err();
        ToolCall { expression: call.to_string(), result: result.unwrap_or_else(|e| e), error }
    }

    fn answer_hermes(&mut self, call: &str) -> Result<String, String> {
        let v: serde_json::Value =
            serde_json::from_str(call).map_err(|e| format!("error: the tool call is not JSON ({e})"))?;
        let Some(name) = v.get("name").and_then(|n| n.as_str()) else {
            return Err(r#"error: a tool call is {"name": …, "arguments": {…}}"#.into());
        };
        // OpenAI's form carries the arguments as a JSON string; Hermes's as an object.
        let args = match v.get("arguments") {
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(serde_json::Value::String(s)) => match serde_json::from_str(s) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err("error: `arguments` must be a JSON object".into()),
            },
            None => serde_json::Map::new(),
            Some(_) => return Err("error: `arguments` must be a JSON object".into()),
        };
        if let Some(tool) = self.tools.iter_mut().find(|t| t.spec.name() == name) {
            return tool.answer(Request::Arguments(&args));
        }
        let names: Vec<String> = self.tools.iter().map(|t| t.spec.name()).collect();
        Err(format!(
            "error: no tool named `{}` (tools: {})",
            name.chars().take(64).collect::<String>(),
            names.join(", ")
        ))
    }

    /// The text appended after a call: inline, its result and `>>`; Hermes, what
    /// the chat template renders after the assistant's text for a `tool` message
    /// holding the result, through the opening of the next assistant turn.
    pub fn result_text(&self, tok: &ChatTokenizer, call: &ToolCall) -> Result<String> {
        match self.format {
            CallFormat::Inline => Ok(format!("{}{CLOSE}", call.result)),
            CallFormat::Hermes => hermes_suffix(tok, &call.result),
        }
    }
}

/// What the chat template renders after an assistant's text for a `tool` message
/// holding `result`, with the next assistant turn opened.
fn hermes_suffix(tok: &ChatTokenizer, result: &str) -> Result<String> {
    let messages = [Message::new("user", "?"), Message::new("assistant", ASSISTANT_MARK), Message::new("tool", result)];
    let rendered = tok.apply_chat_template(&messages, true)?;
    match rendered.find(ASSISTANT_MARK) {
        Some(at) => Ok(rendered[at + ASSISTANT_MARK.len()..].to_string()),
        None => bail!(
            "the chat template does not render an assistant message's content, so a tool's result cannot follow it"
        ),
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

    /// Append a tool's result as `text` renders it (context: no log-probability of the model's).
    pub fn append_result(&mut self, tok: &ChatTokenizer, text: &str, call: ToolCall) -> Result<()> {
        let ids = tok.encode(text)?;
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

/// Answers the calls of local generation inside its batch
/// (`model::generate::AnswerCall`): the call's expression from the row's
/// text, the toolbox's answer, and its result as the tokens to feed; nothing
/// once the row has made `max_tool_calling_iterations` calls (it writes on).
pub struct InBatchCalls<'a> {
    tok: &'a ChatTokenizer,
    limit: Option<usize>,
    toolbox: &'a mut Toolbox,
    made: std::collections::HashMap<usize, usize>,
}

impl<'a> InBatchCalls<'a> {
    pub fn new(tok: &'a ChatTokenizer, tools: &ToolSettings, toolbox: &'a mut Toolbox) -> InBatchCalls<'a> {
        InBatchCalls { tok, limit: tools.max_tool_calling_iterations, toolbox, made: Default::default() }
    }

    pub fn answer(&mut self, row: usize, text: &str) -> Result<Option<(Vec<u32>, ToolCall)>> {
        let made = self.made.entry(row).or_insert(0);
        if self.limit.is_some_and(|m| *made >= m) {
            return Ok(None);
        }
        let Some(expression) = self.toolbox.format().pending(text).map(|e| e.trim().to_string()) else {
            return Ok(None);
        };
        *made += 1;
        let call = self.toolbox.answer(&expression);
        let ids = self.tok.encode(&self.toolbox.result_text(self.tok, &call)?)?;
        Ok(Some((ids, call)))
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
    toolbox: &mut Toolbox,
    sample: &mut SampleWave,
    on_done: &mut dyn FnMut(Completion) -> Result<()>,
) -> Result<()> {
    toolbox.check_template(tok)?;
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
        wave_params.tool_call =
            tools.max_tool_calling_iterations.is_none_or(|m| iteration < m).then_some(toolbox.format());
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
                let format = toolbox.format();
                tok.decode(&a.tokens).ok().and_then(|text| format.pending(&text).map(|e| e.trim().to_string()))
            } else {
                None
            };
            if let Some(expr) = expression.filter(|_| a.tokens.len() < params.max_new_tokens) {
                let call = toolbox.answer(&expr);
                a.append_result(tok, &toolbox.result_text(tok, &call)?, call)?;
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
    fn a_program_is_named_by_its_script_or_itself_unless_named() {
        let program = |c: &[&str], name: Option<&str>| ToolSpec::Program {
            command: c.iter().map(|s| s.to_string()).collect(),
            timeout_s: 1.0,
            name: name.map(str::to_string),
        };
        assert_eq!(program(&["python3", "tools/units.py", "--fast", "table.json"], None).name(), "units");
        assert_eq!(program(&["/usr/local/bin/lookup", "db.sqlite"], None).name(), "lookup");
        assert_eq!(program(&["python3", "x.py"], Some("calculator")).name(), "calculator");
        assert_eq!(ToolSpec::Builtin(BuiltinTool::Calculator).name(), "calculator");
    }

    #[test]
    fn the_calculator_answers_and_errors_are_results() {
        let mut t = Tool::new(&ToolSpec::Builtin(BuiltinTool::Calculator), std::path::Path::new("."));
        assert_eq!(t.call("48/2"), ToolCall { expression: "48/2".into(), result: "24".into(), error: false });
        let bad = t.call("1/0");
        assert!(bad.error && bad.result == "error: division by zero", "{bad:?}");
    }
}
