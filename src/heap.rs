//! Heap memory handed back to the system after a burst.
//!
//! A burst of connections (a sale opening: thousands of clients at once, each with hyper's
//! buffers and a request in flight) grows the heap by hundreds of MiB; when it ends, glibc's
//! allocator keeps most of what was freed. Its per-thread arenas return memory to the system
//! only from the top of each heap, and what a burst frees is scattered between chunks still in
//! use (parked connections, the upstream pool, caches). Measured after 4,096 connections for
//! 5 s (`wrk -c4096`, pass-through): RSS 15 MiB idle, 220 MiB after the burst, 84 MiB after one
//! `malloc_trim(0)`.
//!
//! The policy: a thread of its own wakes every [`CHECK_EVERY`] and asks the allocator how much
//! free memory it holds (`mallinfo2`). When that has grown by [`TRIM_AFTER_GROWTH`] or more
//! since its lowest point since the last trim, a burst has ended, and the thread calls
//! `malloc_trim(0)`, which hands every free page back (`MADV_DONTNEED`), in the middle of a
//! heap too. (Trimmed memory still counts as free to the allocator, hence growth, not a level:
//! a level would trim again every few seconds after one burst.) A quiet or steadily loaded
//! process frees about what it allocates and is never trimmed; a burst that ended is trimmed
//! within [`CHECK_EVERY`]. A trim locks each arena while it walks it, a few milliseconds
//! after a big burst, on this thread, not a runtime's. Counted in
//! `flashgate_heap_trims_total` and `flashgate_heap_released_bytes_total` (resident memory
//! before minus after).
//!
//! glibc only (Linux, `target_env = "gnu"`); elsewhere the allocator is left alone.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// How often the free heap is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Growth of the allocator's free memory (since its lowest point since the last trim) at
/// which it is handed back.
pub const TRIM_AFTER_GROWTH: usize = 16 << 20;

/// Decides when to trim from the allocator's free memory, one look at a time.
#[derive(Debug)]
pub struct Policy {
    /// The least free memory seen since the last trim (or since the start).
    floor: usize,
}

impl Policy {
    pub fn new(free: usize) -> Policy {
        Policy { floor: free }
    }

    /// Whether to trim, the allocator holding `free` bytes free now.
    pub fn should_trim(&mut self, free: usize) -> bool {
        self.floor = self.floor.min(free);
        free - self.floor >= TRIM_AFTER_GROWTH
    }

    /// A trim ran; the allocator held `free` bytes free after it.
    pub fn trimmed(&mut self, free: usize) {
        self.floor = free;
    }
}

/// Starts the trimming thread (once per process: it looks after the whole heap). Returns
/// `false` where the allocator offers no trim.
pub fn spawn_trimmer(metrics: Arc<Metrics>) -> bool {
    let Some(free) = allocator::free_bytes() else {
        return false;
    };
    let mut policy = Policy::new(free);
    std::thread::Builder::new()
        .name("flashgate-heap".into())
        .spawn(move || {
            loop {
                std::thread::sleep(CHECK_EVERY);
                if let Some(free) = allocator::free_bytes()
                    && policy.should_trim(free)
                {
                    let released = trim(&metrics);
                    let after = allocator::free_bytes().unwrap_or(free);
                    policy.trimmed(after);
                    tracing::debug!(free, released, "heap trimmed after a burst");
                }
            }
        })
        .is_ok()
}

/// Hands the allocator's free pages back; returns how many bytes of resident memory that
/// released (0 where it cannot tell), and counts it.
pub fn trim(metrics: &Metrics) -> usize {
    let before = resident_bytes();
    allocator::trim();
    let released = before.saturating_sub(resident_bytes());
    metrics.heap_trimmed(released);
    released
}

/// This process's resident memory, from `/proc/self/statm` (0 where there is none).
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages.saturating_mul(4096))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator {
    /// Bytes the allocator holds free (in its heaps, not handed back to the system).
    pub fn free_bytes() -> Option<usize> {
        // SAFETY: `mallinfo2` takes no arguments and only reads the allocator's own state
        // (under its arena locks); it is safe to call from any thread at any time.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }

    pub fn trim() {
        // SAFETY: `malloc_trim` takes a size and returns a flag; it releases only memory the
        // allocator holds free, under its arena locks, and is safe to call from any thread.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    pub fn free_bytes() -> Option<usize> {
        None
    }

    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_growth_of_the_free_heap_since_its_low_point_trims() {
        let mut p = Policy::new(4 << 20);
        assert!(!p.should_trim(4 << 20), "nothing freed");
        assert!(!p.should_trim((4 << 20) + TRIM_AFTER_GROWTH - 1));
        assert!(
            p.should_trim((4 << 20) + TRIM_AFTER_GROWTH),
            "a burst ended"
        );
        // Trimmed pages still count as free: the same level must not trim again.
        p.trimmed(200 << 20);
        assert!(!p.should_trim(200 << 20));
        assert!(!p.should_trim(210 << 20));
        // A new burst reuses the free memory (the floor falls), then frees it again.
        assert!(!p.should_trim(10 << 20));
        assert!(p.should_trim(200 << 20));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_hands_free_pages_between_live_blocks_back() {
        // 64 MiB in 1 KiB blocks, then every block but one in 32 freed: the free memory lies
        // between blocks still in use, where the allocator does not return it on its own.
        let blocks: Vec<Vec<u8>> = (0..65_536)
            .map(|i| vec![(i % 251) as u8 + 1; 1024])
            .collect();
        let last = blocks.len() - 1;
        let kept: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 32 == 0 || *i == last)
            .map(|(_, b)| b)
            .collect();
        let metrics = Metrics::new();
        let released = trim(&metrics);
        assert!(
            released >= 32 << 20,
            "a trim hands back most of the 62 MiB freed, released {released} bytes"
        );
        assert!(
            metrics
                .encode_text()
                .contains("flashgate_heap_trims_total 1")
        );
        assert_eq!(kept.len(), 2049);
    }
}
