//! Two evaluations compared question by question (`r1pipe metrics paired`):
//! a model of one run against a model of another (another pipeline, cache or
//! stage), each read from an `evaluate` stage's `samples.jsonl`. Questions are
//! matched by their text and reference answer, not by position, since two
//! pipelines may order or slice the test split differently; McNemar's exact
//! test on the questions both answered says whether the difference is more
//! than chance.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Result};

use super::metrics::{compare, Comparison, Verdict, PAIRED_METRICS};
use super::run::EvalSample;
use crate::data::jsonl;

/// One model's samples, read from an evaluation's samples file.
pub struct Evaluated {
    pub model: String,
    pub samples: Vec<EvalSample>,
}

/// The samples of `model` in `path` (`None`: the file's only model).
pub fn read_model(path: &Path, model: Option<&str>) -> Result<Evaluated> {
    let all: Vec<EvalSample> = jsonl::read(path)?.into_iter().map(|(_, s)| s).collect();
    let models: BTreeSet<&str> = all.iter().map(|s| s.model.as_str()).collect();
    let listed = models.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ");
    let model = match model {
        Some(m) if models.contains(m) => m.to_string(),
        Some(m) => bail!("{}: no samples of model `{m}`; the file has {listed}", path.display()),
        None if models.len() == 1 => models.iter().next().expect("one model").to_string(),
        None if models.is_empty() => bail!("{}: no samples (is it an evaluate stage's samples.jsonl?)", path.display()),
        None => bail!(
            "{}: samples of several models ({listed}): say which with --model (both sides) or --model-a/--model-b",
            path.display()
        ),
    };
    let samples = all.into_iter().filter(|s| s.model == model).collect();
    Ok(Evaluated { model, samples })
}

/// One metric compared: each side's accuracy on the shared questions and
/// McNemar's test between them.
pub struct PairedMetric {
    pub accuracy_a: f64,
    pub accuracy_b: f64,
    pub comparison: Comparison,
}

/// The paired comparison of `b` against `a` on the questions both answered
/// (strict, then flexible accuracy), and how many those are.
pub fn compare_models(a: &Evaluated, b: &Evaluated, label_a: &str, label_b: &str) -> (usize, Vec<PairedMetric>) {
    // One index per distinct question, so `compare` pairs them.
    let mut ids: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut verdicts = |e: &Evaluated| -> BTreeMap<usize, Verdict> {
        let mut out = BTreeMap::new();
        for s in &e.samples {
            let next = ids.len();
            let id = *ids.entry((s.question.clone(), s.reference.clone())).or_insert(next);
            // A question asked twice in one file counts once (its first answer).
            out.entry(id).or_insert(Verdict { index: id, ..s.verdict() });
        }
        out
    };
    let (va, vb) = (verdicts(a), verdicts(b));
    // Only the shared questions, so each accuracy is over the same set.
    let (va, vb): (Vec<Verdict>, Vec<Verdict>) = va.iter().filter_map(|(id, x)| Some((*x, *vb.get(id)?))).unzip();
    let shared = va.len();
    let rate =
        |v: &[Verdict], pick: fn(&Verdict) -> bool| v.iter().filter(|x| pick(x)).count() as f64 / shared.max(1) as f64;
    let metrics = PAIRED_METRICS
        .into_iter()
        .map(|(metric, pick)| PairedMetric {
            accuracy_a: rate(&va, pick),
            accuracy_b: rate(&vb, pick),
            comparison: compare(label_a, label_b, metric, &va, &vb, pick),
        })
        .collect();
    (shared, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FinishReason;

    fn sample(model: &str, q: usize, strict: bool, flexible: bool) -> EvalSample {
        EvalSample {
            model: model.into(),
            // A position that differs between files: pairing must go by the question.
            index: 1000 + q,
            question: format!("question {q}"),
            reference: format!("{q}"),
            completion: String::new(),
            extracted: None,
            correct: strict,
            extracted_flexible: None,
            correct_flexible: flexible,
            strict_format: true,
            soft_format: true,
            tokens: 1,
            finish_reason: FinishReason::Stop,
            tool_calls: Vec::new(),
        }
    }

    #[test]
    fn questions_pair_by_text_whatever_their_order_and_only_shared_ones_count() {
        // A: questions 0..10, right on 0..2 (strict) and 0..3 (flexible).
        let a = Evaluated { model: "sft".into(), samples: (0..10).map(|q| sample("sft", q, q < 2, q < 3)).collect() };
        // B: questions 12 down to 2 (reversed; 10, 11, 12 unknown to A), right
        // on 2..9 strict and 2..10 flexible.
        let b = Evaluated {
            model: "tools".into(),
            samples: (2..13).rev().map(|q| sample("tools", q, q < 9, q < 10)).collect(),
        };
        let (shared, m) = compare_models(&a, &b, "A", "B");
        assert_eq!(shared, 8, "questions 2..10");
        // Strict on 2..10: A right on none, B on 2..9 (7): only B 7, only A 0.
        let strict = &m[0];
        assert_eq!(strict.comparison.metric, "accuracy_strict");
        assert_eq!((strict.comparison.a_only, strict.comparison.b_only), (0, 7));
        assert_eq!((strict.accuracy_a, strict.accuracy_b), (0.0, 7.0 / 8.0));
        // McNemar's exact test, two-sided: 2 · 0.5^7.
        assert!((strict.comparison.p_value - 2.0 * 0.5f64.powi(7)).abs() < 1e-12);
        assert!(strict.comparison.significant);
        // Flexible: A right on 2 (one), B on 2..10 (all 8): only B 7, both 1.
        let flexible = &m[1];
        assert_eq!((flexible.comparison.a_only, flexible.comparison.b_only), (0, 7));
        assert_eq!((flexible.accuracy_a, flexible.accuracy_b), (1.0 / 8.0, 1.0));
        assert!((flexible.comparison.delta - 7.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn a_file_of_several_models_needs_the_model_named_and_a_wrong_name_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.jsonl");
        let rows = [sample("base", 0, false, false), sample("sft", 0, true, true)];
        jsonl::write(&path, &rows).unwrap();
        let e = read_model(&path, None).err().unwrap().to_string();
        assert!(e.contains("several models (`base`, `sft`)") && e.contains("--model"), "{e}");
        let e = read_model(&path, Some("grpo")).err().unwrap().to_string();
        assert!(e.contains("no samples of model `grpo`; the file has `base`, `sft`"), "{e}");
        let sft = read_model(&path, Some("sft")).unwrap();
        assert_eq!((sft.model.as_str(), sft.samples.len(), sft.samples[0].correct), ("sft", 1, true));
    }
}
