//! The statistics of an evaluation: a proportion's 95% interval (Wilson) and
//! a paired test between two models on the same questions (McNemar, exact).

/// The 95% Wilson score interval of `k` successes in `n` trials (`[0, 1]` when n = 0).
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_963_984_540_054);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// McNemar's exact test: `b` questions only the first model got right, `c`
/// only the second. Two-sided p-value: 2 · P(X ≤ min(b, c)) for X ~ Binomial(b + c, ½), capped at 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let m = b.min(c);
    // ln C(n, i) − n ln 2, summed from i = 0 in log space (n can be in the thousands).
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let mut ln_c = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=m {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c - ln2n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_values() {
        // 2/48 (base SmolLM2's flexible accuracy in the issue): [1.15%, 13.98%].
        let (lo, hi) = wilson95(2, 48);
        assert!((lo - 0.01151).abs() < 1e-4 && (hi - 0.13977).abs() < 1e-4, "{lo} {hi}");
        // 50/100: 0.5 ± 0.0962 (Wilson's interval is centered at ½ here).
        let (lo, hi) = wilson95(50, 100);
        assert!((lo - 0.40383).abs() < 1e-4 && (hi - 0.59617).abs() < 1e-4, "{lo} {hi}");
        assert_eq!(wilson95(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson95(10, 10);
        assert!((hi - 1.0).abs() < 1e-12 && (lo - 0.72246).abs() < 1e-4, "{lo} {hi}");
    }

    #[test]
    fn mcnemar_matches_hand_computed_binomial_tails() {
        // b = 1, c = 9: 2 · (1 + 10) / 1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        // b = 0, c = 5: 2 / 32.
        assert!((mcnemar_exact(0, 5) - 2.0 / 32.0).abs() < 1e-12);
        // A tie is as far from significant as it gets.
        assert_eq!(mcnemar_exact(4, 4), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large n stays finite and symmetric.
        let p = mcnemar_exact(600, 700);
        assert!(p > 0.0 && p < 0.01 && (p - mcnemar_exact(700, 600)).abs() < 1e-15, "{p}");
    }
}
