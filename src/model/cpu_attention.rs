//! Scaled dot-product attention for inference on the CPU, in one pass per
//! key/value head: scores, mask, softmax and the weighted sum of values,
//! reading keys and values straight out of the KV cache.
//!
//! Why by hand: through candle ops, a decode step's attention is a batched
//! matmul of [rep, d] × [d, S] per head (tiny gemm calls, each with its thread
//! hand-off), a softmax, and another batched matmul, each allocating its
//! output; at batch 8 that was more than half of the step. Here a unit of work
//! is one (sequence, key/value head), so nothing is copied and the threads get
//! whole heads. No gradient: the training path uses candle ops.

use candle_core::{Result, Storage, Tensor};

use super::skinny_matmul::{dot, OutPtr};

/// Whether the fused CPU attention applies: f32 tensors on the CPU.
pub fn applies(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == candle_core::DType::F32
}

/// softmax(q kᵀ · scale + mask) v per head.
///
/// `q` [B, Hkv, R, D]: the R = rep × T query rows that share key/value head h,
/// row r being query position r mod T. `k`, `v` [B, Hkv, S, D], any strides with
/// a contiguous last dimension (a view into the KV cache). `mask` [B, 1, T, S]:
/// the additive bias. Returns [B, Hkv, R, D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, hkv, r, d) = q.dims4()?;
    let s = k.dim(2)?;
    let t = mask.dim(2)?;
    if k.dims4()? != (b, hkv, s, d) || v.dims4()? != (b, hkv, s, d) || mask.dims4()? != (b, 1, t, s) || r % t != 0 {
        candle_core::bail!(
            "cpu attention: shapes q {:?} k {:?} v {:?} mask {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    let q = q.contiguous()?;
    let mask = mask.contiguous()?;
    let qv = View::of(&q)?;
    let kv = View::of(k)?;
    let vv = View::of(v)?;
    let mv = View::of(&mask)?;
    let (qs, ks, vs, ms) = (qv.slice()?, kv.slice()?, vv.slice()?, mv.slice()?);
    let mut out = vec![0f32; b * hkv * r * d];
    let ptr = OutPtr(out.as_mut_ptr());
    let scale = scale as f32;
    let unit = |u: usize| {
        let (bi, h) = (u / hkv, u % hkv);
        let mut scores = vec![0f32; s];
        for row in 0..r {
            let i = row % t;
            let qrow = &qs[qv.at(&[bi, h, row])..][..d];
            let mrow = &ms[mv.at(&[bi, 0, i])..][..s];
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in scores.iter_mut().enumerate() {
                *sc = dot(qrow, &ks[kv.at(&[bi, h, j])..][..d]) * scale + mrow[j];
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            // SAFETY: unit u alone writes rows [u * r, (u + 1) * r) of the output, which outlives the call.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add((u * r + row) * d), d) };
            for (j, p) in scores.iter().enumerate() {
                let p = p * inv;
                for (oe, ve) in o.iter_mut().zip(&vs[vv.at(&[bi, h, j])..][..d]) {
                    *oe += p * ve;
                }
            }
        }
    };
    let units = b * hkv;
    if units > 1 && r * s * d > 1 << 12 {
        candle_core::utils::barrier_pool().execute_chunked(units, |range| range.for_each(unit));
    } else {
        (0..units).for_each(unit);
    }
    Tensor::from_vec(out, (b, hkv, r, d), q.device())
}

/// A read lock on a CPU f32 tensor's storage with its strides.
struct View<'a> {
    storage: candle_core::StorageRef<'a>,
    offset: usize,
    stride: Vec<usize>,
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Result<View<'a>> {
        let (storage, layout) = t.storage_and_layout();
        if layout.stride().last() != Some(&1) {
            candle_core::bail!("cpu attention: the last dimension must be contiguous");
        }
        Ok(View { storage, offset: layout.start_offset(), stride: layout.stride().to_vec() })
    }

    fn slice(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(c) => c.as_slice::<f32>(),
            _ => candle_core::bail!("cpu attention: tensor is not on the CPU"),
        }
    }

    /// Element offset of the start of the innermost row at `idx` (all but the last index).
    fn at(&self, idx: &[usize]) -> usize {
        self.offset + idx.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_candle_ops_on_a_cache_view_with_a_causal_padding_mask() {
        let (b, hkv, rep, t, d, cap) = (2, 3, 2, 4, 16, 20);
        let s = 9;
        // Keys and values as a narrow view of a larger cache buffer, as KvCache hands them out.
        let k = rand(&[b, hkv, cap, d], 1).narrow(2, 0, s).unwrap();
        let v = rand(&[b, hkv, cap, d], 2).narrow(2, 0, s).unwrap();
        let q = rand(&[b, hkv, rep * t, d], 3);
        let offset = s - t;
        let mut m = Vec::new();
        for row in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let padded = row == 1 && j < 2;
                    m.push(if j <= offset + i && !padded { 0.0f32 } else { -1e9 });
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).unwrap();
        let scale = 0.25;
        let got = attention(&q, &k, &v, &mask, scale).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .reshape((b, hkv, rep, t, s))
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().reshape((b, hkv, rep * t, s)).unwrap();
        let want = probs.matmul(&v.contiguous().unwrap()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
