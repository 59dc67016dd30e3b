//! The allocator: jemalloc, its options, and what it tells the metrics.
//!
//! Why jemalloc (issue 15; `bench/README.md` History has the runs): against glibc's malloc,
//! in seven paired A/B runs on the same machine, a flash admission cost 0.91x-1.00x the CPU
//! (median 0.95x), pass-through 0.92x-1.06x (median 0.99x), and 10,000 idle keep-alive
//! connections cost ~4 MiB less. Its per-thread caches serve the admission path's many
//! short-lived allocations (a request's futures, the order task, headers) without the bin
//! consolidation glibc does for blocks over its fastbin sizes. The price is ~2 MiB more
//! resident memory at idle.
//!
//! Memory after a burst: a sale opening brings thousands of connections at once, each with
//! hyper's buffers and a request in flight. jemalloc's background threads (at most one per
//! CPU, asleep unless there is something to hand back) return pages nobody has used for
//! `dirty_decay_ms` (10 s) to the system with `MADV_DONTNEED`, in the middle of a heap too,
//! so RSS falls on its own once the burst is over: no trim call, no policy of our own.
//! `muzzy_decay_ms:0` skips the intermediate `MADV_FREE` state, whose pages the kernel takes
//! back only under memory pressure and which still count in RSS until then: an operator
//! watching RSS sees memory come back, not a plateau. `flashgate_heap_allocated_bytes` and
//! `flashgate_heap_resident_bytes` show both sides, read at every scrape.
//!
//! Not on MSVC targets (jemalloc does not build there): the system allocator stays, and the
//! gauges read 0.

use crate::metrics::Metrics;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (see the module's comment), read once, before `main`, from the
/// symbol `malloc_conf` (prefixed `_rjem_` in the tikv build). A NUL-terminated C string.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Conf = Conf(OPTIONS.as_ptr());

/// The options, as jemalloc parses them (`name:value`, comma-separated).
const OPTIONS: &[u8] = b"background_thread:true,muzzy_decay_ms:0\0";

/// A C string pointer jemalloc reads; it points at a `'static` constant, so sharing it
/// between threads is sound.
#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
struct Conf(*const u8);

// SAFETY: the pointer is to immutable static bytes; nothing ever writes through it.
#[cfg(not(target_env = "msvc"))]
unsafe impl Sync for Conf {}

/// What the allocator holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes the program has allocated and not freed.
    pub allocated: usize,
    /// Bytes of the allocator's pages resident in memory (allocated, cached for reuse, and
    /// its own metadata), as jemalloc counts them.
    pub resident: usize,
}

/// The allocator's figures now; `None` where the allocator is not jemalloc.
#[cfg(not(target_env = "msvc"))]
pub fn stats() -> Option<HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // jemalloc caches its statistics; advancing the epoch refreshes them.
    epoch::advance().ok()?;
    Some(HeapStats {
        allocated: stats::allocated::read().ok()?,
        resident: stats::resident::read().ok()?,
    })
}

#[cfg(target_env = "msvc")]
pub fn stats() -> Option<HeapStats> {
    None
}

/// Sets the heap gauges from the allocator (before every scrape).
pub fn observe(metrics: &Metrics) {
    if let Some(s) = stats() {
        metrics.heap(s);
    }
}

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_options_are_in_force() {
        assert_eq!(OPTIONS.last(), Some(&0), "a C string: NUL-terminated");
        assert!(
            tikv_jemalloc_ctl::opt::background_thread::read().unwrap(),
            "jemalloc read `malloc_conf`: background threads are on"
        );
        assert!(
            tikv_jemalloc_ctl::background_thread::read().unwrap(),
            "and running"
        );
    }

    #[test]
    fn memory_freed_between_live_blocks_goes_back_to_the_system_on_its_own() {
        // 64 MiB in 1 KiB blocks, then every block but one in 32 freed: the free memory lies
        // between blocks still in use, where glibc's malloc never returned it by itself.
        let blocks: Vec<Vec<u8>> = (0..65_536)
            .map(|i| vec![(i % 251) as u8 + 1; 1024])
            .collect();
        let peak = stats().unwrap();
        let kept: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 32 == 0)
            .map(|(_, b)| b)
            .collect();
        // The background threads purge pages unused for `dirty_decay_ms` (10 s), gradually.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut now = stats().unwrap();
        while peak.resident.saturating_sub(now.resident) < 32 << 20 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            now = stats().unwrap();
        }
        assert!(
            peak.resident.saturating_sub(now.resident) >= 32 << 20,
            "most of the 62 MiB freed is handed back: resident {} -> {} bytes",
            peak.resident,
            now.resident
        );
        assert!(now.allocated < peak.allocated);
        assert_eq!(kept.len(), 2048);
    }

    #[test]
    fn a_scrape_shows_the_heap() {
        let metrics = Metrics::new();
        observe(&metrics);
        let text = metrics.encode_text();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert!(value("flashgate_heap_allocated_bytes ") > 0, "{text}");
        assert!(
            value("flashgate_heap_resident_bytes ") >= value("flashgate_heap_allocated_bytes "),
            "{text}"
        );
    }
}
