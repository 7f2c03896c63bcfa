//! Where a training backward leaves its gradients: one accumulator per model,
//! keyed by parameter, summed in place across micro-batches. The activation-
//! checkpointing op and the vocabulary op write into it during the backward
//! itself, so a layer's gradients never exist twice (once in candle's
//! gradient store, once in the accumulator) and no full-model temporary is
//! made per micro-batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId, Var};

use crate::kernels::inplace::accumulate;

#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl GradSink {
    /// Add `g` to the gradient of `var` (in place when it can be).
    pub fn add(&self, var: &Var, g: &Tensor) -> Result<()> {
        let g = g.detach();
        let mut map = self.0.lock().expect("gradient sink poisoned");
        match map.remove(&var.as_tensor().id()) {
            Some(acc) => {
                map.insert(var.as_tensor().id(), accumulate(acc, &g)?);
            }
            None => {
                // Ours alone from here on (a fresh gradient, or a copy of a shared one).
                let g = if g.is_contiguous() && g.dtype() == var.dtype() {
                    g
                } else {
                    g.to_dtype(var.dtype())?.contiguous()?
                };
                map.insert(var.as_tensor().id(), g);
            }
        }
        Ok(())
    }

    /// Every accumulated gradient, leaving the sink empty for the next step.
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.0.lock().expect("gradient sink poisoned"))
    }

    pub fn clear(&self) {
        self.0.lock().expect("gradient sink poisoned").clear();
    }
}
