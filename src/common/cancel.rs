//! Cancellation: set by Ctrl-C, checked by long work between units of work
//! (a training step, a batch of questions) with one call: `token.check()?`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared between the signal handler and the work it may stop.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once cancellation was asked for.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

/// The error work returns after stopping cleanly on Ctrl-C.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;
