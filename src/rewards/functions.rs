//! The built-in reward functions. Each is one declaration in [`builtins!`]:
//! its name, what it pays, its parameters (with defaults and docs), its
//! bounds, its checks and its pure scoring function; `r1pipe rewards --list`,
//! parameter checking and the range property test all follow from it. A
//! reward set holds them, and rewards from outside the binary, behind one
//! trait: [`RewardFn`].

use std::collections::HashSet;
use std::sync::LazyLock;

use rayon::prelude::*;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::answer::{boxed, gsm8k_equal, math_equal, normalize, xml_answer};
use crate::common::{typed, ParamError};

/// One completion to score.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The reference answer.
    pub answer: &'a str,
    /// The completion's length in tokens (for length-aware rewards).
    pub tokens: usize,
    /// The results of the completion's tool calls as the sampler recorded them
    /// (an error's starts with `error`), whatever the call format; `None`: read
    /// from the text's inline calls (`<<expr=result>>`), for a completion known
    /// only by its text.
    pub tool_results: Option<Vec<&'a str>>,
}

/// What a reward set scores with: a built-in, or a function outside the binary.
pub trait RewardFn: Send + Sync {
    /// The scores of a batch, in order; `None` where the function does not apply
    /// to a sample (TRL's `None`: the weighted sum skips it).
    fn score_batch(&self, samples: &[Sample]) -> anyhow::Result<Vec<Option<f32>>>;
    /// The documented bounds of a score (infinite where unbounded or unknown).
    fn range(&self) -> (f32, f32);
    /// Files the function reads, whose content a stage's fingerprint covers.
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
    /// One sample's score.
    fn score_one(&self, sample: &Sample) -> anyhow::Result<Option<f32>> {
        Ok(self.score_batch(std::slice::from_ref(sample))?.pop().flatten())
    }
}

/// A built-in's scoring: a pure function of one sample and its parameters.
pub trait Scorer: Send + Sync {
    fn score(&self, s: &Sample) -> f32;
    fn range(&self) -> (f32, f32);
    /// Parameter checks beyond their types.
    fn check(&self) -> Result<(), ParamError> {
        Ok(())
    }
}

impl<T: Scorer> RewardFn for T {
    fn score_batch(&self, samples: &[Sample]) -> anyhow::Result<Vec<Option<f32>>> {
        Ok(samples.par_iter().map(|s| Some(self.score(s))).collect())
    }
    fn range(&self) -> (f32, f32) {
        Scorer::range(self)
    }
}

/// A parameter of a built-in, for `--list`.
pub struct ParamDoc {
    pub name: &'static str,
    pub doc: &'static str,
}

/// A built-in reward function as the catalog knows it.
pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    pub params: &'static [ParamDoc],
    /// The parameters' defaults, as a mapping.
    pub defaults: fn() -> Value,
    /// The function with these parameters (missing ones take their defaults), checked.
    pub build: fn(&Value) -> Result<Box<dyn RewardFn>, ParamError>,
}

fn defaults<T: Default + Serialize>() -> Value {
    serde_json::to_value(T::default()).unwrap_or(Value::Null)
}

fn build<T: Scorer + DeserializeOwned + 'static>(params: &Value) -> Result<Box<dyn RewardFn>, ParamError> {
    let params = if params.is_null() { Value::Object(Default::default()) } else { params.clone() };
    let f: T = typed(&params)?;
    f.check()?;
    Ok(Box::new(f))
}

pub fn lookup(name: &str) -> Option<&'static Builtin> {
    CATALOG.iter().find(|f| f.name == name)
}

/// The results of a completion's tool calls: as recorded, or `r` of each `<<expr=r>>` in its text.
fn tool_results<'a>(s: &Sample<'a>) -> Vec<&'a str> {
    if let Some(results) = &s.tool_results {
        return results.clone();
    }
    crate::data::gsm8k::tool_result_spans(s.completion)
        .into_iter()
        .map(|r| s.completion[r].trim_end_matches(">>"))
        .collect()
}

/// `(lo, hi)` of a reward that pays `v` or nothing.
fn paid(v: f32) -> (f32, f32) {
    (v.min(0.0), v.max(0.0))
}

/// Declares the built-ins: for each, its parameter struct (fields with their
/// defaults and docs), its `Scorer` impl, and its catalog entry.
macro_rules! builtins {
    ($(
        $(#[doc = $doc:literal])+
        $name:literal => $ty:ident {
            $( $(#[doc = $pdoc:literal])+ $field:ident : $fty:ty = $default:expr ),* $(,)?
        }
        range($rp:ident) $range:block
        $(check($cp:ident) $check:block)?
        score($sp:ident, $s:ident) $score:block
    )*) => {
        $(
            #[derive(Debug, Clone, Serialize, Deserialize)]
            #[serde(deny_unknown_fields, default)]
            pub struct $ty { $( pub $field: $fty ),* }

            impl Default for $ty {
                fn default() -> Self {
                    $ty { $( $field: $default ),* }
                }
            }

            impl Scorer for $ty {
                #[allow(unused_variables)]
                fn score(&self, $s: &Sample) -> f32 {
                    let $sp = self;
                    $score
                }
                #[allow(unused_variables)]
                fn range(&self) -> (f32, f32) {
                    let $rp = self;
                    $range
                }
                $(
                    fn check(&self) -> Result<(), ParamError> {
                        let $cp = self;
                        $check
                    }
                )?
            }
        )*

        /// Every built-in reward function, by its YAML name.
        pub static CATALOG: &[Builtin] = &[$(
            Builtin {
                name: $name,
                description: concat!($($doc),+),
                params: &[$( ParamDoc { name: stringify!($field), doc: concat!($($pdoc),+) } ),*],
                defaults: defaults::<$ty>,
                build: build::<$ty>,
            }
        ),*];
    };
}

builtins! {
    // ------------------------------------------------------------ GSM8K recipe

    /// `correct` if the last <answer> equals the reference (GSM8K normalization, numeric equality), else 0
    "correctness" => Correctness {
        /// what a correct answer earns
        correct: f32 = 2.0,
    }
    range(p) { paid(p.correct) }
    score(p, s) {
        match xml_answer(s.completion) {
            Some(a) if gsm8k_equal(a, s.answer) => p.correct,
            _ => 0.0,
        }
    }

    /// `value` if the extracted answer is an integer
    "integer" => Integer {
        /// what an integer answer earns
        value: f32 = 0.5,
    }
    range(p) { paid(p.value) }
    score(p, s) {
        static INT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+$").expect("static regex"));
        match xml_answer(s.completion) {
            Some(a) if INT.is_match(&normalize(a)) => p.value,
            _ => 0.0,
        }
    }

    /// `value` if the whole completion is exactly <think>\n…\n</think>\n<answer>\n…\n</answer>\n?
    "strict_format" => StrictFormat {
        /// what the format earns
        value: f32 = 0.5,
    }
    range(p) { paid(p.value) }
    score(p, s) {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?s)\A<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?\z").expect("static regex")
        });
        if RE.is_match(s.completion) { p.value } else { 0.0 }
    }

    /// `value` × the share of the completion's tool calls (`<<expr=result>>`, or Hermes's) that the tool answered without an error; 0 without calls
    "tool_calls" => ToolCalls {
        /// what a completion whose calls all worked earns
        value: f32 = 0.5,
    }
    range(p) { paid(p.value) }
    score(p, s) {
        let results = tool_results(s);
        if results.is_empty() {
            return 0.0;
        }
        let ok = results.iter().filter(|r| !r.trim_start().starts_with("error")).count();
        p.value * ok as f32 / results.len() as f32
    }

    /// `value` if the final <answer> (or, without one, the last number) is the result of one of the completion's tool calls
    "tool_result_used" => ToolResultUsed {
        /// what an answer taken from a tool's result earns
        value: f32 = 0.5,
    }
    range(p) { paid(p.value) }
    score(p, s) {
        let answer = xml_answer(s.completion).map(str::to_string).or_else(|| crate::eval::extract::last_number(s.completion));
        let Some(answer) = answer else { return 0.0 };
        if tool_results(s).iter().any(|r| gsm8k_equal(&answer, r.trim())) { p.value } else { 0.0 }
    }

    /// `value` if <think>…</think> then <answer>…</answer> appears anywhere
    "soft_format" => SoftFormat {
        /// what the format earns
        value: f32 = 0.5,
    }
    range(p) { paid(p.value) }
    score(p, s) {
        static RE: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"(?s)<think>.*?</think>\s*<answer>.*?</answer>").expect("static regex"));
        if RE.is_match(s.completion) { p.value } else { 0.0 }
    }

    /// 0.125 per well-formed tag line, minus 0.001 per character after </answer> (the original recipe's counting, kept exactly: its lower bound depends on the length)
    "xml_count" => XmlCount {}
    range(p) { (f32::NEG_INFINITY, 0.501) }
    score(p, s) { xml_count(s.completion) }

    /// scale · ln(1 + min(tokens, target_tokens)) / ln(1 + target_tokens): pays for reasoning up to the target, nothing more beyond it
    "length" => Length {
        /// the length, in tokens, that earns the whole `scale`
        target_tokens: usize = 256,
        /// what a completion of the target length earns
        scale: f32 = 0.5,
    }
    range(p) { paid(p.scale) }
    check(p) {
        if p.target_tokens == 0 {
            return Err(ParamError::new("target_tokens", "must be at least 1"));
        }
        Ok(())
    }
    score(p, s) {
        let n = s.tokens.min(p.target_tokens) as f64;
        (p.scale as f64 * (1.0 + n).ln() / (1.0 + p.target_tokens as f64).ln()) as f32
    }

    /// DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`): 0 up to max_completion_len − soft_punish_cache tokens, then falling linearly to −1 at max_completion_len, −1 beyond
    "soft_overlong" => SoftOverlong {
        /// the length, in tokens, at which the punishment reaches −1 (the stage's `max_completion_length`)
        max_completion_len: usize = 512,
        /// the tokens before `max_completion_len` over which the punishment grows (0: −1 past the limit only)
        soft_punish_cache: usize = 128,
    }
    range(p) { (-1.0, 0.0) }
    check(p) {
        if p.soft_punish_cache > p.max_completion_len {
            return Err(ParamError::new(
                "soft_punish_cache",
                format!("must be at most max_completion_len ({})", p.max_completion_len),
            ));
        }
        Ok(())
    }
    score(p, s) {
        let free = p.max_completion_len - p.soft_punish_cache;
        if s.tokens <= free {
            0.0
        } else if s.tokens <= p.max_completion_len {
            (free as f64 - s.tokens as f64) as f32 / p.soft_punish_cache as f32
        } else {
            -1.0
        }
    }

    // ------------------------------------------------ Building-DeepSeek-R1 recipe

    /// 1 if the answer (\boxed{} or <answer>) is mathematically equal to the reference (numbers, fractions, \frac), else 0
    "accuracy" => Accuracy {}
    range(p) { (0.0, 1.0) }
    score(p, s) { if math_correct(s) { 1.0 } else { 0.0 } }

    /// 1 if the completion is exactly <think>…</think> then <answer>…</answer>, else 0
    "format" => FormatExact {}
    range(p) { (0.0, 1.0) }
    score(p, s) {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z").expect("static regex")
        });
        if RE.is_match(s.completion) { 1.0 } else { 0.0 }
    }

    /// min(1, step markers / 3): `Step 1:`, numbered lines, bullets, First/Second/Next/Finally
    "reasoning_steps" => ReasoningSteps {}
    range(p) { (0.0, 1.0) }
    score(p, s) {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?m)(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)").expect("static regex")
        });
        (RE.find_iter(s.completion).count() as f32 / 3.0).min(1.0)
    }

    /// correctness scaled by length on a cosine schedule (arXiv 2502.03373): short right answers earn most, long wrong ones lose least
    "cosine" => Cosine {
        /// a wrong answer at length 0
        min_value_wrong: f32 = -0.5,
        /// a wrong answer at `max_len` and beyond
        max_value_wrong: f32 = -0.1,
        /// a right answer at `max_len` and beyond
        min_value_correct: f32 = 0.8,
        /// a right answer at length 0
        max_value_correct: f32 = 1.0,
        /// the length, in tokens, where the schedule ends
        max_len: usize = 1000,
    }
    range(p) {
        let v = [p.min_value_wrong, p.max_value_wrong, p.min_value_correct, p.max_value_correct];
        (v.iter().copied().fold(f32::INFINITY, f32::min), v.iter().copied().fold(f32::NEG_INFINITY, f32::max))
    }
    check(p) {
        if p.max_len == 0 {
            return Err(ParamError::new("max_len", "must be at least 1"));
        }
        Ok(())
    }
    score(p, s) {
        let progress = s.tokens.min(p.max_len) as f64 / p.max_len as f64;
        let cos = (progress * std::f64::consts::PI).cos();
        // For a wrong answer min/max swap, so the reward runs from
        // min_value_wrong at length 0 up to max_value_wrong at max_len.
        let (lo, hi) = if math_correct(s) {
            (p.min_value_correct, p.max_value_correct)
        } else {
            (p.max_value_wrong, p.min_value_wrong)
        };
        (lo as f64 + 0.5 * (hi - lo) as f64 * (1.0 + cos)) as f32
    }

    /// (1 − unique n-grams / n-grams) · max_penalty over lower-cased words
    "repetition_penalty" => RepetitionPenalty {
        /// words per n-gram
        ngram_size: usize = 3,
        /// the penalty of a completion that is one n-gram repeated (≤ 0)
        max_penalty: f32 = -0.1,
    }
    range(p) { (p.max_penalty, 0.0) }
    check(p) {
        if p.max_penalty > 0.0 {
            return Err(ParamError::new(
                "max_penalty",
                format!("{} is positive; a penalty must be ≤ 0", p.max_penalty),
            ));
        }
        if p.ngram_size == 0 {
            return Err(ParamError::new("ngram_size", "must be at least 1"));
        }
        Ok(())
    }
    score(p, s) {
        let lower = s.completion.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < p.ngram_size {
            return 0.0;
        }
        let grams: Vec<&[&str]> = words.windows(p.ngram_size).collect();
        let unique: HashSet<&[&str]> = grams.iter().copied().collect();
        (1.0 - unique.len() as f32 / grams.len() as f32) * p.max_penalty
    }

    // ------------------------------------------------------------------ custom

    /// `value` if the completion matches `pattern` (a Rust regex), else 0: custom format or content rewards
    "regex_match" => RegexMatch {
        /// the regex a completion must match (required)
        pattern: Pattern = Pattern::default(),
        /// what a match earns
        value: f32 = 1.0,
    }
    range(p) { paid(p.value) }
    check(p) {
        if p.pattern.0.is_none() {
            return Err(ParamError::new("pattern", "required: the regex a completion must match"));
        }
        Ok(())
    }
    score(p, s) {
        match &p.pattern.0 {
            Some(re) if re.is_match(s.completion) => p.value,
            _ => 0.0,
        }
    }
}

/// The answer of a math completion (the last `\boxed{}`, else the last
/// `<answer>` block) equals the reference mathematically.
fn math_correct(s: &Sample) -> bool {
    matches!(boxed(s.completion).or_else(|| xml_answer(s.completion)), Some(a) if math_equal(a, s.answer))
}

/// The original recipe's tag counting.
fn xml_count(t: &str) -> f32 {
    let mut r = 0.0f64;
    if t.matches("<think>\n").count() == 1 {
        r += 0.125;
    }
    if t.matches("\n</think>\n").count() == 1 {
        r += 0.125;
    }
    if t.matches("\n<answer>\n").count() == 1 {
        r += 0.125;
        let after = t.rsplit("\n</answer>\n").next().unwrap_or("");
        r -= after.chars().count() as f64 * 0.001;
    }
    if t.matches("\n</answer>").count() == 1 {
        r += 0.125;
        let after = t.rsplit("\n</answer>").next().unwrap_or("");
        r -= (after.chars().count() as f64 - 1.0) * 0.001;
    }
    r as f32
}

/// A regex parameter: written as its text, compiled once when read (an invalid
/// one is a parameter error naming the key).
#[derive(Debug, Clone, Default)]
pub struct Pattern(Option<Regex>);

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_ref().map_or("", |r| r.as_str()))
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Pattern(None));
        }
        Regex::new(&text)
            .map(|r| Pattern(Some(r)))
            .map_err(|e| serde::de::Error::custom(format!("not a valid regex: {e}")))
    }
}
