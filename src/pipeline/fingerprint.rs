//! A stage's fingerprint: blake3 over everything its result depends on, and
//! the human explanation of why two fingerprints differ.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything that decides a stage's result. Stored with each record so that
/// a later run can say which part changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FingerprintInputs {
    pub kind: String,
    pub kind_version: u32,
    /// Resolved parameters; artifact references as `${stage.output}` text.
    pub params: Value,
    /// `stage.output` → content hash of that artifact.
    pub inputs: BTreeMap<String, String>,
    /// `param` → content hash of the local file or directory it names.
    pub files: BTreeMap<String, String>,
    /// device class, dtype, seed: only those the kind depends on.
    pub env: BTreeMap<String, String>,
}

impl FingerprintInputs {
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"r1pipe-fingerprint-v1\0");
        h.update(canonical_json(&serde_json::to_value(self).expect("plain data serializes")).as_bytes());
        h.finalize().to_hex().to_string()
    }

    /// Why `self` (the new inputs) differs from `old`, one line per difference.
    pub fn diff(&self, old: &FingerprintInputs) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != old.kind {
            out.push(format!("kind changed: {} → {}", old.kind, self.kind));
        } else if self.kind_version != old.kind_version {
            out.push(format!("`{}` implementation changed: v{} → v{}", self.kind, old.kind_version, self.kind_version));
        }
        let (a, b) = (crate::common::params::flatten(&old.params), crate::common::params::flatten(&self.params));
        for (k, v) in &b {
            match a.get(k) {
                None => out.push(format!("param {k} added: {}", short(v))),
                Some(o) if o != v => out.push(format!("param {k}: {} → {}", short(o), short(v))),
                _ => {}
            }
        }
        for (k, o) in &a {
            if !b.contains_key(k) {
                out.push(format!("param {k} removed (was {})", short(o)));
            }
        }
        diff_maps(&old.inputs, &self.inputs, "input", &mut out);
        diff_maps(&old.files, &self.files, "file", &mut out);
        for (k, v) in &self.env {
            match old.env.get(k) {
                Some(o) if o != v => out.push(format!("{k}: {o} → {v}")),
                None => out.push(format!("{k} now {v}")),
                _ => {}
            }
        }
        if out.is_empty() {
            out.push("fingerprint changed".into());
        }
        out
    }
}

fn diff_maps(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>, what: &str, out: &mut Vec<String>) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{what} {k} added")),
            Some(o) if o != v => {
                out.push(format!("{what} {k} changed (content {} → {})", &o[..8.min(o.len())], &v[..8.min(v.len())]))
            }
            _ => {}
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(format!("{what} {k} removed"));
        }
    }
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let s = s.replace('\n', "⏎");
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// JSON with object keys sorted at every level, whatever map type serde_json was built with.
pub fn canonical_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let body: Vec<String> =
                keys.into_iter().map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&m[k]))).collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inputs(params: Value) -> FingerprintInputs {
        FingerprintInputs {
            kind: "grpo".into(),
            kind_version: 1,
            params,
            inputs: BTreeMap::from([("prompts.train".into(), "aaaa1111".into())]),
            files: BTreeMap::new(),
            env: BTreeMap::from([("seed".into(), "42".into())]),
        }
    }

    #[test]
    fn key_order_does_not_change_the_fingerprint() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"x":1,"y":2}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"y":2,"x":1},"a":1}"#).unwrap();
        assert_eq!(inputs(a).fingerprint(), inputs(b).fingerprint());
    }

    #[test]
    fn every_component_changes_the_fingerprint() {
        let base = inputs(json!({"lr": 1e-6}));
        let fp = base.fingerprint();
        let mut v = base.clone();
        v.kind_version = 2;
        assert_ne!(v.fingerprint(), fp);
        let mut v = base.clone();
        v.params = json!({"lr": 2e-6});
        assert_ne!(v.fingerprint(), fp);
        let mut v = base.clone();
        v.inputs.insert("prompts.train".into(), "bbbb".into());
        assert_ne!(v.fingerprint(), fp);
        let mut v = base.clone();
        v.files.insert("rewards".into(), "cccc".into());
        assert_ne!(v.fingerprint(), fp);
        let mut v = base.clone();
        v.env.insert("seed".into(), "7".into());
        assert_ne!(v.fingerprint(), fp);
    }

    #[test]
    fn diff_names_the_changed_parameter_and_input() {
        let old = inputs(json!({"lr": 3e-6, "lora": {"r": 8}}));
        let mut new = inputs(json!({"lr": 1e-6, "lora": {"r": 8}}));
        new.inputs.insert("prompts.train".into(), "bbbb2222".into());
        let d = new.diff(&old);
        assert_eq!(
            d,
            vec![
                "param lr: 3e-6 → 1e-6".to_string(),
                "input prompts.train changed (content aaaa1111 → bbbb2222)".to_string()
            ]
        );
    }
}
