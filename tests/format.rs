//! The `format` stage's splits: rows held out of train for validation never
//! reach `train` or `sft`, and come before `limit`.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::{gsm8k_rows, Project};

fn questions(path: &str) -> Vec<String> {
    fs::read_to_string(path.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["question"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn validation_rows_are_held_out_of_train_and_sft() {
    let p = Project::new();
    p.write("data/train.jsonl", &gsm8k_rows(12));
    p.write("data/test.jsonl", &gsm8k_rows(2));
    p.write(
        "pipe.yaml",
        "name: f\nstages:\n  d: { kind: download, with: { path: data } }\n  \
         f: { kind: format, with: { data: \"${d.dataset}\", validation: 3, shuffle_seed: 1, limit: { train: 5 } } }\n",
    );
    p.run(&["run", "pipe.yaml"]).ok();
    let show = |o: &str| p.run(&["show", &format!("f.{o}"), "-p", "pipe.yaml"]).ok().stdout;
    let (valid, train) = (questions(&show("valid")), questions(&show("train")));
    let sft: Vec<String> = fs::read_to_string(show("sft").trim())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["messages"][1]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!((valid.len(), train.len(), sft.len()), (3, 5, 5), "3 held out, then the limit of 5");
    let held: BTreeSet<&String> = valid.iter().collect();
    assert!(train.iter().chain(&sft).all(|q| !held.contains(q)), "a held-out question reached train or sft");
    // Asking for more rows than the split has is an error naming the parameter.
    p.write(
        "pipe.yaml",
        &fs::read_to_string(p.root().join("pipe.yaml")).unwrap().replace("validation: 3", "validation: 30"),
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("validation: 30 rows asked for, the train split has 12"), "{}", r.stderr);
}
