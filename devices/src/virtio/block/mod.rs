//! virtio-blk (virtio spec v1.2 section 5.2): a raw disk image behind one or more
//! virtqueues.
//!
//! Each queue is served on a worker thread of its own ([`super::worker::Slot`]), never
//! on a vCPU thread: a queue notification only wakes it. A disk that serves many
//! requests at once ([`disk::SharedDisk`], such as a [`disk::FileDisk`]) gets a queue per
//! vCPU (`VIRTIO_BLK_F_MQ`, up to [`MAX_QUEUES`]) and each queue's requests run in
//! parallel on up to [`IO_THREADS`] threads (see `crew`); any other disk is served one
//! request at a time on one queue, its worker owning the disk while it runs. Either way
//! the device keeps the disk across a reset, so a driver can reset and start the device
//! again. The host may give the device another disk while it runs ([`BlockHandle`]; see
//! `drive`).
//!
//! Features: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, RO (for read-only
//! disks), MQ (for shared disks on machines with more than one vCPU) and EVENT_IDX.

mod buffers;
mod crew;
pub mod disk;
mod drive;
mod handler;
pub mod request;

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use self::disk::Disk;
use self::drive::Drive;
pub use self::drive::{BlockHandle, ReplaceError};
use self::handler::QueueHandler;
use self::request::{ID_LEN, MAX_DATA, MAX_SEGMENTS, MAX_ZEROES_SECTORS, SECTOR_SIZE};
use super::notifier::QueueNotifier;
use super::worker::Slot;
use super::{ActivateError, Activation, VirtioDevice};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The largest single data segment the driver may send (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments a request may have (SEG_MAX): the queue, less the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const _: () = assert!(MAX_DATA == SEG_MAX as u64 * SIZE_MAX as u64, "request::MAX_DATA is what the config says");
const _: () = assert!(SEG_MAX as usize + 2 <= buffers::MAX_PIECES, "a request of SEG_MAX segments fits inline");
/// The most queues a device offers: one per vCPU up to this many. Each queue is a worker
/// thread and up to [`IO_THREADS`]` - 1` helpers; past 8 queues a guest gains little (its
/// block layer maps several CPUs to a queue) and the host gains threads.
pub const MAX_QUEUES: usize = 8;
/// The most threads that serve one queue's requests at once, for a disk that serves many
/// requests at once: the queue's worker and `IO_THREADS - 1` helpers, which start as
/// requests pile up and sleep when there are none.
pub const IO_THREADS: usize = 8;
/// Bytes of the configuration space (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;

/// A virtio block device.
pub struct Block {
    features: u64,
    queue_sizes: Vec<u16>,
    /// One per queue offered, in queue order.
    queues: Vec<Slot<QueueHandler>>,
    /// How many queues run (the first ones).
    running: usize,
    /// The disk, which the queues' threads and the host's [`BlockHandle`]s share.
    drive: Arc<Drive>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("queues", &self.queues.len())
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

/// The first `n` printable characters of the disk's ID, for thread names (a Linux thread
/// name shows 15 bytes, so `top -H` tells the disks apart).
fn short_id(id: &[u8; ID_LEN], n: usize) -> String {
    let id = String::from_utf8_lossy(id);
    id.trim_end_matches('\0').chars().filter(char::is_ascii_graphic).take(n).collect()
}

impl Block {
    /// A block device over `disk` with one queue, answering GET_ID with `id` (at most 20
    /// bytes used).
    pub fn new(disk: Box<dyn Disk>, id: &str) -> Self {
        Block::with_queues(disk, id, 1)
    }

    /// A block device over `disk` offering `queues` queues (`VIRTIO_BLK_F_MQ`; give the
    /// vCPU count), at least 1 and at most [`MAX_QUEUES`], when the disk serves requests
    /// from several threads at once ([`Disk::shared`]); one queue otherwise.
    pub fn with_queues(disk: Box<dyn Disk>, id: &str, queues: usize) -> Self {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let drive = Drive::new(disk);
        let count = if drive.parallel() { queues.clamp(1, MAX_QUEUES) } else { 1 };
        let helpers = if drive.parallel() { IO_THREADS - 1 } else { 0 };
        let slots = (0..count)
            .map(|index| {
                let (worker, pool) = if index == 0 {
                    (format!("vblk-{}", short_id(&id_bytes, 10)), format!("vbio-{}", short_id(&id_bytes, 10)))
                } else {
                    (
                        format!("vblk{index}-{}", short_id(&id_bytes, 9)),
                        format!("vbio{index}-{}", short_id(&id_bytes, 9)),
                    )
                };
                Slot::new(worker, QueueHandler::new(Arc::clone(&drive), id_bytes, pool, helpers))
            })
            .collect();
        let mut features = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if drive.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if count > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        Block { features, queue_sizes: vec![QUEUE_SIZE; count], queues: slots, running: 0, drive }
    }

    /// The host's handle on this device: to give it another disk while it runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle::new(&self.drive)
    }

    fn stop_queues(&mut self) {
        self.drive.stopped();
        for slot in &mut self.queues[..self.running] {
            slot.stop();
        }
        self.running = 0;
    }
}

/// `struct virtio_blk_config` (spec 5.2.4), little-endian.
fn config_space(sectors: u64, num_queues: u16) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let max_sectors = u32::try_from(sectors).unwrap_or(u32::MAX).min(MAX_ZEROES_SECTORS);
    config[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
    config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
    config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    config[34..36].copy_from_slice(&num_queues.to_le_bytes()); // num_queues
    config[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    config[40..44].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
    config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    config[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    config[52..56].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
    config[56] = 1; // write_zeroes_may_unmap
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Built on each read: the capacity changes when the host swaps the disk.
        let config = config_space(self.drive.sectors(), self.queue_sizes.len() as u16);
        super::read_config_bytes(&config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.drive.generation()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, acked_features } = activation;
        if queues.is_empty() {
            return Err(ActivateError::MissingQueues { needed: 1, got: 0 });
        }
        // A driver that did not take MQ uses queue 0 only.
        let usable = if acked_features & (1 << VIRTIO_BLK_F_MQ) != 0 { queues.len() } else { 1 };
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.drive.started(interrupt.clone());
        for (slot, queue) in self.queues.iter_mut().zip(queues).take(usable) {
            let (memory, interrupt) = (memory.clone(), interrupt.clone());
            let started = slot.start(|handler| {
                handler.attach(memory, queue, interrupt, event_idx);
                Ok(())
            });
            if let Err(e) = started {
                self.stop_queues();
                return Err(e);
            }
            self.running += 1;
        }
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if let Some(slot) = self.queues[..self.running].get(usize::from(index)) {
            slot.notify(0);
        }
    }

    fn wants_notifiers(&self) -> bool {
        true
    }

    /// Each queue's notifier goes to that queue's worker, as its bit 0.
    fn set_notifiers(&mut self, notifiers: Vec<QueueNotifier>) {
        for notifier in notifiers {
            let queue = notifier.queue();
            let watched = self.queues.get_mut(usize::from(queue)).is_some_and(|slot| slot.watch(0, notifier));
            if !watched {
                crate::warn_ratelimited!("virtio-blk: queue {queue}'s notifier cannot be watched");
            }
        }
    }

    fn answers_every_chain(&self) -> bool {
        true
    }

    fn counters(&self) -> Option<crate::virtio::counters::DeviceStats> {
        Some(self.drive.counters().snapshot())
    }

    fn reset(&mut self) {
        self.stop_queues();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_queues();
    }
}

#[cfg(test)]
mod parallel_tests;
#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod tests;
