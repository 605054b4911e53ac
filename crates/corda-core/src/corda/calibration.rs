//! The calibration pass, one layer at a time (PEFT's `calib_cov_distribution` without holding
//! the whole model): the samples' hidden states at the input of the current layer, advanced
//! through that layer while the covariance of each of its input sites is collected.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use super::covariance::{CovarianceAccumulator, CovariancePrecision};
use crate::model::{
    embed, load_embeddings, AttnContext, DecoderLayer, InputSite, ModelConfig, Observer, Weights,
};
use crate::{CordaError, Result};

/// One forward batch: hidden states (batch, seq, hidden) and each sample's real length.
struct Batch {
    hidden: Tensor,
    lengths: Vec<usize>,
}

impl Batch {
    fn context(&self, cfg: &ModelConfig, device: &Device) -> Result<AttnContext> {
        let (b, t, _) = self.hidden.dims3()?;
        let rows: Vec<Vec<u8>> = self
            .lengths
            .iter()
            .map(|&l| (0..t).map(|j| u8::from(j < l)).collect())
            .collect();
        AttnContext::new(cfg, b, t, Some(&rows), device)
    }
}

/// The first batch's input and the original layer's output on it, kept to check that residual +
/// adapter reproduce the layer.
pub struct LayerProbe {
    pub input: Tensor,
    pub context: AttnContext,
    pub expected: Tensor,
}

/// The calibration samples' hidden states between layers, kept in float32 or the model's half
/// dtype.
pub struct HiddenStates {
    batches: Vec<Batch>,
    dtype: DType,
    pub num_tokens: usize,
}

/// Feeds a layer's inputs to the accumulators of the sites being collected.
struct SiteObserver<'a> {
    accs: &'a mut BTreeMap<InputSite, CovarianceAccumulator>,
    lengths: &'a [usize],
}

impl Observer for SiteObserver<'_> {
    fn observe(&mut self, layer: usize, site: InputSite, input: &Tensor) -> Result<()> {
        if let Some(acc) = self.accs.get_mut(&site) {
            acc.add_batch(input, self.lengths, &site_label(layer, site))?;
        }
        Ok(())
    }
}

fn site_label(layer: usize, site: InputSite) -> String {
    format!("model.layers.{layer} {site:?} input")
}

impl HiddenStates {
    /// Embed the tokenized `samples`, `batch_size` per forward pass (right-padded).
    pub fn embed(
        weights: &Weights,
        cfg: &ModelConfig,
        samples: &[Vec<u32>],
        batch_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if samples.is_empty() {
            return Err(CordaError::Data(
                "no calibration samples: the calibration set is empty".into(),
            ));
        }
        let table = load_embeddings(weights, cfg, dtype, device)?;
        let mut batches = vec![];
        let mut num_tokens = 0;
        for chunk in samples.chunks(batch_size.max(1)) {
            let lengths: Vec<usize> = chunk.iter().map(Vec::len).collect();
            if lengths.contains(&0) {
                return Err(CordaError::Data(
                    "a calibration sample has no tokens".into(),
                ));
            }
            let tmax = lengths.iter().copied().max().unwrap_or(0);
            num_tokens += lengths.iter().sum::<usize>();
            let mut ids = vec![0u32; chunk.len() * tmax];
            for (b, s) in chunk.iter().enumerate() {
                if let Some(bad) = s.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                    return Err(CordaError::Data(format!(
                        "token id {bad} is outside the model's vocabulary ({}); the tokenizer does not belong to this model",
                        cfg.vocab_size
                    )));
                }
                ids[b * tmax..b * tmax + s.len()].copy_from_slice(s);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), tmax), device)?;
            let hidden = embed(&table, &ids)?.to_dtype(dtype)?;
            batches.push(Batch { hidden, lengths });
        }
        Ok(Self {
            batches,
            dtype,
            num_tokens,
        })
    }

    /// Run the original `layer` on every batch: collect the covariance of each site in `sites`
    /// (site → d_in) and advance the hidden states to the next layer's input.
    pub fn advance(
        &mut self,
        layer: &DecoderLayer,
        cfg: &ModelConfig,
        sites: &BTreeMap<InputSite, usize>,
        precision: CovariancePrecision,
        device: &Device,
    ) -> Result<(BTreeMap<InputSite, Mat<f32>>, LayerProbe)> {
        // This layer's weights as calibration's few-row products read them fastest, for the
        // length of this call: bfloat16 ones widened to float32 (model::widened), float32
        // ones transposed (TargetLinear::keep_transposed).
        let mut layer = layer.widened()?;
        layer.keep_transposed_weights()?;
        let layer = &layer;
        let mut accs = BTreeMap::new();
        for (&site, &d_in) in sites {
            accs.insert(
                site,
                CovarianceAccumulator::for_device(d_in, precision, device)?,
            );
        }
        let mut probe = None;
        for batch in self.batches.iter_mut() {
            let context = batch.context(cfg, device)?;
            let input = batch.hidden.to_dtype(DType::F32)?;
            let mut obs = SiteObserver {
                accs: &mut accs,
                lengths: &batch.lengths,
            };
            let next = layer.forward(&input, &context, Some(&mut obs))?;
            batch.hidden = next.to_dtype(self.dtype)?;
            if probe.is_none() {
                probe = Some(LayerProbe {
                    input,
                    context,
                    expected: next,
                });
            }
        }
        let probe = probe.ok_or_else(|| CordaError::Data("no calibration batches".into()))?;
        let mut covs = BTreeMap::new();
        for (site, acc) in accs.iter_mut() {
            covs.insert(*site, acc.finish(&site_label(layer.index, *site))?);
        }
        Ok((covs, probe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InputSite;

    fn fixture() -> (ModelConfig, Weights) {
        let dir = corda_testdata::peft_tiny_llama().join("base-model");
        (
            ModelConfig::from_dir(&dir).unwrap(),
            Weights::open(&dir).unwrap(),
        )
    }

    /// Right-padded batches of deterministic token ids of varied lengths.
    fn samples(vocab: usize) -> Vec<Vec<u32>> {
        (0..6)
            .map(|s| {
                (0..9 + 7 * s)
                    .map(|i| ((i * 31 + s * 17 + 3) % vocab) as u32)
                    .collect()
            })
            .collect()
    }

    fn rel_fro(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                num += (a[(i, j)] as f64 - b[(i, j)] as f64).powi(2);
                den += (b[(i, j)] as f64).powi(2);
            }
        }
        (num / den).sqrt()
    }

    /// Two layers of bfloat16 calibration through the per-layer float32 copy against the same
    /// computation through candle's own bfloat16 products (widening per product, the path
    /// before the copy): the covariances and the advanced hidden states agree within bfloat16
    /// rounding, and both are a bfloat16 computation (away from float32's by more than that).
    #[test]
    fn bf16_calibration_matches_the_bf16_reference_within_rounding() {
        let (cfg, w) = fixture();
        let dev = Device::Cpu;
        let s = samples(cfg.vocab_size);
        let sites: BTreeMap<InputSite, usize> = InputSite::ALL
            .iter()
            .map(|&site| {
                let d = match site {
                    InputSite::MlpDown => cfg.intermediate_size,
                    _ => cfg.hidden_size,
                };
                (site, d)
            })
            .collect();
        let mut fast = HiddenStates::embed(&w, &cfg, &s, 4, DType::BF16, &dev).unwrap();
        let mut reference = HiddenStates::embed(&w, &cfg, &s, 4, DType::BF16, &dev).unwrap();
        let mut float32 = HiddenStates::embed(&w, &cfg, &s, 4, DType::F32, &dev).unwrap();
        for l in 0..cfg.num_hidden_layers {
            let layer = DecoderLayer::load(&w, &cfg, l, DType::BF16, &dev).unwrap();
            assert_eq!(layer.self_attn.q_proj.weight.dtype(), DType::BF16);
            let (covs, _) = fast
                .advance(&layer, &cfg, &sites, CovariancePrecision::Float32, &dev)
                .unwrap();
            // The reference: the un-copied bfloat16 layer, the same accumulators.
            let mut accs: BTreeMap<InputSite, CovarianceAccumulator> = sites
                .iter()
                .map(|(&site, &d)| {
                    (
                        site,
                        CovarianceAccumulator::new(d, CovariancePrecision::Float32),
                    )
                })
                .collect();
            for batch in reference.batches.iter_mut() {
                let ctx = batch.context(&cfg, &dev).unwrap();
                let mut obs = SiteObserver {
                    accs: &mut accs,
                    lengths: &batch.lengths,
                };
                let input = batch.hidden.to_dtype(DType::F32).unwrap();
                let next = layer.forward(&input, &ctx, Some(&mut obs)).unwrap();
                batch.hidden = next.to_dtype(DType::BF16).unwrap();
            }
            let layer32 = DecoderLayer::load(&w, &cfg, l, DType::F32, &dev).unwrap();
            let (covs32, _) = float32
                .advance(&layer32, &cfg, &sites, CovariancePrecision::Float32, &dev)
                .unwrap();
            for (site, acc) in accs.iter_mut() {
                let want = acc.finish("reference").unwrap();
                let got = &covs[site];
                let err = rel_fro(got, &want);
                let bf16_vs_f32 = rel_fro(&want, &covs32[site]);
                println!("layer {l} {site:?}: {err:.2e} from the reference, {bf16_vs_f32:.2e} from float32");
                assert!(err < 5e-4, "layer {l} {site:?}: {err:e} from the reference");
                assert!(
                    bf16_vs_f32 > 1e-4 && bf16_vs_f32 < 3e-2,
                    "layer {l} {site:?}: bfloat16 vs float32 {bf16_vs_f32:e}"
                );
            }
            for (a, b) in fast.batches.iter().zip(&reference.batches) {
                let diff = crate::util::tensor::max_abs_diff(&a.hidden, &b.hidden).unwrap();
                let scale = crate::util::tensor::max_abs(&b.hidden).unwrap();
                assert!(diff <= scale * 2e-2, "layer {l}: hidden {diff} of {scale}");
            }
        }
    }
}
