//! Allocator settings for the layer-by-layer pipeline.
//!
//! glibc's malloc raises its mmap threshold each time a large block is freed, so after the
//! first layer the big per-layer buffers (weights, activations, SVD workspaces) come from the
//! heap, where fragmentation keeps them resident: peak memory then grows with every layer
//! (measured: 310 MB after 8 layers of a 512-wide model against 97 MB with a fixed threshold).
//!
//! Handing every block above 1 MB straight back to the system (as before) keeps memory flat but
//! makes each of the decomposition's many short-lived float64 matrices fresh pages: on a real
//! model (SmolLM2-135M) that was 4.2 million page faults, ~30% of the preprocess CPU time spent
//! in the kernel. So blocks up to [`HEAP_BLOCK_MAX`] come from the heap and are reused within a
//! layer, and [`release_freed_memory`] returns what is free after each layer, which keeps peak
//! memory flat with depth. The ceiling trades faults for peak memory (measured, SmolLM2-135M /
//! the 4 × 1024 benchmark model: 1 MB 4.26M / 3.00M faults, 299 / 937 MB; 8 MB 3.10M / 2.06M,
//! 343 / 978 MB; 32 MB 2.63M / 1.53M, 439 / 1196 MB, past half of PEFT's peak there).
//!
//! Each thread that allocates may also get its own malloc arena, whose freed memory stays with
//! it; the decomposition runs on fresh threads layer after layer (beside the calibration), so
//! without a cap on arenas peak memory again grew with depth (measured: +15–22 MB from 2 to 8
//! layers of a 512-wide model). Two arenas serve the two sides of the pipeline.

/// Largest block served from the heap; larger ones are mapped and unmapped on their own.
pub const HEAP_BLOCK_MAX: usize = 8 << 20;

/// Fix the allocator's thresholds (see the module doc). Call once at start.
pub fn release_large_blocks_promptly() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_MAX as libc::c_int);
        // Free memory at the top of a heap stays until release_freed_memory, not per free().
        libc::mallopt(libc::M_TRIM_THRESHOLD, (4 * HEAP_BLOCK_MAX) as libc::c_int);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Return the heap's free memory to the system (once per layer).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
