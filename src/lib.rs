//! r1pipe: the DeepSeek-R1 recipe for small models (GRPO with rule-based
//! rewards, SFT, evaluation, inference) as one declarative pipeline on Candle.
//!
//! Layers (README: Layout): `pipeline` (the runner, knows no ML; its
//! `workspace` is what the CLI uses) → `stages` (one file per stage kind, the
//! only place the two sides meet) → the ML core: `data`, `model`, `train`,
//! `eval`, `rewards`, `rollout` → `kernels` (hand-written CPU kernels beside
//! their portable forms). `common` is what both sides share, importing neither.

pub mod bench;
pub mod common;
pub mod data;
pub mod eval;
pub mod fuzzing;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod rewards;
pub mod rollout;
pub mod stages;
pub mod tracking;
pub mod train;
