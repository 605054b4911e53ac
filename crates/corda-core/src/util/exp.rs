//! A float32 `exp` that the compiler can vectorize, for the softmax of attention and of the
//! cross-entropy.
//!
//! glibc's `expf` is a scalar call per element, and inputs far below the underflow threshold
//! (the masked scores of causal attention are `f32::MIN`) take its slow special-case path; on
//! an Intel Xeon that made `expf` a third of a fine-tuning step. This is Cephes' `expf`
//! (range reduction by ln 2 in two parts, a degree-6 polynomial, 2^k from the exponent bits):
//! within 2 ulp of the exact value on [-87.3, 88.7], without branches or float-to-int
//! conversions, so loops over it compile to SIMD (as wide as `util::simd::vectorized!` allows).
//! Results that would be subnormal are 0 (as with flush-to-zero), which no softmax can tell
//! from the exact value at float32 precision of its sum.

use super::simd::vectorized;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `k · LN2_HI` is exact for the k that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// exp(x) is below the smallest normal float32 for x < LOWEST, infinite for x > HIGHEST.
const LOWEST: f32 = -87.336_55;
const HIGHEST: f32 = 88.722_83;
/// 1.5 · 2^23: adding and subtracting it rounds to the nearest integer (ties to even).
const ROUND: f32 = 12_582_912.0;

/// e^x for float32 `x` (NaN stays NaN).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(LOWEST, HIGHEST);
    // k = round(x / ln 2): adding ROUND leaves k in the low mantissa bits, read back as an
    // integer (`as i32` on the float would saturate, a scalar conversion per element).
    let shifted = xc * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^k in two normal halves: k reaches 128 at the top and -126 at the bottom.
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = k >> 1;
    let y = e_r * pow2(half) * pow2(k - half);
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        y
    }
}

/// 2^k for -126 ≤ k ≤ 127, from the exponent bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) << 23) as u32)
}

/// Replaces each `x` of `row` by e^(x − shift) and returns their sum.
pub fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f32 {
    vectorized!({
        row.iter_mut().for_each(|x| *x = exp(*x - shift));
        sum(row)
    })
}

/// Multiplies every element of `row` by `factor`.
pub fn scale_in_place(row: &mut [f32], factor: f32) {
    vectorized!({ row.iter_mut().for_each(|x| *x *= factor) })
}

/// The sum of `v` in 16 lanes (float addition is not reassociated otherwise, so a plain sum
/// would not vectorize); inlined into its callers' `vectorized!` blocks.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// The largest element of `v` (−∞ for an empty slice; NaNs are skipped, as by `f32::max`).
pub fn max(v: &[f32]) -> f32 {
    vectorized!({
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = v.chunks_exact(16);
        let rest = chunks
            .remainder()
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = l.max(x);
            }
        }
        lanes.iter().copied().fold(rest, f32::max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_two_ulp_of_the_float64_exp_over_the_whole_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let ulp = (want as f32).to_bits();
            let got = exp(x).to_bits();
            worst = worst.max((got as i64 - ulp as i64).abs() as f64);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn edges_underflow_to_zero_overflow_to_infinity_and_keep_nan() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let mut row = vec![0.0f32, 1.0, f32::MIN, -2.0];
        let s = exp_shifted_in_place(&mut row, 1.0);
        let want = [(-1f64).exp(), 1.0, 0.0, (-3f64).exp()];
        for (g, w) in row.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{row:?}");
        }
        assert!((s as f64 - want.iter().sum::<f64>()).abs() < 1e-6);
        assert_eq!(sum(&(1..=40).map(|i| i as f32).collect::<Vec<_>>()), 820.0);
    }
}
