//! Helpers for tests of devices (this crate's unit tests, and with the `test-utils`
//! feature the fuzz targets): an interrupt line and a writer to look into. The unit
//! tests also get a per-thread allocation counter and a log-line counter.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::irq::IrqLine;

/// An interrupt line that remembers its level.
#[derive(Default)]
pub struct Line(pub AtomicBool);

impl Line {
    /// The level now.
    pub fn high(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqLine for Line {
    fn set_level(&self, level: bool) {
        self.0.store(level, Ordering::SeqCst);
    }
}

/// A writer the test can look into.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Sink {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that never returns, like a stopped terminal or a pipe nobody reads.
#[derive(Debug, Default)]
pub struct StuckWriter;

impl Write for StuckWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub use counters::*;

#[cfg(test)]
mod counters {
    /// The bytes this thread has allocated and not freed since it started (frees made by
    /// other threads are not counted): for tests that a guest cannot make a device grow the
    /// VMM's memory. Counted by this crate's test allocator.
    pub fn allocated_here() -> isize {
        ALLOCATED.with(std::cell::Cell::get)
    }

    thread_local! {
        static ALLOCATED: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    /// The system allocator, counting per thread for [`allocated_here`].
    struct Counting;

    // SAFETY: every call goes to the system allocator unchanged; the bookkeeping is a
    // thread-local counter with no destructor, which never allocates.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + layout.size() as isize));
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            ALLOCATED.with(|a| a.set(a.get() - layout.size() as isize));
            // SAFETY: as above; `ptr` came from `alloc` with this layout.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + new_size as isize - layout.size() as isize));
            // SAFETY: as above.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    thread_local! {
        static VIRTIO_QUEUE_LINES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Counts, per thread, the log lines `virtio-queue` emits of its own.
    struct CrateLines;

    impl log::Log for CrateLines {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if record.target().starts_with("virtio_queue") {
                VIRTIO_QUEUE_LINES.with(|n| n.set(n.get() + 1));
            }
        }
        fn flush(&self) {}
    }

    /// How many log lines `virtio-queue` has emitted on this thread (installing the counting
    /// logger for this test binary the first time).
    pub fn virtio_queue_lines_here() -> usize {
        static LOGGER: CrateLines = CrateLines;
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
        VIRTIO_QUEUE_LINES.with(std::cell::Cell::get)
    }
}

/// A fresh temporary directory (named after the process and `name`), removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Makes the directory, replacing one of the same name left by an earlier run.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hvrun-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
