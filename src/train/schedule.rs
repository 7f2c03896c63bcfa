//! Learning-rate schedules: transformers' `lr_scheduler_type` names, their
//! `lr_scheduler_kwargs`, and their formulas (transformers/optimization.py,
//! checked against its own functions in tests/reference_fixtures.rs).
//!
//! One deliberate difference: during warmup step k (0-based) trains at
//! lr·(k+1)/warmup, where transformers' first step trains at 0 (its scheduler
//! is read before the first `step()`); from the end of warmup on, the two agree.

use serde::{Deserialize, Serialize};

use crate::common::ParamError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Linear,
    Cosine,
    /// The base rate throughout: no warmup (transformers' `constant`).
    Constant,
    ConstantWithWarmup,
    /// Cosine decay restarted `num_cycles` times.
    CosineWithRestarts,
    /// (lr − lr_end)·(1 − progress)^power + lr_end.
    Polynomial,
    /// lr / √((step + timescale − warmup) / timescale).
    InverseSqrt,
    /// Cosine decay to `min_lr` (or `min_lr_rate` × lr) instead of 0.
    CosineWithMinLr,
}

/// `lr_scheduler_kwargs`: each applies to the schedules named beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleKwargs {
    /// cosine (0.5: half a wave, from lr to 0), cosine_with_min_lr (0.5), cosine_with_restarts (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    /// cosine_with_min_lr: the floor, absolute …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// … or as a fraction of `learning_rate` (one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    /// polynomial: the rate it ends at (1e-7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    /// polynomial: the exponent (1: linear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// inverse_sqrt: the time scale in steps (the warmup's length, or 10,000 without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timescale: Option<u64>,
}

impl Schedule {
    /// The kwargs this schedule reads.
    fn kwargs(self) -> &'static [&'static str] {
        match self {
            Schedule::Cosine => &["num_cycles"],
            Schedule::CosineWithRestarts => &["num_cycles"],
            Schedule::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            Schedule::Polynomial => &["lr_end", "power"],
            Schedule::InverseSqrt => &["timescale"],
            Schedule::Linear | Schedule::Constant | Schedule::ConstantWithWarmup => &[],
        }
    }

    fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// Problems with a schedule and its kwargs for a run at `base` with `warmup` steps.
pub fn problems(schedule: Schedule, kwargs: &ScheduleKwargs, base: f64, warmup_given: bool) -> Vec<ParamError> {
    let mut errors = Vec::new();
    let given = serde_json::to_value(kwargs).unwrap_or_default();
    let takes = schedule.kwargs();
    for key in given.as_object().into_iter().flat_map(|m| m.keys()) {
        if !takes.contains(&key.as_str()) {
            errors.push(
                ParamError::new(
                    format!("lr_scheduler_kwargs.{key}"),
                    format!("`{}` does not read `{key}`", schedule.name()),
                )
                .hint(if takes.is_empty() {
                    "this schedule takes no lr_scheduler_kwargs".to_string()
                } else {
                    format!("it reads {}", takes.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))
                }),
            );
        }
    }
    if schedule == Schedule::Constant && warmup_given {
        errors.push(
            ParamError::new("lr_scheduler_type", "`constant` has no warmup (as in transformers), but a warmup is set")
                .hint("use `constant_with_warmup`, or drop warmup_steps / warmup_ratio"),
        );
    }
    if schedule == Schedule::CosineWithMinLr {
        match (kwargs.min_lr, kwargs.min_lr_rate) {
            (Some(_), Some(_)) => {
                errors.push(ParamError::new("lr_scheduler_kwargs", "give one of `min_lr` and `min_lr_rate`, not both"))
            }
            (None, None) => errors.push(
                ParamError::new("lr_scheduler_kwargs", "`cosine_with_min_lr` needs a floor")
                    .hint("add `lr_scheduler_kwargs: { min_lr_rate: 0.1 }` (or an absolute `min_lr`)"),
            ),
            (Some(m), None) if !(m.is_finite() && (0.0..base).contains(&m)) => {
                errors.push(ParamError::new("lr_scheduler_kwargs.min_lr", "must be in [0, learning_rate)"))
            }
            (None, Some(r)) if !(0.0..=1.0).contains(&r) => {
                errors.push(ParamError::new("lr_scheduler_kwargs.min_lr_rate", "must be in [0, 1]"))
            }
            _ => {}
        }
    }
    if let Some(c) = kwargs.num_cycles.filter(|c| !(c.is_finite() && *c > 0.0)) {
        errors.push(ParamError::new("lr_scheduler_kwargs.num_cycles", format!("{c} is not a positive number")));
    }
    if let Some(end) = kwargs.lr_end.filter(|e| !(e.is_finite() && (0.0..base).contains(e))) {
        errors.push(ParamError::new(
            "lr_scheduler_kwargs.lr_end",
            format!("{end} must be in [0, learning_rate) (transformers refuses an end at or above the start)"),
        ));
    }
    if let Some(p) = kwargs.power.filter(|p| !(p.is_finite() && *p > 0.0)) {
        errors.push(ParamError::new("lr_scheduler_kwargs.power", format!("{p} is not a positive number")));
    }
    if kwargs.timescale == Some(0) {
        errors.push(ParamError::new("lr_scheduler_kwargs.timescale", "must be at least 1"));
    }
    errors
}

/// Learning rate at optimizer step `step` (0-based) of `total`, after `warmup` warmup steps.
pub fn learning_rate(
    base: f64,
    schedule: Schedule,
    kwargs: &ScheduleKwargs,
    step: u64,
    warmup: u64,
    total: u64,
) -> f64 {
    base * factor(base, schedule, kwargs, step, warmup, total)
}

fn factor(base: f64, schedule: Schedule, kw: &ScheduleKwargs, step: u64, warmup: u64, total: u64) -> f64 {
    if schedule == Schedule::Constant {
        return 1.0;
    }
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let cosine = |cycles: f64| 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos());
    match schedule {
        Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => cosine(kw.num_cycles.unwrap_or(0.5)).max(0.0),
        Schedule::CosineWithMinLr => {
            let rate = kw.min_lr_rate.or(kw.min_lr.map(|m| m / base)).unwrap_or(0.0);
            (cosine(kw.num_cycles.unwrap_or(0.5)) * (1.0 - rate) + rate).max(0.0)
        }
        Schedule::CosineWithRestarts => {
            if progress >= 1.0 {
                return 0.0;
            }
            let cycles = kw.num_cycles.unwrap_or(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
        }
        Schedule::Polynomial => {
            let (end, power) = (kw.lr_end.unwrap_or(1e-7), kw.power.unwrap_or(1.0));
            if step > total {
                return end / base;
            }
            ((base - end) * (1.0 - progress).powf(power) + end) / base
        }
        Schedule::InverseSqrt => {
            let timescale = kw.timescale.unwrap_or(if warmup > 0 { warmup } else { 10_000 }) as f64;
            let shift = timescale - warmup as f64;
            1.0 / ((step as f64 + shift) / timescale).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_by_cosine() {
        let none = ScheduleKwargs::default();
        let lr = |s: Schedule, step| learning_rate(1.0, s, &none, step, 10, 100);
        assert!((lr(Schedule::Cosine, 0) - 0.1).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 9) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 10) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 55) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 100).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 0), 1.0, "constant has no warmup");
        assert_eq!(lr(Schedule::ConstantWithWarmup, 50), 1.0);
        assert!((lr(Schedule::ConstantWithWarmup, 4) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn kwargs_a_schedule_does_not_read_and_missing_floors_are_named() {
        let kw = ScheduleKwargs { power: Some(2.0), ..Default::default() };
        let e = problems(Schedule::Cosine, &kw, 1e-5, false);
        assert_eq!(e[0].path, "lr_scheduler_kwargs.power");
        assert!(e[0].hint.as_deref().unwrap().contains("`num_cycles`"));
        let e = problems(Schedule::CosineWithMinLr, &ScheduleKwargs::default(), 1e-5, false);
        assert!(e[0].message.contains("needs a floor"), "{e:?}");
        let e = problems(Schedule::Constant, &ScheduleKwargs::default(), 1e-5, true);
        assert!(e[0].hint.as_deref().unwrap().contains("constant_with_warmup"));
        let kw = ScheduleKwargs { lr_end: Some(1e-4), ..Default::default() };
        assert_eq!(problems(Schedule::Polynomial, &kw, 1e-5, false).len(), 1, "an end above the start");
        assert!(problems(Schedule::Polynomial, &ScheduleKwargs::default(), 1e-5, true).is_empty());
    }
}
