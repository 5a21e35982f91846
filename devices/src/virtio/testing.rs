//! Test helpers: a guest driver's side of the MMIO transport, over `virtio-queue`'s mock
//! queues.

use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use crate::bus::MmioDeviceMut;
pub use crate::testing::{Line, Sink};
use crate::virtio::mmio::MmioTransport;

/// The descriptor flag for device-writable buffers.
pub const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// A descriptor without a next one.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// A descriptor followed by descriptor `next`.
pub fn chained(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    let next_flag = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    RawDescriptor::from(Descriptor::new(addr, len, flags | next_flag, next))
}

/// Guest memory of `size` bytes from address 0.
pub fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Guest memory a device can hold (`GuestMemoryHandle` through `Deref`).
pub struct Mem(pub GuestMemoryMmap);

impl std::ops::Deref for Mem {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.0
    }
}

/// Writes a transport register.
pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(0, offset, &value.to_le_bytes());
}

/// Reads a transport register.
pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, offset, &mut b);
    u32::from_le_bytes(b)
}

/// Does what a driver does to start the device: reset, negotiate every offered feature
/// but EVENT_IDX, set up `queues` in order, and set DRIVER_OK.
///
/// EVENT_IDX stays off because virtio-queue 0.18's `MockSplitQueue::create` puts the used
/// ring right after the available ring's entries, on top of its `used_event` field: with
/// EVENT_IDX on, the device would read the used index as the driver's used event and
/// skip interrupts. Worse, it counts the entries as bytes: the used ring starts at the
/// available ring's entry `n / 2` of `n`, so a test uses at most half a mock queue's
/// entries. Past that, the device's legitimate writes to its used ring land in the
/// available ring: entry `n / 2` is the used flags, which the device sets to 0 whenever
/// it re-enables notifications (a head that turns into 0), entry `n / 2 + 1` the used
/// index, the ones after it the used entries; and the mock's available-ring writes land
/// in the used ring. (rust-vmm/vm-virtio#400 fixes the mock; see
/// `the_mock_used_ring_starts_halfway_through_its_available_ring`.)
pub fn start(t: &mut MmioTransport, queues: &[&MockSplitQueue<GuestMemoryMmap>]) {
    start_without(t, queues, 0);
}

/// [`start`], refusing the features below 32 whose bits are set in `refused` too.
pub fn start_without(t: &mut MmioTransport, queues: &[&MockSplitQueue<GuestMemoryMmap>], refused: u32) {
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, 1);
    write_reg(t, 0x70, 3);
    for sel in 0..2 {
        write_reg(t, 0x14, sel);
        let offered = read_reg(t, 0x10);
        let event_idx = 1u32 << (virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX % 32);
        let accepted = if sel == 0 { offered & !event_idx & !refused } else { offered };
        write_reg(t, 0x24, sel);
        write_reg(t, 0x20, accepted);
    }
    write_reg(t, 0x70, 11);
    for (index, vq) in queues.iter().enumerate() {
        write_reg(t, 0x30, index as u32);
        write_reg(t, 0x38, (vq.desc_table().total_size() / 16) as u32);
        for (low, addr) in [(0x80, vq.desc_table_addr()), (0x90, vq.avail_addr()), (0xa0, vq.used_addr())] {
            write_reg(t, low, addr.0 as u32);
            write_reg(t, low + 4, (addr.0 >> 32) as u32);
        }
        write_reg(t, 0x44, 1);
    }
    write_reg(t, 0x70, 15);
    assert_eq!(read_reg(t, 0x70), 15, "the device accepted DRIVER_OK");
}

/// Waits up to 10 s for `done`, failing the test with `what` otherwise.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `work` on another thread and waits up to 10 s for it: a device that hangs or
/// spins fails the test instead of hanging it (the stuck thread is left behind).
pub fn within_deadline<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    finished.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} did not finish in 10 s"))
}

/// Issue 12, hole 1: on a started device with `queues` queues of 16 entries, the driver
/// moves queue `index`'s available index `ahead` entries past the device's position (more
/// than the queue holds) and notifies. The notify must return, the device must set
/// DEVICE_NEEDS_RESET and raise a configuration-change interrupt, and a reset must finish;
/// the transport comes back reset, for the caller to show that the device works again.
pub fn a_runaway_index_needs_reset(t: MmioTransport, m: &Mem, queues: u64, index: u32, ahead: u16) -> MmioTransport {
    let vqs: Vec<_> =
        (0..queues).map(|i| MockSplitQueue::create(&m.0, GuestAddress(0x8_0000 + i * 0x1_0000), 16)).collect();
    let t = std::sync::Arc::new(std::sync::Mutex::new(t));
    // A device that fails a check below may be spinning: dropping it would wait for its
    // thread for ever, so a failing test leaks it instead of hanging.
    let mut keep = LeakOnPanic(Some(t.clone()));
    start(&mut t.lock().unwrap(), &vqs.iter().collect::<Vec<_>>());
    vqs[index as usize].avail().idx().store(ahead);
    let notifier = t.clone();
    within_deadline("the notify", move || write_reg(&mut notifier.lock().unwrap(), 0x50, index));
    wait_for("DEVICE_NEEDS_RESET", || read_reg(&mut t.lock().unwrap(), 0x70) & 0x40 != 0);
    // `Interrupt::fail` sets the status bit first and raises the interrupt after it, so
    // the interrupt may trail the status by a moment (a CI run under qemu-user saw it).
    wait_for("a configuration-change interrupt", || read_reg(&mut t.lock().unwrap(), 0x60) & 2 == 2);
    // Notifying again is harmless: the device serves nothing more.
    write_reg(&mut t.lock().unwrap(), 0x50, index);
    let resetter = t.clone();
    within_deadline("the reset", move || write_reg(&mut resetter.lock().unwrap(), 0x70, 0));
    keep.0 = None;
    let mut t = std::sync::Arc::try_unwrap(t).expect("no thread holds the transport").into_inner().unwrap();
    assert_eq!(read_reg(&mut t, 0x70), 0, "reset clears DEVICE_NEEDS_RESET");
    t
}

/// Leaks what it holds if the thread is panicking (see `a_runaway_index_needs_reset`).
struct LeakOnPanic<T>(Option<T>);

impl<T> Drop for LeakOnPanic<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(self.0.take());
        }
    }
}

/// Pins the `MockSplitQueue` layout that `start` warns about: a `virtio-queue` that lays
/// the rings out apart fails this test, and the tests' "32 entries for ..." queues can
/// go back to the usual 16.
#[test]
fn the_mock_used_ring_starts_halfway_through_its_available_ring() {
    use vm_memory::Bytes;
    let m = mem(0x10_0000);
    for n in [16u16, 32, 256] {
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), n);
        assert_eq!(vq.avail_addr(), GuestAddress(0x8_0000 + 16 * u64::from(n)));
        // The used flags (a device writes 0 there) are the available ring's entry n / 2.
        assert_eq!(vq.used_addr(), GuestAddress(vq.avail_addr().0 + 4 + 2 * u64::from(n / 2)));
        vq.avail().ring().ref_at(usize::from(n / 2)).unwrap().store(8);
        assert_eq!(m.read_obj::<u16>(vq.used_addr()).unwrap(), 8);
    }
}
