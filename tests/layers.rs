//! The layering rule, held by a test rather than a comment: the runner
//! (`pipeline/`) knows no ML, the ML core (`model/`, `train/`, `rewards/`,
//! `data/`, `rollout/`, `hub.rs`) knows no runner, the neutral `common/` imports neither,
//! and stages are the only place where the two meet.

use std::fs;
use std::path::Path;

/// `crate::X` modules a file under `dir` may not name.
const RULES: &[(&str, &[&str])] = &[
    ("src/common", &["pipeline", "stages", "model", "train", "rewards", "data", "rollout", "hub", "bench"]),
    ("src/pipeline", &["stages", "model", "train", "rewards", "data", "rollout", "hub", "bench"]),
    ("src/model", &["pipeline", "stages", "bench"]),
    ("src/train", &["pipeline", "stages", "bench"]),
    ("src/rollout", &["pipeline", "stages", "train", "bench"]),
    ("src/rewards", &["pipeline", "stages", "model", "train", "bench"]),
    ("src/data", &["pipeline", "stages", "model", "train", "rewards", "bench"]),
    ("src/eval", &["pipeline", "stages", "model", "train", "bench"]),
    ("src/hub.rs", &["pipeline", "stages", "model", "train", "rewards", "bench"]),
    // The command line reaches the ML core through its own modules, not through stage internals.
    ("src/cli", &["stages::format", "stages::grpo", "stages::sft", "stages::evaluate", "stages::infer"]),
];

fn files(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    if p.is_file() {
        out.push(p.to_path_buf());
    } else if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            files(&e.path(), out);
        }
    }
}

/// Every `crate::…` / `r1pipe::…` path named in a file (use lines and inline paths), comments excluded.
fn named_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for prefix in ["crate::", "r1pipe::"] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let tail = &rest[at + prefix.len()..];
                let end = tail.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
                out.push((i + 1, tail[..end].trim_end_matches(':').to_string()));
                rest = &tail[end..];
            }
        }
        // `use super::super::x` does not occur; `super::x` stays within a module.
    }
    out
}

#[test]
fn no_layer_imports_a_layer_it_must_not_know() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut violations = Vec::new();
    for (dir, forbidden) in RULES {
        let mut fs_list = Vec::new();
        files(&root.join(dir), &mut fs_list);
        assert!(!fs_list.is_empty(), "{dir} has no files: the rule is stale");
        for f in fs_list {
            let text = fs::read_to_string(&f).unwrap();
            for (line, path) in named_paths(&text) {
                if forbidden.iter().any(|m| path == *m || path.starts_with(&format!("{m}::"))) {
                    violations.push(format!("{}:{line}: names `{path}`", f.strip_prefix(root).unwrap().display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "cross-layer imports:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_a_violation() {
    let paths = named_paths("use crate::pipeline::Project;\nlet x = crate::model::load(); // crate::stages\n");
    let names: Vec<&str> = paths.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(names, vec!["pipeline::Project", "model::load"]);
}
