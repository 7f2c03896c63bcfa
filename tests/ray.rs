//! The Ray executor on a real one-node Ray cluster (`scripts/ray-local.sh up`,
//! which CI runs first; `R1PIPE_RAY_ADDRESS` names another): stages as Ray
//! jobs with the same results as a local run, a failing job named with its
//! log, a job stopped from outside named and resumed by the next run, a head
//! that dies followed by the next, Ctrl-C checkpointing the jobs, a GRPO job
//! killed mid-way resubmitted to the weights of one uninterrupted run, and
//! clusters that cannot or do not answer. Without a cluster these tests say
//! so and skip.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::time::Duration;

use common::Project;

fn address() -> String {
    std::env::var("R1PIPE_RAY_ADDRESS").unwrap_or_else(|_| "http://127.0.0.1:8265".into())
}

/// Whether the Jobs API answers; if not, why.
fn cluster() -> Result<(), String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    match agent.get(&format!("{}/api/version", address())).call() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{} does not answer ({e}); scripts/ray-local.sh up starts one", address())),
    }
}

macro_rules! need_cluster {
    () => {
        if let Err(why) = cluster() {
            common::skip(&format!("no Ray cluster: {why}"));
            return;
        }
    };
}

const PIPE: &str = r#"
name: ray-cluster
executor: { kind: ray, address: ADDRESS, poll_s: 0.2, signal_grace_s: 30 }
stages:
  a: { kind: test.counter, with: { steps: STEPS, step_ms: STEP_MS, text: a } }
  b: { kind: test.counter, resources: { cpus: 1, mem: 200M }, with: { steps: 3, text: b } }
  c: { kind: test.counter, with: { steps: 1, text: c, inputs: { a: "${a.result}", b: "${b.result}" } } }
"#;

fn pipe(steps: u64, step_ms: u64) -> String {
    PIPE.replace("ADDRESS", &address()).replace("STEPS", &steps.to_string()).replace("STEP_MS", &step_ms.to_string())
}

fn result(p: &Project, stage: &str) -> String {
    fs::read_to_string(p.run(&["show", stage, "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap()
}

/// The process of the job running stage `stage` (its `r1pipe exec-job`).
fn job_pid(p: &Project, stage: &str) -> i32 {
    let work = common::work_of(p, stage);
    let out =
        std::process::Command::new("pgrep").args(["-f", &format!("exec-job {}", work.display())]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().next().expect("the job's process").trim().parse().unwrap()
}

#[test]
fn stages_run_as_ray_jobs_and_give_what_a_local_run_gives() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert_eq!(r.stdout.matches(": Ray job r1pipe-").count(), 3, "{}", r.stdout);
    let on_ray = result(&p, "c.result");
    // Ray has the job, under the name r1pipe gave it, finished.
    let line = r.stdout.lines().find(|l| l.contains("] c: Ray job ")).unwrap();
    let id = line.split("Ray job ").nth(1).unwrap().split(' ').next().unwrap();
    let reply: serde_json::Value =
        ureq::get(&format!("{}/api/jobs/{id}", address())).call().unwrap().into_json().unwrap();
    assert_eq!(reply["status"], "SUCCEEDED", "{reply}");
    assert_eq!(reply["metadata"]["r1pipe_stage"], "c", "{reply}");

    let q = Project::new();
    q.write("pipe.yaml", &pipe(4, 10));
    let r = q.run(&["run", "pipe.yaml", "--executor", "local"]).ok();
    assert!(!r.stdout.contains("Ray job"), "{}", r.stdout);
    assert_eq!(result(&q, "c.result"), on_ray);
    assert!(p.run(&["run", "pipe.yaml"]).ok().stdout.contains("everything is up to date"));
}

#[test]
fn a_failing_job_is_named_with_the_last_lines_of_its_log() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10).replace("text: a }", "text: a, fail_at: 2 }"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("a: failed: Ray job r1pipe-a-"), "{}", r.stderr);
    assert!(r.stderr.contains("last lines of its log") && r.stderr.contains("r1pipe exec-job: failed"), "{}", r.stderr);
}

#[test]
fn a_job_stopped_from_outside_fails_its_stage_and_the_next_run_resumes_it() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(40, 100));
    let head = p
        .cmd(&["run", "pipe.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.wait_for_stage_checkpoint("a", 3, Duration::from_secs(120));
    // What `ray job stop ID` does.
    let id = common::submitted_job_id(&p, "a", "ray");
    ureq::post(&format!("{}/api/jobs/{id}/stop", address())).call().unwrap();
    let out = head.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("a: failed: Ray job {id} was stopped outside r1pipe; its checkpoint is kept")),
        "{stderr}"
    );
    // Nothing of the stopped job was committed; the next run resumes it.
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stdout.contains("a: resume from step"), "{}", r.stdout);
    assert_eq!(result(&p, "a.result"), "a\ncount=40\n");
}

#[test]
fn when_the_head_dies_its_job_runs_on_and_the_next_run_follows_it() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(30, 100));
    let mut head = p.cmd(&["run", "pipe.yaml"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    p.wait_for_stage_checkpoint("a", 3, Duration::from_secs(120));
    head.kill().unwrap();
    head.wait().unwrap();
    let id = common::submitted_job_id(&p, "a", "ray");
    let status = p.run(&["status", "pipe.yaml"]).ok().stdout;
    assert!(status.contains(&format!("Ray job {id} RUNNING")), "{status}");
    // Even a run told to work here follows it: two writers of one work folder would clash.
    let r = p.run(&["run", "pipe.yaml", "--executor", "local"]).ok();
    assert!(r.stdout.contains(&format!("a: following Ray job {id}, submitted by an earlier run")), "{}", r.stdout);
    assert!(
        !r.stdout.lines().any(|l| l.contains("a: Ray job ") && l.contains("(log ")),
        "submitted again: {}",
        r.stdout
    );
    assert_eq!(result(&p, "a.result"), "a\ncount=30\n");
}

#[test]
fn ctrl_c_on_the_head_makes_its_jobs_checkpoint_and_the_next_run_resumes() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(40, 100));
    let head = p.cmd(&["run", "pipe.yaml"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    p.wait_for_stage_checkpoint("a", 3, Duration::from_secs(120));
    // SAFETY: kill sends SIGINT (what Ctrl-C sends) to the child we started.
    unsafe { libc::kill(head.id() as i32, libc::SIGINT) };
    let out = head.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("a: interrupted; checkpoint at step"), "{stdout}");
    let exit = fs::read_to_string(common::work_of(&p, "a").join("exit.json")).unwrap();
    assert!(exit.contains("\"interrupted\""), "the job checkpointed and said so: {exit}");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stdout.contains("a: resume from step"), "{}", r.stdout);
    assert_eq!(result(&p, "a.result"), "a\ncount=40\n");
}

#[test]
fn a_grpo_job_killed_mid_way_is_resubmitted_and_ends_with_the_weights_of_one_uninterrupted_run() {
    need_cluster!();
    let setup = || common::cluster_grpo_project(&format!("{{ kind: ray, address: {}, poll_s: 0.2 }}", address()));
    let local = setup();
    local.run(&["run", "pipe.yaml", "--executor", "local"]).ok();

    let p = setup();
    let head = p.cmd(&["run", "pipe.yaml"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    p.wait_for_stage_checkpoint("grpo", 4, Duration::from_secs(300));
    // The job's process dies without a word (a node lost, an OOM kill).
    // SAFETY: SIGKILL to the job's own process, found by its command line.
    unsafe { libc::kill(job_pid(&p, "grpo"), libc::SIGKILL) };
    let out = head.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("died without saying how") && stdout.contains("resubmitting from its checkpoint"),
        "{stdout}"
    );
    assert!(
        common::grpo_weights(&p) == common::grpo_weights(&local),
        "two Ray jobs did not end where one local run did"
    );
}

#[test]
fn resources_no_node_has_are_refused_before_a_job_is_submitted() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(2, 1).replace("resources: { cpus: 1, mem: 200M }", "resources: { gpus: 64 }"));
    let r = p.run(&["run", "pipe.yaml", "--only", "b"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("b: failed: stage `b` asks for 1 CPUs, 64 GPUs"), "{}", r.stderr);
    assert!(
        r.stderr.contains("no node of the Ray cluster at") && r.stderr.contains("autoscaling: true"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("Ray job"), "nothing submitted: {}", r.stdout);
}

/// A server on a free local port that answers every request with `reply`; its address.
fn fake_dashboard(reply: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_cluster_that_does_not_answer_or_answers_garbage_is_named_and_nothing_is_recorded() {
    // No Ray needed: a closed port, then a server that speaks HTTP and no JSON.
    let p = Project::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    p.write(
        "pipe.yaml",
        &PIPE.replace("ADDRESS", &format!("http://127.0.0.1:{closed}")).replace("STEPS", "2").replace("STEP_MS", "1"),
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!("the Ray cluster at http://127.0.0.1:{closed} does not answer")),
        "{}",
        r.stderr
    );

    let garbage = fake_dashboard("HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<html>hi!");
    let q = Project::new();
    let text = PIPE.replace("ADDRESS", &garbage).replace("STEPS", "2").replace("STEP_MS", "1");
    q.write("pipe.yaml", &text.replace("poll_s: 0.2", "poll_s: 0.2, autoscaling: true"));
    let r = q.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("answered POST /api/jobs/ with something that is not JSON"), "{}", r.stderr);
    assert!(!r.stderr.contains("<html>"), "the reply's text is not echoed: {}", r.stderr);
    assert!(q.run(&["status", "pipe.yaml"]).ok().stdout.lines().all(|l| !l.contains("cached")));
}

#[test]
fn an_executor_entry_that_cannot_work_is_refused_with_its_line() {
    let p = Project::new();
    p.write("pipe.yaml", "name: x\nexecutor: { kind: ray, address: \"ray://head:10001\" }\nstages:\n  a: { kind: test.counter, with: { steps: 1 } }\n");
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("pipe.yaml:2")
            && r.stderr.contains("executor.address")
            && r.stderr.contains("http://HEAD:8265"),
        "{}",
        r.stderr
    );
    p.write(
        "pipe.yaml",
        "name: x\nexecutor: { kind: kubernetes }\nstages:\n  a: { kind: test.counter, with: { steps: 1 } }\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no executor `kubernetes`") && r.stderr.contains("local, slurm, ray"), "{}", r.stderr);
    let r = p.run(&["run", "pipe.yaml", "--executor", "flux"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("[possible values: local, slurm, ray]"), "{}", r.stderr);
}

#[test]
fn without_a_shared_filesystem_ray_jobs_reach_their_artifacts_through_the_remote() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10));
    common::without_shared_filesystem(&p);
    // The head's R1PIPE_* variables travel in each job's runtime_env.
    let r = common::run_without_shared_filesystem(&p);
    assert_eq!(r.stdout.matches(": Ray job r1pipe-").count(), 3, "{}", r.stdout);
    assert_eq!(r.stdout.matches("fetched its outputs from").count(), 3, "{}", r.stdout);
    common::assert_jobs_left_no_trace(&p);

    let q = Project::new();
    q.write("pipe.yaml", &pipe(4, 10));
    q.run(&["run", "pipe.yaml", "--executor", "local"]).ok();
    assert_eq!(result(&p, "c.result"), result(&q, "c.result"));
}
