//! Rewards from outside the binary: a program that answers JSON lines on its
//! stdin/stdout, or an HTTP endpoint (a reward-model server). Both receive a
//! batch as `{"samples": [{"prompt", "completion", "answer",
//! "completion_tokens"}, …]}` and answer `{"rewards": [number or null, …]}`,
//! one value per sample in order (null: the reward does not apply there).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::functions::{RewardFn, Sample};

/// How many of a program's last stderr lines an error shows.
const STDERR_TAIL: usize = 20;

fn request(samples: &[Sample]) -> Value {
    let samples: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({"prompt": s.prompt, "completion": s.completion, "answer": s.answer, "completion_tokens": s.tokens})
        })
        .collect();
    json!({ "samples": samples })
}

#[derive(Deserialize)]
struct Reply {
    rewards: Vec<Option<f64>>,
}

/// The scores in a reply line, checked: one per sample, each finite or null.
fn parse_reply(line: &str, expected: usize) -> Result<Vec<Option<f32>>> {
    let reply: Reply = serde_json::from_str(line.trim()).map_err(|e| {
        let shown: String = line.trim().chars().take(200).collect();
        anyhow!("its reply is not {{\"rewards\": [number or null, …]}} ({e}): `{shown}`")
    })?;
    if reply.rewards.len() != expected {
        bail!("it answered {} rewards for {expected} samples", reply.rewards.len());
    }
    reply
        .rewards
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Some(x) if !x.is_finite() || x.abs() > f32::MAX as f64 => bail!("reward {i} is {x}, not a finite number"),
            r => Ok(r.map(|x| x as f32)),
        })
        .collect()
}

/// A running reward program and the threads that read its output.
struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reward computed by a program started once per stage run (on its first
/// batch, so checking a pipeline starts nothing) and fed one JSON line per batch.
pub struct CommandReward {
    /// The program and its arguments, as written.
    pub command: Vec<String>,
    /// The folder it runs in (the project root), where relative paths resolve.
    pub dir: PathBuf,
    pub timeout: Duration,
    running: Mutex<Option<Running>>,
}

impl CommandReward {
    pub fn new(command: Vec<String>, dir: &Path, timeout_s: f64) -> CommandReward {
        CommandReward {
            command,
            dir: dir.to_path_buf(),
            timeout: Duration::from_secs_f64(timeout_s),
            running: Mutex::new(None),
        }
    }

    fn shown(&self) -> String {
        self.command.join(" ")
    }

    fn start(&self) -> Result<Running> {
        let (program, args) = self.command.split_first().ok_or_else(|| anyhow!("the command is empty"))?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{program}` in {}", self.dir.display()))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("the program's standard streams could not be opened");
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let sink = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let Ok(mut t) = sink.lock() else { break };
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Running { child, stdin, lines, stderr: tail })
    }

    fn exchange(&self, running: &mut Running, samples: &[Sample]) -> Result<Vec<Option<f32>>> {
        let mut line = serde_json::to_string(&request(samples))?;
        line.push('\n');
        running
            .stdin
            .write_all(line.as_bytes())
            .and_then(|_| running.stdin.flush())
            .map_err(|e| anyhow!("writing the batch to it failed ({e}): {}", exit_status(&mut running.child)))?;
        match running.lines.recv_timeout(self.timeout) {
            Ok(Ok(reply)) => parse_reply(&reply, samples.len()),
            Ok(Err(e)) => bail!("reading its reply failed: {e}"),
            Err(RecvTimeoutError::Timeout) => {
                bail!("it did not answer within {:.1} s (`timeout_s` raises the limit)", self.timeout.as_secs_f64())
            }
            Err(RecvTimeoutError::Disconnected) => {
                // The reader thread saw the end of stdout: the exit usually follows at once.
                bail!("it closed its output without answering: {}", exit_status(&mut running.child))
            }
        }
    }
}

/// How the program ended, waiting up to 2 s for it to end.
fn exit_status(child: &mut Child) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return format!("it {s}"),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return "it is still running".into(),
            Err(e) => return format!("its state is unknown ({e})"),
        }
    }
}

impl RewardFn for CommandReward {
    /// The arguments (the program included) that name existing files, resolved
    /// against the project root: editing the script reruns the stage.
    fn files(&self) -> Vec<PathBuf> {
        self.command.iter().map(|a| self.dir.join(a)).filter(|p| p.is_file()).collect()
    }

    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<Option<f32>>> {
        let mut guard = self.running.lock().map_err(|_| anyhow!("the reward program's lock was poisoned"))?;
        if guard.is_none() {
            *guard = Some(self.start().with_context(|| format!("reward program `{}`", self.shown()))?);
        }
        let Some(running) = guard.as_mut() else { bail!("the reward program is not running") };
        match self.exchange(running, samples) {
            Ok(v) => Ok(v),
            Err(e) => {
                // A program that failed once is not trusted with the next batch: stop it, and
                // show what it said on stderr.
                let stderr: Vec<String> =
                    running.stderr.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
                *guard = None;
                let tail = if stderr.is_empty() {
                    " (nothing on stderr)".to_string()
                } else {
                    format!("; its last stderr lines:\n  {}", stderr.join("\n  "))
                };
                Err(anyhow!("reward program `{}`: {e:#}{tail}", self.shown()))
            }
        }
    }

    fn range(&self) -> (f32, f32) {
        (f32::NEG_INFINITY, f32::INFINITY)
    }
}

/// A reward computed by an HTTP endpoint: the batch POSTed as JSON.
pub struct UrlReward {
    pub url: String,
    agent: ureq::Agent,
}

impl UrlReward {
    pub fn new(url: String, timeout_s: f64) -> UrlReward {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs_f64(timeout_s))
            .build();
        UrlReward { url, agent }
    }
}

impl RewardFn for UrlReward {
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<Option<f32>>> {
        let reply = match self.agent.post(&self.url).send_json(request(samples)) {
            Ok(r) => {
                r.into_string().map_err(|e| anyhow!("reward server {}: reading its reply failed: {e}", self.url))?
            }
            // The body of an error reply is not shown: a server may echo the request's headers.
            Err(ureq::Error::Status(code, r)) => {
                bail!("reward server {} answered HTTP {code} {}", self.url, r.status_text())
            }
            Err(ureq::Error::Transport(t)) => bail!("reward server {}: {t}", self.url),
        };
        parse_reply(&reply, samples.len()).map_err(|e| anyhow!("reward server {}: {e}", self.url))
    }

    fn range(&self) -> (f32, f32) {
        (f32::NEG_INFINITY, f32::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked_for_count_shape_and_finiteness() {
        assert_eq!(parse_reply(r#"{"rewards": [1, null, -0.5]}"#, 3).unwrap(), vec![Some(1.0), None, Some(-0.5)]);
        let e = parse_reply(r#"{"rewards": [1]}"#, 2).unwrap_err().to_string();
        assert!(e.contains("1 rewards for 2 samples"), "{e}");
        let e = parse_reply(r#"{"rewards": [1e300]}"#, 1).unwrap_err().to_string();
        assert!(e.contains("not a finite number"), "{e}");
        let e = parse_reply("[1, 2]", 2).unwrap_err().to_string();
        assert!(e.contains("is not {\"rewards\""), "{e}");
    }
}
