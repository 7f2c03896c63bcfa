//! `x @ Wᵀ` against a weight packed once for inference: the weight's columns of
//! the output in panels of [`PANEL`], each panel stored k-major (for every k,
//! its PANEL weights side by side, 64-byte aligned). A register tile then
//! loads PANEL/16 vectors of weights and broadcasts one x value per row for
//! every k, the outer-product form of an optimized gemm, with no horizontal
//! sums at the end and no packing per call (the weight is packed at load).
//!
//! Why beside [`super::matmul_t`]'s dot-product form: that form reads weights
//! as they are stored (training updates them in place every step) and runs at
//! about half the FMA rate at a decode batch of 32 (measured with `cargo bench
//! --bench kernels`: 209–268 GFLOP/s on SmolLM2's shapes, this form 490–518);
//! rearranging its tiles or vectorizing its 16-lane sums did not close the gap.
//! This form runs at the rate of gemm's own kernels without packing the weight
//! at each call, for any number of rows, so a prefill takes it too. The price
//! is one more copy of the weights, held by a model that only generates.
//!
//! Every output element is one sequential sum over k (fused multiply-adds in
//! order from zero), whatever the number of rows, the tile a row falls in or
//! the thread split: a sequence gets bitwise the same logits alone or in any
//! batch, in a prefill or a decode step (the AVX-512 kernel equals the scalar
//! form bit for bit). Without AVX-512 nothing is packed and the unpacked
//! product runs (see [`has_kernel`] for why).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::threads::{for_each_unit, SharedOut};

/// Output columns per panel: three 16-lane vectors.
pub const PANEL: usize = 48;

/// A weight [N, K] packed for [`matmul_packed`].
pub struct PackedWeight {
    pub n: usize,
    pub k: usize,
    /// ceil(N / PANEL) panels of [K][PANEL] floats from `start`, zero past column N.
    buf: Vec<f32>,
    start: usize,
}

impl PackedWeight {
    /// Pack a row-major weight [n, k].
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedWeight {
        assert_eq!(w.len(), n * k, "packed weight: slice size");
        let panels = n.div_ceil(PANEL);
        let len = panels * k * PANEL;
        // 16 floats of slack to start the panels on a 64-byte boundary.
        let mut buf = vec![0f32; len + 16];
        let start = (64 - (buf.as_ptr() as usize % 64)) % 64 / 4;
        let data = &mut buf[start..start + len];
        for p in 0..panels {
            let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
            for c in 0..PANEL.min(n - p * PANEL) {
                let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                for (q, &v) in row.iter().enumerate() {
                    panel[q * PANEL + c] = v;
                }
            }
        }
        PackedWeight { n, k, buf, start }
    }

    /// A weight tensor [N, K] packed, when the CPU forms apply to it (an f32
    /// tensor on the CPU, kernels not forced portable) and the CPU has a packed
    /// kernel (AVX-512); `None` otherwise.
    pub fn for_tensor(w: &Tensor) -> Result<Option<Arc<PackedWeight>>> {
        if !super::cpu_form(&[w]) || !has_kernel() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        // Read in place: a CPU tensor's own storage, no copy to the host to count.
        let (storage, layout) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
            candle_core::bail!("packing a weight: not a contiguous CPU tensor");
        };
        Ok(Some(Arc::new(PackedWeight::pack(&cpu.as_slice::<f32>()?[a..b], n, k))))
    }

    fn panels(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.n.div_ceil(PANEL) * self.k * PANEL]
    }
}

/// `x` [.., K] @ Wᵀ → [.., N] for an f32 `x` on the CPU (where a weight is packed:
/// [`PackedWeight::for_tensor`]). Inference only: there is no backward.
pub fn product(x: &Tensor, w: &Arc<PackedWeight>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("packed product: a scalar input");
    };
    if k != w.k {
        candle_core::bail!("packed product: x has {k} columns but the weight {}", w.k);
    }
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, k))?.apply_op1_no_bwd(&Product(w.clone()))?;
    let mut out = lead.to_vec();
    out.push(w.n);
    y.reshape(out)
}

struct Product(Arc<PackedWeight>);

impl CustomOp1 for Product {
    fn name(&self) -> &'static str {
        "packed-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("packed product: x [{m}, {k}] is not contiguous");
        };
        let x = &s.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; m * self.0.n];
        matmul_packed(x, m, &self.0, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((m, self.0.n))))
    }
}

/// out [m, n] = x [m, k] @ Wᵀ, panels shared out across the CPU threads.
pub fn matmul_packed(x: &[f32], m: usize, w: &PackedWeight, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() == m * k && out.len() == m * n, "packed matmul: slice sizes");
    let shared = SharedOut::new(out);
    let panels = w.panels();
    for_each_unit(n.div_ceil(PANEL), m * n * k > 1 << 15, |r| {
        for p in r {
            // SAFETY: panel p's columns are written by this unit only; `out` outlives the call.
            unsafe { panel(x, m, k, &panels[p * k * PANEL..(p + 1) * k * PANEL], p * PANEL, n, shared.ptr()) }
        }
    });
}

/// Columns c0..min(c0 + PANEL, n) of every row.
///
/// # Safety
/// `out` is an [m, n] buffer whose columns c0..c0 + PANEL only this call writes.
unsafe fn panel(x: &[f32], m: usize, k: usize, wp: &[f32], c0: usize, n: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if has_kernel() {
        return avx512::panel(x, m, k, wp, c0, n, out);
    }
    scalar_panel(x, m, k, wp, c0, n, out)
}

/// Whether models loaded for inference get packed weights here: CPU forms in
/// use and a packed kernel for this CPU.
pub fn packs_here() -> bool {
    super::mode() == super::Mode::Cpu && has_kernel()
}

/// Whether this CPU has a packed kernel (AVX-512); without one weights are not
/// packed and the unpacked product runs. Only AVX-512: an AVX2 form of this kernel
/// (3 rows × 3 vectors of 8) measured no faster than the unpacked AVX2 kernel,
/// which already runs near AVX2's FMA rate (about 225 against 210–230 GFLOP/s
/// at 32 rows, and 134 against 220 on the vocabulary at 8 rows, with AVX-512
/// switched off on the machine of bench/RESULTS.md's 2026-12-03 section).
fn has_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The reference form every vector kernel equals bit for bit: per output, fused
/// multiply-adds over k in order from zero.
///
/// # Safety
/// As [`panel`].
unsafe fn scalar_panel(x: &[f32], m: usize, k: usize, wp: &[f32], c0: usize, n: usize, out: *mut f32) {
    let cols = PANEL.min(n - c0);
    for i in 0..m {
        for c in 0..cols {
            let mut s = 0f32;
            for q in 0..k {
                s = x[i * k + q].mul_add(wp[q * PANEL + c], s);
            }
            *out.add(i * n + c0 + c) = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// x rows per register tile: 8 × 3 accumulators, 3 weight vectors and a broadcast.
    const MR: usize = 8;
    const NV: usize = PANEL / 16;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel(x: &[f32], m: usize, k: usize, wp: &[f32], c0: usize, n: usize, out: *mut f32) {
        let mut i = 0;
        while i + MR <= m {
            tile::<MR>(x, k, wp, i, c0, n, out);
            i += MR;
        }
        match m - i {
            7 => tile::<7>(x, k, wp, i, c0, n, out),
            6 => tile::<6>(x, k, wp, i, c0, n, out),
            5 => tile::<5>(x, k, wp, i, c0, n, out),
            4 => tile::<4>(x, k, wp, i, c0, n, out),
            3 => tile::<3>(x, k, wp, i, c0, n, out),
            2 => tile::<2>(x, k, wp, i, c0, n, out),
            1 => tile::<1>(x, k, wp, i, c0, n, out),
            _ => {}
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize>(x: &[f32], k: usize, wp: &[f32], i: usize, c0: usize, n: usize, out: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let xp = x.as_ptr().add(i * k);
        let w = wp.as_ptr();
        for q in 0..k {
            let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_load_ps(w.add(q * PANEL + v * 16)));
            for (a, acc_a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(a * k + q));
                for v in 0..NV {
                    acc_a[v] = _mm512_fmadd_ps(xv, wv[v], acc_a[v]);
                }
            }
        }
        let cols = PANEL.min(n - c0);
        for (a, acc_a) in acc.iter().enumerate() {
            let row = out.add((i + a) * n + c0);
            for (v, vec) in acc_a.iter().enumerate() {
                let left = cols.saturating_sub(v * 16).min(16);
                if left == 16 {
                    _mm512_storeu_ps(row.add(v * 16), *vec);
                } else if left > 0 {
                    _mm512_mask_storeu_ps(row.add(v * 16), (1u32 << left) as u16 - 1, *vec);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn the_vector_kernel_equals_the_scalar_form_bit_for_bit() {
        let (m, n, k) = (11, 100, 37);
        let (x, w) = (rand(m * k, 1), rand(n * k, 2));
        let pw = PackedWeight::pack(&w, n, k);
        type Kernel = unsafe fn(&[f32], usize, usize, &[f32], usize, usize, *mut f32);
        let run = |f: Kernel| {
            let mut out = vec![0f32; m * n];
            let panels = pw.panels();
            for p in 0..n.div_ceil(PANEL) {
                unsafe { f(&x, m, k, &panels[p * k * PANEL..(p + 1) * k * PANEL], p * PANEL, n, out.as_mut_ptr()) }
            }
            out
        };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(run(avx512::panel), run(scalar_panel));
            return;
        }
        eprintln!("skipped: the AVX-512 packed kernel (this CPU has no AVX-512; nothing is packed here)");
    }

    #[test]
    fn matches_a_float64_reference_and_a_row_is_the_same_in_any_batch() {
        for &(m, n, k) in &[(1, 1, 1), (3, 47, 5), (9, 97, 64), (32, 192, 576), (17, 100, 33)] {
            let (x, w) = (rand(m * k, m as u64), rand(n * k, 7 + n as u64));
            let pw = PackedWeight::pack(&w, n, k);
            let mut out = vec![0f32; m * n];
            matmul_packed(&x, m, &pw, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
                    let g = out[i * n + j] as f64;
                    assert!((g - r).abs() < 1e-4 * (1.0 + r.abs()), "m={m} n={n} k={k} [{i},{j}]: {g} vs {r}");
                }
                let mut alone = vec![0f32; n];
                matmul_packed(&x[i * k..(i + 1) * k], 1, &pw, &mut alone);
                assert_eq!(alone, out[i * n..(i + 1) * n], "m={m} n={n} k={k}: row {i} alone differs");
            }
        }
    }
}
