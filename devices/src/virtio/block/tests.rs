use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, MemDisk};
use super::request::*;
use super::Block;
use crate::virtio::counters::DeviceStats;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{desc, read_reg, start, wait_for, write_reg, Line, Mem, W};
use crate::virtio::{Interrupt, VirtioDevice};

const MEM: usize = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

fn mem() -> GuestMemoryMmap {
    crate::virtio::testing::mem(MEM)
}

/// A 64 KiB disk whose byte i is i % 251.
fn disk() -> MemDisk {
    MemDisk { bytes: (0..65536u32).map(|i| (i % 251) as u8).collect(), ..Default::default() }
}

/// Serves one request made of `descs`, with the header at HDR; returns (used length, status).
fn request(mem: &GuestMemoryMmap, disk: &mut dyn Disk, kind: u32, sector: u64, descs: &[RawDescriptor]) -> (u32, u8) {
    mem.write_slice(&header(kind, sector), GuestAddress(HDR)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let id = *b"hvrun-test-disk\0\0\0\0\0";
    let mut bounce = vec![0u8; 4096];
    let len = serve(mem, chain, Context { disk, id: &id, bounce: &mut bounce });
    (len, mem.read_obj(GuestAddress(STATUS)).unwrap())
}

fn hdr() -> RawDescriptor {
    desc(HDR, 16, 0)
}

fn status() -> RawDescriptor {
    desc(STATUS, 1, W)
}

#[test]
fn write_then_read_back_across_split_buffers() {
    let (m, mut d) = (mem(), disk());
    m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    let out = [hdr(), desc(DATA, 512, 0), desc(DATA + 512, 512, 0), status()];
    assert_eq!(request(&m, &mut d, T_OUT, 3, &out), (1, S_OK));
    assert_eq!(&d.bytes[3 * 512..5 * 512], &[0xab; 1024][..]);
    assert_eq!(d.bytes[5 * 512], ((5 * 512) % 251) as u8);
    // Read it back into one buffer whose last byte is the status (a combined descriptor).
    m.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    let inn = [hdr(), desc(DATA, 1025, W)];
    m.write_slice(&header(T_IN, 3), GuestAddress(HDR)).unwrap();
    let vq = MockSplitQueue::new(&m, 16);
    let chain = vq.build_desc_chain(&inn).unwrap();
    let (id, mut bounce) = ([0u8; ID_LEN], vec![0u8; 100]);
    let len = serve(&m, chain, Context { disk: &mut d, id: &id, bounce: &mut bounce });
    assert_eq!(len, 1025);
    let mut back = [0u8; 1025];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back[..1024], &[0xab; 1024][..]);
    assert_eq!(back[1024], S_OK);
}

#[test]
fn reads_outside_the_disk_or_in_partial_sectors_fail() {
    let (m, mut d) = (mem(), disk());
    let read = [hdr(), desc(DATA, 512, W), status()];
    assert_eq!(request(&m, &mut d, T_IN, 127, &read).1, S_OK, "the last sector");
    assert_eq!(request(&m, &mut d, T_IN, 128, &read).1, S_IOERR, "past the end");
    assert_eq!(request(&m, &mut d, T_IN, u64::MAX / 2, &read).1, S_IOERR, "sector overflows");
    let odd = [hdr(), desc(DATA, 100, W), status()];
    assert_eq!(request(&m, &mut d, T_IN, 0, &odd).1, S_IOERR);
    let before = d.clone();
    let write = [hdr(), desc(DATA, 1024, 0), status()];
    assert_eq!(request(&m, &mut d, T_OUT, 127, &write).1, S_IOERR, "straddles the end");
    assert_eq!(d, before, "nothing written");
}

#[test]
fn a_read_only_disk_refuses_writes_discards_and_zeroes() {
    let m = mem();
    let mut d = MemDisk { read_only: true, ..disk() };
    let before = d.clone();
    assert_eq!(request(&m, &mut d, T_OUT, 0, &[hdr(), desc(DATA, 512, 0), status()]).1, S_IOERR);
    m.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &[hdr(), desc(DATA, 16, 0), status()]).1, S_IOERR);
    assert_eq!(request(&m, &mut d, T_WRITE_ZEROES, 0, &[hdr(), desc(DATA, 16, 0), status()]).1, S_IOERR);
    assert_eq!(d, before);
    assert_eq!(request(&m, &mut d, T_IN, 0, &[hdr(), desc(DATA, 512, W), status()]).1, S_OK);
}

#[test]
fn flush_get_id_and_unknown_types() {
    let (m, mut d) = (mem(), disk());
    assert_eq!(request(&m, &mut d, T_FLUSH, 0, &[hdr(), status()]), (1, S_OK));
    assert_eq!(d.flushes, 1);
    assert_eq!(request(&m, &mut d, T_GET_ID, 0, &[hdr(), desc(DATA, 20, W), status()]), (21, S_OK));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"hvrun-test-disk");
    assert_eq!(request(&m, &mut d, 0x7777, 0, &[hdr(), status()]).1, S_UNSUPP);
}

#[test]
fn discard_and_write_zeroes_validate_their_segments() {
    let (m, mut d) = (mem(), disk());
    let segment = |sector: u64, sectors: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    let one = [hdr(), desc(DATA, 16, 0), status()];
    m.write_slice(&segment(2, 2, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &one).1, S_OK);
    assert!(d.bytes[1024..2048].iter().all(|&b| b == 0));
    assert_ne!(d.bytes[2048], 0);
    m.write_slice(&segment(4, 1, 1), GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_WRITE_ZEROES, 0, &one).1, S_OK, "unmap is allowed for write-zeroes");
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &one).1, S_UNSUPP, "but not for discard");
    m.write_slice(&segment(127, 2, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &one).1, S_IOERR, "past the end");
    let two = [hdr(), desc(DATA, 32, 0), status()];
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &two).1, S_UNSUPP, "more segments than advertised");
    let ragged = [hdr(), desc(DATA, 15, 0), status()];
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &ragged).1, S_UNSUPP);
}

#[test]
fn malformed_chains() {
    let (m, mut d) = (mem(), disk());
    let before = d.clone();
    // Header in a device-writable descriptor: no header to read.
    assert_eq!(request(&m, &mut d, T_OUT, 0, &[desc(HDR, 16, W), status()]).1, S_IOERR);
    // No writable byte for the status: nothing to answer with.
    assert_eq!(request(&m, &mut d, T_OUT, 0, &[hdr(), desc(DATA, 512, 0)]).0, 0);
    // A buffer outside guest memory.
    assert_eq!(request(&m, &mut d, T_IN, 0, &[hdr(), desc(MEM as u64 - 256, 512, W), status()]).0, 0);
    // A zero-length data descriptor is just no data.
    assert_eq!(request(&m, &mut d, T_FLUSH, 0, &[hdr(), desc(DATA, 0, W), status()]).1, S_OK);
    assert_eq!(d.bytes, before.bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary descriptor tables (addresses in and out of memory, any lengths and
    /// flags, `next` pointers that loop): serving never panics, never writes outside the
    /// disk, and never reports more bytes than the chain can hold.
    #[test]
    fn arbitrary_descriptor_tables(
        table in proptest::collection::vec((0u64..2 * MEM as u64, any::<u32>(), 0u16..8, 0u16..20), 1..16),
        kind in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), any::<u32>()],
        sector in prop_oneof![0u64..200, any::<u64>()],
    ) {
        let m = mem();
        let mut d = disk();
        m.write_slice(&header(kind, sector), GuestAddress(HDR)).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
            vq.desc_table().store(i as u16, RawDescriptor::from(Descriptor::new(addr, len, flags, next))).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().unwrap();
        let capacity = d.bytes.len();
        while let Some(chain) = queue.pop_descriptor_chain(&m) {
            let writable: u64 = chain.clone().filter(|desc| desc.is_write_only()).map(|desc| u64::from(desc.len())).sum();
            let (id, mut bounce) = ([0u8; ID_LEN], vec![0u8; 512]);
            let len = serve(&m, chain, Context { disk: &mut d, id: &id, bounce: &mut bounce });
            prop_assert!(u64::from(len) <= writable);
        }
        prop_assert_eq!(d.bytes.len(), capacity);
    }
}

/// A MemDisk shared with the test, so it can look while the worker owns the device's.
#[derive(Clone)]
struct Shared(Arc<Mutex<MemDisk>>);
impl Disk for Shared {
    fn capacity(&self) -> u64 {
        self.0.lock().unwrap().capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().punch_hole(offset, len)
    }
}

#[test]
fn requests_are_served_off_the_notifying_thread_and_survive_a_reset() {
    let m = Arc::new(Mem(mem()));
    let line = Arc::new(Line::default());
    let shared = Shared(Arc::new(Mutex::new(disk())));
    let block = Block::new(Box::new(shared.clone()), "disk0");
    let mut t = MmioTransport::new(Box::new(block), m.clone(), Interrupt::new(line.clone())).unwrap();
    assert_eq!(read_reg(&mut t, 0x100), 128, "capacity in sectors");
    for round in 0..2 {
        let vq = MockSplitQueue::create(&**m, GuestAddress(0x8_0000 + round * 0x1_0000), 16);
        start(&mut t, &[&vq]);
        m.write_slice(&header(T_OUT, 1), GuestAddress(HDR)).unwrap();
        m.write_slice(&[round as u8 + 1; 512], GuestAddress(DATA)).unwrap();
        vq.build_desc_chain(&[hdr(), desc(DATA, 512, 0), status()]).unwrap();
        write_reg(&mut t, 0x50, 0);
        // The worker returns the buffer, then raises the interrupt: wait for both.
        wait_for("the worker's answer", || vq.used().idx().load() != 0 && line.high());
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(shared.0.lock().unwrap().bytes[512..1024], [round as u8 + 1; 512]);
        write_reg(&mut t, 0x70, 0); // reset: the worker stops and hands the disk back
    }
    // A read, and a request of a type the device does not know, in a third session.
    let vq = MockSplitQueue::create(&**m, GuestAddress(0xa_0000), 16);
    start(&mut t, &[&vq]);
    m.write_slice(&header(T_IN, 1), GuestAddress(HDR)).unwrap();
    vq.build_desc_chain(&[hdr(), desc(DATA, 512, W), status()]).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the read's answer", || vq.used().idx().load() == 1);
    m.write_slice(&header(99, 0), GuestAddress(HDR)).unwrap();
    vq.build_desc_chain(&[hdr(), status()]).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the refusal", || vq.used().idx().load() == 2);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_UNSUPP);
    let counted = DeviceStats { requests: 4, rx_bytes: 512, tx_bytes: 1024, errors: 1, ..DeviceStats::default() };
    assert_eq!(t.stats().device, Some(counted), "counted across resets");
}

#[test]
fn a_queue_notifier_reaches_the_queues_worker_without_a_register_write() {
    use crate::virtio::notifier::tests::pipe_notifier;
    use std::io::Write;
    let m = Arc::new(Mem(mem()));
    let line = Arc::new(Line::default());
    let shared = Shared(Arc::new(Mutex::new(disk())));
    let mut block = Block::new(Box::new(shared.clone()), "disk0");
    assert!(block.wants_notifiers());
    let (notifier, mut ring) = pipe_notifier(0);
    block.set_notifiers(vec![notifier, pipe_notifier(99).0]);
    let mut t = MmioTransport::new(Box::new(block), m.clone(), Interrupt::new(line.clone())).unwrap();
    let vq = MockSplitQueue::create(&**m, GuestAddress(0x8_0000), 16);
    start(&mut t, &[&vq]);
    // A first request through the register, so the worker has done its first round...
    m.write_slice(&header(T_OUT, 1), GuestAddress(HDR)).unwrap();
    vq.build_desc_chain(&[hdr(), desc(DATA, 512, 0), status()]).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the first answer", || vq.used().idx().load() == 1);
    // ...and, once its polling has died out, sleeps: only the notifier can wake it now.
    std::thread::sleep(std::time::Duration::from_millis(50));
    m.write_slice(&header(T_OUT, 2), GuestAddress(HDR)).unwrap();
    m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    vq.build_desc_chain(&[hdr(), desc(DATA, 512, 0), status()]).unwrap();
    ring.write_all(&1u64.to_ne_bytes()).unwrap(); // what KVM does for the guest's notify
    wait_for("the answer to the notifier", || vq.used().idx().load() == 2);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(shared.0.lock().unwrap().bytes[1024..1536], [0x5a; 512]);
    write_reg(&mut t, 0x70, 0);
}

/// A disk with no direct path to guest memory: requests go through the bounce buffer.
struct CopyOnly(MemDisk);

impl Disk for CopyOnly {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}

#[test]
fn the_bounce_path_and_the_direct_paths_agree() {
    let path = std::env::temp_dir().join(format!("hvrun-blk-direct-{}.img", std::process::id()));
    std::fs::write(&path, &disk().bytes).unwrap();
    for direct in ["memory", "copy", "file"] {
        let m = mem();
        let mut d: Box<dyn Disk> = match direct {
            "memory" => Box::new(disk()),
            "copy" => Box::new(CopyOnly(disk())),
            _ => Box::new(super::disk::FileDisk::open(&path, false).unwrap()),
        };
        let data: Vec<u8> = (0..3 * 512u32).map(|i| (i * 7 % 256) as u8).collect();
        m.write_slice(&data, GuestAddress(DATA)).unwrap();
        // Three uneven pieces, written at sector 10, then read back into other pieces.
        let out = [hdr(), desc(DATA, 100, 0), desc(DATA + 100, 1000, 0), desc(DATA + 1100, 436, 0), status()];
        assert_eq!(request(&m, d.as_mut(), T_OUT, 10, &out), (1, S_OK), "direct: {direct}");
        let back = DATA + 0x4000;
        let inn = [hdr(), desc(back, 1200, W), desc(back + 1200, 336, W), status()];
        assert_eq!(request(&m, d.as_mut(), T_IN, 10, &inn), (1537, S_OK), "direct: {direct}");
        let mut got = vec![0u8; data.len()];
        m.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, data, "direct: {direct}");
        // A read past the end fails whichever path serves it.
        assert_eq!(request(&m, d.as_mut(), T_IN, 127, &inn).1, S_IOERR, "direct: {direct}");
    }
    std::fs::remove_file(path).unwrap();
}

/// Issue 12, hole 1: an available index beyond the queue's size made the block worker spin
/// at 100% and a reset wait for it for ever. Now the device fails cleanly, a reset ends
/// the worker, and the disk serves again after it.
#[test]
fn a_runaway_available_index_needs_a_reset_and_the_worker_stops() {
    use crate::virtio::testing::a_runaway_index_needs_reset;
    let m = Arc::new(Mem(mem()));
    let line = Arc::new(Line::default());
    let shared = Shared(Arc::new(Mutex::new(disk())));
    let t = MmioTransport::new(
        Box::new(Block::new(Box::new(shared.clone()), "disk0")),
        m.clone(),
        Interrupt::new(line.clone()),
    )
    .unwrap();
    let mut t = a_runaway_index_needs_reset(t, &m, 1, 0, 300);
    let vq = MockSplitQueue::create(&**m, GuestAddress(0x4_0000), 16);
    start(&mut t, &[&vq]);
    m.write_slice(&header(T_IN, 0), GuestAddress(HDR)).unwrap();
    vq.build_desc_chain(&[hdr(), desc(DATA, 512, W), status()]).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the read after the reset", || vq.used().idx().load() == 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
}

/// A disk whose reads wait until the test lets them go: a worker stuck in a request.
struct Stuck {
    disk: MemDisk,
    gate: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
}

impl Disk for Stuck {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let (lock, cv) = &*self.gate;
        let mut state = lock.lock().unwrap();
        state.0 = true; // inside
        cv.notify_all();
        let _open = cv.wait_while(state, |s| !s.1).unwrap();
        self.disk.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.disk.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
}

/// Issue 12, hole 2: every notify put a message on an unbounded channel that the busy
/// worker drained only between batches: a guest notifying in a loop grew the VMM by 16
/// bytes a notify. Now a million notifies cost no memory at all.
#[test]
fn a_notify_storm_while_the_worker_is_busy_costs_no_memory() {
    let m = Arc::new(Mem(mem()));
    let gate = Arc::new((Mutex::new((false, false)), std::sync::Condvar::new()));
    let stuck = Stuck { disk: disk(), gate: gate.clone() };
    let mut t = MmioTransport::new(
        Box::new(Block::new(Box::new(stuck), "d")),
        m.clone(),
        Interrupt::new(Arc::new(Line::default())),
    )
    .unwrap();
    let vq = MockSplitQueue::create(&**m, GuestAddress(0x4_0000), 16);
    start(&mut t, &[&vq]);
    m.write_slice(&header(T_IN, 0), GuestAddress(HDR)).unwrap();
    vq.build_desc_chain(&[hdr(), desc(DATA, 512, W), status()]).unwrap();
    write_reg(&mut t, 0x50, 0);
    let (lock, cv) = &*gate;
    drop(cv.wait_while(lock.lock().unwrap(), |s| !s.0).unwrap());
    let before = crate::testing::allocated_here();
    for _ in 0..1_000_000 {
        write_reg(&mut t, 0x50, 0);
    }
    let grown = crate::testing::allocated_here() - before;
    lock.lock().unwrap().1 = true;
    cv.notify_all();
    wait_for("the stuck read", || vq.used().idx().load() == 1);
    assert!(grown < 4096, "a million notifies allocated {grown} bytes");
}

/// A disk whose every read takes a while (a slow disk).
struct Slow(MemDisk, Arc<std::sync::atomic::AtomicUsize>);

impl Disk for Slow {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}

/// A reset made while requests are in flight waits for the one in hand, not for every
/// request the driver queued (the hostile-driver scenario found a reset waiting for a
/// whole batch: a guest could stall its vCPU, or the VMM's exit, for as long as its
/// queued I/O takes).
#[test]
fn a_reset_waits_for_the_request_in_hand_not_the_whole_ring() {
    let m = Arc::new(Mem(mem()));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let block = Block::new(Box::new(Slow(disk(), reads.clone())), "slow");
    let mut t = MmioTransport::new(Box::new(block), m.clone(), Interrupt::new(Arc::new(Line::default()))).unwrap();
    let vq = MockSplitQueue::create(&**m, GuestAddress(0x4_0000), 64);
    start(&mut t, &[&vq]);
    m.write_slice(&header(T_IN, 0), GuestAddress(HDR)).unwrap();
    use crate::virtio::testing::chained;
    let chains: Vec<RawDescriptor> =
        (0..16u16).flat_map(|i| [chained(HDR, 16, 0, 3 * i + 1), chained(DATA, 512, W, 3 * i + 2), status()]).collect();
    vq.add_desc_chains(&chains, 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the first read", || reads.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // Counted from the reads started when the reset begins, not from the first: on a
    // loaded host the test may see the first read late, when the worker is on a later
    // one. The reset may wait for the one in hand and one the worker was taking.
    let before = reads.load(std::sync::atomic::Ordering::SeqCst);
    let reset = std::time::Instant::now();
    write_reg(&mut t, 0x70, 0);
    let took = reset.elapsed();
    let served = reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(served <= before + 1, "{served} of 16 queued reads served, {before} when the reset began ({took:?})");
}

/// From the adversarial review of issue 12: nothing bounded one request's data, so a
/// chain whose descriptors all named the same buffer could ask for gigabytes, and a
/// reset (or the VMM's exit) waited for all of it. A read or write over what the device
/// advertises (SEG_MAX x SIZE_MAX) is refused, as is a discard or write-zeroes segment
/// over max_discard_sectors / max_write_zeroes_sectors.
#[test]
fn requests_larger_than_advertised_are_refused() {
    let m = crate::virtio::testing::mem(4 << 20);
    let mut d = MemDisk { bytes: vec![0; 512 << 20], ..Default::default() };
    m.write_slice(&header(T_IN, 0), GuestAddress(HDR)).unwrap();
    let vq = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    // The header, 128 writable descriptors of 2 MiB (256 MiB in all), the status.
    let mut table = vec![RawDescriptor::from(Descriptor::new(HDR, 16, next, 1))];
    for i in 0..128u16 {
        table.push(RawDescriptor::from(Descriptor::new(0x20_0000, 2 << 20, W | next, i + 2)));
    }
    table.push(RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)));
    for (i, raw) in (0u16..).zip(&table) {
        vq.desc_table().store(i, *raw).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.pop_descriptor_chain(&m).unwrap();
    let (id, mut bounce) = ([0u8; ID_LEN], vec![0u8; 4096]);
    serve(&m, chain, Context { disk: &mut d, id: &id, bounce: &mut bounce });
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR, "a 256 MiB read");
    let segment = |sectors: u32| {
        let mut s = [0u8; 16];
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s
    };
    let one = [hdr(), desc(DATA, 16, 0), status()];
    let (m, mut d) = (mem(), disk());
    m.write_slice(&segment(MAX_ZEROES_SECTORS + 1), GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_WRITE_ZEROES, 0, &one).1, S_IOERR, "over max_write_zeroes_sectors");
    assert_eq!(request(&m, &mut d, T_DISCARD, 0, &one).1, S_IOERR, "over max_discard_sectors");
}

/// A read of `pieces` writable buffers of 8 bytes each, through an indirect table (which
/// `virtio-queue` follows whether or not it was negotiated): (used length, status).
fn read_in_pieces(m: &GuestMemoryMmap, d: &mut dyn Disk, pieces: u16) -> (u32, u8) {
    const TABLE: u64 = 0x5_0000;
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let mut table = vec![Descriptor::new(HDR, 16, next, 1)];
    for i in 0..pieces {
        table.push(Descriptor::new(DATA + 8 * u64::from(i), 8, W | next, i + 2));
    }
    table.push(Descriptor::new(STATUS, 1, W, 0));
    for (i, entry) in (0u64..).zip(&table) {
        m.write_obj(RawDescriptor::from(*entry), GuestAddress(TABLE + 16 * i)).unwrap();
    }
    m.write_slice(&header(T_IN, 0), GuestAddress(HDR)).unwrap();
    m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(&[desc(TABLE, 16 * table.len() as u32, indirect)]).unwrap();
    let (id, mut bounce) = ([0u8; ID_LEN], vec![0u8; 512]);
    let len = serve(m, chain, Context { disk: d, id: &id, bounce: &mut bounce });
    (len, m.read_obj(GuestAddress(STATUS)).unwrap())
}

/// Hostile chains get the status their request earns, in one walk: too many pieces (more
/// than SEG_MAX, through an indirect table), a header split across descriptors, a
/// status byte in a device-readable descriptor, buffers in the wrong order.
#[test]
fn hostile_chains_get_the_right_status() {
    let (m, mut d) = (mem(), disk());
    // 192 pieces of 8 bytes: 3 sectors, fine.
    assert_eq!(read_in_pieces(&m, &mut d, 192), (1537, S_OK));
    let mut got = vec![0u8; 1536];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, d.bytes[..1536]);
    // 384 pieces: more than a request may have.
    assert_eq!(read_in_pieces(&m, &mut d, 384), (1, S_IOERR));

    // The header in three pieces.
    m.write_slice(&header(T_IN, 2), GuestAddress(HDR)).unwrap();
    let split = [desc(HDR, 3, 0), desc(HDR + 3, 9, 0), desc(HDR + 12, 4, 0), desc(DATA, 512, W), status()];
    let vq = MockSplitQueue::new(&m, 16);
    let (id, mut bounce) = ([0u8; ID_LEN], vec![0u8; 512]);
    let len = serve(&m, vq.build_desc_chain(&split).unwrap(), Context { disk: &mut d, id: &id, bounce: &mut bounce });
    assert_eq!((len, m.read_obj::<u8>(GuestAddress(STATUS)).unwrap()), (513, S_OK));
    let mut got = [0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got[..], d.bytes[1024..1536]);

    // The status descriptor is device-readable: the last writable byte (the data's) takes
    // the status, and 511 bytes of data are not whole sectors.
    let before = d.clone();
    let readable_status = [hdr(), desc(DATA, 512, W), desc(STATUS, 1, 0)];
    m.write_obj(0xeeu8, GuestAddress(DATA + 511)).unwrap();
    assert_eq!(request(&m, &mut d, T_IN, 0, &readable_status).0, 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), S_IOERR);
    // A write whose only writable byte is the status, placed first: served as the
    // device-readable and device-writable streams say.
    m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&m, &mut d, T_OUT, 4, &[status(), hdr(), desc(DATA, 512, 0)]), (1, S_OK));
    assert_eq!(d.bytes[2048..2560], [0x5a; 512]);
    assert_eq!(d.bytes[..2048], before.bytes[..2048]);
    // A sector past the end, and one so large the byte offset overflows.
    let read = [hdr(), desc(DATA, 512, W), status()];
    assert_eq!(request(&m, &mut d, T_IN, 128, &read), (1, S_IOERR));
    assert_eq!(request(&m, &mut d, T_OUT, u64::MAX, &[hdr(), desc(DATA, 512, 0), status()]), (1, S_IOERR));
    // A zero-length descriptor outside guest memory is no buffer at all.
    assert_eq!(request(&m, &mut d, T_FLUSH, 0, &[hdr(), desc(u64::MAX - 8, 0, W), status()]), (1, S_OK));
}
