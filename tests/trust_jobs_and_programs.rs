//! Trust, third pass: a job file edited after the head wrote it is refused
//! before it runs; a reward program that exits, floods or never reads fails
//! its stage (and only its stage) with a message, never r1pipe; credentials
//! and absurd time limits in a reward entry are refused before anything runs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::Project;

const ONE: &str = "name: one\nstages:\n  a: { kind: test.counter, with: { steps: 2, text: alpha } }\n";

/// A job file for stage `a` as the Slurm executor writes it, made from its record:
/// (work folder, job).
fn job_for_a(p: &Project) -> (PathBuf, serde_json::Value) {
    p.write("pipe.yaml", ONE);
    p.run(&["run", "pipe.yaml"]).ok();
    let record = fs::read_dir(p.cache().join("records")).unwrap().flatten().next().unwrap().path();
    let rec: serde_json::Value = serde_json::from_str(&fs::read_to_string(record).unwrap()).unwrap();
    let fp = rec["fingerprint"].as_str().unwrap().to_string();
    let work = p.cache().join("work").join(&fp);
    fs::create_dir_all(&work).unwrap();
    let job = serde_json::json!({
        "fingerprint": fp, "stage": "a", "kind": "test.counter", "params": rec["inputs"]["params"],
        "bindings": {}, "inputs": rec["inputs"], "project_root": p.root(), "device": "cpu",
        "device_class": "cpu", "dtype": "f32", "seed": 42, "work_dir": work,
    });
    (work, job)
}

fn exec_job(p: &Project, work: &Path, job: &serde_json::Value) -> (common::Run, serde_json::Value) {
    fs::write(work.join("job.json"), serde_json::to_vec(job).unwrap()).unwrap();
    let r = p.run(&["exec-job", work.to_str().unwrap()]);
    let exit: serde_json::Value = serde_json::from_str(&fs::read_to_string(work.join("exit.json")).unwrap()).unwrap();
    (r, exit)
}

#[test]
fn a_job_file_edited_after_the_head_wrote_it_is_refused_before_it_runs() {
    let p = Project::new();
    let (work, job) = job_for_a(&p);
    // As written: it runs, into the work folder's out/.
    let (r, exit) = exec_job(&p, &work, &job);
    assert_eq!((r.code, exit["status"].as_str()), (0, Some("ok")), "{}", r.stderr);
    assert!(work.join("out/result.txt").is_file());

    // Edited parameters (S-N3): the fingerprint says otherwise.
    let mut edited = job.clone();
    edited["params"]["steps"] = 1.into();
    let (r, exit) = exec_job(&p, &work, &edited);
    assert_eq!(r.code, 1);
    assert!(exit["error"].as_str().unwrap().contains("parameters are not the ones its fingerprint"), "{exit}");
    // Parameters and fingerprint inputs edited together: the fingerprint no longer matches.
    edited["inputs"]["params"]["steps"] = 1.into();
    let (_, exit) = exec_job(&p, &work, &edited);
    assert!(exit["error"].as_str().unwrap().contains("no longer gives its fingerprint"), "{exit}");

    // An edited output folder (S-N2) is not even read: outputs go to the work folder's out/.
    let elsewhere = p.root().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("keep.txt"), "mine").unwrap();
    let mut edited = job.clone();
    edited["out_dir"] = elsewhere.to_str().unwrap().into();
    let (r, _) = exec_job(&p, &work, &edited);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fs::read_to_string(elsewhere.join("keep.txt")).unwrap(), "mine");
    // A job claiming another work folder is refused.
    let mut edited = job.clone();
    edited["work_dir"] = elsewhere.to_str().unwrap().into();
    let (r, exit) = exec_job(&p, &work, &edited);
    assert_eq!(r.code, 1);
    assert!(exit["error"].as_str().unwrap().contains("its work folder is"), "{exit}");
}

fn grpo_project(program: &str) -> Project {
    let p = common::tiny_project(5, 12);
    p.write("reward.py", program);
    p.write(
        "pipe.yaml",
        "name: g\nstages:\n  gsm8k: { kind: download, with: { dataset: data/gsm8k } }\n  prompts: { kind: format, with: { data: \"${gsm8k.dataset}\" } }\n  grpo:\n    kind: grpo\n    with:\n      model: models/tiny\n      train: ${prompts.train}\n      rewards: [ { name: mine, command: [python3, reward.py], timeout_s: 5 } ]\n      per_device_train_batch_size: 4\n      num_generations: 4\n      max_completion_length: 8\n      max_steps: 3\n      save_steps: 1\n  side: { kind: test.counter, with: { steps: 20, step_ms: 50, text: side } }\n",
    );
    p
}

#[test]
fn a_reward_program_that_exits_between_batches_fails_its_stage_not_r1pipe() {
    // Answers the first batch, then exits: the next write meets a closed pipe.
    let p = grpo_project(
        "import sys, json\nline = sys.stdin.readline()\nn = len(json.loads(line)['samples'])\nprint(json.dumps({'rewards': [0.0] * n}), flush=True)\nsys.stderr.write('leaving early\\n')\n",
    );
    let r = p.run(&["run", "pipe.yaml", "--jobs", "2"]);
    // Before: r1pipe died of SIGPIPE (exit 141), taking `side` with it.
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("reward program `python3 reward.py`"), "{}", r.stderr);
    assert!(r.stderr.contains("it exited (status 0)") || r.stderr.contains("closed"), "{}", r.stderr);
    assert!(r.stderr.contains("leaving early"), "its stderr is shown: {}", r.stderr);
    assert!(r.stdout.contains("side: done in"), "the stage beside it finished and was kept:\n{}", r.stdout);
}

#[test]
fn a_reward_program_that_floods_or_never_reads_fails_within_its_time_limit() {
    for (program, says) in [
        // An endless line on stdout, without a newline.
        ("import sys\nsys.stdin.readline()\nwhile True: sys.stdout.write('x' * 65536)\n", "longer than"),
        // Never reads its input; the batch is written by a thread, the deadline covers it.
        ("import time\ntime.sleep(60)\n", "within the time limit"),
        // Floods stderr forever, never answering.
        ("import sys\nsys.stdin.readline()\nwhile True: sys.stderr.write('e' * 65536)\n", "within the time limit"),
    ] {
        let p = grpo_project(program);
        let t = std::time::Instant::now();
        let r = p.run(&["run", "pipe.yaml", "--until", "grpo", "-S", "grpo.max_steps=1"]);
        assert_eq!(r.code, 1, "{program}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{program}: {}", r.stderr);
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "{program}: took {:?}", t.elapsed());
    }
}

#[test]
fn credentials_and_absurd_time_limits_in_a_reward_entry_are_refused_before_anything_runs() {
    let p = Project::new();
    p.write("c.jsonl", "{\"completion\": \"a\", \"answer\": \"1\"}\n");
    for (entry, says) in [
        ("{ name: s, url: \"http://user:s3cret@localhost:1/score\" }", "user name or password in the URL"),
        ("{ name: s, command: [python3, -c, \"print(1)\"], timeout_s: 1.0e300 }", "is not a number of seconds"),
        ("{ name: s, url: \"http://localhost:1/\", timeout_s: 18446744073709551616 }", "is too large to read"),
    ] {
        p.write("set.yaml", &format!("- {entry}\n"));
        p.write(
            "pipe.yaml",
            "stages:\n  g:\n    kind: grpo\n    with: { model: HuggingFaceTB/SmolLM2-135M-Instruct, train: t.jsonl, rewards: set.yaml }\n",
        );
        p.write("t.jsonl", "");
        for args in [
            &["rewards", "--set", "set.yaml", "c.jsonl"][..],
            &["dag", "pipe.yaml"],
            &["status", "pipe.yaml"],
            &["run", "pipe.yaml", "--dry-run"],
        ] {
            let r = p.run(args);
            assert_ne!(r.code, 0, "{entry}");
            assert!(r.stderr.contains(says), "{entry}: {}", r.stderr);
            assert!(!r.stderr.contains("s3cret") && !r.stderr.contains("panicked"), "{}", r.stderr);
        }
    }
}

/// Whether a process is still running (not gone, not a zombie waiting for its parent).
fn running(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(") ").next().is_some_and(|rest| !rest.is_empty() && !rest.starts_with('Z'))
}

#[test]
fn a_reward_program_and_its_children_die_with_r1pipe_even_on_kill_9() {
    // The program starts a child of its own, says both ids, and then never answers.
    let p = grpo_project(
        "import os, subprocess, sys, time\nchild = subprocess.Popen(['sleep', '300'])\nopen('pids', 'w').write(f'{os.getpid()} {child.pid}')\nsys.stdin.readline()\ntime.sleep(300)\n",
    );
    p.write(
        "pipe.yaml",
        &fs::read_to_string(p.root().join("pipe.yaml")).unwrap().replace("timeout_s: 5", "timeout_s: 600"),
    );
    let mut r1pipe = p.spawn(&["run", "pipe.yaml", "--until", "grpo"]);
    let pids_file = p.root().join("pids");
    let t0 = std::time::Instant::now();
    while !pids_file.exists() || fs::read_to_string(&pids_file).unwrap().split(' ').count() < 2 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(120), "the reward program never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pids: Vec<i32> = fs::read_to_string(&pids_file).unwrap().split(' ').map(|s| s.parse().unwrap()).collect();
    assert!(pids.iter().all(|&pid| running(pid)));
    r1pipe.kill().unwrap(); // SIGKILL: nothing of r1pipe's own runs after this
    r1pipe.wait().unwrap();
    // The kernel ends the program at once (parent-death signal); the watcher in its
    // group ends the program's own child within a second or two.
    let t0 = std::time::Instant::now();
    while pids.iter().any(|&pid| running(pid)) && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left: Vec<&i32> = pids.iter().filter(|&&pid| running(pid)).collect();
    assert!(left.is_empty(), "still running after r1pipe was killed: {left:?}");
}
