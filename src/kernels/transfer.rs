//! Every copy from the device to the host that the training and generation
//! loops make goes through here, counted per thread: on a GPU each one is a
//! synchronization, and a loop that makes one per layer or per parameter (or
//! moves a [batch, vocabulary] matrix per token) is slow however fast its
//! kernels are. Tests assert the counts (tests/transfers.rs); a test of the
//! tree (tests/layers.rs) keeps the loops from reading tensors any other way.

use std::cell::Cell;

use candle_core::{Result, Tensor, WithDType};

thread_local! {
    static COPIES: Cell<u64> = const { Cell::new(0) };
    static ELEMENTS: Cell<u64> = const { Cell::new(0) };
}

fn count(elements: usize) {
    COPIES.with(|c| c.set(c.get() + 1));
    ELEMENTS.with(|c| c.set(c.get() + elements as u64));
}

/// (copies, elements) moved to the host by this thread so far.
pub fn counts() -> (u64, u64) {
    (COPIES.with(Cell::get), ELEMENTS.with(Cell::get))
}

pub fn to_vec1<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count(t.elem_count());
    t.to_vec1()
}

pub fn to_vec2<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<T>>> {
    count(t.elem_count());
    t.to_vec2()
}

pub fn to_scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    count(1);
    t.to_scalar()
}
