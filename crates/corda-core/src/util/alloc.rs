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

/// Blocks this large or larger are mapped on their own (glibc maps them too, from the 1 MiB
/// threshold set above, but unmaps them on free; here they go through the cache below).
#[cfg(target_os = "linux")]
const MAPPED_MIN: usize = 1 << 20;
/// Mappings start at a huge-page boundary and ask for huge pages (`MADV_HUGEPAGE`); a mapping
/// under 2 MiB cannot hold one and stays in 4 KiB pages.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;
#[cfg(target_os = "linux")]
const PAGE: usize = 4096;
/// Freed mappings kept for reuse, at most this many bytes and this many blocks in all.
#[cfg(target_os = "linux")]
const CACHE_BYTES: usize = 64 << 20;
#[cfg(target_os = "linux")]
const CACHE_SLOTS: usize = 32;

/// The global allocator for the preprocess pipeline: the system's malloc, except that blocks
/// of 1 MiB and more (covariances, `W·Cf`, the SVDs' factors and workspaces, activations) are
/// mapped on their own from a 2 MiB boundary with transparent huge pages requested
/// (`MADV_HUGEPAGE`). Those blocks are what the decomposition allocates and frees per module;
/// in 4 KiB pages each one faulted and was zeroed page by page, and the kernel took ~30% of the
/// CPU time (docs/benchmarks.md). A block faults once per whole 2 MiB it spans; its last
/// partial 2 MiB stays in 4 KiB pages, so no memory is resident beyond what a 4 KiB mapping
/// would hold.
///
/// Every layer allocates blocks of the same sizes again, so a freed block is kept in a small
/// cache (`CACHE_BYTES`, most recently freed first, oldest unmapped when full) and handed out
/// again for a request of the same length: no faults, no zeroing by the kernel (a zeroed
/// request is cleared in place). The cache is a constant, so memory still stays flat with
/// depth. Elsewhere, and where the kernel has transparent huge pages off, it behaves as the
/// plain system allocator (with `mmap` for the large blocks).
pub struct HugePageAlloc;

/// Freed mappings `(address, length)`, oldest first. A fixed array under a spin lock: the
/// global allocator must not allocate, and the lock is held for a few comparisons.
#[cfg(target_os = "linux")]
struct BlockCache {
    lock: std::sync::atomic::AtomicBool,
    slots: std::cell::UnsafeCell<([(usize, usize); CACHE_SLOTS], usize)>,
}

// SAFETY: `slots` is only touched while `lock` is held.
#[cfg(target_os = "linux")]
unsafe impl Sync for BlockCache {}

#[cfg(target_os = "linux")]
static CACHE: BlockCache = BlockCache {
    lock: std::sync::atomic::AtomicBool::new(false),
    slots: std::cell::UnsafeCell::new(([(0, 0); CACHE_SLOTS], 0)),
};

#[cfg(target_os = "linux")]
impl BlockCache {
    fn with<R>(&self, f: impl FnOnce(&mut [(usize, usize); CACHE_SLOTS], &mut usize) -> R) -> R {
        use std::sync::atomic::Ordering;
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let (slots, len) = unsafe { &mut *self.slots.get() };
        let r = f(slots, len);
        self.lock.store(false, Ordering::Release);
        r
    }

    /// The most recently freed block of exactly `len` bytes, taken out of the cache.
    fn take(&self, len: usize) -> Option<usize> {
        self.with(|slots, n| {
            let i = (0..*n).rev().find(|&i| slots[i].1 == len)?;
            let ptr = slots[i].0;
            slots.copy_within(i + 1..*n, i);
            *n -= 1;
            Some(ptr)
        })
    }

    /// Keep a freed block; returns the blocks that no longer fit (oldest first), to unmap.
    fn put(&self, ptr: usize, len: usize) -> ([(usize, usize); CACHE_SLOTS + 1], usize) {
        let mut out = [(0, 0); CACHE_SLOTS + 1];
        if len > CACHE_BYTES {
            out[0] = (ptr, len);
            return (out, 1);
        }
        self.with(|slots, n| {
            let mut bytes: usize = slots[..*n].iter().map(|s| s.1).sum();
            let mut evicted = 0;
            while *n == CACHE_SLOTS || bytes + len > CACHE_BYTES {
                out[evicted] = slots[0];
                evicted += 1;
                bytes -= slots[0].1;
                slots.copy_within(1..*n, 0);
                *n -= 1;
            }
            slots[*n] = (ptr, len);
            *n += 1;
            (out, evicted)
        })
    }
}

#[cfg(target_os = "linux")]
impl HugePageAlloc {
    fn mapped(layout: std::alloc::Layout) -> Option<usize> {
        (layout.size() >= MAPPED_MIN && layout.align() <= HUGE_PAGE)
            .then(|| layout.size().div_ceil(PAGE) * PAGE)
    }

    /// `len` bytes (whole 4 KiB pages) at a 2 MiB boundary: a cached block (cleared when
    /// `zeroed`), or fresh anonymous pages (zero).
    unsafe fn block(len: usize, zeroed: bool) -> *mut u8 {
        if let Some(p) = CACHE.take(len) {
            if zeroed {
                // SAFETY: the cached mapping is `len` bytes, owned by this allocator.
                std::ptr::write_bytes(p as *mut u8, 0, len);
            }
            return p as *mut u8;
        }
        Self::map(len)
    }

    /// `len` fresh bytes (whole 4 KiB pages) at a 2 MiB boundary, zeroed.
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

    /// Return a block: into the cache, unmapping what it pushes out.
    unsafe fn free(ptr: *mut u8, len: usize) {
        let (evicted, n) = CACHE.put(ptr as usize, len);
        for &(p, l) in &evicted[..n] {
            // SAFETY: each evicted block is a whole mapping of this allocator, no longer used.
            libc::munmap(p as *mut libc::c_void, l);
        }
    }
}

#[cfg(target_os = "linux")]
// SAFETY: blocks are handed out once and freed with the layout they were made with (the
// GlobalAlloc contract), so `mapped` routes each free to the allocator that made the block.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        match Self::mapped(layout) {
            Some(len) => Self::block(len, false),
            None => std::alloc::System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        match Self::mapped(layout) {
            Some(len) => Self::block(len, true),
            None => std::alloc::System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        match Self::mapped(layout) {
            Some(len) => Self::free(ptr, len),
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

    /// A freed block comes back for a request of the same length (cleared when a zeroed block
    /// is asked for); other lengths get fresh mappings, and the cache never holds more than
    /// its bound.
    #[cfg(target_os = "linux")]
    #[test]
    fn freed_blocks_are_reused_and_cleared() {
        let a = HugePageAlloc;
        let layout = Layout::from_size_align((3 << 20) + 12345, 64).unwrap();
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(p, q, "the freed block is handed out again");
            let s = std::slice::from_raw_parts(q, layout.size());
            assert!(s.iter().all(|&b| b == 0), "a zeroed request is cleared");
            std::ptr::write_bytes(q, 9, layout.size());
            a.dealloc(q, layout);
            let other = Layout::from_size_align(5 << 20, 64).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, q, "another length gets its own mapping");
            a.dealloc(r, other);
            let q2 = a.alloc(layout);
            assert_eq!(q2, q);
            a.dealloc(q2, layout);
            // Far more than the bound, freed: what stays cached is within it.
            let big = Layout::from_size_align(24 << 20, 64).unwrap();
            let blocks: Vec<*mut u8> = (0..6).map(|_| a.alloc(big)).collect();
            for &b in &blocks {
                std::ptr::write_bytes(b, 1, 4096);
                a.dealloc(b, big);
            }
            let cached = CACHE.with(|slots, n| slots[..*n].iter().map(|s| s.1).sum::<usize>());
            assert!(cached <= CACHE_BYTES, "{cached} bytes cached");
            let huge = Layout::from_size_align(CACHE_BYTES + PAGE, 64).unwrap();
            let h = a.alloc(huge);
            a.dealloc(h, huge);
            assert!(CACHE.with(|slots, n| slots[..*n].iter().all(|s| s.0 != h as usize)));
        }
    }
}
