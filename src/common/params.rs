//! Stage parameters: plain JSON values after YAML resolution, turned into each
//! stage kind's typed struct with errors that name the key and the nearest valid one.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::diagnostic::nearest;

/// A parameter problem, located by its dotted path under the stage's `with`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl ParamError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError { path: path.into(), message: message.into(), hint: None }
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "parameter `{}`: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ParamError {}

/// `value` when there are no problems, else all of them.
/// The most rows a batch-like parameter may ask for: far beyond what fits in
/// memory with any model r1pipe runs, low enough that a typo is named here
/// instead of aborting in an allocation.
pub const MAX_BATCH: usize = 1 << 16;

/// A batch-like count (`batch_size`, `num_generations`, …): between 1 and [`MAX_BATCH`].
pub fn batch_problem(field: &str, v: usize) -> Option<ParamError> {
    if v == 0 {
        Some(ParamError::new(field, "must be at least 1"))
    } else if v > MAX_BATCH {
        Some(ParamError::new(field, format!("{v} is more than {MAX_BATCH} rows at a time")).hint(
            "a batch this large cannot fit in memory; accumulate gradients (gradient_accumulation_steps) instead",
        ))
    } else {
        None
    }
}

pub fn checked<T>(value: T, problems: Vec<ParamError>) -> Result<T, Vec<ParamError>> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(problems)
    }
}

/// The keys a parameter type knows, from its defaults serialized (flattened
/// parts included): the one list of keys, derived from the type itself.
pub fn known_keys<P: Default + Serialize>() -> Vec<String> {
    match serde_json::to_value(P::default()) {
        Ok(Value::Object(m)) => m.into_iter().map(|(k, _)| k).collect(),
        _ => Vec::new(),
    }
}

/// A mapping of parameters as `P`, a type whose every field has a default: the
/// keys given replace the defaults' (at the top level: a nested mapping given
/// is taken whole), every key `P` does not know is reported at once with the
/// nearest known one, then the values are typed (a wrong type names its key).
pub fn with_defaults<P: Default + Serialize + DeserializeOwned>(value: &Value) -> Result<P, Vec<ParamError>> {
    let Ok(Value::Object(defaults)) = serde_json::to_value(P::default()) else {
        return Err(vec![ParamError::new("", "internal: a parameter type that is not a mapping")]);
    };
    let given = match value {
        Value::Object(m) => m.clone(),
        Value::Null => serde_json::Map::new(),
        _ => return Err(vec![ParamError::new("", "parameters must be a mapping of names to values")]),
    };
    let known: Vec<String> = defaults.keys().cloned().collect();
    let unknown: Vec<ParamError> = given
        .keys()
        .filter(|k| !defaults.contains_key(*k))
        .map(|k| {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            // A near miss is named alone: a list of eighty keys buries it.
            let hint = match super::diagnostic::nearest(k, names.iter().copied()) {
                Some(n) => format!("did you mean `{n}`?"),
                None => super::diagnostic::suggest(k, &names, "keys"),
            };
            // Shown escaped: a key may hold a newline or a NUL (a file that is not what it seems).
            ParamError::new(k.escape_debug().to_string(), format!("unknown parameter `{}`", k.escape_debug()))
                .hint(hint)
        })
        .collect();
    // Every problem in one pass: the known keys are typed even when some are unknown.
    let given: serde_json::Map<String, Value> = given.into_iter().filter(|(k, _)| defaults.contains_key(k)).collect();
    let mut merged = defaults.clone();
    merged.extend(given.clone());
    let typed_result = typed(&Value::Object(merged)).map_err(|first| {
        // serde stops at the first wrong value, and inside a flattened part names no
        // key: type each given value alone over the defaults to name every wrong one.
        let mut errors: Vec<ParamError> = given
            .into_iter()
            .filter_map(|(k, v)| {
                let mut one = defaults.clone();
                one.insert(k.clone(), v.clone());
                typed_naming::<P>(&Value::Object(one), Some((&k, &v))).err()
            })
            .collect();
        if errors.is_empty() {
            errors.push(first);
        }
        errors
    });
    match typed_result {
        Ok(p) if unknown.is_empty() => Ok(p),
        Ok(_) => Err(unknown),
        Err(mut errors) => {
            let mut all = unknown;
            all.append(&mut errors);
            Err(all)
        }
    }
}

/// Deserialize `value` into `P` (which should be `#[serde(deny_unknown_fields)]`),
/// turning serde's message into one that says which key is wrong and what it may have meant.
pub fn typed<P: DeserializeOwned>(value: &Value) -> Result<P, ParamError> {
    typed_naming::<P>(value, None)
}

/// [`typed`], where an error serde places at no path (inside a flattened part)
/// is `key`'s, whose value is `given`.
fn typed_naming<P: DeserializeOwned>(value: &Value, key: Option<(&str, &Value)>) -> Result<P, ParamError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = err.into_inner().to_string();
        match (path.is_empty(), key) {
            (true, Some((k, v))) => explain_serde_error(k, &inner, Some(v)),
            (true, None) => explain_serde_error(&path, &inner, None),
            (false, _) => explain_serde_error(&path, &inner, lookup(value, &path)),
        }
    })
}

/// What a serde type name means to someone writing YAML, with an example.
fn expected_in_words(serde_name: &str) -> String {
    match serde_name.trim() {
        "f64" | "f32" => "a number (e.g. 3.0e-6)".into(),
        "u64" | "u32" | "u16" | "u8" | "usize" => "a whole number ≥ 0 (e.g. 100)".into(),
        "i64" | "i32" | "isize" => "a whole number (e.g. -1)".into(),
        "a boolean" => "true or false".into(),
        "a string" => "text (quote it if it looks like a number)".into(),
        "a sequence" => "a list (e.g. [a, b])".into(),
        "a map" => "a mapping of keys (e.g. {key: value})".into(),
        s if s.starts_with("struct ") => "a mapping of keys (e.g. {key: value})".into(),
        s if s.starts_with("a ") || s.starts_with("an ") || s.starts_with("one of") => s.into(),
        other => other.into(),
    }
}

/// A value as the user wrote it, short.
fn given_text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    };
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn explain_serde_error(path: &str, msg: &str, given: Option<&Value>) -> ParamError {
    // `invalid type: string "abc", expected f64`: say what the key takes, in words.
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some((_, want)) = rest.rsplit_once(", expected ") {
                let got = given.map(given_text).unwrap_or_else(|| rest.split(", expected").next().unwrap_or("").into());
                return ParamError::new(path, format!("expected {}, not {got}", expected_in_words(want)));
            }
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(tail.split_once("expected").map(|(_, t)| t).unwrap_or(""));
        let key = join_path(path, field);
        // serde_path_to_error already appended the unknown key to the path.
        let key = if path.ends_with(field) { path.to_string() } else { key };
        let hint = match nearest(field, valid.iter().map(String::as_str)) {
            Some(n) => format!("did you mean `{n}`? valid keys: {}", list(&valid)),
            None => format!("valid keys: {}", list(&valid)),
        };
        return ParamError::new(key, format!("unknown parameter `{}`", field.escape_debug())).hint(hint);
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        return ParamError::new(join_path(path, field), "required parameter is missing")
            .hint(format!("add `{field}:` under `with:`"));
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let (variant, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(tail);
        let hint = match nearest(variant, valid.iter().map(String::as_str)) {
            Some(n) => format!("did you mean `{n}`? valid values: {}", list(&valid)),
            None => format!("valid values: {}", list(&valid)),
        };
        return ParamError::new(path, format!("unknown value `{variant}`")).hint(hint);
    }
    // A type's own `expecting` (an untagged enum's forms, written "a …"): say what was given.
    match given {
        Some(v) if msg.starts_with("a ") => ParamError::new(path, format!("expected {msg}, not {}", given_text(v))),
        _ => ParamError::new(path, msg.to_string()),
    }
}

fn join_path(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
    }
}

/// The value at a dotted path of a JSON tree.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, seg| match cur {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A YAML parser's error in words: serde_yaml cannot hold an integer beyond
/// 64 bits and says so in type-system terms (`invalid type: integer `…` as u128,
/// expected any YAML value`).
pub fn yaml_error_text(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    if let Some(rest) = text.split("invalid type: integer `").nth(1) {
        if let Some(n) = rest.split('`').next().filter(|_| rest.contains("as u128") || rest.contains("as i128")) {
            let key = text.split(": invalid type").next().unwrap_or("").trim_start_matches('.');
            let at = if key.is_empty() { String::new() } else { format!(" at `{key}`") };
            return format!("the number {n}{at} is too large to read (integers stop at 2^64); no setting needs it");
        }
    }
    text
}

/// Convert parsed YAML to JSON, the one form parameters take inside r1pipe
/// (canonical for fingerprints: object keys sorted).
pub fn yaml_to_json(v: &serde_yaml::Value, path: &str) -> Result<Value, ParamError> {
    Ok(match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| {
                    ParamError::new(path, format!("number {f} is not finite")).hint("write a finite number")
                })?
            }
        }
        serde_yaml::Value::String(s) => Value::String(s.clone()),
        serde_yaml::Value::Sequence(seq) => Value::Array(
            seq.iter()
                .enumerate()
                .map(|(i, x)| yaml_to_json(x, &join_path(path, &i.to_string())))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, x) in m {
                let key = match k {
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    _ => return Err(ParamError::new(path, "mapping keys must be plain strings")),
                };
                let child = yaml_to_json(x, &join_path(path, &key))?;
                out.insert(key, child);
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(t) => yaml_to_json(&t.value, path)?,
    })
}

/// Leaves of a JSON tree by dotted path (`a.b`); an empty object is a leaf.
/// What fingerprint diffs, `exp show`, `metrics diff` and the trackers read.
pub fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn go(v: &Value, path: String, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    go(x, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out)
                }
            }
            other => {
                out.insert(path, other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    go(v, String::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Lora {
        r: u32,
        #[serde(default)]
        alpha: f32,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        learning_rate: f64,
        #[serde(default)]
        lora: Option<Lora>,
    }

    #[test]
    fn unknown_key_names_the_nearest_valid_key() {
        let e = typed::<P>(&serde_json::json!({"lerning_rate": 1.0})).unwrap_err();
        assert_eq!(e.path, "lerning_rate");
        assert_eq!(e.message, "unknown parameter `lerning_rate`");
        assert!(e.hint.unwrap().starts_with("did you mean `learning_rate`?"));
    }

    #[test]
    fn nested_unknown_key_has_its_full_path() {
        let e = typed::<P>(&serde_json::json!({"learning_rate": 1.0, "lora": {"r": 2, "alpah": 3}})).unwrap_err();
        assert_eq!(e.path, "lora.alpah");
        assert!(e.hint.unwrap().contains("did you mean `alpha`?"));
    }

    #[test]
    fn type_errors_name_the_key() {
        let e = typed::<P>(&serde_json::json!({"learning_rate": "fast"})).unwrap_err();
        assert_eq!(e.path, "learning_rate");
        // In words, with the value as given, not serde's `invalid type: string "fast", expected f64`.
        assert_eq!(e.message, "expected a number (e.g. 3.0e-6), not \"fast\"");
    }

    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    struct Defaults {
        learning_rate: f64,
        lora: Option<Lora>,
        #[serde(flatten)]
        shared: Shared,
    }
    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    struct Shared {
        max_steps: Option<u64>,
        batch: usize,
    }
    impl Default for Defaults {
        fn default() -> Self {
            Defaults { learning_rate: 1e-6, lora: None, shared: Shared { max_steps: None, batch: 8 } }
        }
    }
    #[test]
    fn defaults_fill_what_is_not_given_and_every_unknown_key_is_reported() {
        let d: Defaults = with_defaults(&serde_json::json!({"batch": 2, "lora": {"r": 4}})).unwrap();
        assert_eq!(d.learning_rate, 1e-6);
        assert_eq!(d.shared.batch, 2);
        assert_eq!(d.shared.max_steps, None);
        assert_eq!(d.lora.map(|l| l.r), Some(4));
        let e = with_defaults::<Defaults>(&serde_json::json!({"bacth": 2, "lerning_rate": 1.0})).unwrap_err();
        let paths: Vec<&str> = e.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths, vec!["bacth", "lerning_rate"]);
        assert!(e[1].hint.as_deref().unwrap().contains("`learning_rate`"), "{:?}", e[1].hint);
        // Two wrong types, one of them in the flattened part: both named.
        let e =
            with_defaults::<Defaults>(&serde_json::json!({"max_steps": "ten", "learning_rate": "fast"})).unwrap_err();
        let paths: Vec<&str> = e.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths, vec!["learning_rate", "max_steps"]);
        let mut keys = known_keys::<Defaults>();
        keys.sort();
        assert_eq!(keys, vec!["batch", "learning_rate", "lora", "max_steps"]);
    }

    #[test]
    fn missing_required_key_is_reported() {
        let e = typed::<P>(&serde_json::json!({})).unwrap_err();
        assert_eq!(e.path, "learning_rate");
        assert_eq!(e.message, "required parameter is missing");
    }
}
