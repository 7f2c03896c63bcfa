//! Helpers for tests that run the `r1pipe` binary on temporary projects.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Drop for Project {
    /// The cache's stored artifacts are read-only folders: open them so the temporary folder can go.
    fn drop(&mut self) {
        fn open_up(p: &Path) {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = fs::symlink_metadata(p) {
                if meta.is_dir() {
                    let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
                    for e in fs::read_dir(p).into_iter().flatten().flatten() {
                        open_up(&e.path());
                    }
                }
            }
        }
        open_up(self.dir.path());
    }
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
        c.args(args).current_dir(self.root()).env_remove("R1PIPE_CACHE").env_remove("RUST_LOG");
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

    /// The newest checkpoint step of the unfinished stage `stage` (found by its work folder's stage.json).
    pub fn stage_checkpoint_step(&self, stage: &str) -> Option<u64> {
        let work = self.cache().join("work");
        let mut best = None;
        for e in fs::read_dir(work).ok()?.flatten() {
            let meta: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(e.path().join("stage.json")).unwrap_or_default())
                    .unwrap_or_default();
            if meta["stage"] != stage {
                continue;
            }
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

    /// Wait until `stage` itself has a checkpoint of at least `at_least` (not any stage's).
    pub fn wait_for_stage_checkpoint(&self, stage: &str, at_least: u64, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.stage_checkpoint_step(stage).filter(|&s| s >= at_least) {
                return s;
            }
            assert!(t0.elapsed() < timeout, "no checkpoint ≥ {at_least} of `{stage}` within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// A project with a tiny random model (`models/tiny`, seeded) and GSM8K-shaped
/// data (`data/gsm8k/`, `train` rows for training and 2 for test): what the
/// training stages' tests start from.
pub fn tiny_project(seed: u64, train: usize) -> Project {
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), seed);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(train));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(2));
    p
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

/// A parquet file with `question` and `answer` string columns, snappy-compressed like the hub's.
pub fn write_parquet(path: &Path, rows: &[(String, String)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = std::sync::Arc::new(
        parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
        )
        .unwrap(),
    );
    let props =
        std::sync::Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for col in 0..2 {
        let values: Vec<ByteArray> =
            rows.iter().map(|r| ByteArray::from(if col == 0 { r.0.as_str() } else { r.1.as_str() })).collect();
        let mut c = rg.next_column().unwrap().unwrap();
        c.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        c.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

/// A repository the stand-in hub serves: `datasets/OWNER/NAME` or `OWNER/NAME`
/// (a model), with its files by name.
pub type HubRepoFiles = (String, Vec<(String, Vec<u8>)>);

/// A stand-in for the Hugging Face Hub serving one repository: answers
/// `requests` requests, then returns the URLs it was asked for.
pub fn hub_server(
    repo_path: &str,
    files: Vec<(String, Vec<u8>)>,
    requests: usize,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", server.server_addr().to_ip().unwrap());
    let repos = vec![(repo_path.to_string(), files)];
    let handle = std::thread::spawn(move || {
        let mut log = Vec::new();
        for _ in 0..requests {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_secs(30)) else { break };
            log.push(req.url().to_string());
            respond_as_hub(req, &repos);
        }
        log
    });
    (endpoint, handle)
}

/// A stand-in hub serving several repositories until it is dropped (or `stop`ped).
pub struct StandInHub {
    pub endpoint: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl StandInHub {
    pub fn start(repos: Vec<HubRepoFiles>) -> StandInHub {
        use std::sync::atomic::{AtomicBool, Ordering};
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", server.server_addr().to_ip().unwrap());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut log = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(100)) else { continue };
                log.push(req.url().to_string());
                respond_as_hub(req, &repos);
            }
            log
        });
        StandInHub { endpoint, stop, handle: Some(handle) }
    }

    /// Stop serving; the URLs that were asked for.
    pub fn stop(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().map(|h| h.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for StandInHub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One request, answered as the hub does for hf-hub: the revision info API and
/// `resolve` with ranges.
fn respond_as_hub(req: tiny_http::Request, repos: &[HubRepoFiles]) {
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    let url = req.url().to_string();
    let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap();
    for (repo_path, files) in repos {
        let api = match repo_path.strip_prefix("datasets/") {
            Some(id) => format!("/api/datasets/{id}/revision/main"),
            None => format!("/api/models/{repo_path}/revision/main"),
        };
        let resolve = format!("/{repo_path}/resolve/main/");
        if url == api {
            let siblings: Vec<_> = files.iter().map(|(n, _)| serde_json::json!({"rfilename": n})).collect();
            let body = serde_json::json!({"sha": SHA, "siblings": siblings}).to_string();
            let _ = req.respond(
                tiny_http::Response::from_string(body).with_header(header("Content-Type", "application/json")),
            );
            return;
        }
        if let Some((_, data)) = files.iter().find(|(n, _)| url == format!("{resolve}{n}")) {
            let range =
                req.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.to_string()).unwrap_or_default();
            let start: usize = range.trim_start_matches("bytes=").split('-').next().unwrap_or("0").parse().unwrap_or(0);
            let end = if range.ends_with("-0") { 0 } else { data.len().saturating_sub(1) };
            let body = data[start.min(data.len())..=end.min(data.len().saturating_sub(1))].to_vec();
            let etag = format!("\"{}\"", blake3::hash(data).to_hex());
            let _ = req.respond(
                tiny_http::Response::from_data(body)
                    .with_status_code(206)
                    .with_header(header("ETag", &etag))
                    .with_header(header("X-Repo-Commit", SHA))
                    .with_header(header("Content-Range", &format!("bytes {start}-{end}/{}", data.len()))),
            );
            return;
        }
    }
    let _ = req.respond(tiny_http::Response::from_string("not found").with_status_code(404));
}

/// The shared folder beside the repository (data and model files); fails loudly when absent.
pub fn shared() -> PathBuf {
    let p = std::env::var_os("R1PIPE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        p.join("models/smollm2-135m-instruct/tokenizer.json").exists(),
        "{} lacks models/smollm2-135m-instruct (set R1PIPE_SHARED)",
        p.display()
    );
    p
}

/// A tiny random Llama-shaped model with SmolLM2's real tokenizer, saved in the
/// Hugging Face layout at `dir`: fast enough for stage tests.
pub fn tiny_model(dir: &Path, seed: u64) {
    use r1pipe::model::{load, Config, Transformer};
    let cfg = Config::from_json(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 2048,
        "eos_token_id": 2, "bos_token_id": 1
    }))
    .unwrap();
    let m = Transformer::random(cfg, seed, &candle_core::Device::Cpu).unwrap();
    load::save(&m, &shared().join("models/smollm2-135m-instruct"), dir).unwrap();
}

/// Say that a test skips, and why, where `cargo test` shows it: straight to
/// the process's stderr, which the test harness does not capture (it keeps
/// `println!` of a passing test to itself).
#[allow(dead_code)]
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// GRPO on a tiny model, as tests/grpo.rs trains it, checkpointing every step,
/// with `executor` (a flow mapping) as the pipeline's executor: the cluster
/// tests stop it mid-way and compare its weights with an uninterrupted run.
pub fn cluster_grpo_project(executor: &str) -> Project {
    const GRPO: &str = r#"
name: grpo-cluster
seed: 3
device: cpu
executor: EXECUTOR
stages:
  gsm8k: { kind: download, with: { path: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}", system_prompt: "Answer." } }
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: ${prompts.train}
      rewards: [ { name: regex_match, params: { pattern: "^[A-Za-z]" } } ]
      learning_rate: 0.05
      lr_scheduler_type: constant
      per_device_train_batch_size: 8
      gradient_accumulation_steps: 2
      num_generations: 8
      max_completion_length: 12
      max_steps: 24
      save_steps: 1
"#;
    let p = Project::new();
    tiny_model(&p.root().join("models/tiny"), 5);
    p.write("data/gsm8k/train.jsonl", &gsm8k_rows(12));
    p.write("data/gsm8k/test.jsonl", &gsm8k_rows(2));
    p.write("pipe.yaml", &GRPO.replace("EXECUTOR", executor));
    p
}

/// The bytes of the finished `grpo` stage's weights in `pipe.yaml`'s cache.
pub fn grpo_weights(p: &Project) -> Vec<u8> {
    let dir = p.run(&["show", "grpo.model", "-p", "pipe.yaml"]).ok().stdout.trim().to_string();
    fs::read(format!("{dir}/model.safetensors")).unwrap()
}

/// The work folder of stage `stage` in the project's cache (while it is unfinished).
pub fn work_of(p: &Project, stage: &str) -> PathBuf {
    fs::read_dir(p.cache().join("work"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|w| {
            fs::read_to_string(w.join("stage.json")).unwrap_or_default().contains(&format!("\"stage\": \"{stage}\""))
        })
        .unwrap()
}

/// The id of the stage's current job, from the record the head keeps beside
/// it, checked to be a job of executor `kind`.
pub fn submitted_job_id(p: &Project, stage: &str, kind: &str) -> String {
    let text = fs::read_to_string(work_of(p, stage).join("submitted.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["executor"]["kind"], kind, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// `pipe.yaml` of `p` rewritten for a cluster whose nodes do not see the head's
/// cache: `shared_filesystem: false` in its executor's flow mapping, and a folder
/// remote (`remote-store/` in the project) as what head and jobs share.
pub fn without_shared_filesystem(p: &Project) {
    let text = fs::read_to_string(p.root().join("pipe.yaml")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if let Some(settings) = line.strip_prefix("executor: {") {
            let remote = p.root().join("remote-store");
            out.push_str(&format!("remote: file://{}\n", remote.display()));
            out.push_str(&format!("executor: {{ shared_filesystem: false,{settings}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(out.contains("shared_filesystem: false"), "no `executor: {{…}}` line in {text}");
    p.write("pipe.yaml", &out);
}

/// The node-local scratch folder the jobs of `without_shared_filesystem` keep
/// their caches in (`R1PIPE_JOB_SCRATCH`, passed to jobs with the head's environment).
pub fn job_scratch(p: &Project) -> PathBuf {
    p.root().join("node-scratch")
}

/// The newest checkpoint step in any job's scratch cache.
pub fn scratch_checkpoint_step(p: &Project) -> Option<u64> {
    let mut best = None;
    for job in fs::read_dir(job_scratch(p)).ok()?.flatten() {
        for work in fs::read_dir(job.path().join("work")).into_iter().flatten().flatten() {
            for c in fs::read_dir(work.path().join("checkpoints")).into_iter().flatten().flatten() {
                if let Some(s) =
                    c.file_name().to_string_lossy().strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
                {
                    best = best.max(Some(s));
                }
            }
        }
    }
    best
}

/// Wait until a job's scratch cache has a checkpoint of at least `at_least`.
pub fn wait_for_scratch_checkpoint(p: &Project, at_least: u64, timeout: Duration) {
    let t0 = Instant::now();
    while scratch_checkpoint_step(p).is_none_or(|s| s < at_least) {
        assert!(t0.elapsed() < timeout, "no job checkpoint ≥ {at_least} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a run through the remote must leave: no job wrote into the head's cache
/// (no exit file in its work folders: exits came through the remote), the jobs'
/// scratch caches are gone, and the remote keeps nothing of the jobs.
pub fn assert_jobs_left_no_trace(p: &Project) {
    for w in fs::read_dir(p.cache().join("work")).into_iter().flatten().flatten() {
        assert!(!w.path().join("exit.json").exists(), "a job wrote into the head's cache: {}", w.path().display());
    }
    let left: Vec<_> = fs::read_dir(job_scratch(p)).into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "scratch caches left behind: {left:?}");
    let mut files = Vec::new();
    let mut dirs = vec![p.root().join("remote-store/jobs")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.is_empty(), "the remote keeps job files: {files:?}");
}

/// The variable that tells a job where its scratch cache goes.
pub const SCRATCH_VAR: &str = "R1PIPE_JOB_SCRATCH";

/// `r1pipe run pipe.yaml` in `p` (as `without_shared_filesystem` wrote it), its
/// jobs' scratch caches under `job_scratch(p)`; it must succeed.
pub fn run_without_shared_filesystem(p: &Project) -> Run {
    let r: Run = p.cmd(&["run", "pipe.yaml"]).env(SCRATCH_VAR, job_scratch(p)).output().unwrap().into();
    r.ok()
}
