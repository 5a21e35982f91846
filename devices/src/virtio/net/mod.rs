//! virtio-net (virtio spec v1.2 section 5.1): one queue pair over a [`NetBackend`].
//!
//! Queue 0 receives, queue 1 transmits. Frames are moved on a
//! [`Worker`](super::worker::Worker) event loop: a guest notification or a readable
//! backend wakes it, never a vCPU doing I/O. Offered: MAC, STATUS (link up),
//! MRG_RXBUF and EVENT_IDX always; with a backend that carries virtio-net headers (a
//! tap), also CSUM, GUEST_CSUM, GUEST_TSO4/6 and HOST_TSO4/6, passed through to it.

pub mod backend;
mod frames;
mod receive;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use self::backend::NetBackend;
use self::frames::Frames;
pub use self::frames::{capacity, gather, MAX_FRAME};
use super::counters::{DeviceCounters, DeviceStats};
use super::notifier::QueueNotifier;
use super::worker::Slot;
use super::{queue_pair, ActivateError, Activation, VirtioDevice};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

/// A MAC address.
pub type Mac = [u8; 6];

/// The network device.
pub struct Net {
    features: u64,
    config: [u8; 8],
    frames: Slot<Frames>,
    counters: Arc<DeviceCounters>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("frames", &self.frames).finish_non_exhaustive()
    }
}

impl Net {
    /// A network device with address `mac` over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: Mac) -> Self {
        let mut features = (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if backend.vnet_hdr() {
            features |= (1 << VIRTIO_NET_F_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_TSO4)
                | (1 << VIRTIO_NET_F_GUEST_TSO6)
                | (1 << VIRTIO_NET_F_HOST_TSO4)
                | (1 << VIRTIO_NET_F_HOST_TSO6);
        }
        // struct virtio_net_config: mac[6], status (le16).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let counters = Arc::new(DeviceCounters::default());
        let frames = Slot::new("virtio-net", Frames::new(backend, Arc::clone(&counters)));
        Net { features, config, frames, counters }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, acked_features } = activation;
        let (rx, tx) = queue_pair(queues)?;
        self.frames.start(|frames| frames.attach(memory, rx, tx, interrupt, acked_features))
    }

    fn queue_notify(&mut self, index: u16) {
        self.frames.notify(index);
    }

    fn wants_notifiers(&self) -> bool {
        true
    }

    fn set_notifiers(&mut self, notifiers: Vec<QueueNotifier>) {
        self.frames.watch_all(notifiers);
    }

    fn reset(&mut self) {
        self.frames.stop();
    }

    fn counters(&self) -> Option<DeviceStats> {
        Some(self.counters.snapshot())
    }
}

/// A stable, locally administered unicast MAC address derived from `seed` (e.g. the
/// backend's name), so a VM keeps its address, and its DHCP lease, across runs.
pub fn mac_from_seed(seed: &str) -> Mac {
    // FNV-1a: stable across Rust versions, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let b = hash.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}
