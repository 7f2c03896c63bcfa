//! The Slurm executor on a real one-node cluster (`scripts/slurm-local.sh up`,
//! which CI runs first): stages as jobs with the same results as a local run,
//! a failing job named with its log, and a job stopped mid-way (as a time
//! limit or a preemption does) resubmitted and resumed to the same result.
//! Without a cluster these tests say so and skip.

mod common;

use std::fs;
use std::time::Duration;

use common::Project;

/// Whether a Slurm cluster answers here; if not, the reason, printed by the caller.
fn cluster() -> Result<(), String> {
    match std::process::Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Ok(o) if o.status.success() => {
            let states = String::from_utf8_lossy(&o.stdout).trim().to_string();
            // A node that can take jobs; a cluster whose nodes are all down would only time out.
            if states.lines().any(|s| ["idle", "mixed", "allocated"].contains(&s.trim_end_matches('*'))) {
                Ok(())
            } else {
                Err(format!("no node takes jobs (sinfo: {states:?})"))
            }
        }
        Ok(o) => Err(format!("sinfo answered: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("no sinfo ({e}); scripts/slurm-local.sh up starts a one-node cluster")),
    }
}

macro_rules! need_cluster {
    () => {
        if let Err(why) = cluster() {
            common::skip(&format!("no Slurm cluster: {why}"));
            return;
        }
    };
}

const PIPE: &str = r#"
name: cluster
executor: { kind: slurm, poll_s: 0.2, signal_grace_s: 30 }
stages:
  a: { kind: test.counter, with: { steps: STEPS, step_ms: STEP_MS, text: a } }
  b: { kind: test.counter, resources: { cpus: 1, mem: 200M }, with: { steps: 3, text: b } }
  c: { kind: test.counter, with: { steps: 1, text: c, inputs: { a: "${a.result}", b: "${b.result}" } } }
"#;

fn pipe(steps: u64, step_ms: u64) -> String {
    PIPE.replace("STEPS", &steps.to_string()).replace("STEP_MS", &step_ms.to_string())
}

fn result(p: &Project, stage: &str, extra: &[&str]) -> String {
    let mut args = vec!["show", stage, "-p", "pipe.yaml"];
    args.extend(extra);
    fs::read_to_string(p.run(&args).ok().stdout.trim()).unwrap()
}

#[test]
fn stages_run_as_slurm_jobs_and_give_what_a_local_run_gives() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10));
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert_eq!(r.stdout.matches(": Slurm job ").count(), 3, "{}", r.stdout);
    let on_slurm = result(&p, "c.result", &[]);

    let q = Project::new();
    q.write("pipe.yaml", &pipe(4, 10));
    let r = q.run(&["run", "pipe.yaml", "--executor", "local"]).ok();
    assert!(!r.stdout.contains("Slurm job"), "{}", r.stdout);
    assert_eq!(result(&q, "c.result", &[]), on_slurm);
    // Cached is cached, wherever it ran.
    assert!(p.run(&["run", "pipe.yaml"]).ok().stdout.contains("everything is up to date"));
}

#[test]
fn a_failing_job_is_named_with_the_last_lines_of_its_log() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10).replace("text: a }", "text: a, fail_at: 2 }"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("a: failed: Slurm job") && r.stderr.contains("failed: "), "{}", r.stderr);
    assert!(r.stderr.contains("last lines of") && r.stderr.contains("r1pipe exec-job: failed"), "{}", r.stderr);
}

#[test]
fn a_job_stopped_mid_way_is_resubmitted_and_resumes_from_its_checkpoint() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(40, 100));
    let head = p.cmd(&["run", "pipe.yaml"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    p.wait_for_stage_checkpoint("a", 5, Duration::from_secs(120));
    // What a time limit (`--signal=B:TERM@grace`) or a preemption does to the job.
    let id = common::submitted_job_id(&p, "a", "slurm");
    let status = std::process::Command::new("scancel").args(["--batch", "--signal=TERM", id.trim()]).status().unwrap();
    assert!(status.success());
    let out = head.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("stopped before the end (time limit or preemption); resubmitting"), "{stdout}");
    let submitted = stdout.lines().filter(|l| l.contains("a: Slurm job ") && l.contains("(log ")).count();
    assert_eq!(submitted, 2, "{stdout}");
    let a = result(&p, "a.result", &[]);
    assert_eq!(a, "a\ncount=40\n", "the resumed job counted on from its checkpoint");
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
    let id = common::submitted_job_id(&p, "a", "slurm");
    let status = p.run(&["status", "pipe.yaml"]).ok().stdout;
    assert!(status.contains(&format!("Slurm job {id} RUNNING")), "{status}");
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stdout.contains(&format!("a: following Slurm job {id}, submitted by an earlier run")), "{}", r.stdout);
    assert!(
        !r.stdout.lines().any(|l| l.contains("a: Slurm job ") && l.contains("(log ")),
        "submitted again: {}",
        r.stdout
    );
    assert_eq!(result(&p, "a.result", &[]), "a\ncount=30\n");
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
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stdout.contains("a: resume from step"), "{}", r.stdout);
    assert_eq!(result(&p, "a.result", &[]), "a\ncount=40\n");
}

#[test]
fn a_grpo_run_stopped_by_the_cluster_ends_with_the_weights_of_one_uninterrupted_run() {
    need_cluster!();
    let setup = || common::cluster_grpo_project("{ kind: slurm, poll_s: 0.2 }");
    let local = setup();
    local.run(&["run", "pipe.yaml", "--executor", "local"]).ok();

    let p = setup();
    let head = p.cmd(&["run", "pipe.yaml"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    p.wait_for_stage_checkpoint("grpo", 4, Duration::from_secs(300));
    let id = common::submitted_job_id(&p, "grpo", "slurm");
    std::process::Command::new("scancel").args(["--batch", "--signal=TERM", id.trim()]).status().unwrap();
    let out = head.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("resubmitting"), "{stdout}");
    assert!(
        common::grpo_weights(&p) == common::grpo_weights(&local),
        "two Slurm jobs did not end where one local run did"
    );
}

/// The Slurm job id on a `STAGE: Slurm job N (log …)` line of a run's output (the `nth` submission).
fn job_id_in(stdout: &str, stage: &str, nth: usize) -> String {
    let line = stdout
        .lines()
        .filter(|l| l.contains(&format!("{stage}: Slurm job ")) && l.contains("(log "))
        .nth(nth)
        .unwrap_or_else(|| panic!("no submission {nth} of `{stage}` in {stdout}"));
    line.split("Slurm job ").nth(1).unwrap().split(' ').next().unwrap().to_string()
}

#[test]
fn without_a_shared_filesystem_jobs_reach_their_artifacts_through_the_remote() {
    need_cluster!();
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10));
    common::without_shared_filesystem(&p);
    let r = common::run_without_shared_filesystem(&p);
    assert_eq!(r.stdout.matches("fetched its outputs from").count(), 3, "{}", r.stdout);
    assert!(r.stdout.contains("c: its 2 inputs are in"), "{}", r.stdout);
    common::assert_jobs_left_no_trace(&p);
    // The job of `c` read its inputs from the remote, in a cache of its own.
    let log = fs::read_to_string(format!("/tmp/r1pipe-slurm-{}.log", job_id_in(&r.stdout, "c", 0))).unwrap();
    assert!(log.contains("2 inputs from remote file://") && log.contains("node-scratch"), "{log}");

    let q = Project::new();
    q.write("pipe.yaml", &pipe(4, 10));
    q.run(&["run", "pipe.yaml", "--executor", "local"]).ok();
    assert_eq!(result(&p, "c.result", &[]), result(&q, "c.result", &[]));
    assert!(p.run(&["run", "pipe.yaml"]).ok().stdout.contains("everything is up to date"));
}

#[test]
fn without_a_shared_filesystem_a_stopped_grpo_job_resumes_from_the_checkpoint_it_pushed() {
    need_cluster!();
    let setup = || common::cluster_grpo_project("{ kind: slurm, poll_s: 0.2 }");
    let local = setup();
    local.run(&["run", "pipe.yaml", "--executor", "local"]).ok();

    let p = setup();
    common::without_shared_filesystem(&p);
    let head = p
        .cmd(&["run", "pipe.yaml"])
        .env(common::SCRATCH_VAR, common::job_scratch(&p))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_scratch_checkpoint(&p, 4, Duration::from_secs(300));
    let id = common::submitted_job_id(&p, "grpo", "slurm");
    std::process::Command::new("scancel").args(["--batch", "--signal=TERM", id.trim()]).status().unwrap();
    let out = head.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("resubmitting"), "{stdout}");
    // The first job's scratch cache is gone: the second resumed from what the first pushed.
    let log = fs::read_to_string(format!("/tmp/r1pipe-slurm-{}.log", job_id_in(&stdout, "grpo", 1))).unwrap();
    assert!(log.contains("resuming from the work folder an earlier job pushed"), "{log}");
    common::assert_jobs_left_no_trace(&p);
    assert!(
        common::grpo_weights(&p) == common::grpo_weights(&local),
        "two Slurm jobs through the remote did not end where one local run did"
    );
}

#[test]
fn without_a_shared_filesystem_a_run_without_a_remote_is_refused_before_anything_runs() {
    // No cluster needed: the run is refused before any job is submitted.
    let p = Project::new();
    p.write("pipe.yaml", &pipe(4, 10).replace("poll_s: 0.2", "poll_s: 0.2, shared_filesystem: false"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("shared_filesystem: false") && r.stderr.contains("--remote URL"), "{}", r.stderr);
    assert!(!r.stdout.contains("Slurm job"), "{}", r.stdout);
}
