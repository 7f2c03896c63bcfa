//! Reward scoring cost: both shipped reward sets over groups of realistic
//! completions, serial and in parallel. Prints one table.
//!
//! `cargo bench --bench rewards`

use std::path::Path;
use std::time::Instant;

use r1pipe::rewards::{RewardSet, Sample};

fn completion(i: usize) -> String {
    let steps: String = (0..12)
        .map(|k| format!("Step {k}: we have {} apples and add {} more, so {} in all.\n", i + k, k, i + 2 * k))
        .collect();
    format!("<think>\n{steps}</think>\n<answer>\n{}\n</answer>\n", i + 22)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("{:<14} {:>6} {:>12} {:>12} {:>14}", "reward set", "group", "serial ms", "parallel ms", "µs/completion");
    for set_name in ["r1-gsm8k", "building-r1"] {
        let set =
            RewardSet::from_file(&root.join(format!("stages/rewards/{set_name}.yaml")), root).expect("shipped set");
        for group in [8usize, 64, 512] {
            let texts: Vec<String> = (0..group).map(completion).collect();
            let answers: Vec<String> = (0..group).map(|i| (i + 22).to_string()).collect();
            let samples: Vec<Sample> = texts
                .iter()
                .zip(&answers)
                .map(|(c, a)| Sample {
                    prompt: "",
                    completion: c,
                    answer: a,
                    tokens: c.split_whitespace().count(),
                    tool_results: None,
                })
                .collect();
            let reps = (4096 / group).max(4);
            let t = Instant::now();
            for _ in 0..reps {
                for s in &samples {
                    let one = std::slice::from_ref(s);
                    std::hint::black_box(
                        set.terms.iter().map(|t| t.func.score_batch(one).expect("built-ins").len()).sum::<usize>(),
                    );
                }
            }
            let serial = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(set.score(&samples).expect("built-ins"));
            }
            let parallel = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{set_name:<14} {group:>6} {:>12.3} {:>12.3} {:>14.2}",
                serial * 1e3,
                parallel * 1e3,
                parallel * 1e6 / group as f64
            );
        }
    }
}
