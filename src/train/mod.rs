//! Training machinery shared by GRPO and SFT: optimizer, schedule, clipping,
//! accumulation, checkpoints; and the GRPO mathematics.

pub mod adamw_cpu;
pub mod checkpoint;
pub mod grpo;
pub mod optim;
pub mod sft;
