//! Presets and reward sets built into the binary, so that a project outside
//! this repository has what README's pipelines use after `cargo install`.
//! They are the files of `stages/` (the same text, compiled in), named by
//! their file's stem: `use: grpo`, `rewards: r1-gsm8k`. A value with no slash
//! and no extension names a built-in; anything else is a path, as before.

/// What a built-in is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinKind {
    /// Stage parameters merged under a stage's `with:` (`use: NAME`).
    Preset,
    /// A list of reward functions (`rewards: NAME`).
    RewardSet,
}

impl BuiltinKind {
    pub fn label(self) -> &'static str {
        match self {
            BuiltinKind::Preset => "preset",
            BuiltinKind::RewardSet => "reward set",
        }
    }
}

/// One built-in file.
#[derive(Debug)]
pub struct Builtin {
    pub name: &'static str,
    pub kind: BuiltinKind,
    /// The file in the repository it is compiled from (for messages and `presets`).
    pub source: &'static str,
    pub text: &'static str,
}

impl Builtin {
    /// The first sentence of the file's opening comment: what it is.
    pub fn summary(&self) -> String {
        let comment: Vec<&str> =
            self.text.lines().take_while(|l| l.starts_with('#')).map(|l| l.trim_start_matches('#').trim()).collect();
        let text = comment.join(" ");
        match text.find(". ").or_else(|| text.find(": ")) {
            Some(end) => text[..end].to_string(),
            None => text.trim_end_matches('.').to_string(),
        }
    }
}

macro_rules! builtin {
    ($name:literal, $kind:expr, $file:literal) => {
        Builtin { name: $name, kind: $kind, source: $file, text: include_str!(concat!("../../", $file)) }
    };
}

/// Every built-in, presets first.
pub const BUILTINS: &[Builtin] = &[
    builtin!("grpo", BuiltinKind::Preset, "stages/grpo.yaml"),
    builtin!("sft", BuiltinKind::Preset, "stages/sft.yaml"),
    builtin!("r1-gsm8k", BuiltinKind::RewardSet, "stages/rewards/r1-gsm8k.yaml"),
    builtin!("building-r1", BuiltinKind::RewardSet, "stages/rewards/building-r1.yaml"),
    builtin!("format-only", BuiltinKind::RewardSet, "stages/rewards/format-only.yaml"),
    builtin!("r1-gsm8k-tools", BuiltinKind::RewardSet, "stages/rewards/r1-gsm8k-tools.yaml"),
];

/// Whether `value` is written as a built-in's name (no slash, no extension)
/// rather than as a path.
pub fn is_name(value: &str) -> bool {
    !value.is_empty() && !value.contains(['/', '\\', '.']) && !value.starts_with('~') && !value.contains("${")
}

/// The built-in of that kind and name.
pub fn find(kind: BuiltinKind, name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.kind == kind && b.name == name)
}

/// The names of that kind, for "did you mean" and error hints.
pub fn names(kind: BuiltinKind) -> Vec<&'static str> {
    BUILTINS.iter().filter(|b| b.kind == kind).map(|b| b.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_told_apart() {
        assert!(is_name("grpo") && is_name("r1-gsm8k"));
        for path in ["stages/grpo.yaml", "grpo.yaml", "./grpo", "~/x", "${vars.p}", ""] {
            assert!(!is_name(path), "{path}");
        }
    }

    #[test]
    fn every_builtin_is_its_repository_file_and_has_a_summary() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for b in BUILTINS {
            let on_disk = std::fs::read_to_string(root.join(b.source)).unwrap();
            assert_eq!(on_disk, b.text, "{}", b.source);
            assert!(!b.summary().is_empty(), "{} has no opening comment", b.source);
            let stem = std::path::Path::new(b.source).file_stem().unwrap().to_str().unwrap();
            assert_eq!(stem, b.name);
        }
        assert_eq!(find(BuiltinKind::Preset, "grpo").unwrap().source, "stages/grpo.yaml");
        assert!(find(BuiltinKind::RewardSet, "grpo").is_none());
    }
}
