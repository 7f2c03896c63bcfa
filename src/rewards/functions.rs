//! The reward functions. Each is a pure function of one sample and its own
//! parameters (the struct's fields, from YAML, with the recipes' defaults).

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::answer::{boxed, gsm8k_equal, math_equal, normalize, xml_answer};
use crate::common::{typed, ParamError};

/// One completion to score.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The reference answer.
    pub answer: &'a str,
    /// The completion's length in tokens (for length-aware rewards).
    pub tokens: usize,
}

pub trait RewardFn: Send + Sync {
    fn score(&self, s: &Sample) -> f32;
    /// The documented bounds of `score` (infinite where unbounded).
    fn range(&self) -> (f32, f32);
    /// Parameter checks beyond their types.
    fn validate(&self) -> Result<(), ParamError> {
        Ok(())
    }
    /// Precompute what scoring needs (after `validate`).
    fn prepare(&mut self) {}
}

/// A reward function as the catalog knows it.
pub struct FunctionInfo {
    pub name: &'static str,
    pub description: &'static str,
    pub defaults: fn() -> Value,
    pub build: fn(&Value) -> Result<Box<dyn RewardFn>, ParamError>,
}

fn defaults<T: Default + Serialize>() -> Value {
    serde_json::to_value(T::default()).expect("plain params serialize")
}

fn build<T: RewardFn + DeserializeOwned + 'static>(params: &Value) -> Result<Box<dyn RewardFn>, ParamError> {
    let params = if params.is_null() { Value::Object(Default::default()) } else { params.clone() };
    let mut f: T = typed(&params)?;
    f.validate()?;
    f.prepare();
    Ok(Box::new(f))
}

macro_rules! info {
    ($name:literal, $ty:ty, $desc:literal) => {
        FunctionInfo { name: $name, description: $desc, defaults: defaults::<$ty>, build: build::<$ty> }
    };
}

/// Every reward function, by its YAML name.
pub static CATALOG: &[FunctionInfo] = &[
    info!("correctness", Correctness, "`correct` if the last <answer> equals the reference (GSM8K normalization, numeric equality), else 0"),
    info!("integer", Integer, "`value` if the extracted answer is an integer"),
    info!("strict_format", StrictFormat, "`value` if the whole completion is exactly <think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>\\n?"),
    info!("soft_format", SoftFormat, "`value` if <think>…</think> then <answer>…</answer> appears anywhere"),
    info!("xml_count", XmlCount, "0.125 per well-formed tag line, minus 0.001 per character after </answer>"),
    info!("length", Length, "scale · ln(1 + min(tokens, target_tokens)) / ln(1 + target_tokens): pays for reasoning up to the target, nothing more beyond it"),
    info!("accuracy", Accuracy, "1 if the answer (\\boxed{} or <answer>) is mathematically equal to the reference (numbers, fractions, \\frac), else 0"),
    info!("format", FormatExact, "1 if the completion is exactly <think>…</think> then <answer>…</answer>, else 0"),
    info!("reasoning_steps", ReasoningSteps, "min(1, step markers / 3): `Step 1:`, numbered lines, bullets, First/Second/Next/Finally"),
    info!("cosine", Cosine, "correctness scaled by length on a cosine schedule (arXiv 2502.03373): short right answers earn most, long wrong ones lose least"),
    info!("regex_match", RegexMatch, "`value` if the completion matches `pattern` (a Rust regex), else 0: custom format or content rewards"),
    info!("repetition_penalty", RepetitionPenalty, "(1 − unique n-grams / n-grams) · max_penalty over lower-cased words"),
];

pub fn lookup(name: &str) -> Option<&'static FunctionInfo> {
    CATALOG.iter().find(|f| f.name == name)
}

// ---------------------------------------------------------------- GSM8K recipe

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Correctness {
    pub correct: f32,
}
impl Default for Correctness {
    fn default() -> Self {
        Correctness { correct: 2.0 }
    }
}
impl RewardFn for Correctness {
    fn score(&self, s: &Sample) -> f32 {
        match xml_answer(s.completion) {
            Some(a) if gsm8k_equal(a, s.answer) => self.correct,
            _ => 0.0,
        }
    }
    fn range(&self) -> (f32, f32) {
        (self.correct.min(0.0), self.correct.max(0.0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Integer {
    pub value: f32,
}
impl Default for Integer {
    fn default() -> Self {
        Integer { value: 0.5 }
    }
}
impl RewardFn for Integer {
    fn score(&self, s: &Sample) -> f32 {
        static INT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+$").expect("static regex"));
        match xml_answer(s.completion) {
            Some(a) if INT.is_match(&normalize(a)) => self.value,
            _ => 0.0,
        }
    }
    fn range(&self) -> (f32, f32) {
        (self.value.min(0.0), self.value.max(0.0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrictFormat {
    pub value: f32,
}
impl Default for StrictFormat {
    fn default() -> Self {
        StrictFormat { value: 0.5 }
    }
}
impl RewardFn for StrictFormat {
    fn score(&self, s: &Sample) -> f32 {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?s)\A<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?\z").expect("static regex")
        });
        if RE.is_match(s.completion) {
            self.value
        } else {
            0.0
        }
    }
    fn range(&self) -> (f32, f32) {
        (self.value.min(0.0), self.value.max(0.0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftFormat {
    pub value: f32,
}
impl Default for SoftFormat {
    fn default() -> Self {
        SoftFormat { value: 0.5 }
    }
}
impl RewardFn for SoftFormat {
    fn score(&self, s: &Sample) -> f32 {
        static RE: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"(?s)<think>.*?</think>\s*<answer>.*?</answer>").expect("static regex"));
        if RE.is_match(s.completion) {
            self.value
        } else {
            0.0
        }
    }
    fn range(&self) -> (f32, f32) {
        (self.value.min(0.0), self.value.max(0.0))
    }
}

/// The original recipe's tag counting, kept exactly (including its penalty
/// for trailing text, which makes the lower bound depend on the length).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmlCount {}
impl RewardFn for XmlCount {
    fn score(&self, s: &Sample) -> f32 {
        let t = s.completion;
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
    fn range(&self) -> (f32, f32) {
        (f32::NEG_INFINITY, 0.501)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Length {
    pub target_tokens: usize,
    pub scale: f32,
}
impl Default for Length {
    fn default() -> Self {
        Length { target_tokens: 256, scale: 0.5 }
    }
}
impl RewardFn for Length {
    fn score(&self, s: &Sample) -> f32 {
        let n = s.tokens.min(self.target_tokens) as f64;
        (self.scale as f64 * (1.0 + n).ln() / (1.0 + self.target_tokens as f64).ln()) as f32
    }
    fn range(&self) -> (f32, f32) {
        (self.scale.min(0.0), self.scale.max(0.0))
    }
    fn validate(&self) -> Result<(), ParamError> {
        if self.target_tokens == 0 {
            return Err(ParamError::new("target_tokens", "must be at least 1"));
        }
        Ok(())
    }
}

// ---------------------------------------------------- Building-DeepSeek-R1 recipe

/// The answer a math completion gives: the last `\boxed{}`, else the last `<answer>` block.
fn math_answer(completion: &str) -> Option<&str> {
    boxed(completion).or_else(|| xml_answer(completion))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Accuracy {}
impl RewardFn for Accuracy {
    fn score(&self, s: &Sample) -> f32 {
        match math_answer(s.completion) {
            Some(a) if math_equal(a, s.answer) => 1.0,
            _ => 0.0,
        }
    }
    fn range(&self) -> (f32, f32) {
        (0.0, 1.0)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormatExact {}
impl RewardFn for FormatExact {
    fn score(&self, s: &Sample) -> f32 {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z").expect("static regex")
        });
        if RE.is_match(s.completion) {
            1.0
        } else {
            0.0
        }
    }
    fn range(&self) -> (f32, f32) {
        (0.0, 1.0)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReasoningSteps {}
impl RewardFn for ReasoningSteps {
    fn score(&self, s: &Sample) -> f32 {
        static RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?m)(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)").expect("static regex")
        });
        (RE.find_iter(s.completion).count() as f32 / 3.0).min(1.0)
    }
    fn range(&self) -> (f32, f32) {
        (0.0, 1.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cosine {
    pub min_value_wrong: f32,
    pub max_value_wrong: f32,
    pub min_value_correct: f32,
    pub max_value_correct: f32,
    /// In tokens.
    pub max_len: usize,
}
impl Default for Cosine {
    fn default() -> Self {
        Cosine {
            min_value_wrong: -0.5,
            max_value_wrong: -0.1,
            min_value_correct: 0.8,
            max_value_correct: 1.0,
            max_len: 1000,
        }
    }
}
impl RewardFn for Cosine {
    fn score(&self, s: &Sample) -> f32 {
        let correct = matches!(math_answer(s.completion), Some(a) if math_equal(a, s.answer));
        let progress = s.tokens.min(self.max_len) as f64 / self.max_len as f64;
        let cos = (progress * std::f64::consts::PI).cos();
        // For a wrong answer min/max swap, so the reward runs from
        // min_value_wrong at length 0 up to max_value_wrong at max_len.
        let (lo, hi) = if correct {
            (self.min_value_correct, self.max_value_correct)
        } else {
            (self.max_value_wrong, self.min_value_wrong)
        };
        (lo as f64 + 0.5 * (hi - lo) as f64 * (1.0 + cos)) as f32
    }
    fn range(&self) -> (f32, f32) {
        let v = [self.min_value_wrong, self.max_value_wrong, self.min_value_correct, self.max_value_correct];
        (v.iter().copied().fold(f32::INFINITY, f32::min), v.iter().copied().fold(f32::NEG_INFINITY, f32::max))
    }
    fn validate(&self) -> Result<(), ParamError> {
        if self.max_len == 0 {
            return Err(ParamError::new("max_len", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepetitionPenalty {
    pub ngram_size: usize,
    pub max_penalty: f32,
}
impl Default for RepetitionPenalty {
    fn default() -> Self {
        RepetitionPenalty { ngram_size: 3, max_penalty: -0.1 }
    }
}
impl RewardFn for RepetitionPenalty {
    fn score(&self, s: &Sample) -> f32 {
        let lower = s.completion.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < self.ngram_size {
            return 0.0;
        }
        let grams: Vec<&[&str]> = words.windows(self.ngram_size).collect();
        let unique: HashSet<&[&str]> = grams.iter().copied().collect();
        (1.0 - unique.len() as f32 / grams.len() as f32) * self.max_penalty
    }
    fn range(&self) -> (f32, f32) {
        (self.max_penalty, 0.0)
    }
    fn validate(&self) -> Result<(), ParamError> {
        if self.max_penalty > 0.0 {
            return Err(ParamError::new(
                "max_penalty",
                format!("{} is positive; a penalty must be ≤ 0", self.max_penalty),
            ));
        }
        if self.ngram_size == 0 {
            return Err(ParamError::new("ngram_size", "must be at least 1"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- custom

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegexMatch {
    pub pattern: String,
    pub value: f32,
    #[serde(skip)]
    compiled: Option<Regex>,
}
impl Default for RegexMatch {
    fn default() -> Self {
        RegexMatch { pattern: String::new(), value: 1.0, compiled: None }
    }
}
impl RewardFn for RegexMatch {
    fn score(&self, s: &Sample) -> f32 {
        match &self.compiled {
            Some(re) if re.is_match(s.completion) => self.value,
            _ => 0.0,
        }
    }
    fn range(&self) -> (f32, f32) {
        (self.value.min(0.0), self.value.max(0.0))
    }
    fn validate(&self) -> Result<(), ParamError> {
        if self.pattern.is_empty() {
            return Err(ParamError::new("pattern", "required: the regex a completion must match"));
        }
        Regex::new(&self.pattern).map(|_| ()).map_err(|e| ParamError::new("pattern", format!("not a valid regex: {e}")))
    }
    fn prepare(&mut self) {
        self.compiled = Regex::new(&self.pattern).ok();
    }
}
