//! What a person watching a training run is told, beside the progress bar:
//! a line of the step's numbers every `logging_steps` (TRL prints the same
//! dictionary), and warnings about runs that cannot learn, each said once.
//! Both read the step's log line (the JSON written to log.jsonl), so they
//! work for every algorithm by the metric names TRL users know.

use std::collections::BTreeMap;

use serde_json::Value;

/// Steps in a row on which every group tied before the run is called stuck.
pub const TIED_STEPS: u64 = 3;

/// The console line of a step: `step 10/60 · loss … · reward … · kl … · …`.
pub fn step_line(log: &Value, step: u64, total: u64, secs_per_step: f64) -> String {
    let num = |k: &str| log.get(k).and_then(Value::as_f64);
    let mut parts = vec![format!("step {step}/{total}")];
    if let Some(v) = num("loss") {
        parts.push(format!("loss {}", short(v)));
    }
    if let Some(v) = num("reward") {
        let per_function: Vec<String> = log
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("rewards/")?.strip_suffix("/mean")?;
                Some(format!("{name} {}", short(v.as_f64()?)))
            })
            .collect();
        let std = num("reward_std").map(|s| format!(" ± {}", short(s))).unwrap_or_default();
        if per_function.is_empty() {
            parts.push(format!("reward {}{std}", short(v)));
        } else {
            parts.push(format!("reward {}{std} ({})", short(v), per_function.join(", ")));
        }
    }
    for (key, label) in [
        ("kl", "kl"),
        ("entropy", "entropy"),
        ("mean_token_accuracy", "accuracy"),
        ("completions/mean_length", "length"),
        ("grad_norm", "grad_norm"),
    ] {
        if let Some(v) = num(key) {
            parts.push(format!("{label} {}", short(v)));
        }
    }
    if let Some(v) = num("learning_rate") {
        parts.push(format!("lr {v:.2e}"));
    }
    parts.push(format!("{secs_per_step:.1} s/step"));
    parts.push(format!("ETA {}", duration((total.saturating_sub(step)) as f64 * secs_per_step)));
    parts.join(" · ")
}

/// Four significant digits, without exponent noise for ordinary magnitudes.
fn short(v: f64) -> String {
    if v == 0.0 || (1e-3..1e4).contains(&v.abs()) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// `1h 02m`, `3m 20s`, `12s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

/// Watches the step log for runs that cannot learn and says so once each.
#[derive(Default)]
pub struct Watch {
    /// The first step of the current run of all-tied steps, and its length.
    tied_since: Option<u64>,
    tied_warned: bool,
    truncated_warned: bool,
    /// Per reward function: the range of its mean over the steps seen, and
    /// whether any step had spread within a group.
    rewards: BTreeMap<String, RewardSeen>,
    steps: u64,
}

#[derive(Clone, Copy)]
struct RewardSeen {
    min: f64,
    max: f64,
    any_spread: bool,
}

impl Watch {
    /// The warnings step `step`'s log line gives rise to (each at most once a run).
    pub fn observe(&mut self, log: &Value, step: u64) -> Vec<String> {
        let mut out = Vec::new();
        self.steps += 1;
        let num = |k: &str| log.get(k).and_then(Value::as_f64);
        match num("frac_reward_zero_std") {
            Some(f) if f >= 1.0 => {
                let since = *self.tied_since.get_or_insert(step);
                if !self.tied_warned && step + 1 - since >= TIED_STEPS {
                    self.tied_warned = true;
                    out.push(format!(
                        "steps {since}–{step}: all rewards equal within every group (frac_reward_zero_std 1.0), so \
                         there is no gradient (loss and grad_norm 0); check the reward set on a few completions \
                         (`r1pipe rewards --set …`), raise temperature or num_generations, or start from a model \
                         that already writes the format (an SFT stage before GRPO)"
                    ));
                }
            }
            Some(_) => self.tied_since = None,
            None => {}
        }
        if let Some(c) = num("completions/clipped_ratio") {
            if c >= 1.0 && !self.truncated_warned {
                self.truncated_warned = true;
                out.push(format!(
                    "step {step}: every completion was cut at max_completion_length: no completion ends, so \
                     rewards that read the answer see none; raise max_completion_length or reward shorter answers"
                ));
            }
        }
        if let Some(m) = log.as_object() {
            for (k, v) in m {
                let (Some(name), Some(mean)) =
                    (k.strip_prefix("rewards/").and_then(|r| r.strip_suffix("/mean")), v.as_f64())
                else {
                    continue;
                };
                let spread = m.get(&format!("rewards/{name}/std")).and_then(Value::as_f64).is_some_and(|s| s > 0.0);
                let seen = self.rewards.entry(name.to_string()).or_insert(RewardSeen {
                    min: mean,
                    max: mean,
                    any_spread: false,
                });
                seen.min = seen.min.min(mean);
                seen.max = seen.max.max(mean);
                seen.any_spread |= spread;
            }
        }
        out
    }

    /// At the end of a run: reward functions that gave the same value to every
    /// completion of every step (no signal at all), for runs of two steps or more.
    pub fn finish(&self) -> Vec<String> {
        if self.steps < 2 {
            return Vec::new();
        }
        self.rewards
            .iter()
            .filter(|(_, s)| !s.any_spread && s.min == s.max)
            .map(|(name, s)| {
                format!(
                    "reward `{name}` was {} for every completion of all {} steps: it gave GRPO nothing to learn \
                     from; check its parameters, or that the completions can reach it",
                    short(s.min),
                    self.steps
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_step_line_has_the_numbers_trl_prints() {
        let log = json!({"loss": 0.0123, "reward": 1.5, "reward_std": 0.25, "rewards/xml_count/mean": 0.5,
            "rewards/xml_count/std": 0.1, "kl": 0.00042, "entropy": 0.91, "grad_norm": 0.12, "learning_rate": 3e-6});
        let line = step_line(&log, 10, 60, 12.34);
        assert_eq!(
            line,
            "step 10/60 · loss 0.0123 · reward 1.5 ± 0.25 (xml_count 0.5) · kl 4.200e-4 · entropy 0.91 · \
             grad_norm 0.12 · lr 3.00e-6 · 12.3 s/step · ETA 10m 17s"
        );
        assert_eq!(step_line(&json!({"loss": 0.0}), 1, 1, 0.5), "step 1/1 · loss 0 · 0.5 s/step · ETA 0s");
    }

    #[test]
    fn tied_groups_warn_once_after_three_steps_in_a_row() {
        let mut w = Watch::default();
        let tied = json!({"frac_reward_zero_std": 1.0});
        let untied = json!({"frac_reward_zero_std": 0.5});
        assert!(w.observe(&tied, 1).is_empty());
        assert!(w.observe(&tied, 2).is_empty());
        assert!(w.observe(&untied, 3).is_empty(), "a step with spread resets the count");
        assert!(w.observe(&tied, 4).is_empty() && w.observe(&tied, 5).is_empty());
        let warned = w.observe(&tied, 6);
        assert_eq!(warned.len(), 1);
        assert!(warned[0].starts_with("steps 4–6: all rewards equal"), "{}", warned[0]);
        assert!(w.observe(&tied, 7).is_empty(), "said once");
    }

    #[test]
    fn all_truncated_and_constant_rewards_are_named() {
        let mut w = Watch::default();
        let step = |mean: f64, std: f64| {
            json!({"completions/clipped_ratio": 1.0, "rewards/format/mean": 0.0, "rewards/format/std": 0.0,
                   "rewards/acc/mean": mean, "rewards/acc/std": std})
        };
        let first = w.observe(&step(0.5, 0.0), 1);
        assert!(first.len() == 1 && first[0].contains("max_completion_length"), "{first:?}");
        assert!(w.observe(&step(0.5, 0.0), 2).is_empty());
        let end = w.finish();
        assert_eq!(end.len(), 2, "{end:?}");
        assert!(end[0].starts_with("reward `acc` was 0.5") && end[1].starts_with("reward `format` was 0"), "{end:?}");
        // A reward that varies within a group, or across steps, is not constant.
        let mut w = Watch::default();
        w.observe(&step(0.5, 0.0), 1);
        w.observe(&step(0.7, 0.0), 2);
        let mut w2 = Watch::default();
        w2.observe(&step(0.5, 0.2), 1);
        w2.observe(&step(0.5, 0.0), 2);
        for end in [w.finish(), w2.finish()] {
            assert!(end.iter().all(|l| !l.contains("`acc`")), "{end:?}");
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(200.0), "3m 20s");
        assert_eq!(duration(3720.0), "1h 02m");
    }
}
