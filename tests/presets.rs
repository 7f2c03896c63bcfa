//! The presets in stages/ and the code defaults must not disagree silently: a
//! preset value that differs from the code's default carries a comment on its
//! line that says "code default".

use std::fs;
use std::path::Path;

use r1pipe::train::grpo::GrpoConfig;
use r1pipe::train::sft::SftConfig;

/// The code defaults: each algorithm's config, the one place they are written.
fn code_defaults(kind: &str) -> serde_json::Value {
    match kind {
        "grpo" => serde_json::to_value(GrpoConfig::default()).unwrap(),
        "sft" => serde_json::to_value(SftConfig::default()).unwrap(),
        _ => unreachable!(),
    }
}

fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
        _ => a == b,
    }
}

#[test]
fn preset_values_that_differ_from_the_code_defaults_say_so() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for kind in ["grpo", "sft"] {
        let path = root.join(format!("stages/{kind}.yaml"));
        let text = fs::read_to_string(&path).unwrap();
        let preset: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let defaults = code_defaults(kind);
        for (key, value) in preset.as_object().unwrap() {
            let Some(default) = defaults.get(key) else {
                panic!("{}: `{key}` is not a parameter of `{kind}`", path.display());
            };
            let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
            let says_so = line.contains("code default");
            assert!(
                same(value, default) || says_so,
                "{}: `{key}: {value}` differs from the code default {default} without saying so",
                path.display()
            );
            assert!(!(same(value, default) && says_so), "{}: `{key}` claims to differ but does not", path.display());
        }
    }
}
