//! What a pipeline or stage name may be. Names become folder and file names
//! (plots, records, run logs) and appear in HTML, so they are identifiers:
//! nothing that could climb out of a folder or be read as markup.

/// The longest name accepted.
pub const MAX_LEN: usize = 64;

/// Why `name` is not a valid identifier, or None: 1 to 64 of ASCII letters,
/// digits, `_`, `-` and `.`, starting with a letter, digit or `_`.
pub fn identifier_problem(name: &str) -> Option<String> {
    let shown: String = name.chars().take(MAX_LEN).flat_map(char::escape_debug).collect();
    if name.is_empty() {
        return Some("a name cannot be empty".into());
    }
    if name.len() > MAX_LEN {
        return Some(format!("`{shown}…` is longer than {MAX_LEN} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Some(format!("`{shown}` may hold only ASCII letters, digits, `_`, `-` and `.`"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        return Some(format!("`{shown}` must start with a letter, a digit or `_`"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_a_folder_or_be_markup_are_refused() {
        for ok in ["grpo", "sft_2", "eval-base", "v1.2", "_x"] {
            assert_eq!(identifier_problem(ok), None, "{ok}");
        }
        for bad in ["", "../../tmp/x", "/etc", "..", ".hidden", "-x", "a b", "<img src=x>", "é", "a/b", "a\\b"] {
            assert!(identifier_problem(bad).is_some(), "{bad:?} accepted");
        }
        assert!(identifier_problem(&"x".repeat(65)).unwrap().contains("longer than 64"));
    }
}
