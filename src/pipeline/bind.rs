//! Binding a stage's `${stage.output}` references to the stored artifacts' paths:
//! what the head does before a stage runs here, and what a job does with the
//! references its job file carries.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

/// Replace each `${stage.output}` in `params` by the artifact's path.
pub fn bind_artifacts(params: &mut Value, paths: &BTreeMap<String, PathBuf>) {
    match params {
        Value::Object(m) => m.values_mut().for_each(|x| bind_artifacts(x, paths)),
        Value::Array(a) => a.iter_mut().for_each(|x| bind_artifacts(x, paths)),
        Value::String(s) if s.contains("${") => {
            for (key, p) in paths {
                *s = s.replace(&format!("${{{key}}}"), &p.to_string_lossy());
            }
        }
        _ => {}
    }
}
