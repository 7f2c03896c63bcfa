//! Every parser that a user's file or a server's reply reaches, fed its
//! committed seeds (`tests/fuzz/corpus/<target>/`) mutated (bytes flipped,
//! cut, spliced) and arbitrary bytes, through `r1pipe::fuzzing`'s harnesses:
//! none may panic (an abort or a hang would end or stall the test, loudly).
//! `R1PIPE_FUZZ_CASES` sets the cases per target (64 by default, enough for
//! the suite; `bench/fuzz.sh` runs many more). A failing input is printed so it
//! can join the corpus once fixed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use r1pipe::fuzzing::{corpus_dir, Target, TARGETS};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(Path::new(env!("CARGO_MANIFEST_DIR")), target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (every target needs seeds)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

/// Seeds with a few bytes flipped, cut at some point, or with a piece of
/// themselves spliced in elsewhere; or arbitrary bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    let (s1, s2, s3) = (seeds.clone(), seeds.clone(), seeds);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (0..n, proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)).prop_map(move |(i, flips)| {
            let mut s = s1[i].clone();
            for (at, b) in flips {
                if !s.is_empty() {
                    let len = s.len();
                    s[at % len] = b;
                }
            }
            s
        }),
        (0..n, any::<usize>()).prop_map(move |(i, at)| {
            let s = &s2[i];
            s[..at % (s.len() + 1)].to_vec()
        }),
        (0..n, any::<usize>(), any::<usize>(), any::<usize>()).prop_map(move |(i, from, len, to)| {
            let s = &s3[i];
            let from = from % (s.len() + 1);
            let piece = s[from..(from + len % 64).min(s.len())].to_vec();
            let mut out = s.clone();
            let to = to % (out.len() + 1);
            out.splice(to..to, piece);
            out
        }),
    ]
}

fn fuzz(target: &Target, cases: u32) -> Result<(), String> {
    let mut runner =
        TestRunner::new(Config { cases, failure_persistence: None, max_shrink_iters: 200, ..Config::default() });
    runner
        .run(&inputs(seeds(target.name)), |bytes| {
            catch_unwind(AssertUnwindSafe(|| (target.run)(&bytes))).map(|_| ()).map_err(|_| {
                TestCaseError::fail(format!("panicked on {} bytes: {:?}", bytes.len(), String::from_utf8_lossy(&bytes)))
            })
        })
        .map_err(|e| format!("{}: {e}", target.name))
}

#[test]
fn no_parser_panics_on_mutated_seeds_or_arbitrary_bytes() {
    let cases = std::env::var("R1PIPE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    // `R1PIPE_FUZZ_TARGET=name` runs one target (bench/fuzz.sh runs each under its own limits).
    let only = std::env::var("R1PIPE_FUZZ_TARGET").ok();
    let targets: Vec<&Target> = TARGETS.iter().filter(|t| only.as_deref().is_none_or(|o| o == t.name)).collect();
    assert!(!targets.is_empty(), "no fuzz target named {only:?}");
    let failures: Vec<String> = targets.iter().filter_map(|t| fuzz(t, cases).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{} targets × {cases} cases, no panic", targets.len());
}

#[test]
fn every_seed_is_accepted_by_its_parser_unchanged() {
    // The seeds are valid inputs, so mutations start from what the parsers accept.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for t in TARGETS {
        for s in seeds(t.name) {
            assert!((t.run)(&s), "a seed of {} is refused: {}", t.name, corpus_dir(dir, t.name).display());
        }
    }
}
