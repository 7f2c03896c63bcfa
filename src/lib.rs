//! r1pipe: the DeepSeek-R1 recipe for small models (GRPO with rule-based
//! rewards, SFT, evaluation, inference) as one declarative pipeline on Candle.
//!
//! Layers (see README): `pipeline` (the runner, knows no ML) → `stages` (one
//! file per stage kind) → the ML core: `data`, `model`, `train`, `rewards`.

pub mod bench;
pub mod data;
pub mod hub;
pub mod model;
pub mod pipeline;
pub mod rewards;
pub mod stages;
pub mod train;

/// Keep freed memory in the process instead of returning it to the kernel at
/// once (glibc's default for blocks over 128 KiB up to 32 MiB, and for a heap
/// top over 128 KiB). A training step allocates and frees gigabytes in blocks of
/// megabytes; handing each back means a page fault per 4 KiB on the next use,
/// and unmapping memory that another thread touched interrupts that thread's
/// core to flush its TLB. Measured on SmolLM2's CPU training step: about a
/// tenth of the step. The binary calls this first thing; so do the benchmarks.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // the most glibc allows
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
