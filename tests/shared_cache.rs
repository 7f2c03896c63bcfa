//! One cache, several pipelines: `gc` of one keeps the others' newest results
//! and names what it removes; `verify` of one covers every artifact its plan
//! uses, whoever recorded it, and names every record it drops.

mod common;

use std::fs;

use common::Project;

const CHAIN: &str = r#"
name: chain
stages:
  a: { kind: test.counter, with: { steps: 3, text: "alpha" } }
  b: { kind: test.counter, with: { steps: 2, text: "beta", input: "${a.result}" } }
  c: { kind: test.counter, with: { steps: 1, text: "gamma" } }
"#;

/// Shares stage `a` (same settings, so one fingerprint) with CHAIN.
const OTHER: &str = r#"
name: other
stages:
  a: { kind: test.counter, with: { steps: 3, text: "alpha" } }
  d: { kind: test.counter, with: { steps: 1, text: "delta", input: "${a.result}" } }
"#;

/// Both pipelines run into one cache, then `other` changed and ran again, so
/// its first `d` is an older result.
fn two_pipelines() -> (Project, String) {
    let p = Project::new();
    p.write("chain.yaml", CHAIN);
    p.write("other.yaml", OTHER);
    p.run(&["run", "chain.yaml"]).ok();
    let r = p.run(&["run", "other.yaml"]).ok();
    assert!(r.skipped("a"), "the shared stage is not reused: {}", r.stdout);
    let old_d = p.run(&["show", "d.result", "-p", "other.yaml"]).ok().stdout.trim().to_string();
    p.write("other.yaml", &OTHER.replace("delta", "delta2"));
    p.run(&["run", "other.yaml"]).ok();
    (p, old_d)
}

fn artifact(p: &Project, pipeline: &str, target: &str) -> String {
    p.run(&["show", target, "-p", pipeline]).ok().stdout.trim().to_string()
}

#[test]
fn gc_of_one_pipeline_keeps_the_newest_results_of_the_others_and_names_what_it_removes() {
    let (p, old_d) = two_pipelines();
    let chain_b = artifact(&p, "chain.yaml", "b.result");
    let chain_c = artifact(&p, "chain.yaml", "c.result");

    let dry = p.run(&["gc", "--dry-run", "other.yaml"]).ok();
    let removals: Vec<&str> = dry.stdout.lines().filter(|l| l.starts_with("would remove ")).collect();
    assert_eq!(removals.len(), 2, "only the older d goes (plus the summary line):\n{}", dry.stdout);
    assert!(removals[0].contains("other/d.result (a run finished ") && removals[0].contains(" B "), "{}", dry.stdout);
    assert!(dry.stdout.contains("would remove 1 item(s)"), "{}", dry.stdout);

    p.run(&["gc", "other.yaml"]).ok();
    assert!(fs::metadata(&old_d).is_err(), "other's older d is still there");
    for kept in [&chain_b, &chain_c] {
        assert!(fs::metadata(kept).is_ok(), "gc of other removed chain's {kept}");
    }
    for (file, stages) in [("chain.yaml", &["a", "b", "c"][..]), ("other.yaml", &["a", "d"][..])] {
        let r = p.run(&["run", file]).ok();
        for s in stages {
            assert!(r.skipped(s), "{file}: gc removed the current {s}:\n{}", r.stdout);
        }
    }

    // Told to keep only this pipeline, chain's own results go (not the shared a).
    let dry = p.run(&["gc", "--dry-run", "--only-this-pipeline", "other.yaml"]).ok();
    for gone in ["chain/b.result", "chain/c.result"] {
        assert!(dry.stdout.contains(gone), "{gone} missing from:\n{}", dry.stdout);
    }
    assert!(!dry.stdout.contains("/a.result"), "{}", dry.stdout);
    p.run(&["gc", "--only-this-pipeline", "other.yaml"]).ok();
    assert!(fs::metadata(&chain_b).is_err() && fs::metadata(&chain_c).is_err());
    assert!(p.run(&["run", "other.yaml"]).ok().skipped("a"));
}

#[test]
fn verify_of_one_pipeline_covers_what_another_recorded_and_names_every_record_it_drops() {
    let (p, _) = two_pipelines();
    let v = p.run(&["verify", "other.yaml"]).ok();
    // `a` was recorded by chain; other's plan uses it, so other's verify checks it.
    assert!(v.stdout.contains("ok       chain/a.result"), "{}", v.stdout);
    assert!(v.stdout.contains("ok       other/d.result"), "{}", v.stdout);
    assert!(!v.stdout.contains("chain/b.result"), "{}", v.stdout);

    // Damage the shared artifact: both pipelines' records that use it go, and are named.
    let a = artifact(&p, "chain.yaml", "a.result");
    fs::write(&a, "tampered").unwrap();
    let v = p.run(&["verify", "other.yaml"]);
    assert_eq!(v.code, 1, "{}\n{}", v.stdout, v.stderr);
    let line = v.stdout.lines().find(|l| l.starts_with("DAMAGED")).unwrap_or_else(|| panic!("{}", v.stdout));
    assert!(line.contains("records dropped (these stages rerun): chain/a"), "{line}");
    // The next run remakes it (then it is one record again, which the other pipeline reuses).
    let r = p.run(&["run", "other.yaml"]).ok();
    assert!(r.decision("a").starts_with("run"), "the damaged a was used:\n{}", r.stdout);
    assert!(p.run(&["run", "chain.yaml"]).ok().skipped("a"));
}
