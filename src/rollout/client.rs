//! An OpenAI-compatible completions client with vLLM's extensions: prompts as
//! token ids, `return_token_ids`, sampled-token log-probabilities, and the
//! runtime LoRA API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).
//!
//! Failures that may pass (connection refused, timeouts, 408/429/5xx, an
//! answer that is not the JSON asked for) are retried with doubling waits up
//! to `max_retries` times; then the error names the URL and the last failure.
//! Other statuses (400, 401, 404) are the caller's mistake and fail at once
//! with the server's message.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ServerConfig;
use crate::common::CancelToken;

/// One `/v1/completions` request: `n` samples of one prompt.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The served model, or a loaded LoRA adapter's name.
    pub model: String,
    /// The prompt as token ids (chat template already applied by r1pipe's
    /// tokenizer, so server and trainer see the same tokens).
    pub prompt: Vec<u32>,
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// 0: no top-k cut (not sent).
    pub top_k: usize,
    pub stop: Vec<String>,
    /// Keep the stop string in the text (vLLM's name): a tool call's closing tag
    /// must stay, so that the call can be read and the model's tokens kept whole.
    pub include_stop_str_in_output: bool,
    pub seed: Option<u64>,
    /// Ask for the sampled tokens' log-probabilities (importance-sampling correction).
    pub logprobs: bool,
}

/// One sampled completion as the server returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    /// The sampled ids, EOS included when generation stopped on it (vLLM with
    /// `return_token_ids`); `None` from servers without the extension.
    pub token_ids: Option<Vec<u32>>,
    /// `stop` (EOS or a stop string) or `length`.
    pub finish_reason: String,
    /// vLLM: the stop string or token that ended generation; `None` for EOS.
    pub stop_reason: Option<Value>,
    /// Per sampled token, when asked for.
    pub logprobs: Option<Vec<f32>>,
}

pub struct Client {
    cfg: ServerConfig,
    base: String,
    agent: ureq::Agent,
    api_key: Option<String>,
    cancel: CancelToken,
}

/// Why one attempt failed, and whether another may succeed.
enum Failure {
    Retry(String),
    Fatal(String),
}

impl Client {
    /// A client for `cfg`; the API key is read now from the variable `api_key_env` names.
    pub fn new(cfg: &ServerConfig, cancel: CancelToken) -> Result<Client> {
        let api_key = match &cfg.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow!("rollout.api_key_env names `{var}`, which is not set: export {var}=<the server's API key>")
            })?),
            None => None,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .build();
        Ok(Client { base: cfg.url.trim_end_matches('/').to_string(), cfg: cfg.clone(), agent, api_key, cancel })
    }

    /// The API's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The served base model's name.
    pub fn model(&self) -> &str {
        &self.cfg.model
    }

    /// POST `body` to `path` and turn the answer into `T`, retrying what may pass.
    fn post<T>(&self, path: &str, body: &Value, parse: impl Fn(u16, &str) -> Result<T, Failure>) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let body = body.to_string();
        let t0 = Instant::now();
        let mut wait = self.cfg.retry_backoff_s;
        let mut attempt = 0;
        loop {
            self.cancel.check()?;
            attempt += 1;
            let mut req = self.agent.post(&url).set("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let failure = match req.send_string(&body) {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.into_string() {
                        Ok(text) => match parse(status, &text) {
                            Ok(v) => return Ok(v),
                            Err(f) => f,
                        },
                        Err(e) => Failure::Retry(format!("reading the answer: {e}")),
                    }
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let text = excerpt(&text);
                    if code == 408 || code == 429 || code >= 500 {
                        Failure::Retry(format!("HTTP {code}: {text}"))
                    } else {
                        match parse(code, &text) {
                            Ok(v) => return Ok(v),
                            Err(Failure::Fatal(m)) => Failure::Fatal(m),
                            Err(Failure::Retry(_)) => Failure::Fatal(format!("HTTP {code}: {text}")),
                        }
                    }
                }
                Err(ureq::Error::Transport(t)) => Failure::Retry(t.to_string()),
            };
            // A server may echo the request, headers included: the key never reaches a
            // message or a log.
            let failure = match failure {
                Failure::Fatal(m) => Failure::Fatal(self.redact(&m)),
                Failure::Retry(m) => Failure::Retry(self.redact(&m)),
            };
            match failure {
                Failure::Fatal(m) => bail!("rollout server {url}: {m}"),
                Failure::Retry(m) if attempt > self.cfg.max_retries as usize => bail!(
                    "rollout server {url}: no good answer after {attempt} attempts in {:.0} s; last: {m}. \
                     Is the server running and serving `{}`? (rollout.url, rollout.max_retries)",
                    t0.elapsed().as_secs_f64(),
                    self.cfg.model
                ),
                Failure::Retry(m) => {
                    tracing::warn!(url = %url, attempt, wait_s = wait, error = %m, "rollout request failed; retrying");
                    self.sleep(wait)?;
                    wait = (wait * 2.0).min(60.0);
                }
            }
        }
    }

    /// `text` with the API key's value and any bearer token or Authorization
    /// header value replaced by `[redacted]`.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        if let Some(k) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
            out = out.replace(k, "[redacted]");
        }
        redact_credentials(&out)
    }

    /// Sleep `secs`, waking early on cancellation.
    fn sleep(&self, secs: f64) -> Result<()> {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < until {
            self.cancel.check()?;
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        Ok(())
    }

    /// `n` completions of one prompt, in the server's index order.
    pub fn complete(&self, r: &CompletionRequest) -> Result<Vec<Choice>> {
        let mut body = json!({
            "model": r.model,
            "prompt": r.prompt,
            "n": r.n,
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p,
            // vLLM: the sampled ids (EOS included), so training sees exactly what was sampled.
            "return_token_ids": true,
            "include_stop_str_in_output": r.include_stop_str_in_output,
        });
        if r.top_k > 0 {
            body["top_k"] = json!(r.top_k);
        }
        if !r.stop.is_empty() {
            body["stop"] = json!(r.stop);
        }
        if let Some(s) = r.seed {
            body["seed"] = json!(s);
        }
        if r.logprobs {
            body["logprobs"] = json!(0);
        }
        self.post("/completions", &body, |_, text| parse_completions(text, r.n, r.logprobs).map_err(Failure::Retry))
    }

    /// Completions for many requests, `max_concurrency` in flight; the answers in request order.
    pub fn complete_all(&self, reqs: &[CompletionRequest]) -> Result<Vec<Vec<Choice>>> {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<Vec<Choice>>>>> = Mutex::new((0..reqs.len()).map(|_| None).collect());
        let failed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..self.cfg.max_concurrency.min(reqs.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= reqs.len() || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = self.complete(&reqs[i]);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    results.lock().expect("no worker panics holding the lock")[i] = Some(r);
                });
            }
        });
        let results = results.into_inner().expect("workers are done");
        let mut out = Vec::with_capacity(reqs.len());
        for r in results {
            match r {
                Some(Ok(c)) => out.push(c),
                Some(Err(e)) => return Err(e),
                // Not sent because another request had failed; that error is in the list.
                None => {}
            }
        }
        if out.len() != reqs.len() {
            // Every unsent request follows a failure, which returned above.
            bail!("rollout server {}: requests were left unsent", self.base);
        }
        Ok(out)
    }

    /// Load a PEFT adapter folder under `name` (vLLM: `--enable-lora` and
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). A name already loaded (an
    /// interrupted run that loaded it before) is unloaded and loaded again.
    pub fn load_lora_adapter(&self, name: &str, path: &Path) -> Result<()> {
        let body = json!({ "lora_name": name, "lora_path": path.display().to_string() });
        let already = self.post("/load_lora_adapter", &body, |code, text| match code {
            200..=299 => Ok(false),
            400 if text.contains("already") => Ok(true),
            404 => Err(Failure::Fatal(format!(
                "HTTP 404 on /load_lora_adapter: the server has no runtime LoRA API; start vLLM with \
                 `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ({})",
                excerpt(text)
            ))),
            _ => Err(Failure::Fatal(format!("loading adapter `{name}` from {}: {}", path.display(), excerpt(text)))),
        })?;
        if already {
            self.unload_lora_adapter(name)?;
            self.post("/load_lora_adapter", &body, |code, text| match code {
                200..=299 => Ok(()),
                _ => Err(Failure::Fatal(format!("reloading adapter `{name}`: {}", excerpt(text)))),
            })?;
        }
        Ok(())
    }

    /// Unload the adapter `name`; one the server does not know is already gone.
    pub fn unload_lora_adapter(&self, name: &str) -> Result<()> {
        let body = json!({ "lora_name": name });
        self.post("/unload_lora_adapter", &body, |code, text| match code {
            200..=299 | 404 => Ok(()),
            400 if text.contains("not found") || text.contains("cannot be found") => Ok(()),
            _ => Err(Failure::Fatal(format!("unloading adapter `{name}`: {}", excerpt(text)))),
        })
    }
}

/// At most 300 characters of a server's answer, for error messages.
fn excerpt(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

#[derive(Deserialize)]
struct CompletionsAnswer {
    choices: Vec<RawChoice>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    index: usize,
    text: String,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    stop_reason: Option<Value>,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    logprobs: Option<RawLogprobs>,
}

#[derive(Deserialize)]
struct RawLogprobs {
    token_logprobs: Vec<Option<f32>>,
}

/// The choices of a `/v1/completions` answer, checked to be the `n` asked for.
pub(crate) fn parse_completions(text: &str, n: usize, logprobs: bool) -> Result<Vec<Choice>, String> {
    let a: CompletionsAnswer =
        serde_json::from_str(text).map_err(|e| format!("not a completions answer ({e}): {}", excerpt(text)))?;
    if a.choices.len() != n {
        return Err(format!("asked for {n} completions, got {}", a.choices.len()));
    }
    let mut choices: Vec<RawChoice> = a.choices;
    choices.sort_by_key(|c| c.index);
    choices
        .into_iter()
        .map(|c| {
            // A missing value (vLLM returns null for some special tokens) counts as no
            // correction for that token, as in TRL. A server that returns none at all
            // (not every OpenAI-compatible one does) leaves it to the caller to mind.
            let lp = match (&c.logprobs, logprobs) {
                (Some(l), true) => Some(l.token_logprobs.iter().map(|x| x.unwrap_or(f32::NAN)).collect()),
                _ => None,
            };
            Ok::<Choice, String>(Choice {
                text: c.text,
                token_ids: c.token_ids,
                finish_reason: c.finish_reason.unwrap_or_else(|| "stop".into()),
                stop_reason: c.stop_reason.filter(|v| !v.is_null()),
                logprobs: lp,
            })
        })
        .collect()
}

/// Bearer tokens and Authorization header values in `text`, replaced by `[redacted]`.
fn redact_credentials(text: &str) -> String {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(?i)(authorization"?\s*[:=]\s*"?(?:bearer\s+)?|bearer\s+)[^\s",}]+"#)
            .expect("static regex")
    });
    RE.replace_all(text, "${1}[redacted]").into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_echoed_by_a_server_are_redacted() {
        for echoed in [
            r#"{"error": "bad key", "headers": {"Authorization": "Bearer sk-live-123"}}"#,
            "authorization: Bearer sk-live-123",
            "Authorization=sk-live-123",
            "token was bearer sk-live-123.",
        ] {
            let r = redact_credentials(echoed);
            assert!(!r.contains("sk-live-123") && r.contains("[redacted]"), "{echoed} -> {r}");
        }
    }
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    fn cfg(url: String) -> ServerConfig {
        ServerConfig {
            url,
            model: "m".into(),
            api_key_env: None,
            timeout_s: 5.0,
            max_concurrency: 4,
            max_retries: 3,
            retry_backoff_s: 0.01,
            adapter_dir: None,
        }
    }

    fn request() -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            prompt: vec![1, 2, 3],
            n: 2,
            max_tokens: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            stop: vec![],
            include_stop_str_in_output: false,
            seed: Some(7),
            logprobs: true,
        }
    }

    const ANSWER: &str = r#"{"choices":[
        {"index":1,"text":"b","finish_reason":"length","stop_reason":null,"token_ids":[5,6],"logprobs":{"token_logprobs":[-0.5,-1.5]}},
        {"index":0,"text":"a","finish_reason":"stop","stop_reason":null,"token_ids":[4,0],"logprobs":{"token_logprobs":[-0.25,null]}}]}"#;

    /// A server on a free port that answers each request with `answer(attempt, body)` → (status, text).
    fn serve(answer: impl Fn(u32, &str) -> (u16, String) + Send + 'static) -> (String, Arc<AtomicU32>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            for mut rq in server.incoming_requests() {
                let mut body = String::new();
                rq.as_reader().read_to_string(&mut body).unwrap();
                let (status, text) = answer(c.fetch_add(1, Ordering::SeqCst), &body);
                let _ = rq.respond(tiny_http::Response::from_string(text).with_status_code(status));
            }
        });
        (url, count)
    }

    #[test]
    fn choices_come_back_in_index_order_with_ids_and_logprobs() {
        let (url, _) = serve(|_, body| {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["prompt"], json!([1, 2, 3]));
            assert_eq!((v["n"].as_u64(), v["seed"].as_u64(), v["logprobs"].as_u64()), (Some(2), Some(7), Some(0)));
            assert!(v.get("top_k").is_none(), "top_k 0 is not sent");
            (200, ANSWER.to_string())
        });
        let c = Client::new(&cfg(url), CancelToken::default()).unwrap();
        let got = c.complete(&request()).unwrap();
        assert_eq!(got[0].text, "a");
        assert_eq!(got[0].token_ids, Some(vec![4, 0]));
        assert!(got[0].logprobs.as_ref().unwrap()[1].is_nan(), "a null logprob stays unknown");
        assert_eq!((got[1].finish_reason.as_str(), got[1].logprobs.clone()), ("length", Some(vec![-0.5, -1.5])));
    }

    #[test]
    fn transient_failures_are_retried_then_answered() {
        // Refused-like 503, then malformed JSON, then the answer.
        let (url, count) = serve(|i, _| match i {
            0 => (503, "overloaded".into()),
            1 => (200, "{\"choices\": [".into()),
            _ => (200, ANSWER.into()),
        });
        let c = Client::new(&cfg(url), CancelToken::default()).unwrap();
        assert_eq!(c.complete(&request()).unwrap().len(), 2);
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_server_that_never_answers_well_fails_naming_the_url_after_the_retries() {
        let (url, count) = serve(|_, _| (500, "boom".into()));
        let c = Client::new(&cfg(url.clone()), CancelToken::default()).unwrap();
        let e = format!("{:#}", c.complete(&request()).unwrap_err());
        assert!(e.contains(&format!("{url}/completions")) && e.contains("4 attempts") && e.contains("boom"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 4, "1 try + max_retries 3");
    }

    #[test]
    fn a_refused_connection_is_retried_and_named() {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/v1");
        let c = Client::new(&cfg(url.clone()), CancelToken::default()).unwrap();
        let e = format!("{:#}", c.complete(&request()).unwrap_err());
        assert!(e.contains(&url) && e.contains("4 attempts"), "{e}");
    }

    #[test]
    fn a_client_error_is_not_retried() {
        let (url, count) = serve(|_, _| (400, "{\"message\": \"max_tokens too large\"}".into()));
        let c = Client::new(&cfg(url), CancelToken::default()).unwrap();
        let e = format!("{:#}", c.complete(&request()).unwrap_err());
        assert!(e.contains("max_tokens too large"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_api_key_is_sent_from_its_variable_and_a_missing_one_is_named() {
        let mut c = cfg("http://127.0.0.1:1/v1".into());
        c.api_key_env = Some("R1PIPE_TEST_KEY_UNSET".into());
        let e = Client::new(&c, CancelToken::default()).err().unwrap().to_string();
        assert!(e.contains("R1PIPE_TEST_KEY_UNSET") && e.contains("export"), "{e}");

        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
        let seen = std::thread::spawn(move || {
            let rq = server.recv().unwrap();
            let auth = rq.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.to_string());
            rq.respond(tiny_http::Response::from_string(ANSWER)).unwrap();
            auth
        });
        std::env::set_var("R1PIPE_TEST_KEY_SET", "sk-test");
        let mut c = cfg(url);
        c.api_key_env = Some("R1PIPE_TEST_KEY_SET".into());
        Client::new(&c, CancelToken::default()).unwrap().complete(&request()).unwrap();
        assert_eq!(seen.join().unwrap().as_deref(), Some("Bearer sk-test"));
    }

    #[test]
    fn many_requests_come_back_in_order() {
        let (url, _) = serve(|_, body| {
            let v: Value = serde_json::from_str(body).unwrap();
            let p = v["prompt"][0].as_u64().unwrap();
            (200, format!(r#"{{"choices":[{{"index":0,"text":"{p}","finish_reason":"stop"}}]}}"#))
        });
        let c = Client::new(&cfg(url), CancelToken::default()).unwrap();
        let reqs: Vec<CompletionRequest> =
            (0..10).map(|i| CompletionRequest { prompt: vec![i], n: 1, logprobs: false, ..request() }).collect();
        let got = c.complete_all(&reqs).unwrap();
        let texts: Vec<&str> = got.iter().map(|c| c[0].text.as_str()).collect();
        assert_eq!(texts, ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        assert_eq!(got[0][0].token_ids, None, "a server without return_token_ids");
    }

    #[test]
    fn an_adapter_already_loaded_is_reloaded() {
        let (url, count) = serve(|i, body| match i {
            0 => (400, "The lora adapter 'a' has already been loaded.".into()),
            1 => {
                assert!(body.contains("\"lora_name\":\"a\"") && !body.contains("lora_path"));
                (200, "ok".into())
            }
            _ => (200, "Success".into()),
        });
        let c = Client::new(&cfg(url), CancelToken::default()).unwrap();
        c.load_lora_adapter("a", Path::new("/x")).unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 3, "load, unload, load");
    }
}
