//! virtio-balloon (virtio 1.2 section 5.5), with free page reporting: memory the guest
//! gives up goes back to the host.
//!
//! Features offered: `VIRTIO_BALLOON_F_STATS_VQ`, `F_DEFLATE_ON_OOM` and `F_REPORTING`
//! (each as [`BalloonOptions`] says), and EVENT_IDX; not `F_MUST_TELL_HOST` (the device
//! needs no word before the guest reuses a page), `F_FREE_PAGE_HINT` nor `F_PAGE_POISON`.
//!
//! Queues: inflate 0 and deflate 1, then the statistics queue if `F_STATS_VQ` was
//! negotiated and the reporting queue if `F_REPORTING` was, each taking the next index
//! (Linux's virtio-mmio numbers the queues a driver uses compactly; see [`QueueMap`]).
//! The queues are served by a [`Worker`](super::worker::Worker), not on the vCPU that
//! notifies: releasing hundreds of MiB never stalls a vCPU.
//!
//! The host sets the target (`num_pages`, in 4 KiB pages) through a [`BalloonHandle`],
//! which raises a configuration-change interrupt; the driver inflates or deflates
//! towards it and writes `actual`. Every page frame number and reported range is checked
//! against guest RAM before anything is released ([`release`]).
//!
//! Counters for metrics ([`VirtioDevice::counters`]): `requests` are the buffers served
//! on every queue (page arrays to inflate and deflate, statistics buffers, free page
//! reports); `tx_bytes` the guest memory given back to the host (inflated or reported:
//! the whole host pages released, as [`BalloonHandle::released`] says) and `rx_bytes`
//! the memory the guest took back (deflated, in the guest's 4 KiB pages); `errors` the
//! buffers of which something was ignored: a page array with a partial entry, a buffer
//! outside guest memory or the wrong way round, page frames or reported ranges outside
//! RAM, a report of too many ranges, a malformed statistics buffer, memory the host
//! refused to release. And its own, by name ([`Named`]), Firecracker's: `inflate_count`, `deflate_count`,
//! `stats_updates_count` and `free_page_report_count`, the buffers served on each queue.

mod engine;
pub mod release;
pub mod stats;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use self::engine::Engine;
pub use self::stats::Stats;
use super::counters::{DeviceCounters, DeviceStats, Named};
use super::worker::Slot;
use super::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_CONFIG};

/// The guest tells the host before it reuses a deflated page (not offered).
pub const F_MUST_TELL_HOST: u32 = 0;
/// The statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// The guest deflates the balloon when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (not offered).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Page poisoning (not offered).
pub const F_PAGE_POISON: u32 = 4;
/// Free page reporting: the guest reports free memory and the host releases it.
pub const F_REPORTING: u32 = 5;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The statistics interval of `--balloon` without `stats=`.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(5);
/// Bytes of the balloon's page unit (`num_pages` and `actual` count 4 KiB pages).
pub const PAGE_SIZE: u64 = 1 << release::PFN_SHIFT;

const NAME: &str = "virtio-balloon";

/// What the balloon offers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonOptions {
    /// Offer free page reporting (the guest's free memory goes back to the host).
    pub free_page_reporting: bool,
    /// Offer deflate-on-OOM (the guest takes balloon pages back when it runs out).
    pub deflate_on_oom: bool,
    /// Offer the statistics queue and ask for fresh statistics at this interval; `None`:
    /// no statistics.
    pub stats_interval: Option<Duration>,
    /// The target the balloon starts with, in bytes (the driver inflates to it as it
    /// starts); [`BalloonHandle::set_target`] changes it.
    pub initial_target: u64,
}

impl Default for BalloonOptions {
    /// Everything on, statistics every [`DEFAULT_STATS_INTERVAL`].
    fn default() -> Self {
        BalloonOptions {
            free_page_reporting: true,
            deflate_on_oom: true,
            stats_interval: Some(DEFAULT_STATS_INTERVAL),
            initial_target: 0,
        }
    }
}

impl BalloonOptions {
    /// The feature bits these offer.
    fn features(&self) -> u64 {
        let bit = |on: bool, feature: u32| if on { 1u64 << feature } else { 0 };
        bit(self.free_page_reporting, F_REPORTING)
            | bit(self.deflate_on_oom, F_DEFLATE_ON_OOM)
            | bit(self.stats_interval.is_some(), F_STATS_VQ)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
    }
}

/// Which queue index serves what, from the features the driver accepted: inflate 0,
/// deflate 1, then each negotiated optional queue takes the next index, in the order
/// statistics, free page hints, reporting (as Linux's `virtio_balloon` asks for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMap {
    /// The statistics queue's index.
    pub stats: Option<u16>,
    /// The free page reporting queue's index.
    pub reporting: Option<u16>,
    /// How many queues the driver uses.
    pub count: u16,
}

/// The inflate queue's index.
pub const INFLATE: u16 = 0;
/// The deflate queue's index.
pub const DEFLATE: u16 = 1;

impl QueueMap {
    /// The map for `acked` features.
    pub fn for_features(acked: u64) -> Self {
        let has = |feature: u32| acked & (1 << feature) != 0;
        let mut next = 2;
        let mut take = |on: bool| {
            on.then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(has(F_STATS_VQ));
        // Never negotiated (not offered), but it would take an index before reporting.
        let _hints = take(has(F_FREE_PAGE_HINT));
        let reporting = take(has(F_REPORTING));
        QueueMap { stats, reporting, count: next }
    }
}

/// What the device and the host's [`BalloonHandle`]s share.
#[derive(Debug, Default)]
struct Shared {
    /// `num_pages`: the target the host set.
    target: AtomicU32,
    /// `actual`: what the driver says the balloon holds.
    actual: AtomicU32,
    /// The device's counters (see the module); `tx_bytes` are the bytes released to the
    /// host so far (inflate and reporting).
    counters: DeviceCounters,
    /// The buffers served on each queue (the device's own counters, by name).
    inflates: AtomicU64,
    deflates: AtomicU64,
    stats_updates: AtomicU64,
    free_page_reports: AtomicU64,
    /// The last statistics: a snapshot the device thread replaces every few seconds and
    /// the host reads now and then; a lock is the plain tool for a value of 136 bytes.
    stats: Mutex<Option<Stats>>,
    /// The interrupt of the driver's session, to announce a new target; `None` while the
    /// device is not started (the driver reads the target when it starts).
    interrupt: Mutex<Option<Interrupt>>,
}

/// Adds one to `counter` (a counter for metrics: nothing is ordered by it).
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `bytes` in 4 KiB pages, rounded down, at most `u32::MAX`.
fn pages(bytes: u64) -> u32 {
    u32::try_from(bytes / PAGE_SIZE).unwrap_or(u32::MAX)
}

/// The host's side of a balloon: sets its target, reads what the guest did. Cheap to
/// clone; any thread.
#[derive(Debug, Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Asks the guest to hold `bytes` in the balloon (rounded down to 4 KiB pages, at
    /// most `u32::MAX` pages): sets `num_pages` and raises a configuration-change
    /// interrupt if the driver has the device started (otherwise the driver reads it when
    /// it starts). Returns the target in pages.
    pub fn set_target(&self, bytes: u64) -> u32 {
        let pages = pages(bytes);
        self.shared.target.store(pages, Ordering::SeqCst);
        if let Some(interrupt) = lock(&self.shared.interrupt).as_ref() {
            interrupt.trigger(INT_CONFIG);
        }
        pages
    }

    /// The target in bytes.
    pub fn target(&self) -> u64 {
        u64::from(self.shared.target.load(Ordering::SeqCst)) * PAGE_SIZE
    }

    /// What the guest says the balloon holds (`actual`), in bytes.
    pub fn actual(&self) -> u64 {
        u64::from(self.shared.actual.load(Ordering::SeqCst)) * PAGE_SIZE
    }

    /// Bytes of guest memory given back to the host so far (inflated and reported; the
    /// same memory counts again each time the guest gives it up).
    pub fn released(&self) -> u64 {
        self.shared.counters.snapshot().tx_bytes
    }

    /// The guest's last statistics, if it sent any.
    pub fn stats(&self) -> Option<Stats> {
        *lock(&self.shared.stats)
    }
}

/// The balloon device.
pub struct Balloon {
    options: BalloonOptions,
    shared: Arc<Shared>,
    engine: Slot<Engine>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon").field("options", &self.options).field("engine", &self.engine).finish()
    }
}

impl Balloon {
    /// A balloon offering `options`, and the host's handle on it.
    pub fn new(options: BalloonOptions) -> (Self, BalloonHandle) {
        let shared = Arc::new(Shared::default());
        shared.target.store(pages(options.initial_target), Ordering::SeqCst);
        let engine = Slot::new(NAME, Engine::new(Arc::clone(&shared), options.stats_interval));
        (Balloon { options, shared: Arc::clone(&shared), engine }, BalloonHandle { shared })
    }

    /// The configuration space: `num_pages` and `actual` (little-endian), then the free
    /// page hint command and poison value, both 0 (not offered).
    fn config(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        config[..4].copy_from_slice(&self.shared.target.load(Ordering::SeqCst).to_le_bytes());
        config[4..8].copy_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        config
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // Inflate, deflate, and room for statistics and reporting.
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        self.options.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write, whole or in part.
        let mut config = self.config();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        if start < 4 || end > 8 {
            crate::warn_ratelimited!(
                "{NAME}: driver wrote {} byte(s) at config offset {offset:#x}; ignored",
                data.len()
            );
            return;
        }
        config[start..end].copy_from_slice(data);
        let actual = u32::from_le_bytes([config[4], config[5], config[6], config[7]]);
        let before = self.shared.actual.swap(actual, Ordering::SeqCst);
        // Linux writes `actual` after every MiB it moves: a line every 64 MiB, and when
        // the balloon reaches its target (rate-limited: a guest can write it at will).
        let target = self.shared.target.load(Ordering::SeqCst);
        let step = (64 << 20) / PAGE_SIZE as u32;
        if actual != before && (actual == target || actual / step != before / step) {
            let mib = |pages: u32| (u64::from(pages) * PAGE_SIZE) >> 20;
            crate::log_ratelimited!(
                log::Level::Info,
                "{NAME}: the guest's balloon holds {} MiB (target {} MiB)",
                mib(actual),
                mib(target)
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, mut queues, acked_features, interrupt } = activation;
        let map = QueueMap::for_features(acked_features);
        let needed = usize::from(map.count);
        if queues.len() < needed {
            return Err(ActivateError::MissingQueues { needed, got: queues.len() });
        }
        queues.truncate(needed);
        let notify = interrupt.clone();
        self.engine.start(|engine| {
            engine.attach(memory, queues, map, interrupt);
            Ok(())
        })?;
        *lock(&self.shared.interrupt) = Some(notify);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        self.engine.notify(index);
    }

    fn counters(&self) -> Option<DeviceStats> {
        let shared = &self.shared;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let named = Named::default()
            .with("inflate_count", get(&shared.inflates))
            .with("deflate_count", get(&shared.deflates))
            .with("stats_updates_count", get(&shared.stats_updates))
            .with("free_page_report_count", get(&shared.free_page_reports));
        Some(DeviceStats { named, ..shared.counters.snapshot() })
    }

    fn reset(&mut self) {
        *lock(&self.shared.interrupt) = None;
        self.engine.stop();
        // A reset driver holds no pages: they are all the guest's again.
        self.shared.actual.store(0, Ordering::SeqCst);
    }

    /// The host's target and the driver's `actual`, in pages (little-endian u32s): the
    /// guest's balloon holds its pages across a restore and the target stands.
    fn save_state(&self) -> Vec<u8> {
        let mut state = self.shared.target.load(Ordering::SeqCst).to_le_bytes().to_vec();
        state.extend_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        state
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let Ok([t0, t1, t2, t3, a0, a1, a2, a3]) = <[u8; 8]>::try_from(state) else {
            return Err(format!("{} bytes of state, virtio-balloon's is 8", state.len()));
        };
        self.shared.target.store(u32::from_le_bytes([t0, t1, t2, t3]), Ordering::SeqCst);
        self.shared.actual.store(u32::from_le_bytes([a0, a1, a2, a3]), Ordering::SeqCst);
        Ok(())
    }
}
