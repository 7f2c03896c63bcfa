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

/// Keep freed memory in the process instead of returning it to the kernel
/// (glibc returns blocks over 128 KiB, which it mmaps, on free, and trims a
/// heap top over 128 KiB). A training step allocates and frees gigabytes in
/// blocks of megabytes; handing them back means a page fault per 4 KiB on the
/// next use, several microseconds each on these VMs, and unmapping memory that
/// another thread touched interrupts that thread's core to flush its TLB.
/// Measured on SmolLM2 GRPO on the CPU: the policy pass went from 19–24 s to
/// about 13 s a step. The cost: the process keeps its peak memory. The binary
/// calls this first thing; so do the benchmarks.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads allocate.
    unsafe {
        // Every block from the heap, none from mmap (which is returned to the kernel on
        // free whatever the trim setting), and the heap never trimmed (-1: see mallopt(3)).
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
