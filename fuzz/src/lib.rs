//! What every fuzz target shares: the memory oracle.
//!
//! libFuzzer already fails an input that panics (a crash), runs past `-timeout` (a
//! hang: a device that spins, a reset that waits for ever) or pushes the process past
//! `-rss_limit_mb` / `-malloc_limit_mb`. On top, [`Allocations`] counts the bytes live
//! on the heap, so a target can assert that whatever the guest does, the VMM's
//! buffers and queues stay within a bound ([`assert_bounded`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// The system allocator, counting the bytes live on the heap.
pub struct Allocations;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counter is an atomic.
unsafe impl GlobalAlloc for Allocations {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Allocations = Allocations;

/// Bytes live on the heap now.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Fails (panics, which libFuzzer reports as a crash) if the heap grew by more than
/// `limit` bytes since `start` (a [`live_bytes`] reading): `what` says whose buffers.
///
/// The count is the whole process's, so a reading can catch other threads half-way (a
/// device's worker between dropping old buffers and its next pass): one reading over
/// the limit is taken again a few times, 10 ms apart, and only growth that stays fails.
/// (A CI run of net_frames once read 8,746,196 bytes against 8 MiB on an input that
/// stayed under it when run again alone.)
pub fn assert_bounded(start: isize, limit: usize, what: &str) {
    let mut grown = live_bytes() - start;
    for _ in 0..5 {
        if grown <= limit as isize {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        grown = live_bytes() - start;
    }
    assert!(grown <= limit as isize, "{what}: the heap grew by {grown} bytes (limit {limit})");
}

pub mod dtb;

pub mod ring;

pub mod layout;

pub mod sink;
