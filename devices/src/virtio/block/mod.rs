//! virtio-blk (virtio spec v1.2 section 5.2): a raw disk image behind a virtqueue.
//!
//! Requests are served on a worker thread per device, never on a vCPU thread: a queue
//! notification only wakes the worker. The worker owns the disk while the device runs
//! and hands it back on reset, so a driver can reset and start the device again.
//! Features: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, RO (for
//! read-only disks) and EVENT_IDX.

pub mod disk;
pub mod request;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use self::disk::Disk;
use self::request::{Context, ID_LEN, MAX_SEGMENTS, SECTOR_SIZE};
use super::{drain_queue, single_queue, ActivateError, Activation, GuestMemory, Interrupt, VirtioDevice};
use crate::warn_ratelimited;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The largest single data segment the driver may send (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Bytes of data moved per disk call.
const BOUNCE_SIZE: usize = 256 * 1024;
/// How long the worker keeps watching the ring after it runs dry, before it sleeps until
/// the next notification (QEMU's iothreads poll up to 32 µs by default). A guest that
/// issues its next request within this time is served without a thread wake-up, which
/// costs about 7 µs a request on the development machine (docs/BENCHMARKS.md).
const POLL: Duration = Duration::from_micros(50);

enum Message {
    Notify,
    Stop,
}

struct Worker {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
    disk: Box<dyn Disk>,
    id: [u8; ID_LEN],
    bounce: Vec<u8>,
}

impl Worker {
    fn run(mut self, messages: Receiver<Message>) -> Box<dyn Disk> {
        while let Ok(Message::Notify) = messages.recv() {
            if !self.serve_and_poll(&messages) {
                break;
            }
        }
        self.disk
    }

    /// Serves what is there, then keeps serving while requests keep coming within
    /// [`POLL`] of each other. Notifications that pile up meanwhile are consumed here
    /// (one pass serves them all). `false` when told to stop.
    fn serve_and_poll(&mut self, messages: &Receiver<Message>) -> bool {
        let mut idle_since = Instant::now();
        loop {
            loop {
                match messages.try_recv() {
                    Ok(Message::Notify) => {}
                    Ok(Message::Stop) | Err(TryRecvError::Disconnected) => return false,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if self.has_requests() {
                self.process();
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= POLL {
                return true;
            }
            std::hint::spin_loop();
        }
    }

    /// Whether the driver has made requests available that are not served yet.
    fn has_requests(&self) -> bool {
        let memory = self.memory.memory();
        self.queue.avail_idx(memory, Ordering::Acquire).is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    fn process(&mut self) {
        let memory = self.memory.memory();
        let (disk, id, bounce) = (&mut self.disk, &self.id, &mut self.bounce);
        drain_queue("virtio-blk", &mut self.queue, memory, &self.interrupt, |chain| {
            request::serve(memory, chain, Context { disk: disk.as_mut(), id, bounce })
        });
    }
}

/// A running worker: its inbox, and the thread that hands the disk back when it ends.
struct WorkerHandle {
    messages: Sender<Message>,
    thread: JoinHandle<Box<dyn Disk>>,
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
        let max_sectors = u32::try_from(sectors).unwrap_or(u32::MAX);
        config[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        Block { disk: Some(disk), id: id_bytes, config, features, worker: None }
    }

    fn stop_worker(&mut self) {
        if let Some(WorkerHandle { messages, thread }) = self.worker.take() {
            let _ = messages.send(Message::Stop);
            match thread.join() {
                Ok(disk) => self.disk = Some(disk),
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
        let worker = Worker { memory, queue, interrupt, disk, id: self.id, bounce: vec![0; BOUNCE_SIZE] };
        let (messages, inbox) = channel();
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run(inbox))
            .map_err(|e| ActivateError::Backend(format!("cannot start the I/O thread: {e}")))?;
        self.worker = Some(WorkerHandle { messages, thread });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Some(worker) = &self.worker {
            if worker.messages.send(Message::Notify).is_err() {
                warn_ratelimited!("virtio-blk: the I/O thread is gone; request not served");
            }
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
