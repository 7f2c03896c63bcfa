//! Training: the one loop (`trainer`), the algorithms that plug into it (`grpo`,
//! `sft`, each with its own loss), and what they share: optimizer, schedule,
//! clipping, checkpoints.

pub mod checkpoint;
pub mod config;
pub mod grpo;
pub mod optim;
pub mod plots;
pub mod progress;
pub mod rollout_sync;
pub mod schedule;
pub mod sft;
pub mod task_eval;
pub mod trainer;
