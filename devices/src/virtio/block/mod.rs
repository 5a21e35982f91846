//! virtio-blk (virtio spec v1.2 section 5.2): a raw disk image behind a virtqueue.
//!
//! Requests are served on a worker thread per device, never on a vCPU thread: a queue
//! notification only wakes the worker. The worker owns the disk while the device runs
//! and hands it back on reset, so a driver can reset and start the device again.
//! Features: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, RO (for
//! read-only disks) and EVENT_IDX.

pub mod disk;
mod doorbell;
pub mod request;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;

use self::disk::Disk;
use self::doorbell::{Doorbell, Poll, Ring};
use self::request::{Context, ID_LEN, MAX_DATA, MAX_SEGMENTS, MAX_ZEROES_SECTORS, SECTOR_SIZE};
use super::{
    drain_queue_while, has_pending, single_queue, ActivateError, Activation, GuestMemory, Interrupt, VirtioDevice,
};
use crate::warn_ratelimited;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The largest single data segment the driver may send (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments a request may have (SEG_MAX): the queue, less the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const _: () = assert!(MAX_DATA == SEG_MAX as u64 * SIZE_MAX as u64, "request::MAX_DATA is what the config says");
/// Bytes of data moved per disk call.
const BOUNCE_SIZE: usize = 256 * 1024;
const NAME: &str = "virtio-blk";

struct Worker {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
    disk: Box<dyn Disk>,
    id: [u8; ID_LEN],
    bounce: Vec<u8>,
    poll: Poll,
}

impl Worker {
    /// Sleeps until a notification, then serves and polls, until told to stop; hands
    /// the disk back.
    fn run(mut self, bell: &Doorbell) -> Box<dyn Disk> {
        loop {
            let asleep = Instant::now();
            if bell.wait(None) == Ring::Stop {
                break;
            }
            self.poll.slept(asleep.elapsed());
            if !self.serve_and_poll(bell) {
                break;
            }
        }
        self.disk
    }

    /// Serves what is there, then keeps watching the ring for [`Poll::window`] and serves
    /// again while requests keep coming within it. Notifications that arrive meanwhile
    /// are consumed here (one pass serves them all). `false` when told to stop.
    fn serve_and_poll(&mut self, bell: &Doorbell) -> bool {
        loop {
            if bell.take() == Ring::Stop {
                return false;
            }
            self.process(bell);
            let window = self.poll.window();
            if window.is_zero() {
                return true;
            }
            let until = Instant::now() + window;
            loop {
                // A load, not a take: the ring itself says whether there is work, and an
                // atomic swap here would fight the vCPU's notifications for the cache line.
                if bell.stopping() {
                    return false;
                }
                if self.has_requests() {
                    self.poll.hit();
                    break;
                }
                if Instant::now() >= until {
                    self.poll.miss();
                    return true;
                }
                std::hint::spin_loop();
            }
        }
    }

    /// Whether the driver has made requests available that are not served yet (the same
    /// check that serving makes: a broken ring fails the device, and a failed device has
    /// none).
    fn has_requests(&self) -> bool {
        has_pending(NAME, &self.queue, self.memory.memory(), &self.interrupt)
    }

    /// Serves the requests the driver has made available, until told to stop: a reset
    /// (on a vCPU) waits for the request in hand, not for the whole ring.
    fn process(&mut self, bell: &Doorbell) {
        let memory = self.memory.memory();
        let (disk, id, bounce) = (&mut self.disk, &self.id, &mut self.bounce);
        let go_on = || !bell.stopping();
        drain_queue_while(NAME, &mut self.queue, memory, &self.interrupt, go_on, |chain| {
            request::serve(memory, chain, Context { disk: disk.as_mut(), id, bounce })
        });
    }
}

/// A running worker: its doorbell, and the thread that hands the disk back when it ends.
struct WorkerHandle {
    bell: Arc<Doorbell>,
    thread: JoinHandle<Option<Box<dyn Disk>>>,
}

/// A virtio block device.
pub struct Block {
    disk: Option<Box<dyn Disk>>,
    id: [u8; ID_LEN],
    config: [u8; 60],
    features: u64,
    worker: Option<WorkerHandle>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("running", &self.worker.is_some()).finish_non_exhaustive()
    }
}

impl Block {
    /// A block device over `disk`, answering GET_ID with `id` (at most 20 bytes used).
    pub fn new(disk: Box<dyn Disk>, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let sectors = disk.capacity() / SECTOR_SIZE;
        let mut features = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        // struct virtio_blk_config, little-endian.
        let mut config = [0u8; 60];
        let max_sectors = u32::try_from(sectors).unwrap_or(u32::MAX).min(MAX_ZEROES_SECTORS);
        config[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        Block { disk: Some(disk), id: id_bytes, config, features, worker: None }
    }

    /// The worker thread's name: `vblk-` and the disk's ID, as far as the 15 characters
    /// of a Linux thread name go (so `top -H` tells the disks apart).
    fn thread_name(&self) -> String {
        let id = String::from_utf8_lossy(&self.id);
        let id: String = id.trim_end_matches('\0').chars().filter(char::is_ascii_graphic).take(10).collect();
        format!("vblk-{id}")
    }

    fn stop_worker(&mut self) {
        if let Some(WorkerHandle { bell, thread }) = self.worker.take() {
            bell.stop();
            match thread.join() {
                Ok(disk) => self.disk = disk,
                Err(_) => warn_ratelimited!("virtio-blk: the worker panicked; the disk is gone"),
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        let queue = single_queue(queues)?;
        let disk = self.disk.take().ok_or_else(|| ActivateError::Backend("the disk is gone".into()))?;
        let worker =
            Worker { memory, queue, interrupt, disk, id: self.id, bounce: vec![0; BOUNCE_SIZE], poll: Poll::new() };
        let bell = Arc::new(Doorbell::default());
        let inbox = Arc::clone(&bell);
        // The worker goes to the thread once it exists, so a failed spawn keeps the disk.
        let (give, take) = std::sync::mpsc::sync_channel::<Worker>(1);
        let spawned = std::thread::Builder::new().name(self.thread_name()).spawn(move || match take.recv() {
            Ok(worker) => Some(worker.run(&inbox)),
            Err(_) => None,
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                self.disk = Some(worker.disk);
                return Err(ActivateError::Backend(format!("cannot start the I/O thread: {e}")));
            }
        };
        if let Err(std::sync::mpsc::SendError(worker)) = give.send(worker) {
            self.disk = Some(worker.disk);
            return Err(ActivateError::Backend("the I/O thread ended at once".into()));
        }
        self.worker = Some(WorkerHandle { bell, thread });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Some(worker) = &self.worker {
            worker.bell.ring();
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
