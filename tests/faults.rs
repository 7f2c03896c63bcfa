//! Faults survived with nothing lost: a process killed (aborted, as by kill -9,
//! at a fault-injection point compiled only into test builds) while it commits a
//! stage leaves a cache that the next run trusts or repairs, and that run completes.

mod common;

use std::fs;

use common::Project;

const CHAIN: &str = r#"
name: chain
stages:
  a:
    kind: test.counter
    with: { steps: 2, text: "alpha" }
  b:
    kind: test.counter
    with: { steps: 2, text: "beta", input: "${a.result}" }
"#;

#[test]
fn a_kill_at_any_point_of_a_commit_loses_nothing_and_the_next_run_completes() {
    for point in ["between-outputs", "before-record", "mid-record", "before-flush"] {
        let p = Project::new();
        p.write("pipe.yaml", CHAIN);
        let killed = p.cmd(&["run", "pipe.yaml"]).env("R1PIPE_FAULT", point).output().unwrap();
        let stderr = String::from_utf8_lossy(&killed.stderr);
        assert!(
            !killed.status.success() && stderr.contains(&format!("fault injected at `{point}`")),
            "{point}: {stderr}"
        );
        // The next run completes, and whatever it had to redo gives the same bytes.
        let r = p.run(&["run", "pipe.yaml"]).ok();
        assert!(!r.stdout.contains("failed"), "{point}: {}", r.stdout);
        let b = fs::read_to_string(p.run(&["show", "b.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
        assert_eq!(b, "beta\ncount=2\nalpha\ncount=2\n", "{point}");
        // No leftovers of the interrupted commit, and everything is cached now.
        let tmp: Vec<_> = fs::read_dir(p.cache().join("objects"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{point}: leftovers {tmp:?}");
        let again = p.run(&["run", "pipe.yaml"]).ok();
        assert!(again.skipped("a") && again.skipped("b"), "{point}: {}", again.stdout);
    }
}
