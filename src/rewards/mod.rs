//! Rule-based rewards for GRPO: pure functions of (prompt, completion,
//! reference answer, completion length), combined into weighted reward sets.

pub mod answer;
pub mod external;
pub mod functions;
pub mod set;

pub use functions::{lookup, Builtin, RewardFn, Sample, Scorer, CATALOG};
pub use set::{RewardSet, Scores};
