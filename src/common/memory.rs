//! The process's memory: the allocator's settings for training, giving freed
//! memory back between stages, and resident-set figures for logs and benchmarks.

/// Keep freed memory in the process instead of returning it to the kernel
/// (glibc returns blocks over 128 KiB, which it mmaps, on free, and trims a
/// heap top over 128 KiB). A training step allocates and frees gigabytes in
/// blocks of megabytes; handing them back means a page fault per 4 KiB on the
/// next use, several microseconds each on these VMs, and unmapping memory that
/// another thread touched interrupts that thread's core to flush its TLB.
/// Measured on SmolLM2 GRPO on the CPU: the policy pass went from 19–24 s to
/// about 13 s a step. The cost, that the process would keep its peak memory
/// for good, is paid back by [`release_free_memory`] after each stage. The
/// binary calls this first thing; so do the benchmarks.
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

/// Give the kernel back every free page the allocator holds (glibc's
/// `malloc_trim(0)` releases free memory inside the heap too, not only its
/// top): called when a stage ends, so the next stage (an evaluation after a
/// training run) has the memory the last one freed.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The resident set size now, in bytes (0 where /proc is not available).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page
}

/// The machine's physical memory in bytes (0 where it cannot be read).
pub fn total_memory_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    pages.max(0) as u64 * page.max(0) as u64
}

/// The memory this process may use, in bytes, and what sets it: the smallest of
/// the machine's RAM, the address-space limit (`ulimit -v`, as Slurm's
/// `--mem` is often enforced) and the cgroup's `memory.max` (containers, Slurm's
/// cgroup plugin). 0 where none can be read.
pub fn memory_limit() -> (u64, &'static str) {
    let mut best = (total_memory_bytes(), "this machine's memory");
    let mut consider = |bytes: u64, what: &'static str| {
        if bytes > 0 && (best.0 == 0 || bytes < best.0) {
            best = (bytes, what);
        }
    };
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        consider(lim.rlim_cur, "the process's address-space limit (ulimit -v)");
    }
    if let Some(max) = cgroup_memory_max() {
        consider(max, "the cgroup's memory.max");
    }
    best
}

/// `memory.max` of this process's cgroup (v2), when it is a number.
fn cgroup_memory_max() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
    let file = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')).join("memory.max");
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The peak resident set size of the process so far, in bytes.
pub fn peak_rss_bytes() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_maxrss.max(0) as u64 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_goes_back_to_the_kernel_when_asked() {
        tune_allocator();
        let before = rss_bytes();
        let mut v = vec![1u8; 256 << 20];
        v[12345] = 2;
        std::hint::black_box(&v);
        let grown = rss_bytes();
        drop(v);
        release_free_memory();
        let after = rss_bytes();
        assert!(grown > before + (200 << 20), "allocation not resident: {before} → {grown}");
        assert!(after < grown - (200 << 20), "not given back: {grown} → {after}");
        // The high-water mark is kept by the kernel lazily; it is at least what was resident before.
        assert!(peak_rss_bytes() >= before, "peak {} below {before}", peak_rss_bytes());
    }
}
