//! Element-wise loops compiled for the vector instructions of the running CPU.
//!
//! The crate is built for baseline x86-64, so a loop the compiler vectorizes uses 4-lane SSE2
//! unless it is compiled inside a function with wider target features. `vectorized!` runs a
//! block inside such a function (AVX-512, else AVX2, chosen once at run time from the CPU's
//! features); the block and the `#[inline]` code it calls are compiled again there. (The
//! macro marks the block's closure `#[inline(always)]`: left to the inliner, a closure with a
//! loop stays one out-of-line baseline function called from every level.)
//!
//! Only the instruction width changes: Rust never contracts `a * b + c` into a fused
//! multiply-add, so every result is bitwise the one the baseline build computes, on every CPU.

use std::sync::atomic::{AtomicU8, Ordering};

/// The widest vector level this CPU runs (decided once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Baseline = 0,
    Avx2 = 1,
    Avx512 = 2,
}

const UNKNOWN: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNKNOWN);

impl Level {
    /// The level of this CPU.
    pub fn current() -> Level {
        match LEVEL.load(Ordering::Relaxed) {
            UNKNOWN => {
                let level = Level::detect();
                LEVEL.store(level as u8, Ordering::Relaxed);
                level
            }
            l if l == Level::Avx512 as u8 => Level::Avx512,
            l if l == Level::Avx2 as u8 => Level::Avx2,
            _ => Level::Baseline,
        }
    }

    fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Baseline
    }
}

/// Runs the block compiled for this CPU's widest vector level (module doc).
macro_rules! vectorized {
    ($body:block) => {
        $crate::util::simd::run(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use vectorized;

/// Runs `f` at this CPU's widest vector level; call it through `vectorized!`, which inlines `f`.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match Level::current() {
            // SAFETY: the level was detected from this CPU's features.
            Level::Avx512 => return unsafe { avx512(f) },
            Level::Avx2 => return unsafe { avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_computes_the_same_bits() {
        // The vectorized exp over its whole range, the softmax's scaling and a sum in lanes.
        let x: Vec<f32> = (0..4099)
            .map(|i| (i as f32 * 0.37).sin() * 120.0)
            .chain([f32::MIN, f32::NAN, f32::INFINITY, -0.0])
            .collect();
        #[inline(always)]
        fn work(x: &[f32]) -> Vec<u32> {
            let mut y: Vec<f32> = x
                .iter()
                .map(|&v| crate::util::exp::exp(v) * 0.5 - v)
                .collect();
            y.push(y[..4099].chunks(16).map(|c| c.iter().sum::<f32>()).sum());
            y.into_iter().map(f32::to_bits).collect()
        }
        let base = work(&x);
        assert_eq!(vectorized!({ work(&x) }), base);
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                assert_eq!(unsafe { avx2(|| work(&x)) }, base);
            }
            if Level::current() == Level::Avx512 {
                assert_eq!(unsafe { avx512(|| work(&x)) }, base);
            }
        }
    }
}
