//! Seeded normal initialisation, fast enough for benchmark-sized models.
//!
//! transformers initialises every Llama linear and the embeddings with `normal(0, 0.02)`
//! (`initializer_range`). We do the same so a random demo model behaves like an untrained
//! Hugging Face one: near-uniform logits, sane activations and gradients.
//!
//! Each tensor gets its own ChaCha8 stream (a hash of its name), so a tensor's values depend
//! only on the seed, its name and its length — not on the order tensors are written in, the
//! number of layers or the number of threads. Within a tensor, fixed blocks of elements
//! start at known positions of the stream (ChaCha can seek), so blocks can be filled on all
//! cores and the result is still bit-identical to a single-threaded fill.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Elements per independently seeked block (even, so blocks start on a Box–Muller pair).
const BLOCK: usize = 1 << 16;

/// Stream words (u32) consumed per element: one u64 per uniform, two uniforms per pair of
/// elements.
const WORDS_PER_ELEMENT: u128 = 2;

/// `transformers`' default `initializer_range`.
pub const INIT_STD: f32 = 0.02;

/// 64-bit FNV-1a: a stable, dependency-free hash that picks a tensor's stream.
pub fn stream_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `len` samples of `normal(0, std)` for the tensor `name`, reproducible from `seed`.
pub fn normal_f32(seed: u64, name: &str, len: usize, std: f32) -> Vec<f32> {
    let mut out = vec![0f32; len];
    let stream = stream_of(name);
    let blocks = len.div_ceil(BLOCK);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(blocks);
    if threads <= 1 {
        for (i, block) in out.chunks_mut(BLOCK).enumerate() {
            fill_block(seed, stream, i, block, std);
        }
        return out;
    }
    // Contiguous runs of whole blocks per thread; the values do not depend on the split.
    let per_thread = blocks.div_ceil(threads) * BLOCK;
    std::thread::scope(|s| {
        for (t, run) in out.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                let first = t * per_thread / BLOCK;
                for (i, block) in run.chunks_mut(BLOCK).enumerate() {
                    fill_block(seed, stream, first + i, block, std);
                }
            });
        }
    });
    out
}

fn fill_block(seed: u64, stream: u64, index: usize, block: &mut [f32], std: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos(index as u128 * BLOCK as u128 * WORDS_PER_ELEMENT);
    for pair in block.chunks_mut(2) {
        let (z0, z1) = box_muller(rng.next_u64(), rng.next_u64());
        pair[0] = z0 * std;
        if let Some(x) = pair.get_mut(1) {
            *x = z1 * std;
        }
    }
}

/// Two independent standard normals from two uniform u64 words (Box–Muller). The radius is
/// computed in f64 from 53 bits, so the tails are right even for billions of samples; the angle
/// only needs f32 precision, and f32 sine/cosine are several times faster than f64 ones, which
/// dominate the cost of writing a large model.
fn box_muller(a: u64, b: u64) -> (f32, f32) {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    const SCALE_F32: f32 = 1.0 / (1u32 << 24) as f32;
    // u1 in (0, 1] so the log is finite; u2 in [0, 1).
    let u1 = ((a >> 11) + 1) as f64 * SCALE;
    let u2 = (b >> 40) as f32 * SCALE_F32;
    let r = (-2.0 * u1.ln()).sqrt() as f32;
    let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_init_is_normal_with_the_requested_std() {
        let v = normal_f32(7, "w", 200_001, 0.02);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn demo_init_depends_on_seed_and_name_only() {
        // Across a block boundary, and whether filled by one thread or many.
        let a = normal_f32(1, "model.layers.0.mlp.up_proj.weight", 3 * BLOCK + 5, 1.0);
        let mut b = vec![0f32; a.len()];
        for (i, block) in b.chunks_mut(BLOCK).enumerate() {
            fill_block(
                1,
                stream_of("model.layers.0.mlp.up_proj.weight"),
                i,
                block,
                1.0,
            );
        }
        assert_eq!(a, b);
        // A prefix of a longer tensor is the shorter tensor.
        assert_eq!(
            &normal_f32(1, "x", 1000, 1.0)[..],
            &normal_f32(1, "x", 2001, 1.0)[..1000]
        );
        assert_ne!(normal_f32(1, "x", 10, 1.0), normal_f32(2, "x", 10, 1.0));
        assert_ne!(normal_f32(1, "x", 10, 1.0), normal_f32(1, "y", 10, 1.0));
    }
}
