//! The program's allocator: the system's, with every block of a page or more starting
//! on a cache line, and on Linux those of 32 MiB or more mapped on their own, on a huge
//! page boundary, and advised as huge-page memory.
//!
//! glibc serves large blocks 16 bytes past a page start, so a `Vec<f32>` of weights
//! began 16 bytes into a cache line and every 64-byte AVX-512 load of a row chunk
//! touched two lines. The sparse products of an SAE step gather such chunks from
//! random rows of a weight matrix larger than the caches; with 4 KiB pages each gather
//! also missed the TLB, and where the pages landed decided how well a block of weights
//! shared the (physically indexed) L2. Measured on the 2-core Zen 4, alternating
//! builds: the four products 15–20 % faster (`sparse_ops csr_`, 768 × 24576 at 2 %),
//! whole sparse steps 2–15 % (`sae-trainer bench`). PyTorch's CPU allocator advises
//! huge pages for large tensors for the same reason.
//!
//! A `Vec` cannot ask for more alignment than its element's, so the allocator gives
//! it. A line-aligned block is over-allocated by a line (zeroed ones through `calloc`
//! still) and the caller gets the first line boundary past its start, with the
//! block's own address in the 8 bytes before. A huge block is an anonymous mapping of
//! its own, cut to a 2 MiB boundary; its pages are zero and cost nothing until touched.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes start on a [`LINE`].
const LARGE: usize = 4096;
const LINE: usize = 64;
/// On Linux, blocks of at least this many bytes are mapped on a [`HUGE_PAGE`]. As
/// large as glibc's mmap threshold under `pipeline::sys::tune_allocator` (and the most
/// its own sliding threshold reaches): blocks that size were fresh mappings already,
/// while smaller ones keep coming from the heap, reused without page faults.
const HUGE_FROM: usize = 32 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with large blocks aligned (see the module).
pub struct Aligned;

#[derive(PartialEq)]
enum Kind {
    /// As the system allocator serves it: small, or asking for more than malloc's
    /// own 16-byte alignment.
    System,
    Line,
    Huge,
}

fn kind(l: &Layout) -> Kind {
    match l.size() {
        _ if l.align() > 16 => Kind::System,
        s if s >= HUGE_FROM && cfg!(target_os = "linux") => Kind::Huge,
        s if s >= LARGE => Kind::Line,
        _ => Kind::System,
    }
}

/// The malloc block behind a line-aligned allocation of `l` (`None` where that is
/// too large to ask for).
fn outer(l: &Layout) -> Option<Layout> {
    Layout::from_size_align(l.size().checked_add(LINE)?, 16).ok()
}

/// The first line boundary past `p` (a 16-aligned block start), with `p` stored in
/// the 8 bytes before it (at least 16 bytes past `p`, so inside the block).
unsafe fn place(p: *mut u8) -> *mut u8 {
    if p.is_null() {
        return p;
    }
    let a = p.add(LINE - (p as usize % LINE));
    (a as *mut usize).sub(1).write_unaligned(p as usize);
    a
}

#[cfg(target_os = "linux")]
mod huge {
    use super::HUGE_PAGE;

    fn pages(size: usize) -> usize {
        size.div_ceil(4096) * 4096
    }

    /// An anonymous mapping of `size` bytes (zero) on a huge page boundary.
    pub(super) unsafe fn map(size: usize) -> *mut u8 {
        let n = pages(size);
        let Some(len) = n.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let (p, a) = (p as usize, (p as usize).next_multiple_of(HUGE_PAGE));
        // The slack before and after goes back at once.
        if a > p {
            libc::munmap(p as *mut _, a - p);
        }
        if p + len > a + n {
            libc::munmap((a + n) as *mut _, p + len - (a + n));
        }
        // A hint: where transparent huge pages are off it changes nothing.
        libc::madvise(a as *mut _, n, libc::MADV_HUGEPAGE);
        a as *mut u8
    }

    pub(super) unsafe fn unmap(a: *mut u8, size: usize) {
        libc::munmap(a.cast(), pages(size));
    }
}

unsafe impl GlobalAlloc for Aligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        match kind(&l) {
            Kind::System => System.alloc(l),
            Kind::Line => outer(&l).map_or(std::ptr::null_mut(), |o| place(System.alloc(o))),
            #[cfg(target_os = "linux")]
            Kind::Huge => huge::map(l.size()),
            #[cfg(not(target_os = "linux"))]
            Kind::Huge => unreachable!("huge blocks are Linux's"),
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match kind(&l) {
            Kind::System => System.alloc_zeroed(l),
            Kind::Line => outer(&l).map_or(std::ptr::null_mut(), |o| place(System.alloc_zeroed(o))),
            // A fresh anonymous mapping is zero.
            Kind::Huge => self.alloc(l),
        }
    }

    unsafe fn dealloc(&self, a: *mut u8, l: Layout) {
        match kind(&l) {
            Kind::System => System.dealloc(a, l),
            Kind::Line => {
                let p = (a as *mut usize).sub(1).read_unaligned() as *mut u8;
                // `outer` was Some when this block was allocated.
                System.dealloc(p, outer(&l).unwrap_unchecked())
            }
            #[cfg(target_os = "linux")]
            Kind::Huge => huge::unmap(a, l.size()),
            #[cfg(not(target_os = "linux"))]
            Kind::Huge => unreachable!("huge blocks are Linux's"),
        }
    }

    unsafe fn realloc(&self, a: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, l.align());
        if kind(&l) == Kind::System && kind(&new) == Kind::System {
            return System.realloc(a, l, new_size);
        }
        // An aligned block's place in its malloc block may differ after a system
        // realloc; a copy keeps it simple (large blocks grow by doubling, rarely).
        let b = self.alloc(new);
        if !b.is_null() {
            std::ptr::copy_nonoverlapping(a, b, l.size().min(new_size));
            self.dealloc(a, l);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::{HUGE_FROM, HUGE_PAGE, LARGE, LINE};

    #[test]
    fn large_blocks_start_aligned_and_keep_their_bytes() {
        for n in [1024usize, 4096, 1 << 16, 1 << 20, 9 << 20] {
            let z = vec![0f32; n];
            assert!(z.iter().all(|&v| v == 0.0), "{n} zeroed floats");
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let want = match n * 4 {
                b if b >= HUGE_FROM && cfg!(target_os = "linux") => HUGE_PAGE,
                b if b >= LARGE => LINE,
                _ => 1,
            };
            assert_eq!(z.as_ptr() as usize % want, 0, "zeroed, {n} floats");
            assert_eq!(v.as_ptr() as usize % want, 0, "{n} floats");
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        // Growing from small to huge and back moves the bytes along.
        let mut g: Vec<u32> = Vec::new();
        for i in 0..10_000_000u32 {
            g.push(i);
        }
        assert!(g.iter().enumerate().all(|(i, &x)| x == i as u32));
        g.truncate(10);
        g.shrink_to_fit();
        assert_eq!(g, (0..10).collect::<Vec<_>>());
        // Asked-for alignments above malloc's are kept as asked.
        let page = std::alloc::Layout::from_size_align(8192, 4096).unwrap();
        unsafe {
            let p = std::alloc::alloc(page);
            assert_eq!(p as usize % 4096, 0);
            std::alloc::dealloc(p, page);
        }
    }
}
