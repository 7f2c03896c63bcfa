//! How the hand-written CPU kernels share work across threads: units of work
//! handed out in runs on candle's barrier pool, each writing its own disjoint
//! part of an output buffer.
//!
//! Why candle's barrier pool rather than rayon: its workers spin briefly
//! between calls and the calling thread works too. A decode step makes some
//! two hundred kernel calls a few tens of microseconds apart; waking sleeping
//! rayon workers for each cost a fifth of the step.

use std::ops::Range;

/// Run `f` over the units `0..units`, in runs shared across the CPU threads when
/// `parallel` (the caller says whether the work is worth the hand-off), else in
/// one run on the calling thread.
pub(crate) fn for_each_unit(units: usize, parallel: bool, f: impl Fn(Range<usize>) + Sync) {
    if parallel && units > 1 {
        candle_core::utils::barrier_pool().execute_chunked(units, f);
    } else if units > 0 {
        f(0..units);
    }
}

/// An output buffer shared by the units of one call, each of which writes only
/// its own disjoint part of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(*mut T);

// SAFETY: the units write disjoint parts of the buffer (the contract of `part`).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(crate) fn new(buf: &mut [T]) -> SharedOut<T> {
        SharedOut(buf.as_mut_ptr())
    }

    /// The start of the buffer, for kernels that write a strided part of it.
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }

    /// The `len` elements from `start`.
    ///
    /// # Safety
    /// No other unit may touch these elements during the call, and the buffer
    /// must outlive the use and hold `start + len` elements.
    pub(crate) unsafe fn part<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}
