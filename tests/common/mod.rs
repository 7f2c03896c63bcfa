//! Helpers for tests that run the `r1pipe` binary on temporary projects.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// An empty project: a folder with `stages/` (which marks a project root).
    pub fn new() -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("stages")).unwrap();
        Project { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.root().join("cache")
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_r1pipe"));
        c.args(args)
            .current_dir(self.root())
            .env("R1PIPE_TEST_KINDS", "1")
            .env_remove("R1PIPE_CACHE")
            .env_remove("RUST_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd(args).output().expect("running r1pipe");
        Run::from(out)
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning r1pipe")
    }

    /// The newest checkpoint step of any unfinished stage in the cache.
    pub fn checkpoint_step(&self) -> Option<u64> {
        let work = self.cache().join("work");
        let mut best = None;
        for e in fs::read_dir(work).ok()?.flatten() {
            for c in fs::read_dir(e.path().join("checkpoints")).into_iter().flatten().flatten() {
                if let Some(s) =
                    c.file_name().to_string_lossy().strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
                {
                    best = best.max(Some(s));
                }
            }
        }
        best
    }

    pub fn wait_for_checkpoint(&self, at_least: u64, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.checkpoint_step().filter(|&s| s >= at_least) {
                return s;
            }
            assert!(t0.elapsed() < timeout, "no checkpoint ≥ {at_least} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "r1pipe failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    /// The decision line printed for `stage` (the first one: "run", "skip", "resume").
    pub fn decision(&self, stage: &str) -> String {
        self.stdout
            .lines()
            .find(|l| l.contains(&format!("] {stage}: ")))
            .unwrap_or_else(|| panic!("no line for stage `{stage}` in:\n{}", self.stdout))
            .split_once(": ")
            .unwrap()
            .1
            .to_string()
    }

    pub fn skipped(&self, stage: &str) -> bool {
        self.decision(stage).starts_with("skip (cached)")
    }
}

/// A small GSM8K-format data folder: `n` good rows per split.
pub fn gsm8k_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "question": format!("Tom has {i} apples and buys 2 more. How many apples does he have?"),
                "answer": format!("He has {i} + 2 = <<{i}+2={}>>{} apples.\n#### {}", i + 2, i + 2, i + 2),
            })
            .to_string()
                + "\n"
        })
        .collect()
}
