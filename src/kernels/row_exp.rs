//! The softmax arithmetic of one long row of logits: its maximum, Σ exp(a·x − b)
//! and c·exp(a·x − b) written out, 8 lanes at a time where the CPU has AVX2 and
//! FMA. The vocabulary log-softmax runs these over every token's row of logits
//! (152k entries for Qwen), three times a training step (reference, policy and
//! the backward): with libm's scalar `expf` and one running sum, they were 6% of
//! a Qwen GRPO step.
//!
//! The vector exp is Cephes' `expf` (range reduction by ln 2 in two parts,
//! 1 + r + r²·p(r) with p of degree 5, 2ⁿ from the exponent bits): within 2 ulp
//! of the true value (tested against f64) where libm is within 1, and 0 below
//! e^-87.3, the smallest normal f32. Sums run in 2 × 8 partial sums, added in a
//! fixed order at the end, so a row's result differs from the scalar loop's in
//! the last bits, and it is the same for a row whatever batch it is in. NaN
//! inputs give NaN (the training loop's non-finite check relies on it).

/// The largest element (NaN if the row has one; −∞ for an empty row).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::max(row) };
    }
    portable::max(row)
}

/// Σ exp(a·xᵢ − b), for a > 0 (a is an inverse temperature).
pub fn sum_exp(row: &[f32], a: f32, b: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: as in `max`.
        return unsafe { avx2::sum_exp(row, a, b) };
    }
    portable::sum_exp(row, a, b)
}

/// outᵢ = c · exp(a·xᵢ − b).
pub fn write_exp(row: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) {
    assert_eq!(row.len(), out.len(), "write_exp: row and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: as in `max`; the lengths are equal (asserted).
        return unsafe { avx2::write_exp(row, a, b, c, out) };
    }
    portable::write_exp(row, a, b, c, out)
}

/// (Σ eᵢ, Σ eᵢ·xᵢ) for eᵢ = exp(a·xᵢ − b), a > 0: with b the row's scaled max,
/// what a softmax's entropy needs beside its normalizer.
pub fn sum_exp_weighted(row: &[f32], a: f32, b: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: as in `max`.
        return unsafe { avx2::sum_exp_weighted(row, a, b) };
    }
    portable::sum_exp_weighted(row, a, b)
}

/// softmax of the row in place: exp(xᵢ − max) / Σ. Attention's probabilities.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = max(row);
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: as in `max`.
        return unsafe { avx2::softmax_in_place(row, max) };
    }
    portable::softmax_in_place(row, max)
}

/// Plain loops and libm's `expf`, where AVX2 and FMA are missing (public so the
/// kernels benchmark can time both side by side).
pub mod portable {
    pub fn max(row: &[f32]) -> f32 {
        row.iter().fold(f32::NEG_INFINITY, |m, &x| if x.is_nan() || m.is_nan() { f32::NAN } else { m.max(x) })
    }

    pub fn sum_exp(row: &[f32], a: f32, b: f32) -> f32 {
        row.iter().map(|&x| (x * a - b).exp()).sum()
    }

    pub fn write_exp(row: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = c * (x * a - b).exp();
        }
    }

    pub fn sum_exp_weighted(row: &[f32], a: f32, b: f32) -> (f32, f32) {
        row.iter().fold((0.0, 0.0), |(s, w), &x| {
            let e = (x * a - b).exp();
            (s + e, w + e * x)
        })
    }

    pub fn softmax_in_place(row: &mut [f32], max: f32) {
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Below this exp(x) is under the smallest normal f32 and is returned as 0
    /// (2ⁿ is built from the exponent bits, which have no room below 2⁻¹²⁶).
    const LOW: f32 = -87.33;
    const HIGH: f32 = 88.37;

    /// exp of 8 lanes (Cephes `expf`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp8(x: __m256) -> __m256 {
        // MAX/MIN return their second operand when either is NaN: x goes second so a
        // NaN stays NaN through the clamps and the polynomial.
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
        let xc = _mm256_min_ps(_mm256_set1_ps(HIGH), _mm256_max_ps(_mm256_set1_ps(LOW), x));
        // x = n·ln2 + r, |r| ≤ ln2/2, with ln 2 in two parts so n·ln2 is exact enough.
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(under, _mm256_mul_ps(y, two_n))
    }

    /// The row's last `len % 8` elements in a vector, the other lanes `fill`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tail(rest: &[f32], fill: f32) -> __m256 {
        let mut buf = [fill; 8];
        buf[..rest.len()].copy_from_slice(rest);
        _mm256_loadu_ps(buf.as_ptr())
    }

    /// The fixed pairwise sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), v);
        ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(row: &[f32]) -> f32 {
        let chunks = row.chunks_exact(8);
        let mut m = tail(chunks.remainder(), f32::NEG_INFINITY);
        let mut nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(m, m);
        for c in chunks {
            let x = _mm256_loadu_ps(c.as_ptr());
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            m = _mm256_max_ps(m, x);
        }
        if _mm256_movemask_ps(nan) != 0 {
            return f32::NAN;
        }
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), m);
        l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp(row: &[f32], a: f32, b: f32) -> f32 {
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let chunks = row.chunks_exact(8);
        // Padding lanes are −∞: a·(−∞) − b is −∞ for a > 0, whose exp is 0.
        let rest = chunks.remainder();
        // Two accumulators: the adds of one would wait on each other's latency.
        let mut s = [_mm256_setzero_ps(); 2];
        for (i, c) in chunks.enumerate() {
            let x = _mm256_fmsub_ps(_mm256_loadu_ps(c.as_ptr()), va, vb);
            s[i & 1] = _mm256_add_ps(s[i & 1], exp8(x));
        }
        if !rest.is_empty() {
            let x = _mm256_fmsub_ps(tail(rest, f32::NEG_INFINITY), va, vb);
            s[0] = _mm256_add_ps(s[0], exp8(x));
        }
        hsum(_mm256_add_ps(s[0], s[1]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp_weighted(row: &[f32], a: f32, b: f32) -> (f32, f32) {
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder();
        let (mut s, mut w) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in chunks {
            let x = _mm256_loadu_ps(c.as_ptr());
            let e = exp8(_mm256_fmsub_ps(x, va, vb));
            s = _mm256_add_ps(s, e);
            w = _mm256_fmadd_ps(e, x, w);
        }
        if !rest.is_empty() {
            // Padding lanes: x = 0 with e = exp(−∞) = 0 adds nothing to either sum.
            let x = tail(rest, 0.0);
            let e = exp8(_mm256_fmsub_ps(tail(rest, f32::NEG_INFINITY), va, vb));
            s = _mm256_add_ps(s, e);
            w = _mm256_fmadd_ps(e, x, w);
        }
        (hsum(s), hsum(w))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_in_place(row: &mut [f32], max: f32) {
        let vm = _mm256_set1_ps(max);
        let n = row.len() / 8 * 8;
        let p = row.as_mut_ptr();
        let mut s = [_mm256_setzero_ps(); 2];
        for (k, i) in (0..n).step_by(8).enumerate() {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            s[k & 1] = _mm256_add_ps(s[k & 1], e);
        }
        if n < row.len() {
            let e = exp8(_mm256_sub_ps(tail(&row[n..], f32::NEG_INFINITY), vm));
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), e);
            let len = row.len() - n;
            row[n..].copy_from_slice(&l[..len]);
            s[0] = _mm256_add_ps(s[0], e);
        }
        let inv = _mm256_set1_ps(1.0 / hsum(_mm256_add_ps(s[0], s[1])));
        for i in (0..n).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        let inv = _mm256_cvtss_f32(inv);
        row[n..].iter_mut().for_each(|x| *x *= inv);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn write_exp(row: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) {
        let (va, vb, vc) = (_mm256_set1_ps(a), _mm256_set1_ps(b), _mm256_set1_ps(c));
        let n = row.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let x = _mm256_fmsub_ps(_mm256_loadu_ps(row.as_ptr().add(i)), va, vb);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(vc, exp8(x)));
        }
        if n < row.len() {
            let x = _mm256_fmsub_ps(tail(&row[n..], 0.0), va, vb);
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), _mm256_mul_ps(vc, exp8(x)));
            out[n..].copy_from_slice(&l[..row.len() - n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        // Distance in units of the last place of the f32 nearest to `want`.
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_2_ulp_of_f64_over_the_softmax_range() {
        // a·x − b spans what a log-softmax feeds it: ≤ 0 after the max shift, and a
        // little above (the polynomial's range reduction is the same there).
        let xs: Vec<f32> = (0..=200_000).map(|i| -87.0 + i as f32 * (97.0 / 200_000.0)).collect();
        let mut out = vec![0f32; xs.len()];
        write_exp(&xs, 1.0, 0.0, 1.0, &mut out);
        let worst = xs.iter().zip(&out).map(|(&x, &y)| ulps(y, (x as f64).exp())).fold(0f64, f64::max);
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn exp_is_0_below_the_smallest_normal_and_nan_stays_nan() {
        let xs = [-87.4f32, -100.0, -1e30, f32::NEG_INFINITY, f32::NAN, 0.0, -87.0, 5.0, 1.0];
        let mut out = [9f32; 9];
        write_exp(&xs, 1.0, 0.0, 1.0, &mut out);
        assert_eq!(&out[..4], &[0.0; 4], "{out:?}");
        assert!(out[4].is_nan(), "{out:?}");
        assert_eq!(out[5], 1.0);
        assert!(out[6] > 0.0 && (out[6] as f64 / (-87f64).exp() - 1.0).abs() < 1e-6, "{}", out[6]);
        assert!(ulps(out[7], 5f64.exp()) <= 2.0 && ulps(out[8], 1f64.exp()) <= 2.0, "{out:?}");
    }

    #[test]
    fn sums_and_writes_match_f64_for_every_tail_length() {
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 1000, 49_157] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 2003) as f32 * 0.01 - 10.0).collect();
            let (a, b, c) = (1.0 / 0.7f32, 3.0f32, -0.25f32);
            // Bounds, relative: 2 ulp (2⁻²³) for exp itself, plus the rounding of its f32
            // argument a·x − b (an error of 2⁻²⁴·(|a·x| + |b|) there is that relative error
            // of exp), plus, for the sum, one rounding per add of the 2 × 8 running sums.
            let arg_err = |x: f32| 2f64.powi(-24) * ((x * a).abs() + b.abs()) as f64;
            let eps = 2f64.powi(-23);
            let want: f64 = row.iter().map(|&x| (x as f64 * a as f64 - b as f64).exp()).sum();
            let got = sum_exp(&row, a, b) as f64;
            let bound = eps + row.iter().map(|&x| arg_err(x)).fold(0.0, f64::max) + (len / 16 + 4) as f64 * eps / 2.0;
            assert!((got - want).abs() <= bound * want, "len {len}: {got} vs {want}, bound {bound}");
            let mut out = vec![0f32; len];
            write_exp(&row, a, b, c, &mut out);
            for (i, (&x, &y)) in row.iter().zip(&out).enumerate() {
                let w = c as f64 * (x as f64 * a as f64 - b as f64).exp();
                let bound = 1.5 * eps + arg_err(x);
                assert!((y as f64 - w).abs() <= bound * w.abs(), "len {len} [{i}]: {y} vs {w}");
            }
            let m = max(&row);
            assert_eq!(m, row.iter().copied().fold(f32::NEG_INFINITY, f32::max), "len {len}");
        }
    }

    #[test]
    fn the_portable_loops_agree_with_the_dispatched_path() {
        // On a CPU with AVX2 this compares the two implementations; without, it
        // compares the portable loops with themselves and the tests above cover them.
        let row: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 2003) as f32 * 0.01 - 10.0).collect();
        assert_eq!(portable::max(&row), max(&row));
        let (p, v) = (portable::sum_exp(&row, 1.3, 2.0), sum_exp(&row, 1.3, 2.0));
        assert!((p - v).abs() <= 1e-5 * p, "{p} vs {v}");
        let (mut po, mut vo) = (vec![0f32; row.len()], vec![0f32; row.len()]);
        portable::write_exp(&row, 1.3, 2.0, 0.5, &mut po);
        write_exp(&row, 1.3, 2.0, 0.5, &mut vo);
        // The portable loop rounds a·x and then a·x − b, the vector path once (FMA):
        // with |a·x − b| ≤ 15 here that alone is up to ~2e-6 of exp's value.
        for (i, (p, v)) in po.iter().zip(&vo).enumerate() {
            assert!((p - v).abs() <= 3e-6 * p.abs(), "[{i}] {p} vs {v}");
        }
        let mut with_nan = row.clone();
        with_nan[500] = f32::NAN;
        assert!(portable::max(&with_nan).is_nan() && portable::sum_exp(&with_nan, 1.0, 0.0).is_nan());
    }

    #[test]
    fn max_sees_a_nan_anywhere_in_the_row() {
        for at in [0usize, 5, 8, 20, 22] {
            let mut row: Vec<f32> = (0..23).map(|i| i as f32).collect();
            row[at] = f32::NAN;
            assert!(max(&row).is_nan(), "NaN at {at} not seen");
            assert!(sum_exp(&row, 1.0, 30.0).is_nan(), "NaN at {at} lost in the sum");
        }
    }

    #[test]
    fn softmax_in_place_matches_f64_for_every_tail_length_and_masked_keys() {
        for len in [1usize, 7, 8, 9, 23, 64, 333] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.9).collect();
            if len > 3 {
                row[1] = -1e9; // a masked key
            }
            let want: Vec<f64> = {
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect()
            };
            let mut got = row.clone();
            softmax_in_place(&mut got);
            let mut plain = row.clone();
            portable::softmax_in_place(&mut plain, portable::max(&row));
            for (i, ((&g, &p), &w)) in got.iter().zip(&plain).zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-6 * (1.0 + w), "len {len}, key {i}: {g} vs {w}");
                assert!((p as f64 - w).abs() <= 1e-6 * (1.0 + w), "portable, len {len}, key {i}: {p} vs {w}");
            }
            if len > 3 {
                assert_eq!(got[1], 0.0, "a masked key's probability is exactly 0");
            }
        }
    }

    #[test]
    fn the_weighted_exp_sum_matches_f64_for_every_tail_length() {
        for len in [1usize, 5, 8, 13, 100] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.7).collect();
            let (a, b) = (0.8f32, 3.0f32);
            let (s, w) = sum_exp_weighted(&row, a, b);
            let ws: f64 = row.iter().map(|&x| ((x * a - b) as f64).exp()).sum();
            let ww: f64 = row.iter().map(|&x| ((x * a - b) as f64).exp() * x as f64).sum();
            assert!((s as f64 - ws).abs() < 1e-5 * ws, "len {len}: {s} vs {ws}");
            assert!((w as f64 - ww).abs() < 1e-5 * ww.abs().max(1.0), "len {len}: {w} vs {ww}");
        }
    }
}
