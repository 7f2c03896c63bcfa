//! `r1pipe presets`: the presets and reward sets built into the binary, and the
//! text of one (to read, or to copy into a project and edit).

use anyhow::{bail, Result};

use r1pipe::common::builtin::{BuiltinKind, BUILTINS};
use r1pipe::common::table::render_table;

pub fn run(name: Option<&str>) -> Result<i32> {
    match name {
        None => {
            let rows: Vec<Vec<String>> = BUILTINS
                .iter()
                .map(|b| {
                    let how = match b.kind {
                        BuiltinKind::Preset => format!("use: {}", b.name),
                        BuiltinKind::RewardSet => format!("rewards: {}", b.name),
                    };
                    vec![b.name.to_string(), b.kind.label().to_string(), how, b.summary()]
                })
                .collect();
            print!("{}", render_table(&["name", "kind", "in a stage", "what it is"], &rows));
            println!("`r1pipe presets NAME` prints one; a path instead of a name reads your own file.");
        }
        Some(name) => {
            let Some(b) = BUILTINS.iter().find(|b| b.name == name) else {
                let names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
                bail!("no built-in `{name}`: {}", r1pipe::common::diagnostic::suggest(name, &names, "names"));
            };
            print!("{}", b.text);
        }
    }
    Ok(0)
}
