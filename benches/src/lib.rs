//! The driver side of a virtio device, for benchmarks that drive hvrun's device models
//! through guest memory and a split virtqueue without a hypervisor.
//!
//! [`Driver`] owns one queue laid out in a guest memory it allocates: it writes
//! descriptors and the available ring (with index wrap-around, unlike `virtio-queue`'s
//! test mock), notifies the device through its MMIO transport, and waits for the used
//! ring, as a guest's driver would.

use std::sync::Arc;

use devices::bus::MmioDeviceMut;
use devices::irq::NoIrq;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{Interrupt, VirtioDevice};
use guest_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory a device can hold.
pub struct Mem(pub GuestMemoryMmap);

impl std::ops::Deref for Mem {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.0
    }
}

/// Where the rings live; data buffers go above [`DATA`].
const RINGS: u64 = 0x1_0000;
/// The start of the data area.
pub const DATA: u64 = 0x10_0000;
/// Descriptor flags.
const NEXT: u16 = 1;
/// Device-writable descriptor flag.
pub const WRITE: u16 = 2;

/// The driver's view of one split virtqueue's descriptor table and available ring.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Queue size (a power of two).
    pub size: u16,
}

impl Ring {
    /// Writes a chain of `(addr, len, flags)` buffers at descriptors `first..` and makes
    /// it available, advancing `avail_idx` (the driver's copy of the ring index).
    pub fn post(&self, mem: &GuestMemoryMmap, avail_idx: &mut u16, first: u16, buffers: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let index = (first + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let flags = if i + 1 < buffers.len() { flags | NEXT } else { flags };
            let at = self.desc + 16 * u64::from(index);
            mem.write_obj(addr, GuestAddress(at)).expect("descriptor");
            mem.write_obj(len, GuestAddress(at + 8)).expect("descriptor");
            mem.write_obj(flags, GuestAddress(at + 12)).expect("descriptor");
            mem.write_obj(next, GuestAddress(at + 14)).expect("descriptor");
        }
        let slot = self.avail + 4 + 2 * u64::from(*avail_idx % self.size);
        mem.write_obj(first % self.size, GuestAddress(slot)).expect("avail ring");
        *avail_idx = avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_obj(*avail_idx, GuestAddress(self.avail + 2)).expect("avail idx");
    }
}

/// A device on its transport and the driver side of its queues.
pub struct Driver {
    /// Guest memory.
    pub mem: Arc<Mem>,
    transport: MmioTransport,
    size: u16,
    queues: Vec<(u64, u64, u64)>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

fn reg_write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(0, offset, &value.to_le_bytes());
}

fn reg_read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, offset, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    /// Starts `device` with `queues` queues of `size` entries in `mem_size` bytes of guest
    /// memory, accepting every feature it offers but EVENT_IDX (so every used buffer
    /// interrupts, the conservative case).
    pub fn start(device: Box<dyn VirtioDevice>, queues: usize, size: u16, mem_size: usize) -> Self {
        let mem = Arc::new(Mem(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).expect("guest memory")));
        let mut t = MmioTransport::new(device, mem.clone(), Interrupt::new(Arc::new(NoIrq))).expect("transport");
        for status in [0, 1, 3] {
            reg_write(&mut t, 0x70, status);
        }
        for sel in 0..2 {
            reg_write(&mut t, 0x14, sel);
            let offered = reg_read(&mut t, 0x10);
            let accepted = if sel == 0 { offered & !(1 << 29) } else { offered };
            reg_write(&mut t, 0x24, sel);
            reg_write(&mut t, 0x20, accepted);
        }
        reg_write(&mut t, 0x70, 11);
        let n = u64::from(size);
        // Each queue's rings in their own 4 KiB-aligned block (the descriptor table must
        // be 16-byte aligned).
        let stride = (16 * n + 6 + 2 * n + 6 + 8 * n + 4095) & !4095;
        let mut layout = Vec::new();
        for q in 0..queues {
            let desc = RINGS + q as u64 * stride;
            let avail = desc + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            reg_write(&mut t, 0x30, q as u32);
            reg_write(&mut t, 0x38, u32::from(size));
            for (low, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                reg_write(&mut t, low, addr as u32);
                reg_write(&mut t, low + 4, (addr >> 32) as u32);
            }
            reg_write(&mut t, 0x44, 1);
            layout.push((desc, avail, used));
        }
        reg_write(&mut t, 0x70, 15);
        assert_eq!(reg_read(&mut t, 0x70), 15, "the device accepted DRIVER_OK");
        Driver { mem, transport: t, size, avail_idx: vec![0; queues], used_seen: vec![0; queues], queues: layout }
    }

    /// Makes a chain of `(addr, len, flags)` buffers available on queue `q`, starting at
    /// descriptor `first`, without notifying.
    pub fn post(&mut self, q: usize, first: u16, buffers: &[(u64, u32, u16)]) {
        let (desc, avail, _) = self.queues[q];
        let ring = Ring { desc, avail, size: self.size };
        ring.post(&self.mem, &mut self.avail_idx[q], first, buffers);
    }

    /// Notifies queue `q`, as the guest's write to QueueNotify would.
    pub fn notify(&mut self, q: usize) {
        reg_write(&mut self.transport, 0x50, q as u32);
    }

    /// Waits until the device has used `count` more buffers on queue `q`; returns the
    /// length of the last one.
    pub fn wait_used(&mut self, q: usize, count: u16) -> u32 {
        let (_, _, used) = self.queues[q];
        let target = self.used_seen[q].wrapping_add(count);
        let mut spins = 0u64;
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
            if idx == target {
                break;
            }
            spins += 1;
            // A guest's vCPU waiting for a device sleeps (WFI); this one lets the
            // device's threads have the CPU after a short spin, so that on a machine
            // with few cores the driver does not stand in their way.
            if spins > 64 {
                std::thread::yield_now();
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        self.used_seen[q] = target;
        let last = u64::from(target.wrapping_sub(1) % self.size);
        self.mem.read_obj(GuestAddress(used + 4 + 8 * last + 4)).expect("used elem")
    }

    /// Looks at queue `q`'s used ring without waiting: calls `each` with the head
    /// descriptor and the length of every buffer the device used since the last look (or
    /// [`Driver::wait_used`]), oldest first, and returns how many there were. For
    /// benchmarks that keep several requests in flight and reuse each one's descriptors
    /// as soon as it is done.
    pub fn take_used(&mut self, q: usize, mut each: impl FnMut(u16, u32)) -> u16 {
        let (_, _, used) = self.queues[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let new = idx.wrapping_sub(self.used_seen[q]);
        for i in 0..new {
            let at = used + 4 + 8 * u64::from(self.used_seen[q].wrapping_add(i) % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used elem");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used elem");
            each(id as u16, len);
        }
        self.used_seen[q] = idx;
        new
    }

    /// The started device's transport, to put on a bus (the driver side is given up).
    pub fn into_transport(self) -> MmioTransport {
        self.transport
    }
}
