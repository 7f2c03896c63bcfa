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
//!
//! A weight packs in f32 (evaluation and inference: the model's own values) or
//! in bf16 ([`Precision::Bf16`], GRPO's `rollout_dtype: bf16`): half the bytes,
//! read as bf16 and widened to f32 in registers (a shift, exact), with `x` and
//! the sums in f32. Why: at GRPO's 8–16 decoding rows a step is bound by reading
//! the weights (bench/RESULTS.md), so half the bytes is up to half the time;
//! the values are the weights rounded to bf16 (nearest even), which is what a
//! bf16 rollout engine such as vLLM samples from. The widening needs only
//! AVX-512F, not AVX512-BF16.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::threads::{for_each_unit, SharedOut};

/// Output columns per panel: three 16-lane vectors.
pub const PANEL: usize = 48;

/// What a packed weight stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// The weight's own f32 values.
    F32,
    /// The weight rounded to bf16 (nearest even), widened back to f32 as it is read.
    Bf16,
}

/// A weight [N, K] packed for [`matmul_packed`].
pub struct PackedWeight {
    pub n: usize,
    pub k: usize,
    panels: Panels,
}

/// ceil(N / PANEL) panels of [K][PANEL] values, zero past column N.
enum Panels {
    F32(Aligned<f32>),
    /// bf16 bit patterns.
    Bf16(Aligned<u16>),
}

/// One panel's values, as the kernels read them.
#[derive(Clone, Copy)]
enum PanelRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// A buffer whose values start on a 64-byte boundary (a whole cache line per
/// vector load of f32 panels).
struct Aligned<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn zeroed(len: usize) -> Aligned<T> {
        let size = std::mem::size_of::<T>();
        let slack = 64 / size;
        let buf = vec![T::default(); len + slack];
        let start = (64 - (buf.as_ptr() as usize % 64)) % 64 / size;
        Aligned { buf, start, len }
    }

    fn as_slice(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays NaN): PyTorch's and `half`'s rounding.
fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// bf16 bits → f32, exactly.
fn bf16_value(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The row-major weight [n, k] rearranged into panels of `T`.
fn pack_panels<T: Copy + Default>(w: &[f32], n: usize, k: usize, convert: impl Fn(f32) -> T) -> Aligned<T> {
    assert_eq!(w.len(), n * k, "packed weight: slice size");
    let panels = n.div_ceil(PANEL);
    let mut out = Aligned::zeroed(panels * k * PANEL);
    let data = out.as_mut_slice();
    for p in 0..panels {
        let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
        for c in 0..PANEL.min(n - p * PANEL) {
            let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
            for (q, &v) in row.iter().enumerate() {
                panel[q * PANEL + c] = convert(v);
            }
        }
    }
    out
}

impl PackedWeight {
    /// Pack a row-major weight [n, k] in f32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedWeight {
        PackedWeight::pack_as(w, n, k, Precision::F32)
    }

    /// Pack a row-major weight [n, k] in `precision`.
    pub fn pack_as(w: &[f32], n: usize, k: usize, precision: Precision) -> PackedWeight {
        let panels = match precision {
            Precision::F32 => Panels::F32(pack_panels(w, n, k, |v| v)),
            Precision::Bf16 => Panels::Bf16(pack_panels(w, n, k, bf16_bits)),
        };
        PackedWeight { n, k, panels }
    }

    /// A weight tensor [N, K] packed in `precision`, when the CPU forms apply
    /// to it (an f32 tensor on the CPU, kernels not forced portable) and the
    /// CPU has a packed kernel (AVX-512); `None` otherwise.
    pub fn for_tensor(w: &Tensor, precision: Precision) -> Result<Option<Arc<PackedWeight>>> {
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
        Ok(Some(Arc::new(PackedWeight::pack_as(&cpu.as_slice::<f32>()?[a..b], n, k, precision))))
    }

    pub fn precision(&self) -> Precision {
        match self.panels {
            Panels::F32(_) => Precision::F32,
            Panels::Bf16(_) => Precision::Bf16,
        }
    }

    /// Panel `p`'s values.
    fn panel(&self, p: usize) -> PanelRef<'_> {
        let span = p * self.k * PANEL..(p + 1) * self.k * PANEL;
        match &self.panels {
            Panels::F32(a) => PanelRef::F32(&a.as_slice()[span]),
            Panels::Bf16(a) => PanelRef::Bf16(&a.as_slice()[span]),
        }
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
    for_each_unit(n.div_ceil(PANEL), m * n * k > 1 << 15, |r| {
        for p in r {
            // SAFETY: panel p's columns are written by this unit only; `out` outlives the call.
            unsafe { panel(x, m, k, w.panel(p), p * PANEL, n, shared.ptr()) }
        }
    });
}

/// Columns c0..min(c0 + PANEL, n) of every row.
///
/// # Safety
/// `out` is an [m, n] buffer whose columns c0..c0 + PANEL only this call writes;
/// `wp` holds k × PANEL values.
unsafe fn panel(x: &[f32], m: usize, k: usize, wp: PanelRef, c0: usize, n: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if has_kernel() {
        return match wp {
            PanelRef::F32(w) => avx512::panel::<false>(x, m, k, w.as_ptr().cast(), c0, n, out),
            PanelRef::Bf16(w) => avx512::panel::<true>(x, m, k, w.as_ptr().cast(), c0, n, out),
        };
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
/// multiply-adds over k in order from zero (of the weight's f32 value, a
/// bf16 one widened exactly).
///
/// # Safety
/// As [`panel`].
unsafe fn scalar_panel(x: &[f32], m: usize, k: usize, wp: PanelRef, c0: usize, n: usize, out: *mut f32) {
    let weight = |i: usize| match wp {
        PanelRef::F32(w) => w[i],
        PanelRef::Bf16(w) => bf16_value(w[i]),
    };
    let cols = PANEL.min(n - c0);
    for i in 0..m {
        for c in 0..cols {
            let mut s = 0f32;
            for q in 0..k {
                s = x[i * k + q].mul_add(weight(q * PANEL + c), s);
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

    /// One panel; `BF16` says what `wp` holds (bf16 bits or f32 values, k × PANEL of them).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel<const BF16: bool>(
        x: &[f32],
        m: usize,
        k: usize,
        wp: *const u8,
        c0: usize,
        n: usize,
        out: *mut f32,
    ) {
        let mut i = 0;
        while i + MR <= m {
            tile::<BF16, MR>(x, k, wp, i, c0, n, out);
            i += MR;
        }
        match m - i {
            7 => tile::<BF16, 7>(x, k, wp, i, c0, n, out),
            6 => tile::<BF16, 6>(x, k, wp, i, c0, n, out),
            5 => tile::<BF16, 5>(x, k, wp, i, c0, n, out),
            4 => tile::<BF16, 4>(x, k, wp, i, c0, n, out),
            3 => tile::<BF16, 3>(x, k, wp, i, c0, n, out),
            2 => tile::<BF16, 2>(x, k, wp, i, c0, n, out),
            1 => tile::<BF16, 1>(x, k, wp, i, c0, n, out),
            _ => {}
        }
    }

    /// 16 weights from element `at` of the panel, as f32 lanes: an aligned f32
    /// load, or 16 bf16 widened exactly (zero-extend to 32 bits, shift left 16).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weights16<const BF16: bool>(wp: *const u8, at: usize) -> __m512 {
        if BF16 {
            let half = _mm256_loadu_si256(wp.cast::<u16>().add(at).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        } else {
            _mm512_load_ps(wp.cast::<f32>().add(at))
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const BF16: bool, const R: usize>(
        x: &[f32],
        k: usize,
        wp: *const u8,
        i: usize,
        c0: usize,
        n: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let xp = x.as_ptr().add(i * k);
        for q in 0..k {
            let wv: [__m512; NV] = std::array::from_fn(|v| weights16::<BF16>(wp, q * PANEL + v * 16));
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
    fn the_vector_kernel_equals_the_scalar_form_bit_for_bit_in_f32_and_bf16() {
        let (m, n, k) = (11, 100, 37);
        let (x, w) = (rand(m * k, 1), rand(n * k, 2));
        for precision in [Precision::F32, Precision::Bf16] {
            let pw = PackedWeight::pack_as(&w, n, k, precision);
            assert_eq!(pw.precision(), precision);
            let run = |vector: bool| {
                let mut out = vec![0f32; m * n];
                for p in 0..n.div_ceil(PANEL) {
                    let wp = pw.panel(p);
                    unsafe {
                        if vector {
                            #[cfg(target_arch = "x86_64")]
                            match wp {
                                PanelRef::F32(w) => {
                                    avx512::panel::<false>(&x, m, k, w.as_ptr().cast(), p * PANEL, n, out.as_mut_ptr())
                                }
                                PanelRef::Bf16(w) => {
                                    avx512::panel::<true>(&x, m, k, w.as_ptr().cast(), p * PANEL, n, out.as_mut_ptr())
                                }
                            }
                        } else {
                            scalar_panel(&x, m, k, wp, p * PANEL, n, out.as_mut_ptr())
                        }
                    }
                }
                out
            };
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert_eq!(run(true), run(false), "{precision:?}");
                continue;
            }
            eprintln!("skipped: the AVX-512 packed kernel (this CPU has no AVX-512; nothing is packed here)");
            return;
        }
    }

    #[test]
    fn bf16_packing_rounds_to_nearest_even_as_pytorch_does() {
        // 1 + 2⁻⁸ is halfway between bf16's 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: even is 1 + 2⁻⁶.
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        // Just above halfway rounds up.
        assert_eq!(bf16_value(bf16_bits(f32::from_bits(0x3f80_8001))), 1.0 + 1.0 / 128.0);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(-0.0)).to_bits(), (-0.0f32).to_bits());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn matches_a_float64_reference_and_a_row_is_the_same_in_any_batch() {
        for precision in [Precision::F32, Precision::Bf16] {
            for &(m, n, k) in &[(1, 1, 1), (3, 47, 5), (9, 97, 64), (32, 192, 576), (17, 100, 33)] {
                let (x, w) = (rand(m * k, m as u64), rand(n * k, 7 + n as u64));
                let pw = PackedWeight::pack_as(&w, n, k, precision);
                // The reference multiplies by the values the panel holds: the weights,
                // or the weights rounded to bf16.
                let held = |v: f32| match precision {
                    Precision::F32 => v as f64,
                    Precision::Bf16 => bf16_value(bf16_bits(v)) as f64,
                };
                let mut out = vec![0f32; m * n];
                matmul_packed(&x, m, &pw, &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let r: f64 = (0..k).map(|q| x[i * k + q] as f64 * held(w[j * k + q])).sum();
                        let g = out[i * n + j] as f64;
                        assert!(
                            (g - r).abs() < 1e-4 * (1.0 + r.abs()),
                            "{precision:?} m={m} n={n} k={k} [{i},{j}]: {g} vs {r}"
                        );
                    }
                    let mut alone = vec![0f32; n];
                    matmul_packed(&x[i * k..(i + 1) * k], 1, &pw, &mut alone);
                    assert_eq!(
                        alone,
                        out[i * n..(i + 1) * n],
                        "{precision:?} m={m} n={n} k={k}: row {i} alone differs"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_panels_take_half_the_bytes_and_stay_within_bf16_rounding_of_f32() {
        let (m, n, k) = (8, 96, 576);
        let (x, w) = (rand(m * k, 3), rand(n * k, 4));
        let (f, b) =
            (PackedWeight::pack_as(&w, n, k, Precision::F32), PackedWeight::pack_as(&w, n, k, Precision::Bf16));
        let bytes = |p: &PackedWeight| match &p.panels {
            Panels::F32(a) => a.as_slice().len() * 4,
            Panels::Bf16(a) => a.as_slice().len() * 2,
        };
        assert_eq!(bytes(&b) * 2, bytes(&f));
        let (mut yf, mut yb) = (vec![0f32; m * n], vec![0f32; m * n]);
        matmul_packed(&x, m, &f, &mut yf);
        matmul_packed(&x, m, &b, &mut yb);
        // Each weight moves by at most 2⁻⁹ of itself; over k terms of |x·w| ≤ 1 the
        // sum moves by at most k·2⁻⁹ (and in practice by about √k·2⁻⁹).
        let worst = yf.iter().zip(&yb).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > 0.0, "bf16 rounding changed nothing: the panels are not bf16");
        assert!(worst < k as f32 / 512.0, "bf16 product off by {worst}");
    }
}
