//! virtio 1.x devices over the MMIO transport (virtio spec v1.2, sections 2 and 4.2).
//!
//! [`mmio::MmioTransport`] is the register file the guest driver talks to: feature
//! negotiation, the status state machine, queue setup (validated with `virtio-queue`'s
//! `try_set_*`), interrupt status and acknowledgement, config space and reset. Behind it
//! sits a [`VirtioDevice`]: it says what it offers, and gets its queues, guest memory
//! and interrupt when the driver sets DRIVER_OK. Devices never see a hypervisor: memory
//! is a [`GuestMemoryHandle`] and the interrupt an [`crate::irq::IrqLine`].

pub mod block;
pub mod console;
pub mod iovec;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::irq::IrqLine;
use crate::warn_ratelimited;

/// Access to guest memory for devices, whatever owns it (the VMM's guest RAM, a test's
/// `Box<GuestMemoryMmap>`).
pub trait GuestMemoryHandle: Send + Sync {
    /// The guest's memory.
    fn memory(&self) -> &GuestMemoryMmap;
}

impl<T: std::ops::Deref<Target = GuestMemoryMmap> + Send + Sync> GuestMemoryHandle for T {
    fn memory(&self) -> &GuestMemoryMmap {
        self
    }
}

/// Shared guest memory, as devices hold it.
pub type GuestMemory = Arc<dyn GuestMemoryHandle>;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A transport's interrupt: the InterruptStatus register and the line behind it. The line
/// is high while any status bit is set; the driver clears bits through InterruptACK.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl Interrupt {
    /// An interrupt with no status bits set, driving `line`.
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Interrupt { status: Arc::new(AtomicU32::new(0)), line }
    }

    /// Sets status `bits` and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.set_level(true);
    }

    /// Clears status `bits` (InterruptACK); lowers the line when none remain.
    pub fn acknowledge(&self, bits: u32) {
        let left = self.status.fetch_and(!bits, Ordering::SeqCst) & !bits;
        if left == 0 {
            self.line.set_level(false);
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.line.set_level(false);
    }
}

/// Writes `data` across the chain's leading device-writable buffers; returns how many
/// bytes it wrote. Stops, with a rate-limited warning naming `device`, at a
/// device-readable buffer or one outside guest memory: the guest gets what fitted before.
pub fn write_chain(
    device: &str,
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    data: &[u8],
) -> usize {
    let mut written = 0usize;
    for desc in chain {
        if written == data.len() {
            break;
        }
        if !desc.is_write_only() {
            warn_ratelimited!("{device}: device-readable descriptor where the device writes; chain ends");
            break;
        }
        let n = (desc.len() as usize).min(data.len() - written);
        if memory.write_slice(&data[written..written + n], desc.addr()).is_err() {
            warn_ratelimited!("{device}: buffer at {:#x} is outside guest memory; chain ends", desc.addr().0);
            break;
        }
        written += n;
    }
    written
}

/// Serves every chain the driver has made available: `serve` handles one and returns how
/// many bytes it wrote into it. With EVENT_IDX, chains that raced with re-enabling
/// notifications are served too. Then interrupts the driver if it asked to be.
/// `device` names the device in logs.
pub fn drain_queue(
    device: &str,
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let used_from = queue.next_used();
    while let Some(chain) = next_chain(device, queue, memory) {
        let head = chain.head_index();
        let len = serve(chain);
        if let Err(e) = queue.add_used(memory, head, len) {
            warn_ratelimited!("{device}: cannot return a buffer: {e}");
            break;
        }
    }
    notify_driver(device, queue, memory, interrupt, used_from);
}

/// The next chain the driver made available. When there is none, notifications are
/// re-enabled (with EVENT_IDX: the avail event moves up) and the queue looked at once
/// more, so a chain added meanwhile is not missed.
pub fn next_chain<'a>(
    device: &str,
    queue: &mut Queue,
    memory: &'a GuestMemoryMmap,
) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
    loop {
        if let Some(chain) = queue.pop_descriptor_chain(memory) {
            return Some(chain);
        }
        match queue.enable_notification(memory) {
            Ok(true) => continue,
            Ok(false) => return None,
            Err(e) => {
                warn_ratelimited!("{device}: queue error: {e}");
                return None;
            }
        }
    }
}

/// Interrupts the driver if buffers were used since the used index was `used_from`, and
/// the driver asked for it (always without EVENT_IDX; per the used event with it). Work
/// that used nothing (a wake-up with no data, a driver's spurious notify) interrupts no one.
pub fn notify_driver(device: &str, queue: &mut Queue, memory: &GuestMemoryMmap, interrupt: &Interrupt, used_from: u16) {
    if queue.next_used() == used_from {
        return;
    }
    match queue.needs_notification(memory) {
        Ok(true) => interrupt.trigger(INT_USED_RING),
        Ok(false) => {}
        Err(e) => warn_ratelimited!("{device}: queue error: {e}"),
    }
}

/// Reads `data.len()` bytes of a configuration space held as bytes, from `offset`;
/// bytes past its end read as 0 (the guest may read anywhere in the window).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start.checked_add(i).and_then(|at| config.get(at)).copied().unwrap_or(0);
    }
}

/// The one queue of a single-queue device, or the error saying the driver enabled none.
pub fn single_queue(queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    let got = queues.len();
    queues.into_iter().next().ok_or(ActivateError::MissingQueues { needed: 1, got })
}

/// The two queues of a device with a receive and a transmit queue (console, net), in
/// that order, or the error saying the driver enabled too few.
pub fn queue_pair(queues: Vec<Queue>) -> Result<(Queue, Queue), ActivateError> {
    let got = queues.len();
    let mut queues = queues.into_iter();
    match (queues.next(), queues.next()) {
        (Some(rx), Some(tx)) => Ok((rx, tx)),
        _ => Err(ActivateError::MissingQueues { needed: 2, got }),
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub memory: GuestMemory,
    /// The queues, configured and ready, in queue-index order.
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The device's interrupt.
    pub interrupt: Interrupt,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs.
    #[error("the driver enabled {got} queue(s); the device needs {needed}")]
    MissingQueues {
        /// How many the device needs.
        needed: usize,
        /// How many are ready.
        got: usize,
    },
    /// The device could not start its backend.
    #[error("{0}")]
    Backend(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, 1 = network, 3 = console).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (`VIRTIO_F_VERSION_1` is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (only called after a successful activation).
    fn queue_notify(&mut self, index: u16);
    /// Returns to the state before activation, dropping the queues and stopping any
    /// backend work (driver reset or a failed activation).
    fn reset(&mut self);
}
