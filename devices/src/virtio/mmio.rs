//! The virtio-mmio transport, version 2 (modern; virtio spec v1.2 section 4.2.2).
//!
//! Everything the guest writes is checked: control registers take only aligned 32-bit
//! accesses; the status may only move forward through ACKNOWLEDGE → DRIVER →
//! FEATURES_OK → DRIVER_OK (0 resets); FEATURES_OK sticks only if the driver accepted
//! `VIRTIO_F_VERSION_1`; queue registers are writable only between FEATURES_OK and
//! DRIVER_OK on a queue that is not ready; a queue becomes ready only if `virtio-queue`
//! accepts its size and addresses and finds its rings inside guest memory; notifications
//! before DRIVER_OK are dropped. Whatever is refused is logged with a rate limit.

use guest_memory::GuestMemoryMmap;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{Activation, GuestMemory, Interrupt, VirtioDevice};
use crate::bus::{read_le, write_le, MmioDeviceMut};
use crate::warn_ratelimited;

mod saved;
pub use saved::{SavedQueue, SavedTransport, TransportRestoreError, TransportSaveError};

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
/// The QueueNotify register's offset: the driver writes a queue's index there.
pub const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// The status bits a driver can set (and a saved status can hold).
const STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// "HVRN", hvrun's vendor id.
const VENDOR: u32 = 0x4e52_5648;

/// A queue's configuration as the driver writes it, applied when it sets QueueReady.
#[derive(Debug, Default, Clone, Copy)]
struct QueueAddrs {
    desc: [u32; 2],
    avail: [u32; 2],
    used: [u32; 2],
    /// The last QueueNum written was refused: the queue must not become ready.
    bad_size: bool,
}

fn join(halves: [u32; 2]) -> GuestAddress {
    GuestAddress((u64::from(halves[1]) << 32) | u64::from(halves[0]))
}

/// The register file of one virtio-mmio device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemory,
    interrupt: Interrupt,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    addrs: Vec<QueueAddrs>,
    config_generation: u32,
    active: bool,
    /// How many queues (the first ones) went to the device at DRIVER_OK.
    handed_over: usize,
    /// The sizes of the queues handed over (a snapshot saves them).
    handed_sizes: Vec<u16>,
    /// Counters for metrics.
    stats: TransportStats,
}

/// What a transport has seen so far (counters for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// The device's virtio type.
    pub device_type: u32,
    /// Times a driver started the device (DRIVER_OK).
    pub activations: u64,
    /// Times the device refused to start.
    pub activate_fails: u64,
    /// Resets of a started or starting device.
    pub resets: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Times the device stopped on a driver error (DEVICE_NEEDS_RESET).
    pub failures: u64,
    /// The device's own counters, when it keeps them.
    #[serde(flatten)]
    pub device: Option<super::counters::DeviceStats>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Fresh queues of the device's sizes. `Queue::new` fails only for a size that is 0,
/// above 32768 or not a power of two, which [`MmioTransport::new`] has ruled out.
fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device.queue_max_sizes().iter().filter_map(|&max| Queue::new(max).ok()).collect()
}

/// Which of the queue's rings, at the size and addresses it has, is not wholly inside guest
/// memory (virtio 1.2, 2.7: 16 bytes a descriptor; the available ring's flags, index,
/// entries and used event; the used ring's flags, index, 8-byte entries and avail event).
fn rings_outside_memory(q: &Queue, memory: &GuestMemoryMmap) -> Option<&'static str> {
    use vm_memory::GuestMemoryBackend as _;
    let size = usize::from(q.size());
    let rings = [
        ("descriptor table", q.desc_table(), 16 * size),
        ("available ring", q.avail_ring(), 6 + 2 * size),
        ("used ring", q.used_ring(), 6 + 8 * size),
    ];
    rings.into_iter().find(|&(_, at, len)| !memory.check_range(GuestAddress(at), len)).map(|(ring, _, _)| ring)
}

impl MmioTransport {
    /// A transport for `device`, with guest memory and the interrupt it raises. Fails if
    /// the device asks for a queue size virtio does not allow.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        interrupt: Interrupt,
    ) -> Result<Self, virtio_queue::Error> {
        for &max in device.queue_max_sizes() {
            Queue::new(max)?;
        }
        let queues = new_queues(device.as_ref());
        let addrs = vec![QueueAddrs::default(); queues.len()];
        Ok(MmioTransport {
            device,
            memory,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            addrs,
            config_generation: 0,
            active: false,
            handed_over: 0,
            handed_sizes: Vec::new(),
            stats: TransportStats::default(),
        })
    }

    /// What the transport has seen so far.
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            device_type: self.device.device_type(),
            interrupts: self.interrupt.triggered(),
            failures: self.interrupt.failures(),
            device: self.device.counters(),
            ..self.stats
        }
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn reset(&mut self) {
        if self.status != 0 {
            self.stats.resets += 1;
        }
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.handed_over = 0;
        self.handed_sizes.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.queues = new_queues(self.device.as_ref());
        self.addrs = vec![QueueAddrs::default(); self.queues.len()];
        self.interrupt.clear();
    }

    fn has(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    /// Whether queue configuration may change now (for the selected queue).
    fn queue_configurable(&self) -> Option<usize> {
        let index = self.queue_sel as usize;
        let open = self.has(VIRTIO_CONFIG_S_FEATURES_OK) && !self.has(VIRTIO_CONFIG_S_DRIVER_OK);
        match self.queues.get(index) {
            Some(q) if open && !q.ready() => Some(index),
            _ => None,
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set (a driver writes back what it read);
        // bits the spec does not define are not kept (a saved status holds only these).
        if value & !(STATUS_BITS | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
            warn_ratelimited!("virtio-mmio: status {value:#x} sets undefined bits; they are ignored");
        }
        let mut value = value & STATUS_BITS;
        if value & self.status != self.status {
            warn_ratelimited!("virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}); ignored", self.status);
            return;
        }
        if value & !self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // A legacy driver: this transport is modern only. Leaving FEATURES_OK clear
            // tells the driver so (spec 3.1.1), and a DRIVER_OK in the same write is then
            // out of order.
            warn_ratelimited!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK");
            value &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        let added = value & !self.status;
        let requires = |bit: u32, before: u32| added & bit == 0 || (value & before != 0);
        let in_order = requires(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            && requires(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
            && requires(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK);
        if !in_order {
            warn_ratelimited!("virtio-mmio: status {value:#x} skips a step from {:#x}; ignored", self.status);
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = std::mem::take(&mut self.queues);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        // Queues the driver did not enable stay out; a device that needs them says so.
        let ready: Vec<Queue> = queues.into_iter().take_while(|q| q.ready()).collect();
        self.handed_over = ready.len();
        self.handed_sizes = ready.iter().map(|q| q.size()).collect();
        let activation = Activation {
            memory: self.memory.clone(),
            queues: ready,
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
        };
        self.stats.activations += 1;
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.stats.activate_fails += 1;
                self.device.reset();
                let kind = self.device.device_type();
                self.interrupt.fail("virtio-mmio", format_args!("device type {kind} failed to start: {e}"));
            }
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let Some(index) = self.queue_configurable() else {
            // Disabling a ready queue is allowed until DRIVER_OK.
            let driver_ok = self.has(VIRTIO_CONFIG_S_DRIVER_OK);
            if let (false, false, Some(q)) = (ready, driver_ok, self.queues.get_mut(self.queue_sel as usize)) {
                q.set_ready(false);
            }
            return;
        };
        if !ready {
            return;
        }
        let a = self.addrs[index];
        if a.bad_size {
            warn_ratelimited!("virtio-mmio: queue {index} has an invalid size; not ready");
            return;
        }
        let q = &mut self.queues[index];
        let result = q
            .try_set_desc_table_address(join(a.desc))
            .and_then(|()| q.try_set_avail_ring_address(join(a.avail)))
            .and_then(|()| q.try_set_used_ring_address(join(a.used)));
        if let Err(e) = result {
            warn_ratelimited!("virtio-mmio: queue {index} rejected: {e}");
            return;
        }
        // Checked here rather than with `Queue::is_valid`, which logs an error of its own
        // (without a rate limit) for every refusal.
        match rings_outside_memory(q, self.memory.memory()) {
            None => q.set_ready(true),
            Some(ring) => {
                warn_ratelimited!("virtio-mmio: queue {index}'s {ring} is not inside guest memory; not ready")
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.device.queue_max_sizes().get(self.queue_sel as usize).map_or(0, |&m| u32::from(m)),
            // After DRIVER_OK the queues belong to the device: the ready ones are the
            // first `handed_over` (virtio 1.2, 4.2.2: QueueReady reads back what was written).
            QUEUE_READY => match queue {
                Some(q) => u32::from(q.ready()),
                None => u32::from((self.queue_sel as usize) < self.handed_over),
            },
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS if self.interrupt.needs_reset() => self.status | VIRTIO_CONFIG_S_NEEDS_RESET,
            STATUS => self.status,
            // The transport's count moves on the driver's writes, the device's on its
            // own changes (a disk swapped): either tells the driver to read again.
            CONFIG_GENERATION => self.config_generation.wrapping_add(self.device.config_generation()),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                let negotiating = self.has(VIRTIO_CONFIG_S_DRIVER) && !self.has(VIRTIO_CONFIG_S_FEATURES_OK);
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                if negotiating {
                    let window = 0xffff_ffffu64 << shift;
                    let accepted = (u64::from(value) << shift) & self.offered_features();
                    self.acked_features = (self.acked_features & !window) | accepted;
                } else {
                    warn_ratelimited!("virtio-mmio: DriverFeatures written outside negotiation; ignored");
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => match self.queue_configurable() {
                Some(i) => {
                    let size = u16::try_from(value).map_err(|_| virtio_queue::Error::InvalidSize);
                    let result = size.and_then(|size| self.queues[i].try_set_size(size));
                    self.addrs[i].bad_size = result.is_err();
                    if let Err(e) = result {
                        warn_ratelimited!("virtio-mmio: queue {i} size {value}: {e}");
                    }
                }
                None => warn_ratelimited!("virtio-mmio: QueueNum written when the queue cannot change; ignored"),
            },
            QUEUE_READY => self.set_queue_ready(value == 1),
            QUEUE_DESC_LOW..=QUEUE_DEVICE_HIGH => {
                let Some(i) = self.queue_configurable() else {
                    warn_ratelimited!("virtio-mmio: queue address written when the queue cannot change; ignored");
                    return;
                };
                let a = &mut self.addrs[i];
                match offset {
                    QUEUE_DESC_LOW => a.desc[0] = value,
                    QUEUE_DESC_HIGH => a.desc[1] = value,
                    QUEUE_DRIVER_LOW => a.avail[0] = value,
                    QUEUE_DRIVER_HIGH => a.avail[1] = value,
                    QUEUE_DEVICE_LOW => a.used[0] = value,
                    QUEUE_DEVICE_HIGH => a.used[1] = value,
                    _ => {}
                }
            }
            QUEUE_NOTIFY => {
                let in_range = (value as usize) < self.device.queue_max_sizes().len();
                if self.interrupt.needs_reset() {
                    // The device stopped; it serves nothing until the driver resets it.
                } else if self.active && in_range {
                    self.device.queue_notify(value as u16);
                } else {
                    warn_ratelimited!(
                        "virtio-mmio: notify of queue {value} dropped (device not running or no such queue)"
                    );
                }
            }
            INTERRUPT_ACK => self.interrupt.acknowledge(value),
            STATUS => self.set_status(value),
            _ => warn_ratelimited!("virtio-mmio: write of {value:#x} to {offset:#x} ignored"),
        }
    }
}

impl MmioDeviceMut for MmioTransport {
    fn read(&mut self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            return self.device.read_config(offset - CONFIG, data);
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn_ratelimited!("virtio-mmio: {}-byte register read at {offset:#x}; registers are 32-bit", data.len());
            data.fill(0);
            return;
        }
        write_le(data, u64::from(self.read_reg(offset)));
    }

    fn write(&mut self, _vcpu: usize, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn_ratelimited!("virtio-mmio: {}-byte register write at {offset:#x}; registers are 32-bit", data.len());
            return;
        }
        self.write_reg(offset, read_le(data) as u32);
    }
}

#[cfg(test)]
mod tests;
