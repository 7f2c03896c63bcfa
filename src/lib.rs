//! r1pipe: the DeepSeek-R1 recipe for small models (GRPO with rule-based
//! rewards, SFT, evaluation, inference) as one declarative pipeline on Candle.
//!
//! Layers (see README): `pipeline` (the runner, knows no ML) → `stages` (one
//! file per stage kind) → the ML core: `data`, `model`, `train`, `rewards`,
//! `rollout` (sampling on an OpenAI-compatible server).

pub mod bench;
pub mod common;
pub mod data;
pub mod eval;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod rewards;
pub mod rollout;
pub mod stages;
pub mod train;
