//! Rewards from outside the binary: a program that answers JSON lines on its
//! stdin/stdout, or an HTTP endpoint (a reward-model server). Both receive a
//! batch as `{"samples": [{"prompt", "completion", "answer",
//! "completion_tokens"}, …]}` and answer `{"rewards": [number or null, …]}`,
//! one value per sample in order (null: the reward does not apply there).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::functions::{RewardFn, Sample};
use crate::common::supervised::{Limits, Supervised};

/// The longest `timeout_s` a program or server may be given (a day): beyond it a
/// duration is refused where the set is read rather than overflowing later.
pub const MAX_TIMEOUT_S: f64 = 86_400.0;

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

/// A reward computed by a program started once per stage run (on its first
/// batch, so checking a pipeline starts nothing) and fed one JSON line per
/// batch, under the supervisor every program r1pipe starts runs under
/// (`common::supervised`: its own process group, a deadline over writing and
/// reading, capped output, killed whole when the stage ends).
pub struct CommandReward {
    /// The program and its arguments, as written.
    pub command: Vec<String>,
    /// The folder it runs in (the project root), where relative paths resolve.
    pub dir: PathBuf,
    pub timeout: Duration,
    running: Mutex<Option<Supervised>>,
}

impl CommandReward {
    pub fn new(command: Vec<String>, dir: &Path, timeout_s: f64) -> CommandReward {
        CommandReward {
            command,
            dir: dir.to_path_buf(),
            // Checked finite, positive and at most MAX_TIMEOUT_S where the set is read.
            timeout: Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::from_secs_f64(MAX_TIMEOUT_S)),
            running: Mutex::new(None),
        }
    }

    fn shown(&self) -> String {
        self.command.join(" ")
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
            let started = Supervised::spawn(&self.command, &self.dir, Limits::default())
                .with_context(|| format!("reward program `{}`", self.shown()))?;
            *guard = Some(started);
        }
        let Some(running) = guard.as_mut() else { bail!("the reward program is not running") };
        let line = serde_json::to_string(&request(samples))?;
        let hint = format!("{:.1} s; `timeout_s` raises it", self.timeout.as_secs_f64());
        let reply = running
            .exchange(&line, Instant::now() + self.timeout, &hint)
            .and_then(|reply| parse_reply(&reply, samples.len()));
        match reply {
            Ok(v) => Ok(v),
            Err(e) => {
                // A program that failed once is not trusted with the next batch: stop it
                // (its whole process group), and show what it said on stderr.
                let stderr = running.stop();
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
    /// The environment variable whose value is sent as a bearer token.
    pub api_key_env: Option<String>,
    agent: ureq::Agent,
}

impl UrlReward {
    pub fn new(url: String, timeout_s: f64, api_key_env: Option<String>) -> UrlReward {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::from_secs_f64(MAX_TIMEOUT_S)))
            .build();
        UrlReward { url, api_key_env, agent }
    }

    /// The URL as errors show it: any credentials in it replaced.
    fn shown(&self) -> String {
        crate::common::redact::url(&self.url)
    }
}

impl RewardFn for UrlReward {
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<Option<f32>>> {
        let mut req = self.agent.post(&self.url);
        if let Some(var) = &self.api_key_env {
            let token = std::env::var(var).map_err(|_| {
                anyhow!("reward server {}: the environment variable {var} (api_key_env) is not set", self.shown())
            })?;
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        let reply = match req.send_json(request(samples)) {
            // A redirect it did not follow (307/308 on a POST): not a reply to parse.
            Ok(r) if !(200..300).contains(&r.status()) => bail!(
                "reward server {} answered HTTP {}{}",
                self.shown(),
                r.status(),
                if (300..400).contains(&r.status()) { " (a redirect: give the URL it points to)" } else { "" }
            ),
            Ok(r) => r
                .into_string()
                .map_err(|e| anyhow!("reward server {}: reading its reply failed: {}", self.shown(), e.kind()))?,
            // Named by its status only: neither the body nor the reason phrase is shown (a server
            // may echo the request's headers, the token among them).
            Err(ureq::Error::Status(code, _)) => bail!("reward server {} answered HTTP {code}", self.shown()),
            // The transport error's own text repeats the URL: its kind and cause are enough.
            Err(ureq::Error::Transport(t)) => bail!(
                "reward server {}: {}{}",
                self.shown(),
                t.kind(),
                t.message().map(|m| format!(" ({m})")).unwrap_or_default()
            ),
        };
        parse_reply(&reply, samples.len()).map_err(|e| anyhow!("reward server {}: {e}", self.shown()))
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
