//! `r1pipe rewards`: score completions with a reward set, or list the functions.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::json;

use r1pipe::common::table::render_table;
use r1pipe::data::jsonl;
use r1pipe::pipeline::Project;
use r1pipe::rewards::{RewardSet, Sample, CATALOG};

#[derive(Deserialize)]
struct Row {
    #[serde(default)]
    prompt: Option<serde_json::Value>,
    completion: String,
    answer: String,
    /// Completion length in tokens; whitespace-separated words when absent.
    #[serde(default)]
    tokens: Option<usize>,
}

pub fn list() -> Result<i32> {
    for f in CATALOG {
        let defaults = (f.defaults)();
        println!("{}\n    {}", f.name, f.description.trim());
        if f.params.is_empty() {
            println!("    (no parameters)");
        }
        for p in f.params {
            let d = defaults.get(p.name).map(show_default).unwrap_or_default();
            println!("    {}={d}  {}", p.name, p.doc.trim());
        }
    }
    Ok(0)
}

/// Parameters are f32: show them as such, not as their widened f64 digits.
fn show_default(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if !v.is_i64() && !v.is_u64() => format!("{}", x as f32),
        _ => v.to_string(),
    }
}

pub fn score(set_file: &Path, completions: &Path, as_json: bool) -> Result<i32> {
    let name = set_file.to_string_lossy();
    let set = if r1pipe::common::builtin::is_name(&name) {
        RewardSet::named(&name, &std::env::current_dir()?)?.0
    } else {
        RewardSet::from_file(set_file, &Project::of_file(set_file).root)?
    };
    let rows = jsonl::read::<Row>(completions)?;
    if rows.is_empty() {
        bail!("{} has no completions", completions.display());
    }
    let prompts: Vec<String> = rows
        .iter()
        .map(|(_, r)| match &r.prompt {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        })
        .collect();
    let samples: Vec<Sample> = rows
        .iter()
        .zip(&prompts)
        .map(|((_, r), p)| Sample {
            prompt: p,
            completion: &r.completion,
            answer: &r.answer,
            tokens: r.tokens.unwrap_or_else(|| r.completion.split_whitespace().count()),
            tool_results: None,
        })
        .collect();
    let scores = set.score(&samples)?;
    if as_json {
        for (i, (line, _)) in rows.iter().enumerate() {
            let mut per = serde_json::Map::new();
            for (f, name) in scores.names.iter().enumerate() {
                per.insert(name.clone(), json!(scores.per_function[f][i]));
            }
            println!("{}", json!({"line": line, "rewards": per, "total": scores.total[i]}));
        }
        let summary: serde_json::Map<String, serde_json::Value> =
            scores.stats().into_iter().map(|(n, m, s)| (n, json!({"mean": m, "std": s}))).collect();
        println!("{}", json!({"summary": summary, "total_mean": r1pipe::rewards::set::mean(&scores.total)}));
        return Ok(0);
    }
    let mut headers: Vec<String> = vec!["LINE".into()];
    headers.extend(set.terms.iter().map(|t| format!("{} ×{}", t.name, t.weight)));
    headers.push("TOTAL".into());
    let mut table: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, (line, _))| {
            let mut r = vec![line.to_string()];
            r.extend(scores.per_function.iter().map(|v| format!("{:.3}", v[i])));
            r.push(format!("{:.3}", scores.total[i]));
            r
        })
        .collect();
    let stats = scores.stats();
    let mut mean_row = vec!["mean".to_string()];
    mean_row.extend(stats.iter().map(|(_, m, _)| format!("{m:.3}")));
    mean_row.push(format!("{:.3}", r1pipe::rewards::set::mean(&scores.total)));
    let mut std_row = vec!["std".to_string()];
    std_row.extend(stats.iter().map(|(_, _, s)| format!("{s:.3}")));
    std_row.push(format!("{:.3}", r1pipe::rewards::set::std(&scores.total)));
    table.push(mean_row);
    table.push(std_row);
    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
    print!("{}", render_table(&h, &table));
    Ok(0)
}
