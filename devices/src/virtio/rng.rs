//! virtio-rng: the entropy device (virtio spec v1.2 section 5.4), fed from the host.
//!
//! One queue; the driver posts device-writable buffers and the device fills them. Work
//! is small and bounded (at most [`MAX_PER_CHAIN`] bytes a chain, one reused buffer), so
//! it runs on the notifying thread. Descriptors the device cannot write (device-readable
//! ones, or addresses outside guest memory) end the chain with what was written so far.

use std::io::Read;

use guest_memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::Bytes;

use super::counters::{DeviceCounters, DeviceStats};
use super::{drain_queue, single_queue, ActivateError, Activation, GuestMemory, Interrupt, VirtioDevice};
use crate::warn_ratelimited;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The most entropy handed out per descriptor chain.
pub const MAX_PER_CHAIN: usize = 64 * 1024;

struct Running {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// The entropy device.
pub struct Rng {
    source: Box<dyn Read + Send>,
    buf: Vec<u8>,
    running: Option<Running>,
    counters: DeviceCounters,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("running", &self.running.is_some()).finish_non_exhaustive()
    }
}

impl Rng {
    /// An entropy device reading from `source` (the host's `/dev/urandom` in the VMM).
    pub fn new(source: Box<dyn Read + Send>) -> Self {
        Rng { source, buf: vec![0; 4096], running: None, counters: DeviceCounters::default() }
    }

    /// Fills the chain's writable descriptors; returns the bytes written. Counts the
    /// request, and an error if it ends early on a bad descriptor or the host's source.
    fn fill(
        source: &mut dyn Read,
        buf: &mut [u8],
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        counters: &DeviceCounters,
    ) -> u32 {
        let (written, failed) = match Self::fill_chain(source, buf, memory, chain) {
            Ok(n) => (n, false),
            Err(n) => (n, true),
        };
        counters.request(u64::from(written), 0);
        if failed {
            counters.error();
        }
        written
    }

    /// [`Self::fill`]'s work: `Err` with the bytes written when the chain ended early.
    fn fill_chain(
        source: &mut dyn Read,
        buf: &mut [u8],
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, u32> {
        let mut written = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                warn_ratelimited!("virtio-rng: device-readable descriptor in a request; chain ends");
                return Err(written as u32);
            }
            let mut left = (desc.len() as usize).min(MAX_PER_CHAIN - written);
            let mut addr = desc.addr();
            while left > 0 {
                let n = left.min(buf.len());
                if let Err(e) = source.read_exact(&mut buf[..n]) {
                    warn_ratelimited!("virtio-rng: host entropy source failed: {e}");
                    return Err(written as u32);
                }
                if memory.write_slice(&buf[..n], addr).is_err() {
                    warn_ratelimited!("virtio-rng: buffer at {:#x} is outside guest memory; chain ends", addr.0);
                    return Err(written as u32);
                }
                written += n;
                left -= n;
                addr = vm_memory::GuestAddress(addr.0 + n as u64);
            }
            if written >= MAX_PER_CHAIN {
                break;
            }
        }
        Ok(written as u32)
    }

    fn process(&mut self) {
        let Some(run) = self.running.as_mut() else { return };
        let memory = run.memory.memory();
        let (source, buf, counters) = (&mut self.source, &mut self.buf, &self.counters);
        drain_queue("virtio-rng", &mut run.queue, memory, &run.interrupt, |chain| {
            Self::fill(source, buf, memory, chain, counters)
        });
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        let queue = single_queue(queues)?;
        self.running = Some(Running { memory, queue, interrupt });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process();
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn counters(&self) -> Option<DeviceStats> {
        Some(self.counters.snapshot())
    }
}
