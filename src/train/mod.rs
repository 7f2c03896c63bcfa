//! Training machinery shared by GRPO and SFT: optimizer, schedule, clipping,
//! accumulation, checkpoints; and the GRPO mathematics.

pub mod checkpoint;
pub mod grpo;
pub mod inplace_cpu;
pub mod optim;
pub mod sft;
