//! Matrix stages (DVC's `matrix:`): a stage with
//! `matrix: { KEY: [v, …] | { NAME: v, … }, … }` becomes one member per
//! combination of the keys' values, named `stage@NAME` (the values' names
//! joined by `-`, in key order; a list's values are numbered from 0), with
//! `${item.KEY}` in its body replaced by that member's value. Elsewhere,
//! `${stage@NAME.output}` names one member's output, and a string that is
//! exactly `${stage@*.output}` becomes a mapping of every member's name to its
//! output (evaluate's `models:` compares a whole sweep that way). Members are
//! ordinary stages from here on: their own fingerprints, records and jobs.
//! This runs on the YAML, before any stage is read.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

/// (path in the file, message, hint), as the loader reports problems.
pub type Problem = (String, String, Option<String>);

/// Separates a matrix stage's name from its member's.
pub const MEMBER_SEPARATOR: char = '@';

/// The most members one matrix stage may have: a sweep of a thousand runs is
/// several pipelines, and the product is checked before any member is made.
pub const MAX_MEMBERS: usize = 1024;

/// The longest name a member may have.
pub const MAX_MEMBER_NAME: usize = 128;

/// A YAML scalar or key as its author wrote it (not Rust's Debug form).
fn as_written(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

pub struct Expanded {
    /// Every stage, matrix stages replaced by their members (in file order).
    pub stages: Mapping,
    /// Matrix stage → its members' names, in order.
    pub members: BTreeMap<String, Vec<String>>,
}

/// The stage a name belongs to: `grpo@r1` → `grpo`.
pub fn base_name(stage: &str) -> &str {
    stage.split(MEMBER_SEPARATOR).next().unwrap_or(stage)
}

pub fn expand(stages: &Mapping) -> (Expanded, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut out = Mapping::new();
    let mut members = BTreeMap::new();
    for (name, body) in stages {
        let Some(name) = name.as_str() else {
            out.insert(name.clone(), body.clone());
            continue;
        };
        let matrix = body.as_mapping().and_then(|m| m.get("matrix"));
        let Some(matrix) = matrix else {
            out.insert(Value::from(name), body.clone());
            continue;
        };
        let path = format!("stages.{name}.matrix");
        let Some(axes) = axes(matrix, &path, &mut problems) else { continue };
        let count = axes.iter().try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()));
        if count.is_none_or(|n| n > MAX_MEMBERS) {
            let sizes: Vec<String> = axes.iter().map(|(k, v)| format!("{k}: {}", v.len())).collect();
            problems.push((
                path.clone(),
                format!(
                    "this matrix makes {} members ({}); at most {MAX_MEMBERS} are allowed",
                    count.map_or("more than 2^64".to_string(), |n| n.to_string()),
                    sizes.join(" × ")
                ),
                Some("split the sweep into several stages or pipelines".into()),
            ));
            continue;
        }
        let mut names = Vec::new();
        let mut made_by: BTreeMap<String, String> = BTreeMap::new();
        for combo in combinations(&axes) {
            let member = format!(
                "{name}{MEMBER_SEPARATOR}{}",
                combo.iter().map(|(_, n, _)| n.as_str()).collect::<Vec<_>>().join("-")
            );
            let which: Vec<String> = combo.iter().map(|(k, n, _)| format!("{k}={n}")).collect();
            // The name becomes file names (plots, logs): kept well under a file name's 255 bytes.
            if member.len() > MAX_MEMBER_NAME {
                problems.push((
                    path.clone(),
                    format!("the member name `{member}` is {} bytes long; at most {MAX_MEMBER_NAME}", member.len()),
                    Some("give the matrix's values shorter names (a mapping `{short: value}`)".into()),
                ));
                continue;
            }
            if let Some(other) = made_by.insert(member.clone(), which.join(", ")) {
                problems.push((
                    path.clone(),
                    format!("two members would both be named `{member}` ({other}; and {})", which.join(", ")),
                    Some("rename a value so that no two joined with `-` read the same".into()),
                ));
                continue;
            }
            let values: BTreeMap<&str, &Value> = combo.iter().map(|(k, _, v)| (k.as_str(), *v)).collect();
            let mut b = body.clone();
            if let Some(m) = b.as_mapping_mut() {
                m.remove("matrix");
            }
            fill_items(&mut b, &values, &format!("stages.{name}"), &mut problems);
            out.insert(Value::from(member.clone()), b);
            names.push(member);
        }
        members.insert(name.to_string(), names);
    }
    // References to matrix stages, and `needs:` naming them, in every stage.
    let mut rewritten = Mapping::new();
    for (name, body) in out {
        let stage = name.as_str().unwrap_or("?").to_string();
        let mut body = body;
        rewrite_references(&mut body, &format!("stages.{stage}"), &members, &mut problems);
        if let Some(needs) = body.as_mapping_mut().and_then(|m| m.get_mut("needs")).and_then(Value::as_sequence_mut) {
            let expanded: Vec<Value> = needs
                .iter()
                .flat_map(|n| match n.as_str().and_then(|s| members.get(s)) {
                    Some(ms) => ms.iter().map(|m| Value::from(m.clone())).collect(),
                    None => vec![n.clone()],
                })
                .collect();
            *needs = expanded;
        }
        if body_mentions(&body, "${item.") && !members.contains_key(base_name(&stage)) {
            problems.push((
                format!("stages.{stage}"),
                format!("stage `{stage}` uses `${{item.…}}` but has no `matrix:`"),
                Some("`${item.KEY}` takes the value of KEY in the stage's own `matrix:`".into()),
            ));
        }
        rewritten.insert(name, body);
    }
    (Expanded { stages: rewritten, members }, problems)
}

/// The matrix's keys, each with its values' names and values.
type Axis = (String, Vec<(String, Value)>);

fn axes(matrix: &Value, path: &str, problems: &mut Vec<Problem>) -> Option<Vec<Axis>> {
    let Some(m) = matrix.as_mapping().filter(|m| !m.is_empty()) else {
        problems.push((
            path.into(),
            "`matrix` must be a mapping of keys to lists (or to mappings of names to values)".into(),
            Some("e.g. `matrix: { lr: [1.0e-5, 3.0e-5], rewards: { r1: r1-gsm8k, mine: my-rewards.yaml } }`".into()),
        ));
        return None;
    };
    let mut out = Vec::new();
    for (k, v) in m {
        let Some(key) = k.as_str().filter(|k| member_name_problem(k).is_none()) else {
            problems.push((
                path.into(),
                format!("matrix key `{}` must be a name of letters, digits, `_`, `-`", as_written(k)),
                None,
            ));
            return None;
        };
        let values: Vec<(String, Value)> = match v {
            Value::Sequence(s) if !s.is_empty() => {
                // Named by value (`lr-1e-4`), so a name says which run it is; by position
                // (`lr-0`) where a value cannot be a name or two would read the same.
                let by_value: Vec<Option<String>> = s.iter().map(value_name).collect();
                let distinct: std::collections::BTreeSet<&Option<String>> = by_value.iter().collect();
                let named = by_value.iter().all(Option::is_some) && distinct.len() == s.len();
                s.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let n = if named { by_value[i].clone().unwrap_or_default() } else { i.to_string() };
                        (format!("{key}-{n}"), x.clone())
                    })
                    .collect()
            }
            Value::Mapping(named) if !named.is_empty() => {
                let mut vals: Vec<(String, Value)> = Vec::new();
                for (n, x) in named {
                    let n = as_written(n);
                    if let Some(p) = member_name_problem(&n) {
                        problems.push((format!("{path}.{key}"), p, None));
                        return None;
                    }
                    // `1` and `"1"` are two YAML keys with one name.
                    if vals.iter().any(|(m, _)| *m == n) {
                        problems.push((format!("{path}.{key}"), format!("the value name `{n}` appears twice"), None));
                        return None;
                    }
                    vals.push((n, x.clone()));
                }
                vals
            }
            _ => {
                problems.push((
                    format!("{path}.{key}"),
                    format!("matrix key `{key}` needs a non-empty list, or a mapping of names to values"),
                    None,
                ));
                return None;
            }
        };
        out.push((key.to_string(), values));
    }
    Some(out)
}

/// A list value as a member name: a name-like string, an integer, a boolean,
/// or a float written as integer mantissa and exponent (`1e-4`, `25e-5`: a `.`
/// cannot be in a name). `None` for anything else.
fn value_name(v: &Value) -> Option<String> {
    let name = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => {
            let x = n.as_f64()?;
            if !x.is_finite() {
                return None;
            }
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{x:.0}")
            } else {
                // `3.5e-6` → `35e-7`.
                let e = format!("{x:e}");
                let (mantissa, exp) = e.split_once('e')?;
                let exp: i32 = exp.parse().ok()?;
                match mantissa.split_once('.') {
                    Some((int, frac)) => format!("{int}{frac}e{}", exp - frac.len() as i32),
                    None => format!("{mantissa}e{exp}"),
                }
            }
        }
        _ => return None,
    };
    member_name_problem(&name).is_none().then_some(name)
}

/// A value's name in a member's name: letters, digits, `_`, `-` (a `.` would
/// end the stage name in `${stage@name.output}`).
fn member_name_problem(n: &str) -> Option<String> {
    if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        Some(format!("matrix value name `{n}` must be 1–64 letters, digits, `_` or `-`"))
    } else {
        None
    }
}

/// Every combination of the axes' values, the first key varying slowest.
fn combinations(axes: &[Axis]) -> Vec<Vec<(String, String, &Value)>> {
    let mut out: Vec<Vec<(String, String, &Value)>> = vec![Vec::new()];
    for (key, values) in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |(n, v)| {
                    let mut c = prefix.clone();
                    c.push((key.clone(), n.clone(), v));
                    c
                })
            })
            .collect();
    }
    out
}

/// `${item.KEY}` in every string of `v`: a string that is only the reference
/// becomes the value itself (a number stays a number); inside text, its text.
fn fill_items(v: &mut Value, values: &BTreeMap<&str, &Value>, path: &str, problems: &mut Vec<Problem>) {
    match v {
        Value::Mapping(m) => {
            for (_, x) in m.iter_mut() {
                fill_items(x, values, path, problems);
            }
        }
        Value::Sequence(s) => {
            for x in s.iter_mut() {
                fill_items(x, values, path, problems);
            }
        }
        Value::String(s) if s.contains("${item.") => {
            let text = s.clone();
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("${item.") {
                // `$${item.x}` is the literal text `${item.x}`: left for the loader to unescape.
                if rest[..i].ends_with('$') {
                    out.push_str(&rest[..i + 2]);
                    rest = &rest[i + 2..];
                    continue;
                }
                out.push_str(&rest[..i]);
                let Some(end) = rest[i..].find('}') else { break };
                let key = &rest[i + 7..i + end];
                let Some(value) = values.get(key) else {
                    let keys: Vec<&str> = values.keys().copied().collect();
                    problems.push((
                        path.into(),
                        format!("`${{item.{key}}}` is not a key of the matrix"),
                        Some(format!("its keys: {}", keys.join(", "))),
                    ));
                    return;
                };
                if i == 0 && i + end + 1 == rest.len() && out.is_empty() {
                    *v = as_data((*value).clone());
                    return;
                }
                out.push_str(&escape_references(&as_written(value)));
                rest = &rest[i + end + 1..];
            }
            out.push_str(rest);
            *v = Value::String(out);
        }
        _ => {}
    }
}

/// A matrix value is data: a `${…}` inside it is text, never a reference the
/// loader would resolve (it reads `$${` as a literal `${`).
fn escape_references(text: &str) -> String {
    text.replace("${", "$${")
}

fn as_data(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(escape_references(&s)),
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(as_data).collect()),
        Value::Mapping(m) => Value::Mapping(m.into_iter().map(|(k, x)| (k, as_data(x))).collect()),
        other => other,
    }
}

/// `${S@*.OUT}` (a whole string) → a mapping of S's members to their output;
/// `${S.OUT}` naming a matrix stage without a member is a problem.
fn rewrite_references(v: &mut Value, path: &str, members: &BTreeMap<String, Vec<String>>, problems: &mut Vec<Problem>) {
    match v {
        Value::Mapping(m) => {
            for (_, x) in m.iter_mut() {
                rewrite_references(x, path, members, problems);
            }
        }
        Value::Sequence(s) => {
            for x in s.iter_mut() {
                rewrite_references(x, path, members, problems);
            }
        }
        Value::String(s) if s.contains("${") => {
            let text = s.trim().to_string();
            if let Some(expr) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}')) {
                if let Some((stage, output)) = expr.split_once(&format!("{MEMBER_SEPARATOR}*.")) {
                    match members.get(stage) {
                        Some(ms) => {
                            let mut all = Mapping::new();
                            for m in ms {
                                all.insert(Value::from(m.clone()), Value::from(format!("${{{m}.{output}}}")));
                            }
                            *v = Value::Mapping(all);
                        }
                        None => problems.push((
                            path.into(),
                            format!("`{text}`: `{stage}` is not a matrix stage"),
                            Some("`${STAGE@*.OUTPUT}` gathers the members of a stage with `matrix:`".into()),
                        )),
                    }
                    return;
                }
            }
            let mut rest = text.as_str();
            while let Some(i) = rest.find("${") {
                let Some(end) = rest[i..].find('}') else { break };
                let expr = &rest[i + 2..i + end];
                if let Some((stage, output)) = expr.split_once('.') {
                    if let Some(ms) = members.get(stage) {
                        problems.push((
                            path.into(),
                            format!("`${{{expr}}}`: `{stage}` is a matrix stage of {} members", ms.len()),
                            Some(format!(
                                "name one member, `${{{}.{output}}}`, or all of them where a mapping is expected, \
                                 `${{{stage}@*.{output}}}`",
                                ms[0]
                            )),
                        ));
                    } else if expr.contains("@*") {
                        problems.push((
                            path.into(),
                            format!("`${{{expr}}}` gathers a sweep: it must be the whole value, where a mapping is expected"),
                            None,
                        ));
                    }
                }
                rest = &rest[i + end + 1..];
            }
        }
        _ => {}
    }
}

fn body_mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::Mapping(m) => m.iter().any(|(_, x)| body_mentions(x, needle)),
        Value::Sequence(s) => s.iter().any(|x| body_mentions(x, needle)),
        Value::String(s) => s.contains(needle),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_yaml(text: &str) -> (Expanded, Vec<Problem>) {
        let v: Value = serde_yaml::from_str(text).unwrap();
        expand(v.as_mapping().unwrap())
    }

    #[test]
    fn list_values_name_their_members_where_they_can() {
        let names = |list: &str| -> Vec<String> {
            let (e, p) =
                expand_yaml(&format!("t:\n  kind: k\n  matrix: {{ v: {list} }}\n  with: {{ x: '${{item.v}}' }}\n"));
            assert!(p.is_empty(), "{p:?}");
            e.stages.keys().map(|k| k.as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names("[1.0e-4, 3.5e-6, 2, 0.5]"), ["t@v-1e-4", "t@v-35e-7", "t@v-2", "t@v-5e-1"]);
        assert_eq!(names("[small, large]"), ["t@v-small", "t@v-large"]);
        // A value that cannot be a name, or two that read the same: by position.
        assert_eq!(names("[a.yaml, b.yaml]"), ["t@v-0", "t@v-1"]);
        assert_eq!(names("[1, '1']"), ["t@v-0", "t@v-1"]);
    }

    #[test]
    fn a_matrix_expands_into_named_members_with_items_filled_in() {
        let (e, problems) = expand_yaml(
            "t:\n  kind: k\n  matrix: { lr: [0.1, 0.2], set: { r1: a.yaml, fmt: b.yaml } }\n  \
             with: { lr: '${item.lr}', rewards: '${item.set}', note: 'lr ${item.lr} on ${item.set}' }\n\
             e:\n  kind: k\n  needs: [t]\n  with: { models: '${t@*.model}', one: '${t@lr-2e-1-fmt.model}' }\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&str> = e.stages.keys().map(|k| k.as_str().unwrap()).collect();
        // A list's members are named by value (0.2 as 2e-1: a `.` cannot be in a name).
        assert_eq!(names, ["t@lr-1e-1-r1", "t@lr-1e-1-fmt", "t@lr-2e-1-r1", "t@lr-2e-1-fmt", "e"]);
        let m = &e.stages["t@lr-2e-1-fmt"]["with"];
        assert_eq!(m["lr"], Value::from(0.2));
        assert_eq!(m["rewards"], Value::from("b.yaml"));
        assert_eq!(m["note"], Value::from("lr 0.2 on b.yaml"));
        assert!(e.stages["t@lr-2e-1-fmt"].get("matrix").is_none());
        let models = e.stages["e"]["with"]["models"].as_mapping().unwrap();
        assert_eq!(models.len(), 4);
        assert_eq!(models["t@lr-1e-1-fmt"], Value::from("${t@lr-1e-1-fmt.model}"));
        assert_eq!(e.stages["e"]["needs"].as_sequence().unwrap().len(), 4);
    }

    #[test]
    fn references_to_a_matrix_without_a_member_and_stray_items_are_problems() {
        let (_, problems) = expand_yaml(
            "t: { kind: k, matrix: { x: [1] }, with: { a: '${item.y}' } }\n\
             u: { kind: k, with: { m: '${t.model}', n: 'x ${t@*.model}', o: '${item.x}', p: '${u@*.model}' } }\n",
        );
        let messages: Vec<&str> = problems.iter().map(|p| p.1.as_str()).collect();
        assert!(messages.iter().any(|m| m.contains("`${item.y}` is not a key of the matrix")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("`t` is a matrix stage of 1 members")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("it must be the whole value")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("uses `${item.…}` but has no `matrix:`")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("`u` is not a matrix stage")), "{messages:?}");
    }
}
