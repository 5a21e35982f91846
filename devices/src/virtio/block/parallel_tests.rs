//! Many requests at once: a disk that serves requests from several threads
//! ([`SharedDisk`]), queues served in parallel and out of order, flushes, MQ, and resets
//! with requests in flight.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_memory::GuestMemoryMmap;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, FileDisk, GuestBuffers, SharedDisk};
use super::request::*;
use super::{Block, IO_THREADS};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{chained, desc, read_reg, start, wait_for, write_reg, Line, Mem, W};
use crate::virtio::{Interrupt, VirtioDevice};

const MEM: usize = 4 << 20;
/// Request `k`'s header, status byte and 4 KiB data buffer.
const HDRS: u64 = 0x1_0000;
const STATUSES: u64 = 0x1_8000;
pub(super) const BUFS: u64 = 0x10_0000;
/// Queue `q`'s rings.
const RINGS: u64 = 0x30_0000;
const QUEUE: u16 = 256;

/// What the recording disk saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// A read or write at this offset started.
    Start(u64),
    /// A write at this offset returned.
    Wrote(u64),
    /// A read at this offset returned.
    Read(u64),
    /// A flush started.
    FlushStart,
    /// A flush returned.
    Flushed,
}

#[derive(Default)]
pub(super) struct Recording {
    pub(super) bytes: Vec<u8>,
    seen: Vec<Seen>,
    /// Offsets whose reads and writes wait until taken out.
    held: HashSet<u64>,
    /// How many reads and writes are waiting at a hold now.
    waiting: usize,
}

/// A disk in memory that serves many requests at once and records what it does; reads
/// and writes at held offsets wait until the test lets them go.
#[derive(Clone, Default)]
pub(super) struct Recorder(Arc<(Mutex<Recording>, Condvar)>);

impl Recorder {
    pub(super) fn new(size: usize) -> Self {
        let recorder = Recorder::default();
        recorder.state().bytes = (0..size).map(|i| (i % 251) as u8).collect();
        recorder
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.0 .0.lock().unwrap()
    }

    pub(super) fn hold(&self, offsets: impl IntoIterator<Item = u64>) {
        self.state().held.extend(offsets);
    }

    pub(super) fn release(&self, offset: u64) {
        self.state().held.remove(&offset);
        self.0 .1.notify_all();
    }

    pub(super) fn waiting(&self) -> usize {
        self.state().waiting
    }

    pub(super) fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// Logs the start, waits while `offset` is held, does `io`, logs `done`.
    fn io(&self, offset: u64, io: impl FnOnce(&mut Vec<u8>), done: Seen) {
        let (lock, cv) = &*self.0;
        let mut state = lock.lock().unwrap();
        state.seen.push(Seen::Start(offset));
        state.waiting += 1;
        cv.notify_all();
        let mut state = cv.wait_while(state, |s| s.held.contains(&offset)).unwrap();
        state.waiting -= 1;
        io(&mut state.bytes);
        state.seen.push(done);
    }
}

impl SharedDisk for Recorder {
    fn read_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        let len = bufs.len();
        self.io(offset, |bytes| assert_eq!(bufs.fill_from(&bytes[at..at + len]), len), Seen::Read(offset));
        Ok(())
    }
    fn write_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        let len = bufs.len();
        self.io(offset, |bytes| assert_eq!(bufs.drain_into(&mut bytes[at..at + len]), len), Seen::Wrote(offset));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.state().seen.push(Seen::FlushStart);
        std::thread::sleep(Duration::from_millis(1));
        self.state().seen.push(Seen::Flushed);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.state().bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.punch_hole(offset, len)
    }
}

impl Disk for Recorder {
    fn capacity(&self) -> u64 {
        self.state().bytes.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.copy_from_slice(&self.state().bytes[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.state().bytes[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        SharedDisk::flush(self)
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        SharedDisk::punch_hole(self, offset, len)
    }
    fn shared(&self) -> Option<Arc<dyn SharedDisk>> {
        Some(Arc::new(self.clone()))
    }
}

/// Lets every held read and write go when dropped, so that a failing test ends instead
/// of waiting for them in the device's drop (declare it after the device).
pub(super) struct Opener<'a>(pub(super) &'a Recorder);

impl Drop for Opener<'_> {
    fn drop(&mut self) {
        self.0.state().held.clear();
        self.0 .0 .1.notify_all();
    }
}

/// A device on its transport, and the guest memory it works in.
pub(super) struct Rig {
    pub(super) mem: Arc<Mem>,
    pub(super) transport: MmioTransport,
    /// The host's handle on the device.
    pub(super) handle: super::BlockHandle,
}

impl Rig {
    pub(super) fn new(block: Block) -> Self {
        let mem = Arc::new(Mem(crate::virtio::testing::mem(MEM)));
        let line = Arc::new(Line::default());
        let handle = block.handle();
        let transport = MmioTransport::new(Box::new(block), mem.clone(), Interrupt::new(line)).unwrap();
        Rig { mem, transport, handle }
    }

    /// A device over `disk` (whose reads and writes at `held` offsets wait), started
    /// with one queue.
    pub(super) fn started(disk: &Recorder, held: impl IntoIterator<Item = u64>, id: &str) -> Self {
        disk.hold(held);
        let mut rig = Rig::new(Block::new(Box::new(disk.clone()), id));
        let mem = rig.mem.clone();
        start(&mut rig.transport, &[&queue(&mem, 0)]);
        rig
    }

    pub(super) fn notify(&mut self, q: u32) {
        write_reg(&mut self.transport, 0x50, q);
    }
}

/// Queue `q`'s rings, [`QUEUE`] entries.
pub(super) fn queue(mem: &Mem, q: u64) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(&mem.0, GuestAddress(RINGS + q * 0x1_0000), QUEUE)
}

/// Makes request `k` (descriptors `3k..`, its own header, buffer and status) of `kind`
/// at `sector` available on `vq`, without notifying.
pub(super) fn post(mem: &Mem, vq: &MockSplitQueue<'_, GuestMemoryMmap>, k: u16, kind: u32, sector: u64) {
    vq.add_desc_chains(&request_descs(mem, k, 3 * k, kind, sector), 3 * k).unwrap();
}

/// Makes requests `first..` (each a kind and a sector) available on `vq` at once: one
/// update of the available index. A device polling its ring then sees them together,
/// as a test of requests in flight at once needs; made available one by one, the first
/// may be taken while it is the only one, with no helper called for the rest.
pub(super) fn post_all(mem: &Mem, vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, requests: &[(u32, u64)]) {
    let mut descs = Vec::new();
    for (k, &(kind, sector)) in (first..).zip(requests) {
        let at = 3 * first + descs.len() as u16;
        descs.extend(request_descs(mem, k, at, kind, sector));
    }
    vq.add_desc_chains(&descs, 3 * first).unwrap();
}

/// Request `k`'s descriptors, from index `at` on, its header and status byte written.
fn request_descs(mem: &Mem, k: u16, at: u16, kind: u32, sector: u64) -> Vec<RawDescriptor> {
    let (hdr, buf, status) = (HDRS + 16 * u64::from(k), BUFS + 4096 * u64::from(k), STATUSES + u64::from(k));
    mem.write_slice(&header(kind, sector), GuestAddress(hdr)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    let data = if kind == T_IN { W } else { 0 };
    if kind == T_FLUSH {
        vec![chained(hdr, 16, 0, at + 1), desc(status, 1, W)]
    } else {
        vec![chained(hdr, 16, 0, at + 1), chained(buf, 4096, data, at + 2), desc(status, 1, W)]
    }
}

/// Request `k`'s status byte.
pub(super) fn status(mem: &Mem, k: u16) -> u8 {
    mem.read_obj(GuestAddress(STATUSES + u64::from(k))).unwrap()
}

/// The heads in `vq`'s used ring so far, in order.
pub(super) fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<u16> {
    let n = vq.used().idx().load();
    (0..n).map(|i| vq.used().ring().ref_at(usize::from(i)).unwrap().load().id() as u16).collect()
}

/// 64 reads and writes at once, on a file: every one answered exactly once, with the
/// right data, whatever order they finish in.
#[test]
fn parallel_requests_are_each_answered_once_with_the_right_data() {
    let path = std::env::temp_dir().join(format!("hvrun-blk-parallel-{}.img", std::process::id()));
    let image: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&path, &image).unwrap();
    let mut rig = Rig::new(Block::new(Box::new(FileDisk::open(&path, false).unwrap()), "par"));
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    start(&mut rig.transport, &[&vq]);
    // Even k: read 4 KiB from block k; odd k: write 4 KiB of k to block 100 + k.
    for k in 0..64u16 {
        if k % 2 == 0 {
            post(&mem, &vq, k, T_IN, u64::from(k) * 8);
        } else {
            mem.write_slice(&[k as u8; 4096], GuestAddress(BUFS + 4096 * u64::from(k))).unwrap();
            post(&mem, &vq, k, T_OUT, (100 + u64::from(k)) * 8);
        }
    }
    rig.notify(0);
    wait_for("64 answers", || vq.used().idx().load() == 64);
    let mut heads = used(&vq);
    heads.sort_unstable();
    assert_eq!(heads, (0..64).map(|k| 3 * k).collect::<Vec<_>>(), "each request answered once");
    for k in 0..64u16 {
        assert_eq!(status(&mem, k), S_OK, "request {k}");
        if k % 2 == 0 {
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(BUFS + 4096 * u64::from(k))).unwrap();
            let at = usize::from(k) * 4096;
            assert_eq!(got, image[at..at + 4096], "read {k}");
        }
    }
    write_reg(&mut rig.transport, 0x70, 0);
    let written = std::fs::read(&path).unwrap();
    for k in (1..64u64).step_by(2) {
        let at = (100 + k as usize) * 4096;
        assert!(written[at..at + 4096].iter().all(|&b| b == k as u8), "write {k}");
    }
    std::fs::remove_file(path).unwrap();
}

/// Requests finish in whatever order the disk finishes them: four reads held and let go
/// in reverse come back in reverse.
#[test]
fn requests_complete_out_of_order() {
    let disk = Recorder::new(1 << 20);
    let offsets = [0u64, 4096, 8192, 12288];
    let mut rig = Rig::started(&disk, offsets, "ooo");
    let _open = Opener(&disk);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    post_all(&mem, &vq, 0, &offsets.map(|offset| (T_IN, offset / 512)));
    rig.notify(0);
    wait_for("four reads in flight at once", || disk.waiting() == 4);
    for (k, &offset) in offsets.iter().enumerate().rev() {
        disk.release(offset);
        wait_for("the read let go", || used(&vq).len() == offsets.len() - k);
    }
    assert_eq!(used(&vq), vec![9, 6, 3, 0], "answered in the order they finished");
    assert!((0..4).all(|k| status(&mem, k) == S_OK));
}

/// A flush starts only after every request taken before it on its queue has been
/// answered, and no request is taken while it waits.
#[test]
fn a_flush_waits_for_the_writes_before_it_on_its_queue() {
    let disk = Recorder::new(1 << 20);
    let mut rig = Rig::started(&disk, [0, 4096, 8192], "flush");
    let _open = Opener(&disk);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    post_all(&mem, &vq, 0, &[(T_OUT, 0), (T_OUT, 8), (T_OUT, 16), (T_FLUSH, 0)]);
    rig.notify(0);
    wait_for("three writes in flight", || disk.waiting() == 3);
    // The flush is taken and waits; a write made available now is not taken. (Once the
    // flush's thread, started as the third write was taken, has shut the ring, which
    // cannot be watched from here: a write made available before that may be taken
    // alongside the flush, legitimately. 20 ms was short for a loaded host.)
    std::thread::sleep(Duration::from_millis(200));
    post(&mem, &vq, 4, T_OUT, 100 * 8);
    rig.notify(0);
    std::thread::sleep(Duration::from_millis(20));
    let seen = disk.seen();
    assert!(!seen.contains(&Seen::FlushStart), "the flush waits: {seen:?}");
    assert!(!seen.contains(&Seen::Start(100 * 4096)), "and nothing is taken meanwhile: {seen:?}");
    for offset in [8192, 0, 4096] {
        disk.release(offset);
    }
    wait_for("all five answered", || vq.used().idx().load() == 5);
    let seen = disk.seen();
    let at = |what: Seen| seen.iter().position(|&s| s == what).unwrap();
    for offset in [0, 4096, 8192] {
        assert!(at(Seen::Wrote(offset)) < at(Seen::FlushStart), "write at {offset} before the flush: {seen:?}");
    }
    assert!(at(Seen::Flushed) > at(Seen::FlushStart));
    assert!((0..5).all(|k| status(&mem, k) == S_OK));
    let flush_answer = used(&vq).iter().position(|&h| h == 9).unwrap();
    assert!(flush_answer >= 3, "the flush is answered after the writes before it");
}

/// Flushes taken together wait for the writes before them, not for each other.
#[test]
fn flushes_in_a_row_all_complete() {
    let disk = Recorder::new(1 << 20);
    let mut rig = Rig::started(&disk, [0, 4096], "flushes");
    let _open = Opener(&disk);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    post_all(&mem, &vq, 0, &[(T_OUT, 0), (T_OUT, 8), (T_FLUSH, 0), (T_FLUSH, 0), (T_FLUSH, 0), (T_FLUSH, 0)]);
    rig.notify(0);
    wait_for("two writes in flight", || disk.waiting() == 2);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!disk.seen().contains(&Seen::FlushStart));
    disk.release(4096);
    disk.release(0);
    wait_for("all six answered", || vq.used().idx().load() == 6);
    let seen = disk.seen();
    let first_flush = seen.iter().position(|&s| s == Seen::FlushStart).unwrap();
    assert!(seen[..first_flush].contains(&Seen::Wrote(0)) && seen[..first_flush].contains(&Seen::Wrote(4096)));
    assert!((0..6).all(|k| status(&mem, k) == S_OK));
}

/// With MQ, a write the driver saw completed on one queue is covered by a flush on
/// another; a write still in flight on another queue is not waited for (the spec asks
/// for completed writes only).
#[test]
fn a_flush_covers_writes_completed_on_other_queues() {
    let disk = Recorder::new(1 << 20);
    let mut rig = Rig::new(Block::with_queues(Box::new(disk.clone()), "mq-flush", 2));
    let mem = rig.mem.clone();
    let (q0, q1) = (queue(&mem, 0), queue(&mem, 1));
    start(&mut rig.transport, &[&q0, &q1]);
    post(&mem, &q1, 0, T_OUT, 0);
    rig.notify(1);
    wait_for("the write on queue 1", || q1.used().idx().load() == 1);
    let _open = Opener(&disk);
    disk.hold([8192]);
    post(&mem, &q1, 1, T_OUT, 16);
    rig.notify(1);
    wait_for("a write held on queue 1", || disk.waiting() == 1);
    post(&mem, &q0, 2, T_FLUSH, 0);
    rig.notify(0);
    wait_for("the flush on queue 0", || q0.used().idx().load() == 1);
    let seen = disk.seen();
    let at = |what: Seen| seen.iter().position(|&s| s == what).unwrap();
    assert!(at(Seen::Wrote(0)) < at(Seen::FlushStart), "{seen:?}");
    assert!(!seen.contains(&Seen::Wrote(8192)), "the held write did not hold up the flush: {seen:?}");
    disk.release(8192);
    wait_for("the held write", || q1.used().idx().load() == 2);
}

/// MQ: the number of queues in the configuration space, each queue served, and a driver
/// without MQ served on queue 0 only.
#[test]
fn several_queues_each_serve_their_own_requests() {
    let disk = Recorder::new(1 << 20);
    let block = Block::with_queues(Box::new(disk.clone()), "mq", 4);
    assert_ne!(block.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ), 0);
    assert_eq!(block.queue_max_sizes(), &[256; 4]);
    let mut num_queues = [0u8; 2];
    block.read_config(34, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 4, "num_queues at offset 34");
    let mut rig = Rig::new(block);
    let mem = rig.mem.clone();
    let vqs: Vec<_> = (0..4).map(|q| queue(&mem, q)).collect();
    start(&mut rig.transport, &vqs.iter().collect::<Vec<_>>());
    for (q, vq) in (0u16..).zip(&vqs) {
        post(&mem, vq, q, T_IN, u64::from(q) * 8);
        rig.notify(u32::from(q));
    }
    for vq in &vqs {
        wait_for("each queue's read", || vq.used().idx().load() == 1);
    }
    assert!((0..4).all(|k| status(&mem, k) == S_OK));

    // Capped at MAX_QUEUES, and one queue for a disk that serves one request at a time.
    assert_eq!(Block::with_queues(Box::new(disk.clone()), "many", 64).queue_max_sizes().len(), super::MAX_QUEUES);
    let serial =
        Block::with_queues(Box::new(super::disk::MemDisk { bytes: vec![0; 4096], ..Default::default() }), "m", 4);
    assert_eq!(serial.queue_max_sizes().len(), 1);
    assert_eq!(serial.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ), 0);
}

#[test]
fn a_driver_without_mq_is_served_on_queue_0_only() {
    let disk = Recorder::new(1 << 20);
    let mut rig = Rig::new(Block::with_queues(Box::new(disk), "no-mq", 2));
    let mem = rig.mem.clone();
    let (q0, q1) = (queue(&mem, 0), queue(&mem, 1));
    // `start` takes every feature offered; this driver leaves MQ out.
    let t = &mut rig.transport;
    for status in [0, 1, 3] {
        write_reg(t, 0x70, status);
    }
    write_reg(t, 0x14, 0);
    let offered = read_reg(t, 0x10);
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, offered & !(1 << 12) & !(1 << 29));
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, 1); // VERSION_1
    write_reg(t, 0x70, 11);
    for (index, vq) in [&q0, &q1].into_iter().enumerate() {
        write_reg(t, 0x30, index as u32);
        write_reg(t, 0x38, u32::from(QUEUE));
        for (low, addr) in [(0x80, vq.desc_table_addr()), (0x90, vq.avail_addr()), (0xa0, vq.used_addr())] {
            write_reg(t, low, addr.0 as u32);
            write_reg(t, low + 4, (addr.0 >> 32) as u32);
        }
        write_reg(t, 0x44, 1);
    }
    write_reg(t, 0x70, 15);
    assert_eq!(read_reg(t, 0x70), 15);
    post(&mem, &q1, 1, T_IN, 8);
    rig.notify(1);
    post(&mem, &q0, 0, T_IN, 0);
    rig.notify(0);
    wait_for("the read on queue 0", || q0.used().idx().load() == 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q1.used().idx().load(), 0, "queue 1 is not served");
}

/// A reset with requests in the I/O threads waits for those in hand, never starts the
/// queued ones, answers none of them, and leaves the device able to start again.
#[test]
fn a_reset_with_requests_in_flight_answers_none_and_keeps_the_disk() {
    let disk = Recorder::new(1 << 20);
    let mut rig = Rig::started(&disk, (0..32u64).map(|k| k * 4096), "reset");
    let _open = Opener(&disk);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    let reads: Vec<_> = (0..32u64).map(|k| (T_IN, k * 8)).collect();
    post_all(&mem, &vq, 0, &reads);
    rig.notify(0);
    wait_for("the I/O threads busy", || disk.waiting() == IO_THREADS);
    let releaser = disk.clone();
    // Let go once the reset has (surely) begun: a read let go before it would take the
    // next request, legitimately. (The reset cannot be watched from here; 50 ms was too
    // short for a host that keeps the test's thread waiting for a CPU.)
    let letting_go = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for k in 0..32u64 {
            releaser.release(k * 4096);
        }
    });
    // The reset waits for the reads in hand, which the other thread lets go.
    write_reg(&mut rig.transport, 0x70, 0);
    letting_go.join().unwrap();
    let started = disk.seen().iter().filter(|s| matches!(s, Seen::Start(_))).count();
    assert_eq!(started, IO_THREADS, "only the requests in hand ran");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vq.used().idx().load(), 0, "no request answered after the reset");
    // The device starts again with its disk.
    let vq = MockSplitQueue::create(&mem.0, GuestAddress(RINGS + 0x8_0000), QUEUE);
    start(&mut rig.transport, &[&vq]);
    post(&mem, &vq, 0, T_IN, 0);
    rig.notify(0);
    wait_for("a read after the reset", || vq.used().idx().load() == 1);
    assert_eq!(status(&mem, 0), S_OK);
}

/// Serving a request allocates nothing: the walk keeps its pieces inline.
#[test]
fn a_request_allocates_nothing() {
    let mem = crate::virtio::testing::mem(1 << 20);
    let mut disk = super::disk::MemDisk { bytes: vec![0; 1 << 20], ..Default::default() };
    let vq = MockSplitQueue::new(&mem, 16);
    mem.write_slice(&header(T_IN, 8), GuestAddress(0x1_0000)).unwrap();
    let chain = [desc(0x1_0000, 16, 0), desc(0x2_0000, 2048, W), desc(0x2_0800, 2048, W), desc(0x3_0000, 1, W)];
    let (id, mut bounce) = ([0u8; ID_LEN], [0u8; 512]);
    let chain = vq.build_desc_chain(&chain).unwrap();
    let mut chains: Vec<_> = (0..100).map(|_| chain.clone()).collect();
    let before = crate::testing::allocated_here();
    for chain in chains.drain(..) {
        assert_eq!(serve(&mem, chain, Context { disk: &mut disk, id: &id, bounce: &mut bounce }), 4097);
    }
    assert_eq!(crate::testing::allocated_here(), before, "no allocation per request");
}
