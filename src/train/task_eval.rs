//! Evaluation during training on the task itself: the policy answers held-out
//! prompts through the evaluation loop the `evaluate` stage uses (same
//! prompts, judge and metrics, so `eval/accuracy_strict` at step N is what
//! `evaluate` reports for step N's weights), and the reward set scores the
//! answers too (`eval/reward`, TRL's evaluation metric).

use std::collections::BTreeMap;

use anyhow::Result;

use super::trainer::Evaluator;
use crate::common::Host;
use crate::data::PromptRow;
use crate::eval::metrics::ModelMetrics;
use crate::eval::run::{self, EvalSettings};
use crate::model::{ChatTokenizer, SamplingParams, Transformer};
use crate::rewards::set::mean;
use crate::rewards::{RewardSet, Sample};
use crate::rollout::tools::ToolSettings;
use crate::rollout::Sampler;

/// The metrics an evaluation during training reports (`eval/<name>` in the log).
pub const METRICS: &[&str] = &[
    "accuracy_strict",
    "accuracy_flexible",
    "strict_format",
    "soft_format",
    "mean_completion_tokens",
    "truncation_rate",
    "reward",
];

pub struct TaskEvaluator<'a> {
    pub tokenizer: &'a ChatTokenizer,
    /// The evaluation questions, each repeated `generations` times in a row.
    rows: Vec<PromptRow>,
    pub rewards: &'a RewardSet,
    pub sampling: SamplingParams,
    pub batch_size: usize,
    pub seed: u64,
    /// The training's tools (evaluation samples as training does), and where programs run.
    pub tools: ToolSettings,
    pub tool_dir: std::path::PathBuf,
}

impl<'a> TaskEvaluator<'a> {
    /// `generations` completions per question: 1 is greedy decoding, as `evaluate`
    /// does by default; more are sampled with `sampling` (the training's settings).
    pub fn new(
        tokenizer: &'a ChatTokenizer,
        questions: Vec<PromptRow>,
        generations: usize,
        rewards: &'a RewardSet,
        sampling: SamplingParams,
        batch_size: usize,
        seed: u64,
    ) -> Self {
        let sampling = if generations <= 1 { SamplingParams { temperature: 0.0, ..sampling } } else { sampling };
        let rows = questions.iter().flat_map(|q| std::iter::repeat_n(q.clone(), generations.max(1))).collect();
        TaskEvaluator {
            tokenizer,
            rows,
            rewards,
            sampling,
            batch_size,
            seed,
            tools: ToolSettings::default(),
            tool_dir: std::path::PathBuf::from("."),
        }
    }

    /// Sample with the training's tools, programs running in `dir`.
    pub fn with_tools(mut self, tools: ToolSettings, dir: &std::path::Path) -> Self {
        self.tools = tools;
        self.tool_dir = dir.to_path_buf();
        self
    }
}

impl Evaluator for TaskEvaluator<'_> {
    fn evaluate(&mut self, model: &Transformer, step: u64, host: &dyn Host) -> Result<BTreeMap<String, f64>> {
        let name = format!("step-{step}");
        // Samples of an evaluation a kill interrupted are kept: a resumed run
        // reaches this step with bitwise the same weights.
        let (mut samples, todo) = run::resume(host, &name, self.rows.len())?;
        let settings = EvalSettings {
            sampling: self.sampling.clone(),
            batch_size: self.batch_size,
            shots: Vec::new(),
            seed: self.seed ^ step.wrapping_mul(0x9e37_79b9),
            tools: self.tools.clone(),
            tool_dir: self.tool_dir.clone(),
        };
        if !todo.is_empty() {
            let sampler = Sampler::Local(model);
            samples.extend(run::evaluate(&name, &sampler, self.tokenizer, &self.rows, &todo, &settings, host)?);
        }
        samples.sort_by_key(|s| s.index);
        let verdicts: Vec<_> = samples.iter().map(|s| s.verdict()).collect();
        let m = ModelMetrics::of(&verdicts);
        let judged: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                prompt: &s.question,
                completion: &s.completion,
                answer: &s.reference,
                tokens: s.tokens,
                tool_results: (!s.tool_calls.is_empty())
                    .then(|| s.tool_calls.iter().map(|t| t.result.as_str()).collect()),
            })
            .collect();
        let reward = mean(&self.rewards.score(&judged)?.total) as f64;
        Ok(BTreeMap::from([
            ("accuracy_strict".to_string(), m.accuracy_strict),
            ("accuracy_flexible".to_string(), m.accuracy_flexible.unwrap_or(0.0)),
            ("strict_format".to_string(), m.strict_format),
            ("soft_format".to_string(), m.soft_format),
            ("mean_completion_tokens".to_string(), m.mean_completion_tokens),
            ("truncation_rate".to_string(), m.truncation_rate),
            ("reward".to_string(), reward),
        ]))
    }
}
