//! Allocator settings for the layer-by-layer pipeline.
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
