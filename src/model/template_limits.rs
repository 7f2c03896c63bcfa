//! Bounds on what a chat template's filters may build. A template comes with a
//! model's files (untrusted); minijinja's fuel bounds its instructions and the
//! output is capped, but one filter call can ask for gigabytes: `indent(4e9)`,
//! `'%999999999999s'|format`, `replace` applied until a string doubles past
//! memory, `tojson` over a value nested 100,000 deep (the stack). These
//! replace the built-in filters with ones that check the size first and then
//! call the built-in. (`~` and `+` on strings and lists are operators, not
//! filters, and cannot be bounded here: the memory budget of the process
//! templates render in bounds them, `template_sandbox`.)

use minijinja::value::{Kwargs, Rest, StringInput, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

/// The largest string a filter may produce.
pub const VALUE_CAP: usize = 4 << 20;
/// The widest indentation or field width a template may ask for.
pub const WIDTH_CAP: usize = 1024;
/// How deep a value `tojson` serializes may nest.
pub const DEPTH_CAP: usize = 64;

fn too_big(what: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{what} (a chat template's values are capped)"))
}

pub fn install(env: &mut Environment<'_>) {
    env.add_filter("indent", indent);
    env.add_filter("replace", replace);
    env.add_filter("format", format);
    env.add_filter("tojson", tojson);
}

fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let w = width.or(kwargs.peek::<Option<usize>>("width")?).unwrap_or(4);
    if w > WIDTH_CAP {
        return Err(too_big(&format!("indent width {w} is more than {WIDTH_CAP}")));
    }
    let lines = value.as_str().matches('\n').count() + 1;
    if value.as_str().len().saturating_add(lines.saturating_mul(w)) > VALUE_CAP {
        return Err(too_big(&format!("indenting would make more than {} MiB", VALUE_CAP >> 20)));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

fn replace(state: &State, value: StringInput<'_>, from: StringInput<'_>, to: StringInput<'_>) -> Result<Value, Error> {
    let (s, f, t) = (value.as_str(), from.as_str(), to.as_str());
    let count = if f.is_empty() { s.chars().count() + 1 } else { s.matches(f).count() };
    let grown = count.saturating_mul(t.len().saturating_sub(f.len()));
    if s.len().saturating_add(grown) > VALUE_CAP {
        return Err(too_big(&format!("replace would make more than {} MiB", VALUE_CAP >> 20)));
    }
    minijinja::filters::replace(state, value, from, to)
}

/// printf-style widths and precisions (`%999999999999s`, `%.9999d`) beyond the cap are refused.
fn format(state: &State, format_str: &Value, args: Rest<Value>) -> Result<Value, Error> {
    if let Some(s) = format_str.as_str() {
        let mut digits = String::new();
        let mut in_spec = false;
        for c in s.chars() {
            match (in_spec, c) {
                (false, '%') => in_spec = true,
                (true, '0'..='9') => digits.push(c),
                (true, '.' | '-' | '+' | ' ' | '#' | '*' | '(' | ')') => {
                    check_width(&digits)?;
                    digits.clear();
                }
                (true, _) => {
                    check_width(&digits)?;
                    digits.clear();
                    in_spec = false;
                }
                _ => {}
            }
        }
        check_width(&digits)?;
    }
    minijinja::filters::format(state, format_str, args)
}

fn check_width(digits: &str) -> Result<(), Error> {
    if !digits.is_empty() && (digits.len() > 6 || digits.parse::<usize>().unwrap_or(usize::MAX) > WIDTH_CAP) {
        return Err(too_big(&format!("a format width of {digits} is more than {WIDTH_CAP}")));
    }
    Ok(())
}

fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let asked = indent.clone().or_else(|| kwargs.peek::<Option<Value>>("indent").ok().flatten());
    if let Some(w) = asked.and_then(|v| usize::try_from(v).ok()) {
        if w > WIDTH_CAP {
            return Err(too_big(&format!("tojson indent {w} is more than {WIDTH_CAP}")));
        }
    }
    if depth_beyond(value, DEPTH_CAP) {
        return Err(too_big(&format!("tojson of a value nested more than {DEPTH_CAP} deep")));
    }
    minijinja::filters::tojson(value, indent, kwargs)
}

/// Whether `v` nests more than `left` levels (stops looking as soon as it does).
fn depth_beyond(v: &Value, left: usize) -> bool {
    match v.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
            if left == 0 {
                return true;
            }
            let Ok(items) = v.try_iter() else { return false };
            items.into_iter().any(|item| {
                let child = if v.kind() == ValueKind::Map { v.get_item(&item).unwrap_or_default() } else { item };
                depth_beyond(&child, left - 1)
            })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> Result<String, Error> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_fuel(Some(10_000_000));
        install(&mut env);
        env.render_str(template, ())
    }

    #[test]
    fn filters_that_would_exhaust_memory_are_refused_and_ordinary_use_is_unchanged() {
        assert_eq!(render("{{ 'a\\nb'|indent(2, true) }}").unwrap(), "  a\n  b");
        assert_eq!(render("{{ 'abc'|replace('b', 'xx') }}").unwrap(), "axxc");
        assert_eq!(render("{{ '%5s|%-3d'|format('ab', 7) }}").unwrap(), "   ab|7  ");
        assert_eq!(render("{{ [1, {'a': 2}]|tojson }}").unwrap(), "[1,{\"a\":2}]");
        for (t, says) in [
            ("{{ 'x'|indent(4000000000) }}", "indent width"),
            ("{{ '%999999999999s'|format('x') }}", "format width"),
            (
                "{% set s = namespace(v='0123456789' * 1000) %}{% for i in range(11) %}{% set s.v = s.v|replace('0', s.v) %}{% endfor %}{{ s.v|length }}",
                "replace would make",
            ),
            ("{{ 'a'|tojson(indent=100000) }}", "tojson indent"),
            ("{% set ns = namespace(v=[]) %}{% for i in range(200) %}{% set ns.v = [ns.v] %}{% endfor %}{{ ns.v|tojson }}", "nested more than"),
        ] {
            let e = render(t).unwrap_err().to_string();
            assert!(e.contains(says), "{t}: {e}");
        }
    }
}
