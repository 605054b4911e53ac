//! Allocator settings: for the layer-by-layer pipeline (memory flat with depth) and for training
//! (freed memory reused).
//!
//! glibc's malloc raises its mmap threshold each time a large block is freed, so after the
//! first layer the big per-layer buffers (weights, activations, SVD workspaces) come from the
//! heap, where fragmentation keeps them resident: peak memory then grows with every layer
//! (measured: 310 MB after 8 layers of a 512-wide model against 97 MB with a fixed threshold).
//! A fixed threshold hands every large buffer back to the system when it is freed.
//!
//! Each thread that allocates may also get its own malloc arena, whose freed memory stays with
//! it; the decomposition runs on fresh threads layer after layer (beside the calibration), so
//! without a cap on arenas peak memory again grew with depth (measured: +15–22 MB from 2 to 8
//! layers of a 512-wide model). Two arenas serve the two sides of the pipeline.

/// Make large allocations come from (and return to) the system directly. Call once at start.
pub fn release_large_blocks_promptly() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Keep freed memory in the heap for reuse (training without gradient checkpointing): every op
/// output is a fresh buffer, and mapping and unmapping the large ones made each step fault and
/// zero them again. Measured on the benchmark model: page faults 3x fewer, CPU time −13%, peak
/// RSS +1% (docs/benchmarks.md). Not for checkpointing, whose point is memory: there it raised
/// the peak 11%. Call once at start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under glibc's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
