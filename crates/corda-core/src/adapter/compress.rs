//! `--rank K` (beyond PEFT): the exact conversion doubles the rank, which some serving stacks cap.
//! dW = s [B | -B0] [A ; A0] has rank at most 2r, so its SVD is cheap through two thin QRs
//! (dW = Qb (Rb Raᵀ) Qaᵀ, SVD of the small core), all in f64. Keeping the top K components gives
//! the best rank-K approximation (Eckart–Young); the written adapter has r = lora_alpha = K, so its
//! scaling is 1, with `A = sqrt(S) Vᵀ` and `B = U sqrt(S)`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use serde_json::Value;

use super::convert::{check_compatible, delta_factors};
use super::{Adapter, LoraPair};
use crate::{CordaError, Result};

/// How well one module's update survived the compression.
#[derive(Debug, Clone)]
pub struct ModuleCompression {
    pub module: String,
    /// ‖dW − B_K A_K‖_F / ‖dW‖_F, measured in f64 against the f32 factors that are written
    /// (0 when dW is zero).
    pub relative_error: f64,
    /// Singular values of dW (at most 2r; the rest are zero), descending.
    pub singular_values: Vec<f64>,
}

/// A compressed adapter and the per-module report, in module order.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub adapter: Adapter,
    pub report: Vec<ModuleCompression>,
}

fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let rows = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let (n, m) = (rows.len(), rows.first().map_or(0, Vec::len));
    Ok(Mat::from_fn(n, m, |i, j| rows[i][j]))
}

fn to_tensor(m: &Mat<f64>) -> Result<Tensor> {
    let v: Vec<f32> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
        .collect();
    Ok(Tensor::from_vec(v, (m.nrows(), m.ncols()), &Device::Cpu)?)
}

/// Rank-`rank` factors `(B_K, A_K)` of `b @ a` (b: d_out x q, a: q x d_in) and its singular values.
fn truncated_factors(
    module: &str,
    b: &Mat<f64>,
    a: &Mat<f64>,
    rank: usize,
) -> Result<(Mat<f64>, Mat<f64>, Vec<f64>)> {
    let qr_b = b.qr();
    let qr_at = a.transpose().to_owned().qr();
    let (qb, rb) = (qr_b.compute_thin_Q(), qr_b.thin_R().to_owned());
    let (qa, ra) = (qr_at.compute_thin_Q(), qr_at.thin_R().to_owned());
    let core = &rb * ra.transpose();
    let svd = core.thin_svd().map_err(|e| {
        CordaError::Numerics(format!(
            "SVD of the update of `{module}` did not converge ({e:?}); check the adapters for NaN or inf values"
        ))
    })?;
    let u = &qb * svd.U();
    let v = &qa * svd.V();
    let s: Vec<f64> = (0..svd.S().column_vector().nrows())
        .map(|i| svd.S().column_vector()[i])
        .collect();
    let keep = rank.min(s.len());
    // Columns beyond the true rank stay zero: they contribute nothing to B_K A_K.
    let bk = Mat::from_fn(b.nrows(), rank, |i, j| {
        if j < keep {
            u[(i, j)] * s[j].sqrt()
        } else {
            0.0
        }
    });
    let ak = Mat::from_fn(rank, a.ncols(), |i, j| {
        if i < keep {
            v[(j, i)] * s[i].sqrt()
        } else {
            0.0
        }
    });
    Ok((bk, ak, s))
}

/// Compress `trained` (against `initial`) into a uniform rank-`rank` LoRA for the original base
/// model. `on_module` is called after each module (for progress).
pub fn compress_to_rank(
    initial: &Adapter,
    trained: &Adapter,
    rank: usize,
    mut on_module: impl FnMut(&ModuleCompression),
) -> Result<Compressed> {
    if rank == 0 {
        return Err(CordaError::Invalid(
            "the target rank must be at least 1".to_string(),
        ));
    }
    check_compatible(initial, trained)?;
    let mut modules = BTreeMap::new();
    let mut report = Vec::with_capacity(trained.modules.len());
    for module in trained.modules.keys() {
        let (b, a) = delta_factors(initial, trained, module)?;
        let (b, a) = (to_mat(&b)?, to_mat(&a)?);
        if b.as_ref().has_nan()
            || a.as_ref().has_nan()
            || !b.as_ref().is_all_finite()
            || !a.as_ref().is_all_finite()
        {
            return Err(CordaError::Numerics(format!(
                "module `{module}` has NaN or inf values in its adapter weights; the training diverged, use an earlier checkpoint"
            )));
        }
        let (bk, ak, singular_values) = truncated_factors(module, &b, &a, rank)?;
        let pair = LoraPair {
            a: to_tensor(&ak)?,
            b: to_tensor(&bk)?,
        };
        // Measure what is actually written: the f32 factors against the exact f64 update.
        let (bw, aw) = (to_mat(&pair.b)?, to_mat(&pair.a)?);
        let exact = &b * &a;
        let norm = exact.norm_l2();
        let err = (&exact - &bw * &aw).norm_l2();
        let relative_error = if norm > 0.0 { err / norm } else { 0.0 };
        let entry = ModuleCompression {
            module: module.clone(),
            relative_error,
            singular_values,
        };
        on_module(&entry);
        report.push(entry);
        modules.insert(module.clone(), pair);
    }

    let mut config = trained.config.clone();
    config.init_lora_weights = Value::Bool(true);
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    Ok(Compressed {
        adapter: Adapter { config, modules },
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_top_components() {
        // b @ a = diag(3, 2, 1) padded: the best rank-2 error is 1 / sqrt(14).
        let b = Mat::from_fn(4, 3, |i, j| if i == j { [3.0, 2.0, 1.0][i] } else { 0.0 });
        let a = Mat::from_fn(3, 5, |i, j| if i == j { 1.0 } else { 0.0 });
        let (bk, ak, s) = truncated_factors("m", &b, &a, 2).unwrap();
        assert!((s[0] - 3.0).abs() < 1e-12 && (s[2] - 1.0).abs() < 1e-12);
        let err = (&b * &a - &bk * &ak).norm_l2() / (&b * &a).norm_l2();
        assert!((err - 1.0 / 14f64.sqrt()).abs() < 1e-12, "{err}");
        let (bk, ak, _) = truncated_factors("m", &b, &a, 5).unwrap();
        assert_eq!((bk.ncols(), ak.nrows()), (5, 5));
        assert!((&b * &a - &bk * &ak).norm_l2() < 1e-12);
    }
}
