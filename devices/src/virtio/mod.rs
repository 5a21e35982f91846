//! virtio 1.x devices over the MMIO transport (virtio spec v1.2, sections 2 and 4.2).
//!
//! [`mmio::MmioTransport`] is the register file the guest driver talks to: feature
//! negotiation, the status state machine, queue setup (validated with `virtio-queue`'s
//! `try_set_*`), interrupt status and acknowledgement, config space and reset. Behind it
//! sits a [`VirtioDevice`]: it says what it offers, and gets its queues, guest memory
//! and interrupt when the driver sets DRIVER_OK. Devices never see a hypervisor: memory
//! is a [`GuestMemoryHandle`] and the interrupt an [`crate::irq::IrqLine`].

pub mod balloon;
pub mod block;
pub mod console;
pub mod counters;
pub mod input;
mod interrupt;
pub mod iovec;
pub mod mmio;
pub mod net;
pub mod notifier;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use virtio_queue::Queue;

pub use interrupt::{Interrupt, INT_CONFIG, INT_USED_RING};
pub use queue::{
    check_notified, drain_queue, drain_queue_while, give_back, has_pending, next_chain, notify_driver, write_chain,
    write_chain_at, Chain, Chains,
};

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
    /// How many times the device changed its configuration space by itself (a disk's new
    /// capacity), for the transport's ConfigGeneration: a driver reading a field in
    /// several accesses sees it move if the field changed in between. 0 (the default) for
    /// a device whose configuration only the driver changes.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (only called after a successful activation).
    fn queue_notify(&mut self, index: u16);
    /// Whether the device's event loop can watch its queues' notifiers
    /// ([`notifier::QueueNotifier`], KVM's ioeventfd), so the VMM should make them. A
    /// device that says yes still serves [`VirtioDevice::queue_notify`]: writes the
    /// hypervisor does not match arrive that way.
    fn wants_notifiers(&self) -> bool {
        false
    }
    /// Hands the device its queues' notifiers (some or all), once, before the first
    /// activation; they last as long as the device.
    fn set_notifiers(&mut self, notifiers: Vec<notifier::QueueNotifier>) {
        let _ = notifiers;
    }
    /// Returns to the state before activation, dropping the queues and stopping any
    /// backend work (driver reset or a failed activation).
    fn reset(&mut self);
    /// Whether every chain the driver makes available comes back once served, soon
    /// (block requests; not receive buffers held until data comes). A snapshot then
    /// waits, with the guest paused, until each queue's used index has caught up with its
    /// available one before it stops the device: no request is left in hand, whatever
    /// the order the device answers in.
    fn answers_every_chain(&self) -> bool {
        false
    }
    /// The device's counters for metrics: requests, bytes each way and errors (see
    /// [`counters`]). `None` for a device that keeps none.
    fn counters(&self) -> Option<counters::DeviceStats> {
        None
    }
    /// The device's own state for a snapshot, beyond its queues and the transport's
    /// registers: what the driver set in its configuration space, what the protocol
    /// needs carried over. Called while the guest is paused, before the transport stops
    /// the device (a stop forgets what the driver set). Empty for a device with none.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes state that [`VirtioDevice::save_state`] returned (in another process, from a
    /// snapshot file: check it), with the device stopped, before the transport starts it
    /// again. A device with no
    /// state of its own takes only an empty one.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes of state for a device that keeps none", state.len()))
        }
    }
}
