//! `x @ Wᵀ`: the one matrix product of every linear layer, as one op on every
//! device, with a hand-written CPU form for an `x` of few rows (the shape of
//! every product in a decode step, one row per sequence of the batch).
//!
//! Why one op rather than candle's `x.matmul(&w.t())`: for the backward.
//! candle would produce the weight's gradient as a transposed [K, N] tensor and
//! add it to a zero [N, K] one through a strided copy, a slow pass over every
//! parameter (on CUDA, several weight-sized temporaries per weight per
//! micro-batch); here the gradient comes out as [N, K] directly. The forward is
//! the device's own matmul (cuBLAS, gemm) reading `w` through a transposed
//! layout, except for few rows on the CPU:
//!
//! Why a CPU form: candle's CPU matmul goes through the `gemm` crate, which for
//! a handful of rows runs a single-threaded matrix-vector path (M = 1), or packs
//! the whole weight matrix before multiplying (small M > 1). A decode step is
//! bound by reading the weights, so both waste most of the step: here each
//! weight row is read from memory once, multiplied against every row of `x`
//! while it sits in L1, and the output columns are split across threads.
//!
//! Every output element of the CPU form is the same dot product (lane-wise
//! partial sums over K in order, a fixed reduction, then the scalar tail)
//! whatever the number of rows or the thread split, so a sequence gets bitwise
//! the same logits alone or in a batch. With AVX-512 the lanes are 16 and the
//! register tiles 8 rows × 3 weight rows (32 vector registers): at a decode
//! batch of 32 the product is bound by arithmetic, not memory, and twice the
//! lanes is up to twice the rate where the CPU executes 512-bit FMAs whole.

use candle_core::{backend::BackendStorage, CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::threads::{for_each_unit, SharedOut};

/// Up to this many rows of `x` the hand-written kernel is used; above it
/// `gemm`'s packed kernels win (timed against each other on this machine's CPU
/// for SmolLM2's weight shapes: ahead up to 48 rows, even at 64).
pub const MAX_ROWS: usize = 48;

/// Output columns per unit of parallel work (the pool hands out runs of units).
const COLS_PER_UNIT: usize = 8;

/// `x` [M, K] @ `w` [N, K]ᵀ → [M, N] on any device and float dtype,
/// differentiable in both. On the CPU in f32 (the dispatch rule,
/// [`super::cpu_form`]) the hand-written kernel takes up to [`MAX_ROWS`] rows.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let skinny = super::cpu_form(&[x, w]);
    x.apply_op2(w, MatmulT { skinny })
}

struct MatmulT {
    /// The CPU form may run (it does up to [`MAX_ROWS`] rows).
    skinny: bool,
}

impl MatmulT {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul-t: x is [{m}, {k}] but w is [{n}, {k2}]");
        }
        Ok((m, n, k))
    }
}

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "matmul-t"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = Self::dims(l1, l2)?;
        if !self.skinny || m > MAX_ROWS {
            let wt = l2.transpose(0, 1)?;
            super::check_cublas(l1, &wt, "matmul-t")?;
            return Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n))));
        }
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        let mut out = vec![0f32; m * n];
        matmul_t_slices(&x, &w, m, n, k, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (m, n, k) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?, Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // y = x wᵀ: dx = dy w, dw = dyᵀ x ([N, K], the weight's own layout). The incoming
        // gradient may be a broadcast (a sum's backward): cuBLAS needs real strides.
        let grad = grad.contiguous()?;
        let gt = grad.t()?;
        super::check_cublas(grad.layout(), w.layout(), "matmul-t backward (dx)")?;
        super::check_cublas(gt.layout(), x.layout(), "matmul-t backward (dw)")?;
        Ok((Some(grad.matmul(w)?), Some(gt.matmul(x)?)))
    }
}

/// The storage as a contiguous f32 slice, borrowed when it already is one.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return Ok(std::borrow::Cow::Borrowed(&s.as_slice::<f32>()?[a..b]));
    }
    let mut dst = CpuStorage::F32(vec![0f32; l.shape().elem_count()]);
    s.copy_strided_src(&mut dst, 0, l)?;
    match dst {
        CpuStorage::F32(v) => Ok(std::borrow::Cow::Owned(v)),
        _ => unreachable!("allocated as f32 above"),
    }
}

/// out[i, j] = dot(x[i, :], w[j, :]) for x [m, k], w [n, k], out [m, n], all row-major;
/// the columns are shared out across the CPU threads.
pub fn matmul_t_slices(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n, "skinny matmul: slice sizes");
    let shared = SharedOut::new(out);
    for_each_unit(n.div_ceil(COLS_PER_UNIT), m * n * k > 1 << 15, |r| {
        let (c0, c1) = (r.start * COLS_PER_UNIT, (r.end * COLS_PER_UNIT).min(n));
        // SAFETY: this range of units, hence columns c0..c1, is handed to exactly one thread,
        // and `out` outlives the call.
        unsafe { columns(x, w, m, k, c0, c1, n, shared.ptr()) }
    });
}

/// Columns c0..c1 of the output.
///
/// # Safety
/// `out` points at an [m, ldo] buffer whose columns c0..c1 only this call writes.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(x: &[f32], w: &[f32], m: usize, k: usize, c0: usize, c1: usize, ldo: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return avx512::columns(x, w, m, k, c0, c1, ldo, out);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return avx2::columns(x, w, m, k, c0, c1, ldo, out);
    }
    for j in c0..c1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            *out.add(i * ldo + j) = dot(&x[i * k..(i + 1) * k], wr);
        }
    }
}

/// A dot product in 8 interleaved partial sums (vectorizable without fast-math).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = reduce8(&acc);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// The fixed reduction of 8 partial sums (pairwise), shared by both kernels.
#[inline(always)]
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Weight rows per tile: each x chunk loaded is used against this many rows.
    const NR: usize = 3;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(x: &[f32], w: &[f32], m: usize, k: usize, c0: usize, c1: usize, ldo: usize, out: *mut f32) {
        let mut j = c0;
        while j < c1 {
            let nr = NR.min(c1 - j);
            let mut i = 0;
            // Tiles of 4 × NR accumulators (12 of the 16 ymm registers), then one tile of
            // the leftover rows: a batch of 8 is two full tiles, none of them so small
            // that its few accumulators wait on the FMA latency.
            while i + 4 <= m {
                tile::<4>(x, w, k, i, j, nr, ldo, out);
                i += 4;
            }
            match m - i {
                3 => tile::<3>(x, w, k, i, j, nr, ldo, out),
                2 => tile::<2>(x, w, k, i, j, nr, ldo, out),
                1 => tile::<1>(x, w, k, i, j, nr, ldo, out),
                _ => {}
            }
            j += nr;
        }
    }

    /// out[i..i+MR, j..j+nr] for nr ≤ NR weight rows.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile<const MR: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        j: usize,
        nr: usize,
        ldo: usize,
        out: *mut f32,
    ) {
        let m_total = x.len() / k;
        let kv = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let xp = x.as_ptr().add(i * k);
        // Rows past nr repeat the last real row: same memory traffic, results dropped.
        let wp: [*const f32; NR] = std::array::from_fn(|r| w.as_ptr().add((j + r.min(nr - 1)) * k));
        // With more than one row tile, the first tile of a block asks for the next
        // block's weights (the NR rows that follow in memory) while it works: the later
        // tiles compute from L1 while nothing streams, and a large matrix (the
        // vocabulary projection) was read at half the memory bandwidth. A single tile
        // streams at full speed on the hardware prefetcher alone.
        let next = (i == 0 && MR < m_total).then(|| w.as_ptr().wrapping_add((j + NR) * k));
        let mut p = 0;
        while p < kv {
            if let (Some(next), 0) = (next, p % 16) {
                for r in 0..NR {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * k + p) as *const i8);
                }
            }
            let wv: [__m256; NR] = std::array::from_fn(|r| _mm256_loadu_ps(wp[r].add(p)));
            for (a, accr) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(a * k + p));
                for r in 0..NR {
                    accr[r] = _mm256_fmadd_ps(xv, wv[r], accr[r]);
                }
            }
            p += 8;
        }
        for (a, accr) in acc.iter().enumerate() {
            for (r, v) in accr.iter().enumerate().take(nr) {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                let mut s = super::reduce8(&lanes);
                for q in kv..k {
                    s += *xp.add(a * k + q) * *wp[r].add(q);
                }
                *out.add((i + a) * ldo + j + r) = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Weight rows per tile, and x rows per full tile (24 accumulators, 3 weight
    /// vectors and an x vector: 28 of the 32 registers).
    const NR: usize = 3;
    const MR: usize = 8;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(x: &[f32], w: &[f32], m: usize, k: usize, c0: usize, c1: usize, ldo: usize, out: *mut f32) {
        let mut j = c0;
        while j < c1 {
            let nr = NR.min(c1 - j);
            let mut i = 0;
            while i + MR <= m {
                tile::<MR>(x, w, k, i, j, nr, ldo, out);
                i += MR;
            }
            match m - i {
                7 => tile::<7>(x, w, k, i, j, nr, ldo, out),
                6 => tile::<6>(x, w, k, i, j, nr, ldo, out),
                5 => tile::<5>(x, w, k, i, j, nr, ldo, out),
                4 => tile::<4>(x, w, k, i, j, nr, ldo, out),
                3 => tile::<3>(x, w, k, i, j, nr, ldo, out),
                2 => tile::<2>(x, w, k, i, j, nr, ldo, out),
                1 => tile::<1>(x, w, k, i, j, nr, ldo, out),
                _ => {}
            }
            j += nr;
        }
    }

    /// The fixed pairwise sum of 16 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce16(v: __m512) -> f32 {
        let mut l = [0f32; 16];
        _mm512_storeu_ps(l.as_mut_ptr(), v);
        let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
        ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
    }

    /// out[i..i+R, j..j+nr] for nr ≤ NR weight rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile<const R: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        j: usize,
        nr: usize,
        ldo: usize,
        out: *mut f32,
    ) {
        let kv = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); NR]; R];
        let xp = x.as_ptr().add(i * k);
        // Rows past nr repeat the last real row: same memory traffic, results dropped.
        let wp: [*const f32; NR] = std::array::from_fn(|r| w.as_ptr().add((j + r.min(nr - 1)) * k));
        // The first tile of a block asks for the next block's weights while it works
        // (see the AVX2 kernel; here a lone tile gains from it too, measured).
        let next = (i == 0).then(|| w.as_ptr().wrapping_add((j + NR) * k));
        let mut p = 0;
        while p < kv {
            if let Some(next) = next {
                for r in 0..NR {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * k + p) as *const i8);
                }
            }
            let wv: [__m512; NR] = std::array::from_fn(|r| _mm512_loadu_ps(wp[r].add(p)));
            for (a, accr) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(a * k + p));
                for r in 0..NR {
                    accr[r] = _mm512_fmadd_ps(xv, wv[r], accr[r]);
                }
            }
            p += 16;
        }
        for (a, accr) in acc.iter().enumerate() {
            for (r, v) in accr.iter().enumerate().take(nr) {
                let mut s = reduce16(*v);
                for q in kv..k {
                    s += *xp.add(a * k + q) * *wp[r].add(q);
                }
                *out.add((i + a) * ldo + j + r) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The f64 reference: plain loops.
    fn reference(x: &Tensor, w: &Tensor) -> Vec<Vec<f64>> {
        let (x, w) = (x.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        x.iter()
            .map(|xr| w.iter().map(|wr| xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum()).collect())
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_for_every_row_count_and_ragged_sizes() {
        // K not a multiple of 8 and N not a multiple of the tile or task size exercise every tail.
        for &(m, n, k) in &[(1, 1, 1), (1, 130, 67), (2, 5, 8), (3, 67, 200), (4, 129, 576), (7, 300, 33), (16, 70, 96)]
        {
            let (x, w) = (rand((m, k), m as u64), rand((n, k), 100 + n as u64));
            let got = matmul_t(&x, &w).unwrap().to_vec2::<f32>().unwrap();
            let want = reference(&x, &w);
            for (gr, wr) in got.iter().zip(&want) {
                for (g, r) in gr.iter().zip(wr) {
                    assert!((*g as f64 - r).abs() < 1e-4 * (1.0 + r.abs()), "m={m} n={n} k={k}: {g} vs {r}");
                }
            }
        }
    }

    /// The order of operations every vector form follows, for `L` lanes, in
    /// scalar code: lane-wise fused multiply-adds over K in order, the fixed
    /// lane reduction, then the unfused scalar tail.
    fn lane_model<const L: usize>(x: &[f32], w: &[f32]) -> f32 {
        let kv = x.len() / L * L;
        let mut acc = [0f32; L];
        for p in (0..kv).step_by(L) {
            for l in 0..L {
                acc[l] = x[p + l].mul_add(w[p + l], acc[l]);
            }
        }
        // The kernels' fixed reduction: halves added lane by lane down to 8, then pairwise.
        let mut h: [f32; 8] = std::array::from_fn(|i| acc[i]);
        for half in (8..L).step_by(8) {
            for (i, v) in h.iter_mut().enumerate() {
                *v += acc[half + i];
            }
        }
        let mut s = reduce8(&h);
        for q in kv..x.len() {
            s += x[q] * w[q];
        }
        s
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_vector_form_equals_the_scalar_model_of_its_order_bit_for_bit() {
        type Columns = unsafe fn(&[f32], &[f32], usize, usize, usize, usize, usize, *mut f32);
        type Model = fn(&[f32], &[f32]) -> f32;
        let forms: [(&str, bool, Columns, Model); 2] = [
            (
                "avx2",
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                avx2::columns,
                lane_model::<8>,
            ),
            ("avx512", std::arch::is_x86_feature_detected!("avx512f"), avx512::columns, lane_model::<16>),
        ];
        // Every tile height (full tiles and each leftover), ragged K and column counts.
        for &(m, n, k) in &[(1, 7, 5), (3, 10, 40), (8, 9, 67), (13, 14, 96), (19, 5, 200), (32, 8, 33)] {
            let (x, w) = (rand((m, k), 20 + m as u64), rand((n, k), 40 + n as u64));
            let (x, w) = (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w.flatten_all().unwrap().to_vec1());
            let w: Vec<f32> = w.unwrap();
            for (name, available, columns, model) in forms {
                if !available {
                    eprintln!("{name}: this CPU lacks it, its form is not checked here");
                    continue;
                }
                let mut out = vec![0f32; m * n];
                // SAFETY: the CPU has the form's instructions; out is [m, n], all columns written here.
                unsafe { columns(&x, &w, m, k, 0, n, n, out.as_mut_ptr()) };
                for i in 0..m {
                    for j in 0..n {
                        let want = model(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                        assert_eq!(out[i * n + j].to_bits(), want.to_bits(), "{name} m={m} n={n} k={k} [{i}, {j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_bitwise_the_same_result_alone_or_in_any_batch() {
        // A property of the CPU form (gemm's packed kernels have no such promise).
        crate::kernels::with_mode(crate::kernels::Mode::Cpu, || {
            let w = rand((200, 83), 1);
            let x = rand((11, 83), 2);
            let all = matmul_t(&x, &w).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in all.iter().enumerate() {
                let alone = matmul_t(&x.narrow(0, i, 1).unwrap(), &w).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(&alone[0], row, "row {i}");
            }
        });
    }

    #[test]
    fn both_forms_agree_in_values_and_gradients_and_the_portable_one_takes_bf16() {
        use crate::kernels::{with_mode, Mode};
        for (m, n, k) in [(3, 70, 96), (60, 33, 20)] {
            let (x0, w0, up) = (rand((m, k), 8), rand((n, k), 9), rand((m, n), 10));
            let run = |mode| {
                with_mode(mode, || {
                    let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
                    let y = matmul_t(&x, &w).unwrap();
                    let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    [y, g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone()]
                        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
            };
            let (cpu, portable) = (run(Mode::Cpu), run(Mode::Portable));
            for (a, b) in cpu.iter().zip(&portable) {
                let d = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(d < 1e-4, "[{m}, {k}] @ [{n}, {k}]ᵀ: the forms differ by {d}");
            }
            let bf = matmul_t(&x0.to_dtype(DType::BF16).unwrap(), &w0.to_dtype(DType::BF16).unwrap()).unwrap();
            assert_eq!(bf.dtype(), DType::BF16);
            let d = (bf.to_dtype(DType::F32).unwrap() - x0.matmul(&w0.t().unwrap()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 0.1, "bf16 product off by {d}");
        }
    }

    #[test]
    fn strided_inputs_are_read_through_their_layout() {
        let x = rand((9, 4), 3).t().unwrap(); // [4, 9], not contiguous
        let w = rand((6, 9), 4);
        let got = matmul_t(&x, &w).unwrap().to_vec2::<f32>().unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (g, r) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - r).abs() < 1e-5);
        }
    }

    #[test]
    fn gradients_equal_those_of_candles_matmul() {
        let x = Var::from_tensor(&rand((3, 20), 5)).unwrap();
        let w = Var::from_tensor(&rand((7, 20), 6)).unwrap();
        let up = rand((3, 7), 7);
        let g1 = (matmul_t(&x, &w).unwrap() * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (x.matmul(&w.t().unwrap()).unwrap() * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "gradient differs by {d}");
        }
    }
}
