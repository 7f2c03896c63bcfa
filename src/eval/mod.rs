//! Evaluation as the literature reports it: strict (the recipe's `<answer>`)
//! and flexible (last number, as lm-eval-harness's GSM8K "flexible-extract")
//! accuracy, each with a 95% Wilson interval, format adherence, and paired
//! comparisons between models on the same questions (McNemar's exact test).
//! The metrics file is versioned; older versions still read. The loop that
//! produces the samples (`run`) serves the evaluate stage and training alike.

pub mod extract;
pub mod metrics;
pub mod paired;
pub mod run;
pub mod stats;
