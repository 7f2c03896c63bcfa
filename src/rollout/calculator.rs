//! The built-in `calculator` tool: arithmetic as GSM8K's annotations write it
//! (`48/2`, `0.2*50`, `(3+4)*2`, `2^10`, `15%*80`), computed exactly in
//! rational numbers and bounded, so that whatever a model writes gives a result
//! or an error text it can read, never a crash, a hang or an abort. Nothing is
//! evaluated but numbers and the operators + − × ÷ ^ and %.

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// The longest expression read.
const MAX_EXPR_CHARS: usize = 256;
/// The most digits a number in an expression may have.
const MAX_DIGITS: usize = 40;
/// The most bits a numerator or denominator may reach while computing.
const MAX_BITS: u64 = 1024;
/// The largest exponent (in absolute value) of `^`.
const MAX_EXPONENT: i64 = 64;
/// Nesting of parentheses.
const MAX_DEPTH: usize = 32;

/// An expression's value as a model should read it: an integer, a terminating
/// decimal exactly, or a decimal rounded to 6 places (`≈` not written: GSM8K's
/// own annotations round the same way), or an error text beginning `error:`.
pub fn evaluate(expr: &str) -> Result<String, String> {
    let value = evaluate_exact(expr)?;
    Ok(show(&value))
}

/// The exact value.
pub fn evaluate_exact(expr: &str) -> Result<BigRational, String> {
    if expr.chars().count() > MAX_EXPR_CHARS {
        return Err(format!("error: expression longer than {MAX_EXPR_CHARS} characters"));
    }
    let tokens = lex(expr)?;
    let mut p = Parser { tokens, at: 0, depth: 0 };
    let v = p.sum()?;
    if p.at != p.tokens.len() {
        return Err(format!("error: unexpected `{}`", p.tokens[p.at].text()));
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(BigRational),
    Op(char),
    Open,
    Close,
}

impl Tok {
    fn text(&self) -> String {
        match self {
            Tok::Num(n) => show(n),
            Tok::Op(c) => c.to_string(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
        }
    }
}

fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '$' => i += 1, // `$5` as people write it
            '0'..='9' | '.' => {
                let start = i;
                let mut text = String::new();
                while i < chars.len() {
                    let c = chars[i];
                    // `1,200`: a comma between thousands is part of the number.
                    let thousands = c == ','
                        && chars.len() >= i + 4
                        && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
                        && !chars.get(i + 4).is_some_and(char::is_ascii_digit)
                        && i > start;
                    if c.is_ascii_digit() || c == '.' {
                        text.push(c);
                    } else if !thousands {
                        break;
                    }
                    i += 1;
                }
                out.push(Tok::Num(number(&text)?));
            }
            '+' | '-' | '−' => {
                out.push(Tok::Op(if c == '+' { '+' } else { '-' }));
                i += 1;
            }
            '*' | '×' | 'x' | 'X' => {
                // `**` is a power, as Python writes it.
                if c == '*' && chars.get(i + 1) == Some(&'*') {
                    out.push(Tok::Op('^'));
                    i += 2;
                } else {
                    out.push(Tok::Op('*'));
                    i += 1;
                }
            }
            '/' | '÷' => {
                out.push(Tok::Op('/'));
                i += 1;
            }
            '^' | '%' => {
                out.push(Tok::Op(c));
                i += 1;
            }
            '(' | '[' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' | ']' => {
                out.push(Tok::Close);
                i += 1;
            }
            other => return Err(format!("error: `{other}` is not arithmetic")),
        }
    }
    if out.is_empty() {
        return Err("error: empty expression".into());
    }
    Ok(out)
}

fn number(text: &str) -> Result<BigRational, String> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if text.matches('.').count() > 1 || (int.is_empty() && frac.is_empty()) {
        return Err(format!("error: `{text}` is not a number"));
    }
    if int.len() + frac.len() > MAX_DIGITS {
        return Err(format!("error: a number longer than {MAX_DIGITS} digits"));
    }
    let digits: BigInt = format!("{int}{frac}").parse().map_err(|_| format!("error: `{text}` is not a number"))?;
    let scale = BigInt::from(10u32).pow(frac.len() as u32);
    Ok(BigRational::new(digits, scale))
}

struct Parser {
    tokens: Vec<Tok>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at)
    }

    fn sum(&mut self) -> Result<BigRational, String> {
        let mut v = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.at += 1;
            let r = self.product()?;
            v = if op == '+' { v + r } else { v - r };
            bounded(&v)?;
        }
        Ok(v)
    }

    fn product(&mut self) -> Result<BigRational, String> {
        let mut v = self.power()?;
        loop {
            match self.peek().cloned() {
                Some(Tok::Op(op @ ('*' | '/'))) => {
                    self.at += 1;
                    let r = self.power()?;
                    v = if op == '*' {
                        v * r
                    } else if r.is_zero() {
                        return Err("error: division by zero".into());
                    } else {
                        v / r
                    };
                    bounded(&v)?;
                }
                // `3(4+5)` and `2 (3)`: a factor right after another multiplies.
                Some(Tok::Open) | Some(Tok::Num(_)) => {
                    let r = self.power()?;
                    v *= r;
                    bounded(&v)?;
                }
                _ => return Ok(v),
            }
        }
    }

    /// `a ^ b`, right-associative, with an integer exponent of at most 64.
    fn power(&mut self) -> Result<BigRational, String> {
        let base = self.unary()?;
        if let Some(Tok::Op('^')) = self.peek() {
            self.at += 1;
            let exp = self.power()?;
            if !exp.is_integer() {
                return Err("error: only whole-number powers".into());
            }
            let e = exp.to_integer().to_i64().filter(|e| e.abs() <= MAX_EXPONENT);
            let Some(e) = e else { return Err(format!("error: a power beyond {MAX_EXPONENT}")) };
            if base.is_zero() && e < 0 {
                return Err("error: division by zero".into());
            }
            let mut v = BigRational::one();
            for _ in 0..e.unsigned_abs() {
                v *= &base;
                bounded(&v)?;
            }
            return Ok(if e < 0 { v.recip() } else { v });
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<BigRational, String> {
        match self.peek().cloned() {
            Some(Tok::Op('-')) => {
                self.at += 1;
                Ok(-self.unary()?)
            }
            Some(Tok::Op('+')) => {
                self.at += 1;
                self.unary()
            }
            _ => self.percent(),
        }
    }

    /// A number or a parenthesized sum, with any `%` after it (`15%` is 0.15).
    fn percent(&mut self) -> Result<BigRational, String> {
        let mut v = self.atom()?;
        while let Some(Tok::Op('%')) = self.peek() {
            self.at += 1;
            v /= BigRational::from_integer(BigInt::from(100));
        }
        Ok(v)
    }

    fn atom(&mut self) -> Result<BigRational, String> {
        match self.peek().cloned() {
            Some(Tok::Num(n)) => {
                self.at += 1;
                Ok(n)
            }
            Some(Tok::Open) => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("error: parentheses nested beyond {MAX_DEPTH}"));
                }
                self.at += 1;
                let v = self.sum()?;
                match self.peek() {
                    Some(Tok::Close) => self.at += 1,
                    _ => return Err("error: a `(` is not closed".into()),
                }
                self.depth -= 1;
                Ok(v)
            }
            Some(t) => Err(format!("error: unexpected `{}`", t.text())),
            None => Err("error: the expression ends too early".into()),
        }
    }
}

fn bounded(v: &BigRational) -> Result<(), String> {
    if v.numer().bits() > MAX_BITS || v.denom().bits() > MAX_BITS {
        Err("error: a number too large to show".into())
    } else {
        Ok(())
    }
}

/// An integer as is; a terminating decimal exactly (up to 12 places); anything
/// else rounded to 6 places, trailing zeros dropped.
pub fn show(v: &BigRational) -> String {
    if v.is_integer() {
        return v.to_integer().to_string();
    }
    let ten = BigInt::from(10u32);
    let mut scaled = v.abs();
    let mut places = 0;
    while !scaled.is_integer() && places < 12 {
        scaled *= BigRational::from_integer(ten.clone());
        places += 1;
    }
    let (digits, places) = if scaled.is_integer() {
        (scaled.to_integer(), places)
    } else {
        // Round half away from zero at 6 places.
        let s = v.abs() * BigRational::from_integer(ten.pow(6));
        ((s + BigRational::new(BigInt::one(), BigInt::from(2))).floor().to_integer(), 6)
    };
    let text = digits.to_string();
    let text = if text.len() <= places { format!("{}{}", "0".repeat(places - text.len() + 1), text) } else { text };
    let (int, frac) = text.split_at(text.len() - places);
    let frac = frac.trim_end_matches('0');
    let sign = if v.is_negative() { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_style_arithmetic_is_exact() {
        for (expr, want) in [
            ("48/2", "24"),
            ("48+24", "72"),
            ("12/60", "0.2"),
            ("0.2*50", "10"),
            ("(3+4)*2", "14"),
            ("2^10", "1024"),
            ("2**-2", "0.25"),
            ("15%*80", "12"),
            ("10/3", "3.333333"),
            ("2/3", "0.666667"),
            ("1,200 - 350", "850"),
            ("$5 × 3", "15"),
            ("7 ÷ 2", "3.5"),
            ("-3 + 5", "2"),
            ("3(4+5)", "27"),
            ("0.1+0.2", "0.3"),
            ("100-(20+30)*2", "0"),
            ("1/8", "0.125"),
        ] {
            assert_eq!(evaluate(expr).as_deref(), Ok(want), "{expr}");
        }
    }

    #[test]
    fn bad_input_is_an_error_text_never_a_crash() {
        for (expr, says) in [
            ("1/0", "division by zero"),
            ("10^10^10", "power beyond"),
            ("2^0.5", "whole-number powers"),
            ("(1+2", "not closed"),
            ("1+", "ends too early"),
            ("import os", "is not arithmetic"),
            ("", "empty"),
            ("1..2", "not a number"),
            ("99999999999999999999999999999999999999999999", "longer than 40 digits"),
            ("2^64^1*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64*2^64", "too large"),
            ("0^-1", "division by zero"),
        ] {
            let e = evaluate(expr).unwrap_err();
            assert!(e.starts_with("error: ") && e.contains(says), "{expr}: {e}");
        }
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(evaluate(&deep).unwrap_err().contains("nested"));
        assert!(evaluate(&"1+".repeat(200)).is_err());
    }
}
