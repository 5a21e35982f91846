//! The disk behind a block device, which the host may swap for another while the guest
//! runs ([`BlockHandle::replace`], Firecracker's `PATCH /drives`).
//!
//! Every request holds the disk while it is checked against it and served (its size, the
//! disk work): shared by the threads of a disk that serves many requests at once,
//! exclusively for one that serves one at a time (only the worker of the device's one
//! queue uses it then). A swap takes the disk exclusively, so it waits for the requests in
//! hand, and requests taken after it go to the new disk. Before the old disk goes the swap
//! flushes it: every write the guest saw completed on it is durable there, so a flush the
//! guest asked for before the swap keeps its promise even when it runs after it (on the
//! new disk). Then the configuration space shows the new capacity, the configuration
//! generation moves on and the driver gets a configuration-change interrupt (Linux's
//! virtio_blk then reads the capacity again: "new size: ..."): at once if it has the
//! device started, else when it starts it (it may have read the old capacity before).
//!
//! What the driver negotiated stays: the new disk must be read-only exactly when the old
//! one was (Firecracker opens the new file with the drive's `is_read_only`), and a device
//! that serves requests in parallel (several queues, helper threads) needs a disk that can
//! ([`Disk::shared`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use super::disk::{Disk, SharedDisk};
use super::request::{DiskInfo, Target, SECTOR_SIZE};
use crate::virtio::counters::DeviceCounters;
use crate::virtio::{Interrupt, INT_CONFIG};

/// A disk served from many threads at once, through `shared`; `disk`, which offered it,
/// is kept for as long (behind a lock nobody takes, as a [`Disk`] need not be `Sync`).
pub(super) struct SharedHeld {
    disk: Mutex<Box<dyn Disk>>,
    shared: Arc<dyn SharedDisk>,
}

/// The disk in use and what the device knows of it.
pub(super) struct Current<T> {
    info: DiskInfo,
    disk: T,
}

/// The disk, as the device serves it.
enum Slot {
    /// One request at a time, by the worker of the device's one queue.
    Serial(Mutex<Current<Box<dyn Disk>>>),
    /// Many at once, from any thread.
    Parallel(RwLock<Current<SharedHeld>>),
}

/// The device's disk, shared by its queues' threads and the host's [`BlockHandle`]s.
pub(super) struct Drive {
    slot: Slot,
    /// Whether the disk refuses writes (fixed: the driver negotiated it).
    read_only: bool,
    /// The capacity in sectors, for the configuration space (read without the lock).
    sectors: AtomicU64,
    /// Moves on with every swap, for the transport's ConfigGeneration.
    generation: AtomicU32,
    /// How a new capacity reaches the driver.
    announce: Mutex<Announce>,
    /// Requests served, for metrics (whatever disk served them).
    counters: DeviceCounters,
}

/// How a new capacity reaches the driver.
#[derive(Default)]
struct Announce {
    /// The interrupt of the driver's session; `None` while the device is not started.
    interrupt: Option<Interrupt>,
    /// The disk changed while the device was not started: a driver may have read the old
    /// capacity before it started the device, so it hears of the change when it does.
    pending: bool,
}

impl std::fmt::Debug for Drive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drive")
            .field("parallel", &self.parallel())
            .field("read_only", &self.read_only)
            .field("sectors", &self.sectors())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The disk held while one request is checked and served.
pub(super) enum Hold<'a> {
    /// Shared with the other threads serving requests.
    Shared(RwLockReadGuard<'a, Current<SharedHeld>>),
    /// This thread's alone (a disk that serves one request at a time).
    Alone(MutexGuard<'a, Current<Box<dyn Disk>>>),
}

impl Hold<'_> {
    /// The disk's size and whether it is read-only.
    pub(super) fn info(&self) -> DiskInfo {
        match self {
            Hold::Shared(current) => current.info,
            Hold::Alone(current) => current.info,
        }
    }

    /// The disk to serve the request on; `bounce` is the thread's bounce buffer (for a
    /// disk served one request at a time that cannot reach guest memory itself).
    pub(super) fn target<'b>(&'b mut self, bounce: &'b mut [u8]) -> Target<'b> {
        match self {
            Hold::Shared(current) => Target::Shared(&*current.disk.shared),
            Hold::Alone(current) => Target::Serial(current.disk.as_mut(), bounce),
        }
    }
}

impl Drive {
    /// A drive holding `disk`, served in parallel if it can be ([`Disk::shared`]).
    pub(super) fn new(disk: Box<dyn Disk>) -> Arc<Self> {
        let info = DiskInfo { capacity: disk.capacity(), read_only: disk.read_only() };
        let slot = match disk.shared() {
            Some(shared) => {
                Slot::Parallel(RwLock::new(Current { info, disk: SharedHeld { disk: Mutex::new(disk), shared } }))
            }
            None => Slot::Serial(Mutex::new(Current { info, disk })),
        };
        Arc::new(Drive {
            slot,
            read_only: info.read_only,
            sectors: AtomicU64::new(info.capacity / SECTOR_SIZE),
            generation: AtomicU32::new(0),
            announce: Mutex::new(Announce::default()),
            counters: DeviceCounters::default(),
        })
    }

    /// The device's counters, which the queues' threads add to.
    pub(super) fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// Whether requests may run on several threads at once.
    pub(super) fn parallel(&self) -> bool {
        matches!(self.slot, Slot::Parallel(_))
    }

    /// Whether the disk refuses writes.
    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    /// The capacity in sectors, as the configuration space shows it.
    pub(super) fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::SeqCst)
    }

    /// How many times the configuration changed (swaps).
    pub(super) fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Holds the disk for one request: a swap waits until it is let go.
    pub(super) fn hold(&self) -> Hold<'_> {
        match &self.slot {
            Slot::Parallel(current) => Hold::Shared(current.read().unwrap_or_else(|e| e.into_inner())),
            Slot::Serial(current) => Hold::Alone(lock(current)),
        }
    }

    /// The driver started the device: configuration changes are announced through
    /// `interrupt` from now on.
    /// A swap made while the device was stopped is announced now (a driver reads the
    /// capacity before it starts the device, and may have read the old one).
    pub(super) fn started(&self, interrupt: Interrupt) {
        let mut announce = lock(&self.announce);
        if std::mem::take(&mut announce.pending) {
            interrupt.trigger(INT_CONFIG);
        }
        announce.interrupt = Some(interrupt);
    }

    /// The device stopped (a reset): no interrupt until it starts again.
    pub(super) fn stopped(&self) {
        lock(&self.announce).interrupt = None;
    }

    /// Swaps the disk for `disk` (see the module), returning the old one.
    fn replace(&self, disk: Box<dyn Disk>) -> Result<Box<dyn Disk>, ReplaceError> {
        if disk.read_only() != self.read_only {
            return Err(ReplaceError::ReadOnly { device: self.read_only });
        }
        let info = DiskInfo { capacity: disk.capacity(), read_only: self.read_only };
        // Taking the lock waits for every request in hand on the old disk; its writes
        // become durable before anything goes to the new one.
        let old = match &self.slot {
            Slot::Serial(current) => {
                let mut current = lock(current);
                current.disk.flush().map_err(ReplaceError::Flush)?;
                self.announce(info);
                std::mem::replace(&mut *current, Current { info, disk }).disk
            }
            Slot::Parallel(current) => {
                let shared = disk.shared().ok_or(ReplaceError::NotParallel)?;
                let mut current = write(current);
                current.disk.shared.flush().map_err(ReplaceError::Flush)?;
                self.announce(info);
                let new = SharedHeld { disk: Mutex::new(disk), shared };
                let old = std::mem::replace(&mut *current, Current { info, disk: new });
                old.disk.disk.into_inner().unwrap_or_else(|e| e.into_inner())
            }
        };
        let mut announce = lock(&self.announce);
        match &announce.interrupt {
            Some(interrupt) => interrupt.trigger(INT_CONFIG),
            None => announce.pending = true,
        }
        Ok(old)
    }

    /// The configuration space shows `info`'s capacity: the capacity, then the
    /// generation, so a driver that reads the generation around the capacity sees it
    /// move if it read any of the old one.
    fn announce(&self, info: DiskInfo) {
        self.sectors.store(info.capacity / SECTOR_SIZE, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Why a disk could not be swapped in.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// The device is gone (the machine stopped).
    #[error("the device is gone")]
    Gone,
    /// The new disk's read-only setting is not the device's (a driver cannot take a
    /// change of it).
    #[error("the drive is {}; the new disk must be too", if *device { "read-only" } else { "read-write" })]
    ReadOnly {
        /// Whether the device's disk is read-only.
        device: bool,
    },
    /// The device serves requests in parallel and the new disk cannot.
    #[error("the new disk cannot serve requests in parallel, as the device does")]
    NotParallel,
    /// The old disk could not be flushed: it stays.
    #[error("flushing the old disk: {0}")]
    Flush(std::io::Error),
}

/// The host's side of a block device: gives it another disk while the machine runs
/// (Firecracker's `PATCH /drives`). Cheap to clone; any thread. It does not keep the
/// device (or its disk) alive.
#[derive(Debug, Clone)]
pub struct BlockHandle {
    drive: Weak<Drive>,
}

impl BlockHandle {
    pub(super) fn new(drive: &Arc<Drive>) -> Self {
        BlockHandle { drive: Arc::downgrade(drive) }
    }

    /// Gives the device `disk` in place of its disk: waits for the requests in hand on
    /// the old one to return (requests taken later go to the new one), flushes the old
    /// one (a flush the guest asked for before the swap covers its writes there), then
    /// shows the new capacity, moves the configuration generation on and raises a
    /// configuration-change interrupt (once the driver starts the device, if it has not).
    /// Returns the old disk. `disk` must be read-only exactly when the device's disk is,
    /// and serve requests in parallel ([`Disk::shared`]) if the device does.
    pub fn replace(&self, disk: Box<dyn Disk>) -> Result<Box<dyn Disk>, ReplaceError> {
        self.drive.upgrade().ok_or(ReplaceError::Gone)?.replace(disk)
    }

    /// The capacity in bytes the device shows now (whole sectors); `None` once it is
    /// gone.
    pub fn capacity(&self) -> Option<u64> {
        self.drive.upgrade().map(|drive| drive.sectors() * SECTOR_SIZE)
    }
}
