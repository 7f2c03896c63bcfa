//! Activation checkpointing (TRL's `gradient_checkpointing`): a decoder layer
//! runs forward without a graph, so none of its activations outlive it; only
//! its input is kept. In the backward the layer is recomputed from that
//! input with a graph, and differentiated at once: the input's gradient goes
//! on down the main backward, the layer's parameter gradients straight into
//! the model's gradient sink. Same gradients as without (tested); the price
//! is a second forward of every layer, about a third more compute per step.

use std::sync::Mutex;

use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, Var, D,
};

use super::grads::GradSink;
use super::layers::{DecoderLayer, LayerInputs, Pass};

/// `layer(x)` whose backward recomputes the layer. `vars`: the layer's
/// trainable variables; `x_tracked`: whether the input needs a gradient (false
/// for the first layer when the embedding is frozen).
pub fn checkpointed(
    layer: &DecoderLayer,
    vars: Vec<Var>,
    x: &Tensor,
    inputs: &LayerInputs,
    pass: Pass,
    sink: &GradSink,
    x_tracked: bool,
) -> Result<Tensor> {
    let out = layer.forward(&x.detach(), inputs, Pass { grad: false, ..pass }, None)?.contiguous()?;
    // The op's third argument anchors it to the layer's trainable variables, so that the
    // backward reaches it even when the input itself needs no gradient (LoRA, layer 0).
    let Some(anchor) = vars.first().map(|v| v.as_tensor().clone()) else {
        return Ok(out);
    };
    // The value goes into the op, which copies it as its result and drops it: the
    // graph node keeps the layer's input and that result, not a second copy.
    let op = Recompute {
        layer: layer.clone(),
        inputs: inputs.clone(),
        pass,
        sink: sink.clone(),
        vars,
        x_tracked,
        value: Mutex::new(Some(out)),
    };
    let x = if x_tracked { x.clone() } else { x.detach() };
    x.apply_op2(&anchor, op)
}

struct Recompute {
    layer: DecoderLayer,
    inputs: LayerInputs,
    pass: Pass,
    sink: GradSink,
    vars: Vec<Var>,
    x_tracked: bool,
    /// The layer's output, computed without a graph; taken by the forward.
    value: Mutex<Option<Tensor>>,
}

impl Recompute {
    fn take_value(&self) -> Result<Tensor> {
        let taken =
            self.value.lock().map_err(|_| candle_core::Error::Msg("checkpoint value lock poisoned".into()))?.take();
        taken.ok_or_else(|| candle_core::Error::Msg("checkpointed layer: forward run twice".into()))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy_cpu(s, layout),
            _ => candle_core::bail!("checkpointed layer: the value is not on the CPU"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy_cuda(s, layout),
            _ => candle_core::bail!("checkpointed layer: the value is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input = if self.x_tracked { Some(Var::from_tensor(&x.detach())?) } else { None };
        let xin = match &input {
            Some(v) => v.as_tensor().clone(),
            None => x.detach(),
        };
        let out = self.layer.forward(&xin, &self.inputs, Pass { grad: true, ..self.pass }, None)?;
        // Seeded with `grad` through Σ out·grad; summed by rows first, since a reduction
        // to one value runs in a single CUDA block.
        let grads = (out * grad.detach())?.sum(D::Minus1)?.sum_all()?.backward()?;
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.sink.add(v, g)?;
            }
        }
        let dx = match &input {
            Some(v) => grads.get(v.as_tensor()).cloned(),
            None => None,
        };
        Ok((dx, None))
    }
}

/// The forward of an op that only attaches a backward: a copy of the value
/// computed beforehand without a graph (a contiguous tensor of any float dtype).
/// It requires what [`copy_cuda`] requires (a fresh contiguous tensor), so that
/// a CPU run catches what would fail on a GPU.
pub(crate) fn copy_cpu(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let Some((a, b)) = l.contiguous_offsets().filter(|(a, _)| *a == 0) else {
        candle_core::bail!("attach-backward: the value must be a fresh contiguous tensor")
    };
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        _ => candle_core::bail!("attach-backward: not a float tensor"),
    };
    Ok((out, l.shape().clone()))
}

/// [`copy_cpu`] on CUDA: the value is made fresh and contiguous by its caller.
pub(crate) fn copy_cuda(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("attach-backward: the value must be a fresh contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}
