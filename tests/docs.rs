//! The manual and the program say the same thing where a machine can check it:
//! every parameter a stage kind takes is in docs/stages.md's table of that
//! kind with the code's default (and nothing else is), and docs/grpo.md and
//! docs/stages.md carry the table of TRL's config fields that the code acts on.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use r1pipe::stages::trl_compat::{markdown, Trainer};

fn doc(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name)).unwrap()
}

/// The rows `| `key` | default | … |` of the table under the heading `### `kind``.
fn documented(text: &str, kind: &str) -> BTreeMap<String, String> {
    let heading = format!("### `{kind}`");
    let Some(start) = text.find(&heading) else { panic!("docs/stages.md has no `{heading}` section") };
    let section = &text[start + heading.len()..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let key = cells[0].trim_matches('`').to_string();
        rows.insert(key, cells.get(1).copied().unwrap_or_default().to_string());
    }
    rows
}

/// Whether a documented default says what the code's default is.
fn same_default(cell: &str, code: &serde_json::Value) -> Result<(), String> {
    let required_or_none = code.is_null() || code.as_str() == Some("") || code == &serde_json::json!({});
    if cell.starts_with('—') {
        return if required_or_none || code == &serde_json::json!([]) {
            Ok(())
        } else {
            Err(format!("the docs say none, the code says {code}"))
        };
    }
    let Some(inner) = cell.strip_prefix('`').and_then(|c| c.split('`').next()) else {
        // Described in words: only for long text (a prompt), which a table cannot hold.
        return if code.as_str().is_some_and(|s| s.len() > 40) {
            Ok(())
        } else {
            Err(format!("`{cell}` is not a value in backticks; the code's is {code}"))
        };
    };
    let doc: serde_yaml::Value = serde_yaml::from_str(inner).map_err(|e| format!("`{inner}`: {e}"))?;
    let doc = serde_json::to_value(doc).unwrap();
    let equal = match (doc.as_f64(), code.as_f64()) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
        _ => doc == *code,
    };
    if equal {
        Ok(())
    } else {
        Err(format!("the docs say `{inner}`, the code {code}"))
    }
}

#[test]
fn every_stage_parameter_is_documented_with_the_codes_default() {
    let text = doc("stages.md");
    let registry = r1pipe::stages::registry();
    let mut problems = Vec::new();
    for kind in ["download", "format", "sft", "grpo", "evaluate", "infer"] {
        let params = registry.get(kind).unwrap().parameters();
        let params = params.as_object().unwrap();
        let docs = documented(&text, kind);
        for (key, default) in params {
            match docs.get(key) {
                None => problems.push(format!("{kind}: `{key}` (default {default}) is not in docs/stages.md")),
                Some(cell) => {
                    if let Err(e) = same_default(cell, default) {
                        problems.push(format!("{kind}: `{key}`: {e}"));
                    }
                }
            }
        }
        for key in docs.keys().filter(|k| !params.contains_key(*k)) {
            problems.push(format!("{kind}: docs/stages.md lists `{key}`, which the kind does not take"));
        }
    }
    assert!(problems.is_empty(), "docs/stages.md and the code disagree:\n{}", problems.join("\n"));
}

#[test]
fn the_trl_field_tables_in_the_docs_are_the_codes() {
    let registry = r1pipe::stages::registry();
    for (trainer, kind, page) in [(Trainer::Grpo, "grpo", "grpo.md"), (Trainer::Sft, "sft", "stages.md")] {
        let known: Vec<String> =
            registry.get(kind).unwrap().parameters().as_object().unwrap().keys().cloned().collect();
        let table = markdown(trainer, &known);
        assert!(
            doc(page).contains(&table),
            "docs/{page} lacks the current table of TRL's {} fields; it should contain:\n{table}",
            trainer.config_name()
        );
    }
}
