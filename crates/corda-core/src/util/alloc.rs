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

/// Keep freed memory in the heap for reuse (training): every op output is a fresh buffer, and
/// mapping and unmapping the large ones made each step fault and zero them again. Measured on
/// the benchmark model: page faults 3x fewer, CPU time −13%, peak RSS +1% (docs/benchmarks.md).
/// With gradient checkpointing too since the fused ops: there it once raised the peak 11%, now
/// 0–1% (4 × 512 tokens on an Intel Xeon: 1.21 → 1.22 GB, 345k fewer page faults per step,
/// steps 6% faster). Call once at start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under glibc's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Blocks this large or larger are mapped on their own, starting at a huge-page boundary.
#[cfg(target_os = "linux")]
const HUGE_MIN: usize = 2 << 20;
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;
#[cfg(target_os = "linux")]
const PAGE: usize = 4096;

/// The global allocator for the preprocess pipeline: the system's malloc, except that blocks
/// of 2 MiB and more (covariances, `W·Cf`, the SVDs' factors and workspaces, activations) are
/// mapped on their own from a 2 MiB boundary with transparent huge pages requested
/// (`MADV_HUGEPAGE`), and unmapped when freed. Those blocks are what the decomposition
/// allocates and frees per module; in 4 KiB pages each one faulted and was zeroed page by page,
/// and the kernel took ~30% of the CPU time (docs/benchmarks.md). Now a block faults once per
/// whole 2 MiB it spans; its last partial 2 MiB stays in 4 KiB pages, so no memory is resident
/// beyond what a 4 KiB mapping would hold. Memory stays flat with depth as before: a freed
/// block goes back to the system at once. Elsewhere, and where the kernel has transparent huge
/// pages off, it behaves as the plain system allocator (with `mmap` for the large blocks).
pub struct HugePageAlloc;

#[cfg(target_os = "linux")]
impl HugePageAlloc {
    fn mapped(layout: std::alloc::Layout) -> Option<usize> {
        (layout.size() >= HUGE_MIN && layout.align() <= HUGE_PAGE)
            .then(|| layout.size().div_ceil(PAGE) * PAGE)
    }

    /// `len` bytes (whole 4 KiB pages) at a 2 MiB boundary, zeroed (fresh anonymous pages).
    unsafe fn map(len: usize) -> *mut u8 {
        // SAFETY (whole fn): anonymous private mappings owned by this allocator only; the
        // trimmed head and tail lie inside the mapping just made.
        let Some(span) = len.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        let p = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let start = p as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        if head > 0 {
            libc::munmap(p, head);
        }
        let tail = span - head - len;
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        aligned as *mut u8
    }
}

#[cfg(target_os = "linux")]
// SAFETY: blocks are handed out once and freed with the layout they were made with (the
// GlobalAlloc contract), so `mapped` routes each free to the allocator that made the block.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        match Self::mapped(layout) {
            Some(len) => Self::map(len),
            None => std::alloc::System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        match Self::mapped(layout) {
            Some(len) => Self::map(len),
            None => std::alloc::System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        match Self::mapped(layout) {
            Some(len) => {
                libc::munmap(ptr as *mut libc::c_void, len);
            }
            None => std::alloc::System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let new = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
        match (Self::mapped(layout), Self::mapped(new)) {
            (None, None) => std::alloc::System.realloc(ptr, layout, new_size),
            // Within the same mapped pages nothing moves.
            (Some(old), Some(len)) if old == len => ptr,
            _ => {
                let p = self.alloc(new);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                p
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
// SAFETY: the system allocator, unchanged.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        std::alloc::System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    /// Large blocks are 2 MiB-aligned, zeroed when asked, keep their contents through a
    /// `realloc` across the threshold both ways, and small ones go to the system allocator.
    #[test]
    fn huge_page_blocks_round_trip() {
        let a = HugePageAlloc;
        let big = Layout::from_size_align((5 << 20) + 10, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            #[cfg(target_os = "linux")]
            assert!((p as usize).is_multiple_of(HUGE_PAGE));
            let s = std::slice::from_raw_parts_mut(p, big.size());
            assert!(s.iter().all(|&b| b == 0));
            for (i, b) in s.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // Grow within the same page, then past it, then shrink below the threshold.
            let p = a.realloc(p, big, (5 << 20) + 100);
            let grown = Layout::from_size_align((5 << 20) + 100, 64).unwrap();
            let p = a.realloc(p, grown, 9 << 20);
            let s = std::slice::from_raw_parts(p, big.size());
            assert!(s.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            let p = a.realloc(p, Layout::from_size_align(9 << 20, 64).unwrap(), 4096);
            let s = std::slice::from_raw_parts(p, 4096);
            assert!(s.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            a.dealloc(p, Layout::from_size_align(4096, 64).unwrap());
            // Small blocks, and large ones aligned beyond a huge page, stay with the system.
            let small = Layout::from_size_align(1000, 8).unwrap();
            let q = a.alloc(small);
            assert!(!q.is_null());
            a.dealloc(q, small);
            let odd = Layout::from_size_align(8 << 20, 4 << 20).unwrap();
            let q = a.alloc(odd);
            assert!(!q.is_null() && (q as usize).is_multiple_of(4 << 20));
            a.dealloc(q, odd);
        }
    }
}
