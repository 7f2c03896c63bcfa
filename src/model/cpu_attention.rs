//! Scaled dot-product attention on the CPU as one op with a hand-written
//! backward: scores, mask, softmax and the weighted sum of values per
//! (sequence, key/value head), reading keys and values through their strides
//! (straight out of the KV cache when decoding).
//!
//! Why by hand: composed from candle ops, attention allocates half a dozen
//! [B, H, T, S] tensors forward and, with candle's zero-then-add gradient
//! accumulation, three times as many backward: 4 of the 10 seconds of a
//! SmolLM2 training step of 4 × 256 tokens, and at decode time a tangle of
//! tiny batched gemm calls. Here nothing [T, S]-sized is ever stored: the
//! backward recomputes each row's probabilities, as flash attention does.
//!
//! Backward, per query row with probabilities p and output gradient dO:
//! dV_j += p_j dO, dP_j = dO · V_j, dS_j = p_j (dP_j − Σ_k p_k dP_k),
//! dQ = scale Σ_j dS_j K_j, dK_j += scale dS_j Q.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::cpu_threads::{for_each_unit, SharedOut};
use super::skinny_matmul::dot;

/// A mask entry at or below this is a masked key (the model uses −1e9): its
/// score is the mask itself, without the dot product, and its probability 0.
const MASKED_BELOW: f32 = -1e8;

/// Forward work items to aim for (units split by rows when there are fewer).
const FORWARD_PARTS: usize = 8;

/// Whether the CPU attention applies: f32 tensors on the CPU.
pub fn applies(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == candle_core::DType::F32
}

/// softmax(q kᵀ · scale + mask) v per head; differentiable in q, k and v.
///
/// `q` [B, Hkv, R, D]: the R = rep × T query rows that share key/value head h,
/// row r being query position r mod T. `k`, `v` [B, Hkv, S, D], any strides with
/// a contiguous last dimension (a view into the KV cache). `mask` [B, 1, T, S]:
/// the additive bias (no gradient). Returns [B, Hkv, R, D].
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
    q.apply_op3(k, v, Attention { mask: mask.contiguous()?.detach(), scale: scale as f32 })
}

struct Attention {
    mask: Tensor,
    scale: f32,
}

/// An f32 tensor of rank 4 read through its strides; rows along the last dimension.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 3],
    d: usize,
}

impl<'a> Rows<'a> {
    fn new(data: &'a [f32], l: &Layout) -> Result<Rows<'a>> {
        let st = l.stride();
        if l.dims().len() != 4 || st[3] != 1 {
            candle_core::bail!("cpu attention: expected rank 4 with a contiguous last dimension, got {l:?}");
        }
        Ok(Rows { data, offset: l.start_offset(), stride: [st[0], st[1], st[2]], d: l.dims()[3] })
    }

    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize) -> &'a [f32] {
        let o = self.offset + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[o..o + self.d]
    }
}

/// The shapes of one call, and the kernels over one (sequence, head) unit.
struct Unit<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    mask: &'a [f32],
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
}

impl<'a> Unit<'a> {
    /// The kernels' view of one call: q [B, Hkv, R, D], k and v [B, Hkv, S, D],
    /// the [B, 1, T, S] mask from its first element.
    #[allow(clippy::too_many_arguments)]
    fn new(q: Rows<'a>, k: Rows<'a>, v: Rows<'a>, mask: &'a [f32], hkv: usize, t: usize, s: usize, scale: f32) -> Self {
        Unit { q, k, v, mask, hkv, t, s, d: q.d, scale }
    }

    /// Normalized attention probabilities of query `row` of unit (bi, h) into `p`.
    #[inline(always)]
    fn probs(&self, bi: usize, h: usize, row: usize, p: &mut [f32]) {
        let qrow = self.q.row(bi, h, row);
        let mrow = &self.mask[(bi * self.t + row % self.t) * self.s..][..self.s];
        let mut max = f32::NEG_INFINITY;
        for (j, sc) in p.iter_mut().enumerate() {
            *sc =
                if mrow[j] <= MASKED_BELOW { mrow[j] } else { dot(qrow, self.k.row(bi, h, j)) * self.scale + mrow[j] };
            max = max.max(*sc);
        }
        // A masked key's probability is exactly 0 (exp underflows) unless the whole row
        // is masked (a padding query: uniform). Writing the 0 skips libm's slow
        // underflow path, which packed rows (many masked keys per query) made costly.
        let any_visible = max > MASKED_BELOW;
        let mut sum = 0f32;
        for sc in p.iter_mut() {
            *sc = if any_visible && *sc <= MASKED_BELOW { 0.0 } else { (*sc - max).exp() };
            sum += *sc;
        }
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|x| *x *= inv);
    }

    /// Output rows `rows` of unit u (a sequence and key/value head) into `out`
    /// (those rows' block of its R × D).
    fn forward(&self, u: usize, rows: Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.forward_avx2(u, rows, out) };
        }
        self.forward_any(u, rows, out)
    }

    /// The same code compiled for AVX2: its loops vectorize twice as wide. (No FMA:
    /// the arithmetic, hence every bit of the result, is the same on either path.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(&self, u: usize, rows: Range<usize>, out: &mut [f32]) {
        self.forward_any(u, rows, out)
    }

    #[inline(always)]
    fn forward_any(&self, u: usize, rows: Range<usize>, out: &mut [f32]) {
        let (bi, h) = (u / self.hkv, u % self.hkv);
        let mut p = vec![0f32; self.s];
        for (row, o) in rows.zip(out.chunks_exact_mut(self.d)) {
            self.probs(bi, h, row, &mut p);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    axpy(pj, self.v.row(bi, h, j), o);
                }
            }
        }
    }

    /// Gradients of unit u: `dq` its R × D block, `dk`, `dv` its S × D blocks.
    fn backward(&self, u: usize, grad: Rows, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.backward_avx2(u, grad, dq, dk, dv) };
        }
        self.backward_any(u, grad, dq, dk, dv)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn backward_avx2(&self, u: usize, grad: Rows, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        self.backward_any(u, grad, dq, dk, dv)
    }

    #[inline(always)]
    fn backward_any(&self, u: usize, grad: Rows, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (bi, h) = (u / self.hkv, u % self.hkv);
        let (mut p, mut dp) = (vec![0f32; self.s], vec![0f32; self.s]);
        for (row, dqr) in dq.chunks_exact_mut(self.d).enumerate() {
            self.probs(bi, h, row, &mut p);
            let g = grad.row(bi, h, row);
            let mut delta = 0f32;
            for (j, (&pj, dpj)) in p.iter().zip(dp.iter_mut()).enumerate() {
                if pj != 0.0 {
                    *dpj = dot(g, self.v.row(bi, h, j));
                    delta += pj * *dpj;
                    axpy(pj, g, &mut dv[j * self.d..][..self.d]);
                }
            }
            let qrow = self.q.row(bi, h, row);
            for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                if pj != 0.0 {
                    let ds = pj * (dpj - delta) * self.scale;
                    axpy(ds, self.k.row(bi, h, j), dqr);
                    axpy(ds, qrow, &mut dk[j * self.d..][..self.d]);
                }
            }
        }
    }
}

/// y += a·x
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (ye, xe) in y.iter_mut().zip(x) {
        *ye += a * xe;
    }
}

/// Run `f(u)` for every (sequence, head) unit, across the CPU threads when worth it.
fn for_units(units: usize, work_per_unit: usize, f: impl Fn(usize) + Sync) {
    for_each_unit(units, work_per_unit * units > 1 << 12, |range| range.for_each(&f));
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mask_storage, mask_layout) = self.mask.storage_and_layout();
        let Storage::Cpu(mask_cpu) = &*mask_storage else { candle_core::bail!("cpu attention: mask not on the CPU") };
        let (b, hkv, r, d) = l1.shape().dims4()?;
        let (t, s) = (self.mask.dim(2)?, l2.dims()[2]);
        let unit = Unit::new(
            Rows::new(s1.as_slice::<f32>()?, l1)?,
            Rows::new(s2.as_slice::<f32>()?, l2)?,
            Rows::new(s3.as_slice::<f32>()?, l3)?,
            &mask_cpu.as_slice::<f32>()?[mask_layout.start_offset()..],
            hkv,
            t,
            s,
            self.scale,
        );
        let mut out = vec![0f32; b * hkv * r * d];
        let shared = SharedOut::new(&mut out);
        // Rows are independent in the forward: split each unit's rows into parts when
        // there are few units (one packed GRPO row × 3 key/value heads on 2 threads
        // would leave a thread idle a third of the time). Same arithmetic per row.
        let parts = FORWARD_PARTS.div_ceil(b * hkv).clamp(1, r.max(1));
        let per = r.div_ceil(parts);
        // SAFETY: part w writes only its rows' block of its unit's R × D.
        for_units(b * hkv * parts, per * s * d, |w| {
            let (u, part) = (w / parts, w % parts);
            let rows = (part * per).min(r)..((part + 1) * per).min(r);
            let out = unsafe { shared.part((u * r + rows.start) * d, rows.len() * d) };
            unit.forward(u, rows, out)
        });
        Ok((CpuStorage::F32(out), Shape::from((b, hkv, r, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, hkv, r, d) = q.dims4()?;
        let (t, s) = (self.mask.dim(2)?, k.dim(2)?);
        let locked = [q, k, v, grad, &self.mask].map(|x| x.storage_and_layout());
        let mut slices = Vec::with_capacity(5);
        for (st, l) in &locked {
            let Storage::Cpu(c) = &**st else { candle_core::bail!("cpu attention: tensor not on the CPU") };
            slices.push((c.as_slice::<f32>()?, *l));
        }
        let rows = |i: usize| Rows::new(slices[i].0, slices[i].1);
        let mask = &slices[4].0[slices[4].1.start_offset()..];
        let unit = Unit::new(rows(0)?, rows(1)?, rows(2)?, mask, hkv, t, s, self.scale);
        let g = rows(3)?;
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; b * hkv * r * d], vec![0f32; b * hkv * s * d], vec![0f32; b * hkv * s * d]);
        let (pq, pk, pv) = (SharedOut::new(&mut dq), SharedOut::new(&mut dk), SharedOut::new(&mut dv));
        for_units(b * hkv, 2 * r * s * d, |u| {
            // SAFETY: unit u writes only its own blocks of dq, dk and dv.
            let (dq, dk, dv) =
                unsafe { (pq.part(u * r * d, r * d), pk.part(u * s * d, s * d), pv.part(u * s * d, s * d)) };
            unit.backward(u, g, dq, dk, dv);
        });
        drop(locked);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, hkv, r, d), dev)?),
            Some(Tensor::from_vec(dk, (b, hkv, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, hkv, s, d), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The same function from candle ops.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, hkv, r, _) = q.dims4().unwrap();
        let (t, s) = (mask.dim(2).unwrap(), k.dim(2).unwrap());
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .reshape((b, hkv, r / t, t, s))
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap();
        let probs = crate::model::ops::softmax_last(&scores, crate::model::Kernels::Differentiable).unwrap();
        probs.reshape((b, hkv, r, s)).unwrap().matmul(&v.contiguous().unwrap()).unwrap()
    }

    /// A causal mask after `offset` cached keys, with the first two keys of row 1 padding.
    fn mask(b: usize, t: usize, s: usize) -> Tensor {
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
        Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn equals_candle_ops_on_a_cache_view_with_a_causal_padding_mask() {
        let (b, hkv, rep, t, d, cap) = (2, 3, 2, 4, 16, 20);
        let s = 9;
        // Keys and values as a narrow view of a larger cache buffer, as KvCache hands them out.
        let k = rand(&[b, hkv, cap, d], 1).narrow(2, 0, s).unwrap();
        let v = rand(&[b, hkv, cap, d], 2).narrow(2, 0, s).unwrap();
        let q = rand(&[b, hkv, rep * t, d], 3);
        let m = mask(b, t, s);
        let got = attention(&q, &k, &v, &m, 0.25).unwrap();
        assert!(max_diff(&got, &composed(&q, &k, &v, &m, 0.25)) < 1e-5);
    }

    #[test]
    fn gradients_equal_those_of_candle_ops() {
        let (b, hkv, rep, t, d) = (2, 2, 3, 5, 8);
        let q = Var::from_tensor(&rand(&[b, hkv, rep * t, d], 4)).unwrap();
        let k = Var::from_tensor(&rand(&[b, hkv, t, d], 5)).unwrap();
        let v = Var::from_tensor(&rand(&[b, hkv, t, d], 6)).unwrap();
        let m = mask(b, t, t);
        let up = rand(&[b, hkv, rep * t, d], 7);
        let loss = |o: Tensor| (o * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(attention(&q, &k, &v, &m, 0.3).unwrap());
        let g2 = loss(composed(&q, &k, &v, &m, 0.3));
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = max_diff(g1.get(x).unwrap(), g2.get(x).unwrap());
            assert!(d < 1e-5, "d{name} differs by {d}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // Independent of candle's own backward: central differences in f32 on a tiny case.
        let (b, hkv, t, d) = (1, 1, 3, 4);
        let q = rand(&[b, hkv, t, d], 8);
        let k = Var::from_tensor(&rand(&[b, hkv, t, d], 9)).unwrap();
        let v = rand(&[b, hkv, t, d], 10);
        let m = mask(b, t, t);
        let up = rand(&[b, hkv, t, d], 11);
        let f = |k: &Tensor| {
            (attention(&q, k, &v, &m, 0.5).unwrap() * &up).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let g = (attention(&q, k.as_tensor(), &v, &m, 0.5).unwrap() * &up).unwrap().sum_all().unwrap();
        let grads = g.backward().unwrap();
        let dk: Vec<f32> = grads.get(&k).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let k0: Vec<f32> = k.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        for i in 0..k0.len() {
            let at = |delta: f32| {
                let mut kk = k0.clone();
                kk[i] += delta;
                f(&Tensor::from_vec(kk, (b, hkv, t, d), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - dk[i]).abs() < 2e-3, "dk[{i}]: analytic {} vs finite difference {fd}", dk[i]);
        }
    }
}
