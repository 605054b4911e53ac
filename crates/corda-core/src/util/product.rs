//! Float32 matrix products on the CPU through the faster of two kernel families on this CPU.
//!
//! faer's kernels and the gemm crate's (feature `x86-v4`) both pick AVX-512 or AVX2/FMA at run
//! time, but they block and pack differently, and which is faster depends on the CPU. On an
//! Intel Xeon with AVX-512 (family 6 model 167, 2 threads, GFLOP/s, gemm against faer) a
//! layer's `x Wᵀ` at 1024 tokens ran at 278–285 against 172–235 and `g W` at 324–340 against
//! 261–265; in place, a fine-tuning step took 10–13% less time and preprocess 5% less with the
//! gemm crate for every product (faer still wins a few skinny shapes alone, not the whole
//! step). AMD Zen 4 and Zen 5 were measured with faer (fine-tuning 1.3–1.9x PyTorch) and keep
//! it. Whichever runs, `dst (+)= alpha · lhs · rhs` is the same product within float32
//! rounding.
//!
//! The choice is a function of the CPU's vendor and features, never of a timing, so the same
//! inputs give the same bits on the same machine. [`KERNEL_ENV`] pins it for side-by-side
//! measurements.

use std::sync::OnceLock;

use faer::{Accum, MatMut, MatRef, Par};

/// A float32 product kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Faer,
    Gemm,
}

/// The environment variable that pins the kernel family (`faer` or `gemm`); unset (or any
/// other value), the CPU decides.
pub const KERNEL_ENV: &str = "CORDA_F32_KERNEL";

impl Kernel {
    /// The family every float32 product of this process uses (decided once).
    pub fn current() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| match std::env::var(KERNEL_ENV).as_deref() {
            Ok("faer") => Kernel::Faer,
            Ok("gemm") => Kernel::Gemm,
            _ => Kernel::for_this_cpu(),
        })
    }

    /// The gemm crate on Intel CPUs with AVX-512 (module doc), faer elsewhere.
    fn for_this_cpu() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && intel() {
                return Kernel::Gemm;
            }
        }
        Kernel::Faer
    }
}

#[cfg(target_arch = "x86_64")]
fn intel() -> bool {
    // Leaf 0 (the vendor string) exists on every x86_64 CPU; `__cpuid` is safe on recent
    // toolchains and `unsafe` on older ones.
    #[allow(unused_unsafe)]
    let id = unsafe { std::arch::x86_64::__cpuid(0) };
    [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"GenuineIntel")
}

/// `dst = alpha · lhs · rhs` (`Accum::Replace`) or `dst += alpha · lhs · rhs` (`Accum::Add`),
/// any strides, on `par`'s threads.
pub fn matmul(
    dst: MatMut<'_, f32>,
    accum: Accum,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
    par: Par,
) {
    let (m, n, k) = (dst.nrows(), dst.ncols(), lhs.ncols());
    assert!(
        lhs.nrows() == m && rhs.nrows() == k && rhs.ncols() == n,
        "product: ({m} × {n}) = ({} × {}) · ({} × {})",
        lhs.nrows(),
        k,
        rhs.nrows(),
        rhs.ncols()
    );
    match Kernel::current() {
        Kernel::Faer => faer::linalg::matmul::matmul(dst, accum, lhs, rhs, alpha, par),
        Kernel::Gemm => gemm_matmul(dst, accum, lhs, rhs, alpha, par),
    }
}

/// [`matmul`] through the gemm crate.
fn gemm_matmul(
    dst: MatMut<'_, f32>,
    accum: Accum,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
    par: Par,
) {
    let (m, n, k) = (dst.nrows(), dst.ncols(), lhs.ncols());
    let threads = match par {
        Par::Seq => gemm::Parallelism::None,
        Par::Rayon(t) => gemm::Parallelism::Rayon(t.get()),
    };
    // SAFETY: the three views are valid for their shapes and strides (faer's invariants), the
    // dimensions agree (checked by `matmul`), and `dst` is borrowed mutably, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_ptr_mut(),
            dst.col_stride(),
            dst.row_stride(),
            matches!(accum, Accum::Add),
            lhs.as_ptr(),
            lhs.col_stride(),
            lhs.row_stride(),
            rhs.as_ptr(),
            rhs.col_stride(),
            rhs.row_stride(),
            1.0,
            alpha,
            false,
            false,
            false,
            threads,
        )
    }
}

/// `a · b` for row-major `a` (m × k) and `b` given as a view (k × n), on rayon's threads;
/// row-major result.
pub fn product(a: &[f32], m: usize, k: usize, b: MatRef<'_, f32>) -> Vec<f32> {
    let n = b.ncols();
    let mut out = vec![0f32; m * n];
    matmul(
        MatMut::from_row_major_slice_mut(&mut out, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        b,
        1.0f32,
        Par::rayon(0),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// The gemm crate's path computes faer's product on the layouts the model uses (row-major
    /// data and destination, transposed views, a strided column block), replacing and accumulating, with a
    /// scale, on one thread and on rayon's.
    #[test]
    fn gemm_path_equals_faer() {
        let (m, n, k) = (67, 45, 130);
        let val =
            |i: usize, j: usize, s: usize| (((i * 31 + j * 17 + s) % 97) as f32 - 48.0) / 29.0;
        let lhs_t = Mat::<f32>::from_fn(k, m, |i, j| val(i, j, 1));
        let wide = Mat::<f32>::from_fn(k, n + 9, |i, j| val(i, j, 2));
        let start = Mat::<f32>::from_fn(m, n, |i, j| val(i, j, 3));
        let (lhs, rhs) = (lhs_t.transpose(), wide.as_ref().subcols(4, n));
        for par in [Par::Seq, Par::rayon(2)] {
            for accum in [Accum::Replace, Accum::Add] {
                let mut want = start.clone();
                // The destination row-major, as the model's tensors are.
                let mut got_t = start.transpose().to_owned();
                faer::linalg::matmul::matmul(want.as_mut(), accum, lhs, rhs, 0.75, par);
                gemm_matmul(got_t.as_mut().transpose_mut(), accum, lhs, rhs, 0.75, par);
                let scale = want.norm_max();
                assert!(
                    (&want - got_t.transpose()).norm_max() <= 1e-5 * scale,
                    "{accum:?} {par:?}"
                );
                assert!(scale > 1.0);
            }
        }
    }

    /// Exact small integers through the public entry point, whichever kernel this CPU uses.
    #[test]
    fn row_major_product() {
        let (m, k, n) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
        let b = Mat::<f32>::from_fn(k, n, |i, j| (i + 2 * j) as f32);
        let out = product(&a, m, k, b.as_ref());
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * b[(t, j)]).sum();
                assert_eq!(out[i * n + j], want);
            }
        }
    }
}
