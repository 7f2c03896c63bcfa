//! Reward sets: a weighted list of reward functions, from a YAML file or an
//! inline list, scored over a whole group of completions in parallel.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use super::external::{CommandReward, UrlReward, MAX_TIMEOUT_S};
use super::functions::{lookup, RewardFn, Sample, CATALOG};
use crate::common::builtin::{self, BuiltinKind};
use crate::common::diagnostic::{suggest, Diagnostic, Diagnostics};
use crate::common::params::{yaml_error_text, yaml_to_json};
use crate::common::yaml_pos::Positions;
use crate::common::{typed, ParamError};

/// One entry of a reward set: a built-in by `name` (with `params`), or a
/// function outside the binary (`command` or `url`, `name` its label).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TermSpec {
    name: String,
    #[serde(default = "one")]
    weight: f32,
    #[serde(default)]
    params: Value,
    command: Option<Vec<String>>,
    url: Option<String>,
    /// Only for a `command` or `url` entry (a built-in runs in the process).
    timeout_s: Option<f64>,
    /// Only for a `url` entry: the environment variable holding a token, sent as
    /// `Authorization: Bearer …` (a secret never sits in the pipeline file).
    api_key_env: Option<String>,
}

fn one() -> f32 {
    1.0
}

/// How long a program or server may take per batch.
fn default_timeout() -> f64 {
    60.0
}

impl TermSpec {
    fn timeout(&self) -> f64 {
        self.timeout_s.unwrap_or_else(default_timeout)
    }

    /// The function of an entry that names a command or a URL; None for a built-in.
    fn external(&self, root: &Path) -> Option<Result<Box<dyn RewardFn>, ParamError>> {
        let checked = |field: &str| -> Result<(), ParamError> {
            if !self.params.is_null() {
                return Err(ParamError::new("params", format!("a `{field}` reward takes no `params`"))
                    .hint("pass what the program needs as arguments, or in the samples it reads"));
            }
            if !(self.timeout().is_finite() && self.timeout() > 0.0 && self.timeout() <= MAX_TIMEOUT_S) {
                return Err(ParamError::new(
                    "timeout_s",
                    format!("{} is not a number of seconds between 0 and {MAX_TIMEOUT_S} (a day)", self.timeout()),
                ));
            }
            Ok(())
        };
        match (&self.command, &self.url) {
            (None, None) if self.timeout_s.is_some() => Some(Err(ParamError::new(
                "timeout_s",
                format!("`{}` is a built-in reward: it runs inside r1pipe and has no time limit", self.name),
            )
            .hint("`timeout_s` is for a `command` or `url` entry; drop it here"))),
            (None, None) => None,
            (Some(_), Some(_)) => Some(Err(ParamError::new("url", "an entry has a `command` or a `url`, not both"))),
            (Some(c), None) => Some(checked("command").and_then(|_| {
                if c.is_empty() || c[0].is_empty() {
                    return Err(ParamError::new("command", "the command is empty")
                        .hint("a list: [program, args…], e.g. [python3, stages/rewards/examples/length.py]"));
                }
                command_problem(c, root)?;
                Ok(Box::new(CommandReward::new(c.clone(), root, self.timeout())) as Box<dyn RewardFn>)
            })),
            (None, Some(u)) => Some(checked("url").and_then(|_| {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(ParamError::new("url", format!("`{u}` is not an http:// or https:// address")));
                }
                if crate::common::redact::has_credentials(u) {
                    return Err(ParamError::new(
                        "url",
                        "a user name or password in the URL would be copied into the cache's records and logs",
                    )
                    .hint("put a token in an environment variable and name it: `api_key_env: REWARD_TOKEN`"));
                }
                Ok(Box::new(UrlReward::new(u.clone(), self.timeout(), self.api_key_env.clone())) as Box<dyn RewardFn>)
            })),
        }
    }
}

/// A reward program that cannot start, named before anything runs: the program
/// is neither on PATH nor a file, or an argument that names a script (a path
/// with a script's extension) does not exist.
fn command_problem(command: &[String], root: &Path) -> Result<(), ParamError> {
    let program = &command[0];
    let found = if program.contains('/') {
        let p = if Path::new(program).is_absolute() { PathBuf::from(program) } else { root.join(program) };
        p.is_file()
    } else {
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
    };
    if !found {
        return Err(ParamError::new("command.0", format!("the program `{program}` is not on PATH nor a file"))
            .hint(format!("install it, or give its path (relative paths are read from {})", root.display())));
    }
    const SCRIPTS: &[&str] = &["py", "sh", "js", "mjs", "rb", "pl", "lua", "jl", "R"];
    for (i, arg) in command.iter().enumerate().skip(1) {
        let is_script = Path::new(arg).extension().and_then(|e| e.to_str()).is_some_and(|e| SCRIPTS.contains(&e))
            && !arg.starts_with('-');
        let p = if Path::new(arg).is_absolute() { PathBuf::from(arg) } else { root.join(arg) };
        if is_script && !p.is_file() {
            return Err(ParamError::new(format!("command.{i}"), format!("the script {} does not exist", p.display()))
                .hint(format!("relative paths are read from the project root, {}", root.display())));
        }
    }
    Ok(())
}

pub struct Term {
    pub name: String,
    pub weight: f32,
    pub func: Box<dyn RewardFn>,
}

pub struct RewardSet {
    pub terms: Vec<Term>,
}

/// Per-function scores of a batch, and their weighted sum.
#[derive(Debug, Clone)]
pub struct Scores {
    pub names: Vec<String>,
    /// `per_function[f][i]`: function `f` on sample `i` (unweighted).
    pub per_function: Vec<Vec<f32>>,
    pub total: Vec<f32>,
}

impl Scores {
    /// (name, mean, std) per function over the samples it applies to (TRL's
    /// nanmean and nanstd), std with Bessel's correction as TRL logs it.
    pub fn stats(&self) -> Vec<(String, f32, f32)> {
        self.names
            .iter()
            .zip(&self.per_function)
            .map(|(n, v)| {
                let applies: Vec<f32> = v.iter().copied().filter(|x| !x.is_nan()).collect();
                (n.clone(), if applies.is_empty() { f32::NAN } else { mean(&applies) }, std(&applies))
            })
            .collect()
    }
}

pub fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
pub fn std(v: &[f32]) -> f32 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / (v.len() - 1) as f32).sqrt()
}

impl RewardSet {
    /// From a list of `{name, weight, params}` (or `{name, command | url, weight,
    /// timeout_s}`); a command runs in `root`. Errors carry the list index path
    /// (`1.params.correct`).
    pub fn from_value(v: &Value, root: &Path) -> Result<RewardSet, Vec<ParamError>> {
        let Value::Array(items) = v else {
            return Err(vec![ParamError::new("", "a reward set is a list of {name, weight, params}")]);
        };
        if items.is_empty() {
            return Err(vec![ParamError::new("", "the reward set is empty")]);
        }
        let mut terms = Vec::new();
        let mut errors = Vec::new();
        let names: Vec<&str> = CATALOG.iter().map(|f| f.name).collect();
        for (i, item) in items.iter().enumerate() {
            let spec: TermSpec = match typed(item) {
                Ok(s) => s,
                Err(mut e) => {
                    e.path = prefixed(i, &e.path);
                    errors.push(e);
                    continue;
                }
            };
            if !spec.weight.is_finite() {
                errors.push(ParamError::new(format!("{i}.weight"), "weight must be a finite number"));
                continue;
            }
            match spec.external(root) {
                Some(Ok(func)) => {
                    // A program's label names log keys and plot series: an identifier.
                    if let Some(problem) = crate::common::names::identifier_problem(&spec.name) {
                        errors.push(ParamError::new(format!("{i}.name"), format!("reward name: {problem}")));
                        continue;
                    }
                    terms.push(Term { name: spec.name, weight: spec.weight, func });
                    continue;
                }
                Some(Err(mut e)) => {
                    e.path = prefixed(i, &e.path);
                    errors.push(e);
                    continue;
                }
                None => {}
            }
            let Some(info) = lookup(&spec.name) else {
                errors.push(
                    ParamError::new(format!("{i}.name"), format!("unknown reward function `{}`", spec.name))
                        .hint(suggest(&spec.name, &names, "functions")),
                );
                continue;
            };
            match (info.build)(&spec.params) {
                Ok(func) => terms.push(Term { name: spec.name, weight: spec.weight, func }),
                Err(mut e) => {
                    e.path = prefixed(
                        i,
                        &format!("params{}", if e.path.is_empty() { String::new() } else { format!(".{}", e.path) }),
                    );
                    e.message = format!("{} ({}): {}", spec.name, "params", e.message);
                    errors.push(e);
                }
            }
        }
        // Each function's log keys (`rewards/<name>/mean`) and plot series are its name.
        for (i, t) in terms.iter().enumerate() {
            if let Some(j) = terms[..i].iter().position(|u| u.name == t.name) {
                errors.push(
                    ParamError::new(
                        format!("{i}.name"),
                        format!("`{}` is in the set twice (entries {j} and {i})", t.name),
                    )
                    .hint("its two scores would share one log key; merge them into one entry with the summed weight"),
                );
            }
        }
        if errors.is_empty() {
            Ok(RewardSet { terms })
        } else {
            Err(errors)
        }
    }

    /// From a YAML file, commands running in `root`; errors name the file and line.
    pub fn from_file(path: &Path, root: &Path) -> Result<RewardSet, Diagnostics> {
        Self::parse_file(path, root).map(|(set, _)| set)
    }

    /// A reward set as a stage or `r1pipe rewards` names it: a built-in's name
    /// (`r1-gsm8k`) or a YAML file's path (relative to `root`). Also returns the
    /// set's parsed content (its list as JSON), which is what a fingerprint
    /// covers: comments and layout of the file do not change the result.
    pub fn named(value: &str, root: &Path) -> Result<(RewardSet, Value), Diagnostics> {
        if builtin::is_name(value) {
            let Some(b) = builtin::find(BuiltinKind::RewardSet, value) else {
                let names = builtin::names(BuiltinKind::RewardSet);
                return Err(Diagnostic::new(Path::new(value), None, format!("no built-in reward set `{value}`"))
                    .with_hint(format!(
                        "{}; or give a YAML file's path (`my-rewards/{value}.yaml`); `r1pipe presets` lists them",
                        suggest(value, &names, "built-in reward sets")
                    ))
                    .into());
            };
            return Self::parse_text(b.text, Path::new(&format!("<built-in {}>", b.source)), root);
        }
        let path = if Path::new(value).is_absolute() { PathBuf::from(value) } else { root.join(value) };
        Self::parse_file(&path, root)
    }

    fn parse_file(path: &Path, root: &Path) -> Result<(RewardSet, Value), Diagnostics> {
        let text = crate::common::fsutil::read_text_capped(path, 1 << 20)
            .map_err(|e| Diagnostic::new(path, None, format!("cannot read reward set: {e}")))?;
        Self::parse_text(&text, path, root)
    }

    /// `text` read from `path` (named in every error, with the line).
    fn parse_text(text: &str, path: &Path, root: &Path) -> Result<(RewardSet, Value), Diagnostics> {
        if let Some(d) = crate::common::yaml_pos::nesting_problem(path, text) {
            return Err(d.into());
        }
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            Diagnostic::new(path, e.location().map(|l| l.line()), format!("YAML syntax error: {}", yaml_error_text(&e)))
        })?;
        let v = yaml_to_json(&doc, "").map_err(|e| Diagnostic::new(path, None, e.message))?;
        let positions = Positions::parse(text);
        // A bare list, or a mapping with a `rewards:` list (as a pipeline's stage writes it).
        let (list, prefix) = match &v {
            serde_json::Value::Object(m) if m.contains_key("rewards") => (&m["rewards"], "rewards."),
            serde_json::Value::Object(_) => {
                return Err(Diagnostic::new(path, Some(1), "a reward set is a list of {name, weight, params}")
                    .with_hint("write the list at the top level, or under a `rewards:` key")
                    .into())
            }
            _ => (&v, ""),
        };
        let set = RewardSet::from_value(list, root).map_err(|errs| {
            Diagnostics(
                errs.into_iter()
                    .map(|e| {
                        let at = positions
                            .line(&format!("{prefix}{}", e.path))
                            .or_else(|| positions.line(prefix.trim_end_matches('.')));
                        Diagnostic::new(path, at, e.to_string()).with_optional_hint(e.hint)
                    })
                    .collect(),
            )
        })?;
        Ok((set, list.clone()))
    }

    /// The files the set's programs read (their scripts, arguments that are
    /// files): a stage's fingerprint covers their content.
    pub fn files(&self) -> Vec<PathBuf> {
        self.terms.iter().flat_map(|t| t.func.files()).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.terms.iter().map(|t| t.name.clone()).collect()
    }

    /// Score every sample with every function, each over the whole batch (a
    /// built-in in parallel over the samples). A function that does not apply to
    /// a sample (`None`) has NaN there and is left out of its weighted total.
    pub fn score(&self, samples: &[Sample]) -> anyhow::Result<Scores> {
        let mut per_function = Vec::with_capacity(self.terms.len());
        for t in &self.terms {
            let v = t.func.score_batch(samples).with_context(|| format!("reward function `{}`", t.name))?;
            if v.len() != samples.len() {
                anyhow::bail!("reward function `{}` gave {} scores for {} samples", t.name, v.len(), samples.len());
            }
            per_function.push(v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect::<Vec<f32>>());
        }
        let total: Vec<f32> = (0..samples.len())
            .map(|i| {
                self.terms.iter().zip(&per_function).filter(|(_, v)| !v[i].is_nan()).map(|(t, v)| v[i] * t.weight).sum()
            })
            .collect();
        // Each function's scores are finite; their weighted sum can still overflow f32.
        if let Some(i) = total.iter().position(|t| !t.is_finite()) {
            let parts: Vec<String> = self
                .terms
                .iter()
                .zip(&per_function)
                .map(|(t, v)| format!("{} {} × {}", t.name, v[i], t.weight))
                .collect();
            anyhow::bail!(
                "the weighted reward of sample {i} is {} ({}): lower the weights or the functions' scale",
                total[i],
                parts.join(" + ")
            );
        }
        Ok(Scores { names: self.names(), per_function, total })
    }
}

fn prefixed(i: usize, path: &str) -> String {
    if path.is_empty() {
        i.to_string()
    } else {
        format!("{i}.{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function that applies only to completions mentioning "x": 1 there, `None` elsewhere.
    struct OnlyX;
    impl RewardFn for OnlyX {
        fn score_batch(&self, samples: &[Sample]) -> anyhow::Result<Vec<Option<f32>>> {
            Ok(samples.iter().map(|s| s.completion.contains('x').then_some(1.0)).collect())
        }
        fn range(&self) -> (f32, f32) {
            (0.0, 1.0)
        }
    }

    #[test]
    fn a_weighted_sum_that_overflows_names_the_rewards() {
        let set = RewardSet::from_value(
            &serde_json::json!([
                {"name": "regex_match", "weight": 3.0e38, "params": {"pattern": "a", "value": 1.0}},
                {"name": "length", "weight": 3.0e38}
            ]),
            std::path::Path::new("."),
        )
        .unwrap();
        let samples = vec![Sample { prompt: "p", completion: "a", answer: "1", tokens: 300, tool_results: None }];
        let e = set.score(&samples).unwrap_err().to_string();
        assert!(e.contains("the weighted reward of sample 0 is inf") && e.contains("regex_match"), "{e}");
    }

    #[test]
    fn a_function_that_does_not_apply_is_left_out_of_the_total_and_its_stats() {
        let mut set =
            RewardSet::from_value(&serde_json::json!([{"name": "integer", "weight": 2.0}]), Path::new(".")).unwrap();
        set.terms.push(Term { name: "only_x".into(), weight: 3.0, func: Box::new(OnlyX) });
        let s = |c: &'static str| Sample { prompt: "", completion: c, answer: "", tokens: 1, tool_results: None };
        let scores = set.score(&[s("<answer>\n4\n</answer> x"), s("<answer>\n4\n</answer>"), s("y")]).unwrap();
        assert_eq!(scores.total, vec![2.0 * 0.5 + 3.0, 2.0 * 0.5, 0.0]);
        assert!(scores.per_function[1][1].is_nan());
        let stats = scores.stats();
        assert_eq!((stats[1].1, stats[1].2), (1.0, 0.0), "mean and std over the one sample it applies to");
    }
}
