//! The layering rule, held by a test rather than a comment: the runner
//! (`pipeline/`) knows no ML, the ML core (`model/`, `train/`, `rewards/`,
//! `data/`, `rollout/`, `eval/`, `hub.rs`) knows no runner, the neutral
//! `common/` imports neither, the CPU kernels (`kernels/`) import nothing of the
//! crate but each other, stages are the only place where the two meet, and the
//! command line goes through the workspace without naming stage kinds or
//! artifact files. `pipeline/`'s modules import each other without a cycle.

use std::fs;
use std::path::Path;

/// `crate::X` modules a file under `dir` may not name.
const RULES: &[(&str, &[&str])] = &[
    // The kernels import only each other and candle.
    (
        "src/kernels",
        &["common", "pipeline", "stages", "model", "train", "rewards", "data", "eval", "rollout", "hub", "bench"],
    ),
    ("src/common", &["pipeline", "stages", "model", "train", "rewards", "data", "rollout", "hub", "bench", "kernels"]),
    ("src/pipeline", &["stages", "model", "train", "rewards", "data", "rollout", "hub", "bench", "kernels", "eval"]),
    ("src/model", &["pipeline", "stages", "bench"]),
    ("src/train", &["pipeline", "stages", "bench"]),
    ("src/rollout", &["pipeline", "stages", "train", "bench"]),
    ("src/rewards", &["pipeline", "stages", "model", "train", "bench"]),
    ("src/data", &["pipeline", "stages", "model", "train", "rewards", "bench"]),
    ("src/eval", &["pipeline", "stages", "train", "bench"]),
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
        // `super::…` paths (train/grpo/config.rs uses `super::super::`) stay inside one
        // layer's folder, so only `crate::`/`r1pipe::` paths can cross a layer.
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

/// String literals (`"…"`) in a file's code, comments and clap's attributes
/// (which name the command line's own arguments) excluded.
fn string_literals(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if code.trim_start().starts_with("#[arg(") || code.trim_start().starts_with("#[command(") {
            continue;
        }
        let parts: Vec<&str> = code.split('"').collect();
        for lit in parts.iter().skip(1).step_by(2) {
            out.push((i + 1, lit.to_string()));
        }
    }
    out
}

#[test]
fn the_command_line_names_no_stage_kind_and_no_artifact_file() {
    let registry = r1pipe::stages::registry();
    let mut names: Vec<String> = Vec::new();
    for kind in registry.names() {
        names.push(kind.to_string());
        let k = registry.get(kind).unwrap();
        for o in k.outputs() {
            names.push(o.name.to_string());
            names.push(o.file_name.to_string());
        }
    }
    names.sort();
    names.dedup();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cli = Vec::new();
    files(&root.join("src/cli"), &mut cli);
    assert!(!cli.is_empty());
    let mut found = Vec::new();
    for f in cli {
        let text = fs::read_to_string(&f).unwrap();
        for (line, lit) in string_literals(&text) {
            if names.contains(&lit) {
                found.push(format!("{}:{line}: \"{lit}\"", f.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(found.is_empty(), "the CLI names stage kinds or outputs (a kind's hook should):\n{}", found.join("\n"));
}

#[test]
fn the_runner_modules_import_each_other_without_a_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pipeline");
    let mut modules = Vec::new();
    files(&root, &mut modules);
    let name = |p: &Path| p.file_stem().unwrap().to_string_lossy().to_string();
    let names: Vec<String> = modules.iter().map(|p| name(p)).filter(|n| n != "mod").collect();
    let mut edges: Vec<(String, String)> = Vec::new();
    for f in &modules {
        let from = name(f);
        if from == "mod" {
            continue;
        }
        let text = fs::read_to_string(f).unwrap();
        for line in text.lines().map(|l| l.split("//").next().unwrap_or("")) {
            for prefix in ["super::", "crate::pipeline::"] {
                for (at, _) in line.match_indices(prefix) {
                    let tail = &line[at + prefix.len()..];
                    let m: String = tail.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if names.contains(&m) && m != from {
                        edges.push((from.clone(), m));
                    }
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        edges: &[(String, String)],
        path: &mut Vec<String>,
        done: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            return Some(path[i..].to_vec());
        }
        if done.iter().any(|d| d == n) {
            return None;
        }
        path.push(n.to_string());
        for (_, to) in edges.iter().filter(|(f, _)| f == n) {
            if let Some(c) = visit(to, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.push(n.to_string());
        None
    }
    let mut done = Vec::new();
    for n in &names {
        if let Some(cycle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            panic!("pipeline/ modules import each other in a cycle: {}", cycle.join(" → "));
        }
    }
    assert!(edges.iter().any(|(f, t)| f == "dag" && t == "spec"), "the scan sees imports (dag reads spec)");
}

#[test]
fn the_training_and_generation_loops_read_tensors_only_through_the_counted_copies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for dir in ["src/model", "src/train", "src/eval", "src/rollout", "src/kernels"] {
        let mut fs_list = Vec::new();
        files(&root.join(dir), &mut fs_list);
        for f in fs_list.into_iter().filter(|f| !f.ends_with("kernels/transfer.rs")) {
            let text = fs::read_to_string(&f).unwrap();
            // Unit tests (after `#[cfg(test)]`) may read what they like.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or("");
                for read in [".to_vec1", ".to_vec2", ".to_vec3", ".to_scalar"] {
                    if line.contains(read) {
                        found.push(format!("{}:{}: {}", f.strip_prefix(root).unwrap().display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "device reads outside kernels::transfer (use it, so tests/transfers.rs counts them):\n{}",
        found.join("\n")
    );
}

/// Identifiers in a file's code (comments and string literals excluded).
fn identifiers(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let code: String = code.split('"').step_by(2).collect::<Vec<_>>().join(" ");
        for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()) {
            out.push((i + 1, word.to_string()));
        }
    }
    out
}

#[test]
fn the_runner_and_the_command_line_name_no_executor_and_no_executor_internals() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let inside = root.join("src/pipeline/executor");
    let mut all = Vec::new();
    files(&root.join("src"), &mut all);
    let internals = ["job", "local", "remote", "slurm", "ray"];
    let mut found = Vec::new();
    for f in all.iter().filter(|f| !f.starts_with(&inside)) {
        let text = fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        // Through the executor module's own surface only (`executor::Executor`, `executor::live_job`, …).
        for (line, code) in text.lines().enumerate().map(|(i, l)| (i + 1, l.split("//").next().unwrap_or(""))) {
            for (at, _) in code.match_indices("executor::") {
                let tail: String =
                    code[at + "executor::".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if internals.contains(&tail.as_str()) {
                    found.push(format!("{rel}:{line}: names `executor::{tail}`"));
                }
            }
        }
        // No executor by name: a Slurm or Ray identifier outside executor/ means one leaked out.
        for (line, word) in identifiers(&text) {
            let lower = word.to_lowercase();
            if lower.contains("slurm") || lower == "ray" || lower.starts_with("ray_") || word.starts_with("Ray") {
                found.push(format!("{rel}:{line}: `{word}`"));
            }
        }
    }
    assert!(found.is_empty(), "executors leak out of src/pipeline/executor/:\n{}", found.join("\n"));
}

#[test]
fn the_executor_checker_sees_a_leak() {
    let words: Vec<String> = identifiers("let c: SlurmConfig = x; // RayConfig\nlet s = \"slurm\"; ray::submit();")
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    assert!(words.contains(&"SlurmConfig".to_string()) && words.contains(&"ray".to_string()));
    assert!(!words.contains(&"RayConfig".to_string()) && !words.contains(&"slurm".to_string()));
}
