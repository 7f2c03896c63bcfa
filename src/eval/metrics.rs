//! An evaluation's metrics file (versioned JSON) and its table: per model,
//! strict and flexible accuracy with 95% Wilson intervals, strict and soft
//! format rates, mean completion tokens, truncation rate and n; between every
//! two models evaluated on the same questions, McNemar's exact test.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stats::{mcnemar_exact, wilson95};
use crate::common::table::render_table;

/// The metrics file's version: 1 had one `accuracy` (strict) and no intervals.
pub const VERSION: u32 = 2;

/// One evaluated question's verdicts.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub index: usize,
    pub correct_strict: bool,
    pub correct_flexible: bool,
    pub strict_format: bool,
    pub soft_format: bool,
    pub tokens: usize,
    pub truncated: bool,
    /// Tool calls the completion made, and how many of them failed.
    pub tool_calls: usize,
    pub tool_errors: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub n: usize,
    pub accuracy_strict: f64,
    /// 95% Wilson interval (absent in version-1 files).
    pub accuracy_strict_ci95: Option<(f64, f64)>,
    pub accuracy_flexible: Option<f64>,
    pub accuracy_flexible_ci95: Option<(f64, f64)>,
    pub strict_format: f64,
    pub soft_format: f64,
    pub mean_completion_tokens: f64,
    pub truncation_rate: f64,
    /// With tools: calls per completion, the share of calls that failed, and the
    /// share of completions that called a tool at all (absent without tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls_per_completion: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_tool_rate: Option<f64>,
}

/// A paired comparison of two models on the questions both answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub metric: String,
    /// Questions only `a` got right, and only `b`.
    pub a_only: usize,
    pub b_only: usize,
    /// accuracy(b) − accuracy(a) on the shared questions.
    pub delta: f64,
    pub p_value: f64,
    pub significant: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub version: u32,
    pub questions: usize,
    #[serde(default)]
    pub num_fewshot: usize,
    pub models: BTreeMap<String, ModelMetrics>,
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
}

/// Whether a question's verdict counts as right on one metric.
pub type Pick = fn(&Verdict) -> bool;

/// The metrics paired comparisons are made on, and each question's verdict on it.
pub const PAIRED_METRICS: [(&str, Pick); 2] =
    [("accuracy_strict", |v| v.correct_strict), ("accuracy_flexible", |v| v.correct_flexible)];

/// Significance level the table marks differences at.
pub const ALPHA: f64 = 0.05;

impl ModelMetrics {
    pub fn of(v: &[Verdict]) -> ModelMetrics {
        let n = v.len();
        let count = |f: &dyn Fn(&Verdict) -> bool| v.iter().filter(|x| f(x)).count();
        let frac = |k: usize| k as f64 / n.max(1) as f64;
        let (ks, kf) = (count(&|x| x.correct_strict), count(&|x| x.correct_flexible));
        ModelMetrics {
            n,
            accuracy_strict: frac(ks),
            accuracy_strict_ci95: Some(wilson95(ks, n)),
            accuracy_flexible: Some(frac(kf)),
            accuracy_flexible_ci95: Some(wilson95(kf, n)),
            strict_format: frac(count(&|x| x.strict_format)),
            soft_format: frac(count(&|x| x.soft_format)),
            mean_completion_tokens: v.iter().map(|x| x.tokens as f64).sum::<f64>() / n.max(1) as f64,
            truncation_rate: frac(count(&|x| x.truncated)),
            tool_calls_per_completion: None,
            tool_error_rate: None,
            used_tool_rate: None,
        }
    }

    /// [`ModelMetrics::of`] for a model evaluated with tools: also what it did with them.
    pub fn with_tools(v: &[Verdict]) -> ModelMetrics {
        let calls: usize = v.iter().map(|x| x.tool_calls).sum();
        let errors: usize = v.iter().map(|x| x.tool_errors).sum();
        let n = v.len().max(1) as f64;
        ModelMetrics {
            tool_calls_per_completion: Some(calls as f64 / n),
            tool_error_rate: Some(errors as f64 / calls.max(1) as f64),
            used_tool_rate: Some(v.iter().filter(|x| x.tool_calls > 0).count() as f64 / n),
            ..ModelMetrics::of(v)
        }
    }
}

impl EvalMetrics {
    /// Metrics of every model and the paired comparisons between every two (in
    /// name order); `tools`: the models were evaluated with tools.
    pub fn of(
        questions: usize,
        num_fewshot: usize,
        verdicts: &BTreeMap<String, Vec<Verdict>>,
        tools: bool,
    ) -> EvalMetrics {
        let per_model = if tools { ModelMetrics::with_tools } else { ModelMetrics::of };
        let models = verdicts.iter().map(|(k, v)| (k.clone(), per_model(v))).collect();
        let names: Vec<&String> = verdicts.keys().collect();
        let mut comparisons = Vec::new();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                for (metric, pick) in PAIRED_METRICS {
                    comparisons.push(compare(a, b, metric, &verdicts[*a], &verdicts[*b], pick));
                }
            }
        }
        EvalMetrics { version: VERSION, questions, num_fewshot, models, comparisons }
    }

    /// Read a metrics file of any version.
    pub fn from_json(v: &Value) -> Result<EvalMetrics> {
        let version = v.get("version").and_then(Value::as_u64).unwrap_or(1) as u32;
        match version {
            1 => {
                // { questions, models: { name: { n, accuracy, strict_format, soft_format, mean_completion_tokens, truncation_rate } } }
                let mut models = BTreeMap::new();
                for (name, m) in v.get("models").and_then(Value::as_object).into_iter().flatten() {
                    let f = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
                    models.insert(
                        name.clone(),
                        ModelMetrics {
                            n: m.get("n").and_then(Value::as_u64).unwrap_or(0) as usize,
                            accuracy_strict: f("accuracy"),
                            accuracy_strict_ci95: None,
                            accuracy_flexible: None,
                            accuracy_flexible_ci95: None,
                            strict_format: f("strict_format"),
                            soft_format: f("soft_format"),
                            mean_completion_tokens: f("mean_completion_tokens"),
                            truncation_rate: f("truncation_rate"),
                            tool_calls_per_completion: None,
                            tool_error_rate: None,
                            used_tool_rate: None,
                        },
                    );
                }
                Ok(EvalMetrics {
                    version: 1,
                    questions: v.get("questions").and_then(Value::as_u64).unwrap_or(0) as usize,
                    num_fewshot: 0,
                    models,
                    comparisons: Vec::new(),
                })
            }
            VERSION => Ok(serde_json::from_value(v.clone())?),
            other => bail!("metrics version {other} is newer than this r1pipe reads ({VERSION}); upgrade r1pipe"),
        }
    }

    /// The models side by side, then the paired comparisons.
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let with_ci = |x: Option<f64>, ci: Option<(f64, f64)>| match (x, ci) {
            (Some(x), Some((lo, hi))) => format!("{} [{:.1}, {:.1}]", pct(x), 100.0 * lo, 100.0 * hi),
            (Some(x), None) => pct(x),
            (None, _) => "-".into(),
        };
        let mut headers = vec!["metric".to_string()];
        headers.extend(self.models.keys().cloned());
        type Cell<'a> = Box<dyn Fn(&ModelMetrics) -> String + 'a>;
        let opt = |x: Option<f64>, f: fn(f64) -> String| x.map_or("-".to_string(), f);
        let mut rows: Vec<(&str, Cell)> = vec![
            ("accuracy, strict (95% CI)", Box::new(|m| with_ci(Some(m.accuracy_strict), m.accuracy_strict_ci95))),
            ("accuracy, flexible (95% CI)", Box::new(|m| with_ci(m.accuracy_flexible, m.accuracy_flexible_ci95))),
            ("strict format", Box::new(|m| pct(m.strict_format))),
            ("soft format", Box::new(|m| pct(m.soft_format))),
            ("mean completion tokens", Box::new(|m| format!("{:.1}", m.mean_completion_tokens))),
            ("truncated", Box::new(|m| pct(m.truncation_rate))),
        ];
        // A model evaluated with tools: what it did with them.
        if self.models.values().any(|m| m.tool_calls_per_completion.is_some()) {
            rows.push((
                "tool calls per completion",
                Box::new(|m| opt(m.tool_calls_per_completion, |x| format!("{x:.2}"))),
            ));
            rows.push(("used a tool", Box::new(|m| opt(m.used_tool_rate, |x| format!("{:.1}%", 100.0 * x)))));
            rows.push(("failed tool calls", Box::new(|m| opt(m.tool_error_rate, |x| format!("{:.1}%", 100.0 * x)))));
        }
        rows.push(("n", Box::new(|m| m.n.to_string())));
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|(label, cell)| {
                let mut r = vec![label.to_string()];
                r.extend(self.models.values().map(cell));
                r
            })
            .collect();
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let mut out = render_table(&h, &body);
        if !self.comparisons.is_empty() {
            out.push_str(&format!("paired comparisons (McNemar's exact test; * significant at {ALPHA}):\n"));
            for c in &self.comparisons {
                out.push_str(&format!(
                    "  {} vs {}, {}: {:+.1} points ({} only {}, {} only {}), p = {:.3}{}\n",
                    c.b,
                    c.a,
                    c.metric,
                    100.0 * c.delta,
                    c.b,
                    c.b_only,
                    c.a,
                    c.a_only,
                    c.p_value,
                    if c.significant { " *" } else { "" }
                ));
            }
        }
        out
    }
}

/// The paired comparison of `b` against `a` on `metric` (`accuracy_strict` or
/// `accuracy_flexible`), over the questions (by [`Verdict::index`]) both answered.
pub fn compare(
    a: &str,
    b: &str,
    metric: &str,
    va: &[Verdict],
    vb: &[Verdict],
    pick: fn(&Verdict) -> bool,
) -> Comparison {
    let by_index: BTreeMap<usize, &Verdict> = vb.iter().map(|v| (v.index, v)).collect();
    let (mut a_only, mut b_only, mut shared, mut a_right, mut b_right) = (0, 0, 0usize, 0usize, 0usize);
    for x in va {
        let Some(y) = by_index.get(&x.index) else { continue };
        shared += 1;
        let (ra, rb) = (pick(x), pick(y));
        a_right += ra as usize;
        b_right += rb as usize;
        match (ra, rb) {
            (true, false) => a_only += 1,
            (false, true) => b_only += 1,
            _ => {}
        }
    }
    let p_value = mcnemar_exact(a_only, b_only);
    Comparison {
        a: a.into(),
        b: b.into(),
        metric: metric.into(),
        a_only,
        b_only,
        delta: (b_right as f64 - a_right as f64) / shared.max(1) as f64,
        p_value,
        significant: p_value < ALPHA,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(index: usize, strict: bool, flexible: bool) -> Verdict {
        Verdict {
            index,
            correct_strict: strict,
            correct_flexible: flexible,
            strict_format: strict,
            soft_format: strict,
            tokens: 10,
            truncated: false,
            tool_calls: 0,
            tool_errors: 0,
        }
    }

    #[test]
    fn metrics_carry_intervals_and_paired_tests_and_read_back() {
        let base: Vec<Verdict> = (0..20).map(|i| v(i, false, i < 2)).collect();
        let tuned: Vec<Verdict> = (0..20).map(|i| v(i, i < 12, i < 13)).collect();
        let m =
            EvalMetrics::of(20, 0, &BTreeMap::from([("base".to_string(), base), ("tuned".to_string(), tuned)]), false);
        let t = &m.models["tuned"];
        assert_eq!((t.n, t.accuracy_strict, t.accuracy_flexible), (20, 0.6, Some(0.65)));
        assert_eq!(t.accuracy_strict_ci95, Some(wilson95(12, 20)));
        let c = m.comparisons.iter().find(|c| c.metric == "accuracy_strict").unwrap();
        assert_eq!((c.a.as_str(), c.b.as_str(), c.a_only, c.b_only), ("base", "tuned", 0, 12));
        assert!((c.delta - 0.6).abs() < 1e-12 && c.significant && c.p_value == mcnemar_exact(0, 12));
        let back = EvalMetrics::from_json(&serde_json::to_value(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        let table = m.table();
        assert!(
            table.contains("60.0% [38.7, 78.1]") && table.contains("tuned vs base, accuracy_strict: +60.0 points"),
            "{table}"
        );
    }

    #[test]
    fn a_version_1_file_still_reads() {
        let old = serde_json::json!({"questions": 8, "models": {"sft": {"n": 8, "accuracy": 0.25, "strict_format": 0.875,
            "soft_format": 0.875, "mean_completion_tokens": 118.5, "truncation_rate": 0.125}}});
        let m = EvalMetrics::from_json(&old).unwrap();
        assert_eq!(m.version, 1);
        assert_eq!(m.models["sft"].accuracy_strict, 0.25);
        assert_eq!(m.models["sft"].accuracy_flexible, None);
        assert!(m.table().contains("25.0%"));
        assert!(EvalMetrics::from_json(&serde_json::json!({"version": 99})).is_err());
    }
}
