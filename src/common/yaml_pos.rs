//! Where each key of a YAML document sits, so that errors found after parsing
//! (by serde, which forgets positions) can still name a line.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Maps a dotted path (`stages.grpo.with.learning_rate`, sequence items by
/// index: `stages.infer.with.questions.0`) to the 1-based line where it appears.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    lines: HashMap<String, usize>,
}

/// How deep flow collections (`[…]`, `{…}`) may nest in a file r1pipe reads.
pub const MAX_FLOW_DEPTH: usize = 64;

/// How far a block-style line may sit: its indentation plus two columns for each
/// `- ` or `? ` that opens a level on it (every level of block nesting takes at
/// least one column). No pipeline comes near; 10,000 levels overflow the parser's stack.
pub const MAX_BLOCK_COLUMNS: usize = 512;

/// The line (1-based) where block style nests beyond [`MAX_BLOCK_COLUMNS`].
fn too_deep_block(text: &str) -> Option<usize> {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start_matches([' ', '\t']);
        let mut columns = line.len() - trimmed.len();
        let mut rest = trimmed;
        while let Some(r) =
            rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")).or_else(|| rest.strip_prefix("-\t"))
        {
            columns += 2;
            rest = r.trim_start_matches([' ', '\t']);
            if columns > MAX_BLOCK_COLUMNS {
                return Some(i + 1);
            }
        }
        if columns > MAX_BLOCK_COLUMNS {
            return Some(i + 1);
        }
    }
    None
}

/// The line (1-based) where flow collections first nest deeper than
/// [`MAX_FLOW_DEPTH`], found in one pass before any YAML parser sees the text
/// (the parsers' own limits come only after work that grows with the square of
/// the depth). Quoted strings and comments are skipped.
pub fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = ' ';
    for c in text.chars() {
        if c == '\n' {
            line += 1;
            comment = false;
            prev = c;
            continue;
        }
        match (quote, c) {
            _ if comment => {}
            (Some('"'), '"') if prev != '\\' => quote = None,
            (Some('\''), '\'') => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '[' | '{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(line);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    None
}

/// [`too_deep`] as the error that names `file`, for every reader of YAML files.
pub fn nesting_problem(file: &std::path::Path, text: &str) -> Option<super::diagnostic::Diagnostic> {
    let (line, what) = match (too_deep(text), too_deep_block(text)) {
        (Some(l), _) => (l, format!("`[` and `{{` nest more than {MAX_FLOW_DEPTH} deep here")),
        (None, Some(l)) => (l, format!("indentation and `- ` / `? ` nest beyond {MAX_BLOCK_COLUMNS} columns here")),
        (None, None) => return None,
    };
    Some(
        super::diagnostic::Diagnostic::new(file, Some(line), what)
            .with_hint("no pipeline, preset or reward set needs this; is the file what you meant to pass?"),
    )
}

impl Positions {
    pub fn parse(text: &str) -> Positions {
        let mut recv = Receiver::default();
        // Syntax errors are reported by serde_yaml with their own location; here we
        // keep whatever positions were collected before the error.
        let _ = Parser::new_from_str(text).load(&mut recv, false);
        Positions { lines: recv.lines }
    }

    /// Line of exactly `path`, if the document has it.
    pub fn exact(&self, path: &str) -> Option<usize> {
        self.lines.get(path).copied()
    }

    /// Line of `path`, or of its nearest recorded ancestor.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            p = &p[..p.rfind('.')?];
        }
    }
}

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

#[derive(Default)]
struct Receiver {
    stack: Vec<Frame>,
    path: Vec<String>,
    lines: HashMap<String, usize>,
}

impl Receiver {
    /// Called when a node starts in value position; returns true when that node is a mapping key.
    fn enter_value(&mut self, mark: Marker, scalar: Option<&str>) -> bool {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) if key.is_none() => {
                let k = scalar.unwrap_or("?").to_string();
                *key = Some(k.clone());
                let mut full = self.path.clone();
                full.push(k);
                self.lines.entry(full.join(".")).or_insert(mark.line());
                true
            }
            Some(Frame::Map { key }) => {
                let k = key.clone().unwrap_or_default();
                self.path.push(k);
                false
            }
            Some(Frame::Seq { index }) => {
                let i = *index;
                *index += 1;
                self.path.push(i.to_string());
                self.lines.entry(self.path.join(".")).or_insert(mark.line());
                false
            }
            None => false,
        }
    }

    /// Called when a value node is complete.
    fn leave_value(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => {
                *key = None;
                self.path.pop();
            }
            Some(Frame::Seq { .. }) => {
                self.path.pop();
            }
            None => {}
        }
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(s, ..) if !self.enter_value(mark, Some(&s)) => {
                self.leave_value();
            }
            Event::Alias(_) if !self.enter_value(mark, None) => {
                self.leave_value();
            }
            Event::MappingStart(..) => {
                self.enter_value(mark, None);
                self.stack.push(Frame::Map { key: None });
            }
            Event::SequenceStart(..) => {
                self.enter_value(mark, None);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.leave_value();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_nesting_beyond_the_columns_is_found_before_parsing() {
        let dashes = format!("x:\n  {}1\n", "- ".repeat(10_000));
        let t = std::time::Instant::now();
        let d = nesting_problem(std::path::Path::new("p.yaml"), &dashes).expect("refused");
        assert!(d.to_string().contains("p.yaml:2") && d.to_string().contains("512 columns"), "{d}");
        let keys = format!("{}a\n", "? ".repeat(10_000));
        assert!(nesting_problem(std::path::Path::new("p.yaml"), &keys).is_some());
        let indented: String = (0..2000).map(|i| format!("{}- a:\n", " ".repeat(i))).collect();
        assert!(nesting_problem(std::path::Path::new("p.yaml"), &indented).is_some());
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Ordinary files pass.
        assert!(nesting_problem(std::path::Path::new("p.yaml"), "a:\n  - b: [1, {c: 2}]\n  - - x\n").is_none());
    }

    #[test]
    fn finds_lines_of_nested_keys_and_sequence_items() {
        let text = "name: x\nstages:\n  a:\n    kind: format\n    with:\n      limit: 3\n      qs:\n        - one\n        - two\n  b: {kind: sft, with: {lr: 1}}\n";
        let p = Positions::parse(text);
        assert_eq!(p.line("name"), Some(1));
        assert_eq!(p.line("stages.a"), Some(3));
        assert_eq!(p.line("stages.a.with.limit"), Some(6));
        assert_eq!(p.line("stages.a.with.qs.1"), Some(9));
        assert_eq!(p.line("stages.b.with.lr"), Some(10));
        // unknown leaf: falls back to its parent
        assert_eq!(p.line("stages.a.with.nothing"), Some(5));
    }
}
