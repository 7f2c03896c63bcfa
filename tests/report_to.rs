//! `report_to` (TRL's name) read back by the tools themselves: TensorBoard's
//! own event reader finds every logged number under TRL's tags at its step,
//! and a real MLflow tracking server holds the run's parameters, each step's
//! metrics and its status. A server that is down is a warning and the run
//! goes on; `report_to` never changes a stage's fingerprint.
//!
//! The tools come from PyPI into .venv-tracking (scripts/tracking-venv.sh);
//! without it these tests print why and skip.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// GRPO with evaluation during training: `train/…` and `eval/…` numbers.
fn pipeline(report_to: &str) -> String {
    format!(
        r#"
name: tracked
seed: 3
device: cpu
stages:
  gsm8k: {{ kind: download, with: {{ dataset: data/gsm8k }} }}
  prompts: {{ kind: format, with: {{ data: "${{gsm8k.dataset}}" }} }}
  grpo:
    kind: grpo
    with:
      model: models/tiny
      train: "${{prompts.train}}"
      rewards: r1-gsm8k
      max_steps: 4
      num_generations: 2
      per_device_train_batch_size: 2
      max_completion_length: 8
      eval_dataset: "${{prompts.test}}"
      eval_steps: 2
{report_to}"#
    )
}

fn python() -> Option<PathBuf> {
    let py = std::env::var_os("R1PIPE_TRACKING_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-tracking/bin/python"));
    py.exists().then_some(py)
}

/// The step log of the stage, as `tag → step → value` under TRL's tag names.
fn logged(p: &common::Project) -> BTreeMap<String, BTreeMap<u64, f64>> {
    let log = p.run(&["show", "grpo.log", "-p", "p.yaml"]).ok().stdout;
    let mut out: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for line in std::fs::read_to_string(log.trim()).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (tag, x) in r1pipe::tracking::tags(&v) {
            out.entry(tag).or_default().insert(step, x);
        }
    }
    out
}

#[test]
fn tensorboards_reader_finds_every_logged_number_under_trls_tags() {
    let Some(py) = python() else {
        common::skip("no TensorBoard to read the event files with (run scripts/tracking-venv.sh)");
        return;
    };
    let p = common::tiny_project(6, 8);
    p.write("p.yaml", &pipeline(""));
    p.run(&["run", "p.yaml", "-q"]).ok();
    // Adding report_to does not rerun anything: it is not part of the fingerprint.
    p.write("p.yaml", &pipeline("      report_to: tensorboard\n"));
    assert!(p.run(&["run", "p.yaml"]).ok().skipped("grpo"));
    p.run(&["run", "p.yaml", "-q", "--force", "grpo"]).ok();

    let dir = p.cache().join("tensorboard/tracked/grpo");
    let read = Command::new(&py)
        .arg("-c")
        .arg(
            "import json, sys\n\
             from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
             ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
             print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))",
        )
        .arg(&dir)
        .output()
        .unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let seen: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&read.stdout).unwrap();
    let want = logged(&p);
    for tag in ["train/loss", "train/reward", "train/kl", "train/learning_rate", "eval/accuracy_strict", "eval/reward"]
    {
        assert!(want.contains_key(tag), "the log has no {tag}");
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (tag, steps) in &want {
        let got: BTreeMap<u64, f64> = seen[tag].iter().copied().collect();
        assert_eq!(got.keys().collect::<Vec<_>>(), steps.keys().collect::<Vec<_>>(), "{tag}");
        for (step, x) in steps {
            // Stored as float32, as TensorBoard stores scalars.
            assert!(
                (got[step] - (*x as f32) as f64).abs() <= 1e-6 * x.abs().max(1.0),
                "{tag}@{step}: {} vs {x}",
                got[step]
            );
        }
    }
}

/// An MLflow tracking server on a free port, in a process group of its own,
/// stopped whole when dropped (it starts uvicorn and job workers of its own,
/// which outlive a kill of the server's first process alone).
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: signals to the group this test started; no memory is touched.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever of the group is left (workers that ignore TERM, or are slow to end).
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn mlflow_server(py: &Path, dir: &Path) -> Result<Server, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(dir.join("mlflow.log")).unwrap();
    let child = Command::new(py)
        .args(["-m", "mlflow", "server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
        .arg("--backend-store-uri")
        .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
        .arg("--default-artifact-root")
        .arg(dir.join("artifacts"))
        .current_dir(dir)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start mlflow server: {e}"))?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}") };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if ureq::get(&format!("{}/health", server.url)).call().is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "mlflow server did not answer within 120 s: {}",
        std::fs::read_to_string(dir.join("mlflow.log")).unwrap_or_default()
    ))
}

fn api(server: &Server, endpoint: &str, body: Value) -> Value {
    ureq::post(&format!("{}/api/2.0/mlflow/{endpoint}", server.url)).send_json(body).unwrap().into_json().unwrap()
}

#[test]
fn an_mlflow_server_receives_the_runs_parameters_metrics_and_status_and_one_that_is_down_is_a_warning() {
    let Some(py) = python() else {
        common::skip("no MLflow to serve the runs (run scripts/tracking-venv.sh)");
        return;
    };
    let p = common::tiny_project(6, 8);
    let server = match mlflow_server(&py, p.root()) {
        Ok(s) => s,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    p.write("p.yaml", &pipeline("      report_to: [mlflow]\n"));
    let r = p.cmd(&["run", "p.yaml", "-q"]).env("MLFLOW_TRACKING_URI", &server.url).output().unwrap();
    let r = common::Run::from(r).ok();
    assert!(!r.stderr.contains("warning: report_to"), "{}", r.stderr);

    let found = api(&server, "runs/search", serde_json::json!({"experiment_ids": [experiment(&server, "tracked")]}));
    let runs = found["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{found}");
    let run = &runs[0];
    assert_eq!(run["info"]["run_name"], "grpo");
    assert_eq!(run["info"]["status"], "FINISHED");
    let params: BTreeMap<&str, &str> = run["data"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| (kv["key"].as_str().unwrap(), kv["value"].as_str().unwrap()))
        .collect();
    assert_eq!(params.get("max_steps"), Some(&"4"), "{params:?}");
    assert_eq!(params.get("num_generations"), Some(&"2"), "{params:?}");
    let tags: Vec<&str> = run["data"]["tags"].as_array().unwrap().iter().filter_map(|t| t["key"].as_str()).collect();
    assert!(tags.contains(&"r1pipe.fingerprint"), "{tags:?}");

    // Each step's loss, read back as its history.
    let id = run["info"]["run_id"].as_str().unwrap();
    let history: Value = ureq::get(&format!("{}/api/2.0/mlflow/metrics/get-history", server.url))
        .query("run_id", id)
        .query("metric_key", "train/loss")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let got: BTreeMap<u64, f64> = history["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["step"].as_u64().unwrap_or(0), m["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, logged(&p)["train/loss"]);
    let eval = &run["data"]["metrics"].as_array().unwrap();
    assert!(eval.iter().any(|m| m["key"] == "eval/accuracy_strict"), "{eval:?}");

    // A server that is down: said once, and the stage finishes.
    drop(server);
    let r =
        p.cmd(&["run", "p.yaml", "--force", "grpo"]).env("MLFLOW_TRACKING_URI", "http://127.0.0.1:1").output().unwrap();
    let r = common::Run::from(r).ok();
    assert_eq!(r.stderr.matches("warning: report_to mlflow").count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("could not be reached") && r.stderr.contains("training goes on without it"),
        "{}",
        r.stderr
    );
}

fn experiment(server: &Server, name: &str) -> String {
    let v: Value = ureq::get(&format!("{}/api/2.0/mlflow/experiments/get-by-name", server.url))
        .query("experiment_name", name)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    v["experiment"]["experiment_id"].as_str().unwrap().to_string()
}
