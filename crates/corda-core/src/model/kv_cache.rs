//! Incremental decoding: the keys and values of every layer kept between forward steps, so that
//! generating a token costs one position's forward instead of the whole sequence's.
//!
//! Rows may be left-padded (batched generation): a row's rotary positions count only its real
//! tokens, as transformers' `generate` derives them (`cumsum(attention_mask) - 1`), and padded
//! keys are masked for every query. The logits equal the whole-sequence forward's.

use candle_core::Tensor;

use super::causal_lm::CausalLM;
use super::decoder::{AttnContext, LayerCache};
use crate::{CordaError, Result};

/// The cached keys and values of a batch, with each row's key mask and next position.
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// (batch, cached length): 1 for the real tokens.
    key_mask: Vec<Vec<u8>>,
    /// Per row, the rotary position of its next real token.
    next_pos: Vec<u32>,
}

impl KvCache {
    /// An empty cache for `batch` rows of `model`.
    pub fn new(model: &CausalLM, batch: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); model.layers.len()],
            key_mask: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Rows in the cache.
    pub fn batch(&self) -> usize {
        self.key_mask.len()
    }

    /// Cached positions (real and padded) per row.
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the rows `rows` (indices into the current batch, in the new order): finished
    /// sequences leave the batch so later steps do not compute them.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(CordaError::Invalid(format!(
                "row {bad} is not in a cache of {} rows",
                self.batch()
            )));
        }
        if rows.is_empty() {
            self.layers
                .iter_mut()
                .for_each(|l| *l = LayerCache::default());
        } else {
            let device = self.layers[0].k.as_ref().map(|k| k.device().clone());
            if let Some(device) = device {
                let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let idx = Tensor::from_vec(idx, rows.len(), &device)?;
                for l in &mut self.layers {
                    l.k = l.k.as_ref().map(|k| k.index_select(&idx, 0)).transpose()?;
                    l.v = l.v.as_ref().map(|v| v.index_select(&idx, 0)).transpose()?;
                }
            }
        }
        self.key_mask = rows.iter().map(|&r| self.key_mask[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }
}

impl CausalLM {
    /// Final hidden states (batch, seq, hidden), float32, of `input_ids` (batch, seq) following
    /// the tokens already in `cache`, which this step extends. `mask` is (batch, seq) with 0
    /// for padding (left padding of a prompt); padded tokens neither advance a row's positions
    /// nor are attended to.
    pub fn hidden_states_cached(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if b != cache.batch() || mask.len() != b || mask.iter().any(|r| r.len() != t) {
            return Err(CordaError::Invalid(format!(
                "a cached step needs input ids and mask of (batch, seq) = ({}, {t}) for a cache \
                 of {} rows; got {b} id rows and {} mask rows",
                cache.batch(),
                cache.batch(),
                mask.len()
            )));
        }
        let mut positions = Vec::with_capacity(b);
        for (row, m) in mask.iter().enumerate() {
            let mut p = Vec::with_capacity(t);
            for &real in m {
                if real != 0 {
                    p.push(cache.next_pos[row]);
                    cache.next_pos[row] += 1;
                } else {
                    // transformers gives padding position 1; it is never attended to.
                    p.push(1);
                }
            }
            positions.push(p);
            cache.key_mask[row].extend(m.iter().map(|&x| u8::from(x != 0)));
        }
        let ctx =
            AttnContext::incremental(&self.config, &positions, &cache.key_mask, &self.device)?;
        let mut h = self.embed_tokens.lookup(input_ids)?;
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_cached(&h, &ctx, lc)?;
        }
        self.norm.forward(&h)
    }

    /// Logits (batch, vocab), float32, of the last position of a cached step (see
    /// [`Self::hidden_states_cached`]): what greedy decoding needs, without the LM head on
    /// every prompt position.
    pub fn next_token_logits(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.hidden_states_cached(input_ids, mask, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        Ok(self.lm_head_logits(&last)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use candle_core::{DType, Device};

    fn fixture() -> CausalLM {
        let dir = corda_testdata::peft_tiny_llama().join("base-model");
        CausalLM::load(
            &dir,
            &LoadOptions {
                dtype: Some(DType::F32),
                device: Device::Cpu,
            },
        )
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::util::tensor::max_abs_diff(a, b).unwrap()
    }

    /// Prefill then one token at a time gives the logits of the whole-sequence forward.
    #[test]
    fn incremental_steps_equal_the_full_forward() {
        let m = fixture();
        let v = m.config.vocab_size as u32;
        let ids: Vec<u32> = (0..11u32).map(|i| (i * 7 + 3) % v).collect();
        let full = m
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut cache = KvCache::new(&m, 1);
        let prefill = Tensor::new(&ids[..5], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = m
            .hidden_states_cached(&prefill, &[vec![1; 5]], &mut cache)
            .unwrap();
        let got = m.lm_head_logits(&h).unwrap().squeeze(0).unwrap();
        assert!(max_diff(&got, &full.narrow(0, 0, 5).unwrap()) < 1e-4);
        for (i, &id) in ids.iter().enumerate().skip(5) {
            let x = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            let l = m.next_token_logits(&x, &[vec![1]], &mut cache).unwrap();
            let d = max_diff(&l.squeeze(0).unwrap(), &full.get(i).unwrap());
            assert!(d < 1e-4, "position {i}: {d}");
        }
        assert_eq!(cache.len(), ids.len());
    }

    /// A left-padded row gives the logits of the same row alone; dropping a row keeps the other.
    #[test]
    fn left_padding_and_dropping_rows_do_not_change_a_row() {
        let m = fixture();
        let v = m.config.vocab_size as u32;
        let long: Vec<u32> = (0..7u32).map(|i| (i * 5 + 1) % v).collect();
        let short: Vec<u32> = (0..4u32).map(|i| (i * 11 + 2) % v).collect();
        let alone = |ids: &[u32]| {
            m.forward(
                &Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
        };
        let mut padded = vec![0u32; 3];
        padded.extend(&short);
        let ids = Tensor::new([long.clone(), padded].concat(), &Device::Cpu)
            .unwrap()
            .reshape((2, 7))
            .unwrap();
        let mask = vec![vec![1; 7], vec![0, 0, 0, 1, 1, 1, 1]];
        let mut cache = KvCache::new(&m, 2);
        let l = m.next_token_logits(&ids, &mask, &mut cache).unwrap();
        assert!(max_diff(&l.get(0).unwrap(), &alone(&long).get(6).unwrap()) < 1e-4);
        assert!(max_diff(&l.get(1).unwrap(), &alone(&short).get(3).unwrap()) < 1e-4);
        // Next token 9 on both rows, then keep only the short one.
        let step = Tensor::new(&[[9u32], [9]], &Device::Cpu).unwrap();
        m.next_token_logits(&step, &[vec![1], vec![1]], &mut cache)
            .unwrap();
        cache.retain_rows(&[1]).unwrap();
        let l = m
            .next_token_logits(
                &Tensor::new(&[[4u32]], &Device::Cpu).unwrap(),
                &[vec![1]],
                &mut cache,
            )
            .unwrap();
        let mut seq = short.clone();
        seq.extend([9, 4]);
        let d = max_diff(&l.squeeze(0).unwrap(), &alone(&seq).get(5).unwrap());
        assert!(d < 1e-4, "{d}");
        assert!(cache.retain_rows(&[3]).is_err());
    }
}
