//! What this process's memory is made of, for the soak: the heap bytes Rust code holds (counted by
//! the global allocator below) beside where the RSS lives (from /proc/self/smaps). RSS alone cannot
//! tell a leak from an allocator keeping freed pages or a thread stack cache.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// The system allocator, counting live bytes and allocations. Two relaxed atomic adds per call.
pub struct Counting;

static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE_ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }
}

/// Where this process's resident memory is, in KiB, and what Rust code holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Bytes allocated through the global allocator and not freed (KiB).
    pub live_heap_kib: u64,
    /// Allocations not freed.
    pub live_allocs: u64,
    /// Resident in the main malloc arena (`[heap]`).
    pub main_arena_kib: u64,
    /// Resident in other anonymous mappings: thread arenas, thread stacks, large mmap'd blocks.
    pub anon_kib: u64,
    /// Anonymous mappings (a thread arena is one, a thread stack another).
    pub anon_mappings: u64,
    /// Resident file pages (the binary and libraries: code first run late counts here).
    pub file_kib: u64,
    /// glibc malloc's arenas (the main one and one per set of threads, up to 8 per core).
    pub malloc_arenas: u64,
    /// Bytes malloc holds free in its arenas (freed by the program, kept by the allocator).
    pub malloc_free_kib: u64,
    /// Bytes malloc counts in use: the live heap plus what C code allocated, chunk headers and
    /// chunks cached per thread (tcache).
    pub malloc_in_use_kib: u64,
}

/// This process's memory now.
pub fn now() -> Memory {
    let mut m = Memory {
        live_heap_kib: LIVE_BYTES.load(Ordering::Relaxed) / 1024,
        live_allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
        ..Memory::default()
    };
    // Read line by line: one buffer for the whole file would be large enough to move malloc's
    // mmap threshold, changing what is measured.
    if let Ok(f) = std::fs::File::open("/proc/self/smaps") {
        use std::io::BufRead;
        add_smaps(
            &mut m,
            std::io::BufReader::new(f).lines().map_while(Result::ok),
        );
    }
    // SAFETY: mallinfo2 only reads malloc's statistics.
    let mi = unsafe { libc::mallinfo2() };
    m.malloc_free_kib = mi.fordblks as u64 / 1024;
    m.malloc_in_use_kib = (mi.uordblks + mi.hblkhd) as u64 / 1024;
    m.malloc_arenas = malloc_info_xml().map_or(0, |x| x.matches("<heap nr=").count() as u64);
    m
}

impl Memory {
    /// What malloc keeps for reuse rather than what the program holds: its free bytes, and the
    /// bytes it counts in use beyond the live heap (chiefly chunks cached per thread).
    pub fn malloc_cached_kib(&self) -> u64 {
        self.malloc_free_kib + self.malloc_in_use_kib.saturating_sub(self.live_heap_kib)
    }
}

/// glibc's `malloc_info` report (XML, one `<heap nr=...>` per arena).
fn malloc_info_xml() -> Option<String> {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream owns `buf` until fclose; the bytes are copied out before it is
    // freed with the libc allocator that made it.
    unsafe {
        let f = libc::open_memstream(&mut buf, &mut len);
        if f.is_null() {
            return None;
        }
        let rc = libc::malloc_info(0, f);
        libc::fclose(f);
        let xml = (rc == 0 && !buf.is_null()).then(|| {
            String::from_utf8_lossy(std::slice::from_raw_parts(buf as *const u8, len)).into_owned()
        });
        libc::free(buf.cast());
        xml
    }
}

/// Adds each mapping's `Rss:` to its kind.
fn add_smaps<L: AsRef<str>>(m: &mut Memory, lines: impl Iterator<Item = L>) {
    enum Kind {
        Heap,
        Anon,
        File,
        Other,
    }
    let mut kind = Kind::Other;
    for line in lines {
        let mut words = line.as_ref().split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping's header: range perms offset dev inode [name].
            let name = words.nth(4);
            kind = match name {
                Some("[heap]") => Kind::Heap,
                None => {
                    m.anon_mappings += 1;
                    Kind::Anon
                }
                Some(n) if n.starts_with('/') => Kind::File,
                Some(_) => Kind::Other,
            };
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match kind {
                Kind::Heap => m.main_arena_kib += kib,
                Kind::Anon => m.anon_kib += kib,
                Kind::File => m.file_kib += kib,
                Kind::Other => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rss_is_split_by_mapping_kind() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/x
Size:               1024 kB
Rss:                 300 kB
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0 [heap]
Rss:                 700 kB
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
Rss:                 132 kB
7f0000100000-7f0000300000 rw-p 00000000 00:00 0
Rss:                  16 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  40 kB
";
        let mut m = Memory::default();
        add_smaps(&mut m, smaps.lines());
        assert_eq!(
            (m.main_arena_kib, m.anon_kib, m.anon_mappings, m.file_kib),
            (700, 148, 2, 300)
        );
    }

    #[test]
    fn live_heap_counts_what_is_held_and_not_what_was_freed() {
        // Other tests allocate at the same time, so only a large block is told apart.
        let before = now().live_heap_kib;
        let block = vec![1u8; 64 << 20];
        let held = now().live_heap_kib;
        drop(std::hint::black_box(block));
        assert!(held >= before + (64 << 10) - 1024, "{before} -> {held}");
        // This process has at least the main arena, and malloc counts the live heap in use.
        let m = now();
        assert!(m.malloc_arenas >= 1, "{m:?}");
        assert!(m.malloc_in_use_kib + 1024 >= m.live_heap_kib, "{m:?}");
    }
}
