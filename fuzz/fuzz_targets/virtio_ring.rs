//! Every device's virtqueue chain handling, on rings the fuzzer lays out in guest memory:
//! the descriptor table (and indirect tables), the available ring with its index, flags
//! and used event, the queue size, the device's start positions (next_avail, next_used)
//! and EVENT_IDX. One input drives one consumer through the real code, synchronously:
//! - virtio-blk: `drain_queue`/`next_chain` with `block::request::serve` on a `MemDisk`;
//! - virtio-console: the transmit side's `console::collect`, the receive side's `write_chain`;
//! - virtio-net: `net::gather` (the transmit copy), `net::capacity` then `write_chain` (a
//!   received frame), and `GuestIovecs::from_chain` (the zero-copy paths);
//! - virtio-rng: an `Rng` activated with the queue and notified.
//!
//! Oracles: no panic; every input returns within libFuzzer's -timeout; the heap grows by
//! at most [`BOUND`] (checked after every chain and at the end). When the layout is
//! well-formed enough for the spec to say what must happen (no device-writable buffer
//! overlaps a ring or table the device reads, so the device cannot rewrite its own work):
//! - an available index more than a queue ahead of next_avail sets DEVICE_NEEDS_RESET, and
//!   nothing is used or written;
//! - otherwise the chains are used in order, each used entry naming the head the driver
//!   offered, until the first head that is not a descriptor of the queue (which sets
//!   DEVICE_NEEDS_RESET); no used length exceeds the chain's writable bytes;
//! - no byte of guest memory changes outside the used ring and the used chains'
//!   device-writable buffers;
//! - the used-buffer interrupt is raised whenever the driver asked for it (always without
//!   EVENT_IDX; with it, when the used index passed the used event);
//! - per device, what a reference model of the spec says: block statuses, used lengths, data
//!   read and written, and a disk that never changes outside a valid write's sectors (a
//!   request past the capacity never changes it); console and net copies hold exactly the
//!   chain's bytes; receive capacity never exceeds the writable bytes; iovecs lie inside the
//!   guest's mappings and add up to the chain's bytes.

#![no_main]

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use devices::virtio::block::disk::MemDisk;
use devices::virtio::block::request::{
    self, Context, ID_LEN, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use devices::virtio::iovec::{GuestIovecs, MAX_IOVECS};
use devices::virtio::rng::{Rng, MAX_PER_CHAIN};
use devices::virtio::testing::Line;
use devices::virtio::{console, drain_queue, net, write_chain, Activation, Interrupt, VirtioDevice};
use guest_memory::GuestMemoryMmap;
use hvrun_fuzz::layout::{self, le16, DescIn, Offer, RingIn, Rings, Space};
use hvrun_fuzz::ring::{self, walk, Chain, Desc, Span};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The descriptor table (at most 256 entries).
const DESC: u64 = 0x0000;
/// The available ring.
const AVAIL: u64 = 0x1000;
/// The used ring.
const USED: u64 = 0x2000;
/// Where indirect tables go: 512 descriptors.
const TABLES: u64 = 0x3000;
const TABLE_ENTRIES: u64 = 512;
/// Buffers, across the boundary of the two regions.
const DATA: u64 = 0x5000;
/// The end of the first region and the start of the second (separate host mappings).
const SPLIT: u64 = 0x1_0000;
/// The end of guest memory.
const END: u64 = 0x2_0000;
const REGIONS: [(u64, usize); 2] = [(0, SPLIT as usize), (SPLIT, (END - SPLIT) as usize)];

/// How much the heap may grow over an input. The target's own copies of guest memory (two
/// of 128 KiB) and of the disk (at most 32.5 KiB, twice), the block bounce buffer (at most
/// 64 KiB here), the console copy (at most 64 KiB a chain), the net frame buffer (64 KiB and
/// change), the rng's 4 KiB, iovec lists (at most 256 pieces) and the `Reader`/`Writer`
/// slice lists of one chain (a descriptor each, 8192 at most in 128 KiB) come to under
/// 1 MiB; 4 MiB leaves room for the allocator's rounding, and anything that grows with
/// the number of chains or descriptors the guest offers would blow through it.
const BOUND: usize = 4 << 20;

#[derive(Arbitrary, Debug)]
enum Consumer {
    Block { sectors: u8, tail: u16, read_only: bool, bounce: u16 },
    Rng { source: Vec<u8>, fails: bool },
    ConsoleTx,
    ConsoleRx { input: Vec<u8> },
    NetTx,
    NetRx { frame: u32 },
    Iovecs { writable: bool, skip: u16, limit: u32, truncate: u32, advance: u32 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    ring: RingIn,
    event_idx: bool,
    /// The indirect-table area.
    indirect: Vec<DescIn>,
    consumer: Consumer,
}

const SPACE: Space = Space { tables: TABLES, table_entries: TABLE_ENTRIES, data: DATA, split: SPLIT, end: END };
const RINGS: Rings = Rings { desc: DESC, avail: AVAIL, used: USED };

/// An entropy source: the fuzzer's bytes, repeated, or followed by an error.
struct Source {
    bytes: Vec<u8>,
    at: usize,
    fails: bool,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes.is_empty() {
            if self.fails {
                return Err(std::io::Error::other("the entropy source failed"));
            }
            buf.fill(0x5a);
            return Ok(buf.len());
        }
        if self.at == self.bytes.len() {
            if self.fails {
                return Err(std::io::Error::other("the entropy source ran dry"));
            }
            self.at = 0;
        }
        let n = buf.len().min(self.bytes.len() - self.at);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fuzz_target!(|input: Input| {
    let start = hvrun_fuzz::live_bytes();
    run(&input, start);
    hvrun_fuzz::assert_bounded(start, BOUND, "virtio_ring");
});

fn run(input: &Input, start: isize) {
    let r = &input.ring;
    let size = layout::size_of(r);
    let mem = ring::guest_memory(&REGIONS);
    let m: &GuestMemoryMmap = &mem.0;
    layout::lay_tables(m, &SPACE, &input.indirect);
    let mut queue = layout::lay_ring(m, &SPACE, &RINGS, r, input.event_idx);
    let offered = layout::offer(m, &RINGS, size, r.next_avail, &[]);
    ring::snapshot(m, &REGIONS);
    let line = Arc::new(Line::default());
    let interrupt = Interrupt::new(line.clone());
    let clean = offered.clean;

    match &input.consumer {
        Consumer::Rng { source, fails } => {
            let source = Source { bytes: source.clone(), at: 0, fails: *fails };
            let mut rng = Rng::new(Box::new(source));
            let activation = Activation {
                memory: mem.clone(),
                queues: vec![queue],
                acked_features: 0,
                interrupt: interrupt.clone(),
            };
            rng.activate(activation).expect("an rng takes one queue");
            rng.queue_notify(0);
            drop(rng);
            if clean {
                check_rng(m, &offered, input);
            }
        }
        consumer => {
            let mut serve = Serve::new(consumer, clean);
            drain_queue("fuzz", &mut queue, m, &interrupt, |chain| {
                let len = serve.chain(m, size, chain);
                hvrun_fuzz::assert_bounded(start, BOUND, "virtio_ring, after a chain");
                len
            });
            if clean && !interrupt.needs_reset() {
                assert_eq!(queue.next_avail(), le16(m, AVAIL + 2), "every chain offered was taken");
            }
        }
    }

    if !clean {
        return;
    }
    let used_now = le16(m, USED + 2);
    let entries = layout::used_entries(m, &RINGS, &offered, r.next_used, "virtio_ring");
    let used = entries.len() as u16;
    let Some(heads) = &offered.heads else {
        assert!(interrupt.needs_reset(), "an available index more than {size} ahead needs a reset");
        ring::assert_written_only(m, &[], "a runaway ring");
        return;
    };
    let first_bad = offered.first_bad();
    assert_eq!(interrupt.needs_reset(), first_bad.is_some(), "DEVICE_NEEDS_RESET iff a head is not a descriptor");
    assert_eq!(usize::from(used), first_bad.unwrap_or(heads.len()), "chains used in order up to the first bad head");
    let mut allowed: Vec<Span> = vec![RINGS.used_span(size)];
    allowed.extend(offered.writable(entries.len()));
    ring::assert_written_only(m, &allowed, "virtio_ring");
    if used > 0 {
        let asked = !input.event_idx || used_now.wrapping_sub(r.used_event).wrapping_sub(1) < used;
        if asked {
            assert!(interrupt.status() & 1 != 0 && line.high(), "the driver asked for an interrupt and got none");
        }
    }
}

/// The rng wrote the source's bytes into each chain's leading writable buffers, 4 KiB at a
/// time, at most 64 KiB a chain, stopping at a readable buffer, one outside memory, or a
/// source that failed (which then fails every later read).
fn check_rng(m: &GuestMemoryMmap, offered: &Offer, input: &Input) {
    let Consumer::Rng { source, fails } = &input.consumer else { unreachable!() };
    let Some(heads) = &offered.heads else { return };
    let used = le16(m, USED + 2).wrapping_sub(input.ring.next_used);
    let used_chains = &offered.chains[..usize::from(used).min(offered.chains.len())];
    let exact =
        ring::disjoint(used_chains.iter().flat_map(|c| c.descs.iter().filter(|d| d.writable()).map(Desc::span)));
    let mut at = 0usize;
    for (k, chain) in used_chains.iter().enumerate() {
        let slot = USED + 4 + 8 * u64::from(input.ring.next_used.wrapping_add(k as u16) % offered.size);
        let len = m.read_obj::<u32>(GuestAddress(slot + 4)).unwrap() as usize;
        let mut expect = 0usize;
        'chain: for d in chain.descs.iter() {
            if !d.writable() {
                break;
            }
            let mut left = (d.len as usize).min(MAX_PER_CHAIN - expect);
            let mut addr = d.addr;
            while left > 0 {
                let n = left.min(4096);
                let bytes: Vec<u8> = match (source.is_empty(), *fails) {
                    (true, false) => vec![0x5a; n],
                    (false, false) => (0..n).map(|i| source[(at + i) % source.len()]).collect(),
                    (_, true) if at + n > source.len() => {
                        at = source.len();
                        break 'chain;
                    }
                    (_, true) => source[at..at + n].to_vec(),
                };
                at += n;
                if !source.is_empty() && !*fails {
                    at %= source.len();
                }
                if !m.check_range(GuestAddress(addr), n) {
                    break 'chain;
                }
                if exact {
                    let mut got = vec![0u8; n];
                    m.read_slice(&mut got, GuestAddress(addr)).unwrap();
                    assert_eq!(got, bytes, "the rng wrote the source's bytes");
                }
                expect += n;
                left -= n;
                addr += n as u64;
            }
            if expect >= MAX_PER_CHAIN {
                break;
            }
        }
        assert_eq!(len, expect, "rng chain {k} (head {}): used length", heads[k]);
    }
}

/// Serves chains for the consumers that run under the target's own `drain_queue`.
struct Serve<'c> {
    consumer: &'c Consumer,
    clean: bool,
    disk: MemDisk,
    bounce: Vec<u8>,
    id: [u8; ID_LEN],
    out: VecDeque<u8>,
    frame: Vec<u8>,
}

impl<'c> Serve<'c> {
    fn new(consumer: &'c Consumer, clean: bool) -> Self {
        let (mut disk, mut bounce, mut frame) = (MemDisk::default(), Vec::new(), Vec::new());
        match *consumer {
            Consumer::Block { sectors, tail, read_only, bounce: b } => {
                let len = 512 * usize::from(sectors % 65) + usize::from(tail % 513);
                disk = MemDisk { bytes: (0..len).map(|i| (i % 251) as u8).collect(), read_only, flushes: 0 };
                bounce = vec![0; 1 + usize::from(b)];
            }
            Consumer::NetTx => frame = vec![0; net::MAX_FRAME],
            Consumer::NetRx { frame: len } => {
                frame = (0..(len as usize % (net::MAX_FRAME + 1))).map(|i| (i % 253) as u8).collect()
            }
            _ => {}
        }
        Serve { consumer, clean, disk, bounce, id: *b"hvrun-fuzz-disk-0123", out: VecDeque::new(), frame }
    }

    fn chain(&mut self, m: &GuestMemoryMmap, size: u16, chain: devices::virtio::Chain<'_>) -> u32 {
        let walked = walk(m, DESC, size, chain.head_index());
        let exact = self.clean && walked.writes_disjoint();
        match self.consumer {
            Consumer::Block { .. } => {
                let model = exact.then(|| BlockModel::before(m, &walked, &self.disk));
                let ctx = Context { disk: &mut self.disk, id: &self.id, bounce: &mut self.bounce };
                let len = request::serve(m, chain, ctx);
                if let Some(model) = model {
                    model.check(m, &walked, &self.disk, &self.id, len);
                }
                len
            }
            Consumer::ConsoleTx => {
                self.out.clear();
                console::collect(m, chain, &mut self.out);
                assert!(self.out.len() <= console::MAX_CHAIN_OUTPUT);
                if self.clean {
                    let (expect, whole) = readable_prefix(m, &walked);
                    let out = self.out.make_contiguous();
                    assert!(expect.starts_with(out), "collect took bytes the chain does not hold");
                    if whole {
                        assert_eq!(out.len(), expect.len().min(console::MAX_CHAIN_OUTPUT), "collect took it all");
                    }
                }
                0
            }
            Consumer::ConsoleRx { input } => {
                let n = write_chain("fuzz", m, chain, input);
                assert!(n <= input.len() && n as u64 <= walked.leading_writable_bytes());
                if exact {
                    let got = leading_written(m, &walked, n);
                    assert_eq!(got, input[..n], "write_chain put the input in the buffers");
                }
                n as u32
            }
            Consumer::NetTx => {
                let iov = GuestIovecs::from_chain(m, chain.clone(), false, 12, net::MAX_FRAME - 12);
                check_iovecs(m, &walked, false, 12, net::MAX_FRAME - 12, iov.as_ref());
                let got = net::gather(m, chain, &mut self.frame);
                if self.clean {
                    let all_readable = walked.descs.iter().all(|d| !d.writable());
                    let total: u64 = walked.descs.iter().map(|d| u64::from(d.len)).sum();
                    let bytes = ring::contents(m, &walked.descs, net::MAX_FRAME);
                    let fits = total <= net::MAX_FRAME as u64 && total >= 12;
                    match got {
                        Some(len) => {
                            assert!(all_readable && fits && bytes.is_some(), "gather took a chain it must drop");
                            assert_eq!(&self.frame[..len], &bytes.unwrap()[..], "gather copied the chain");
                        }
                        None => assert!(!(all_readable && fits && bytes.is_some()), "gather dropped a good chain"),
                    }
                }
                0
            }
            Consumer::NetRx { .. } => {
                let room = net::capacity(m, &chain);
                let iov = GuestIovecs::from_chain(m, chain.clone(), true, 0, usize::MAX);
                check_iovecs(m, &walked, true, 0, usize::MAX, iov.as_ref());
                let mut expect = 0u64;
                for d in walked.descs.iter().take_while(|d| d.writable()) {
                    if !m.check_range(GuestAddress(d.addr), d.len as usize) {
                        break;
                    }
                    expect += u64::from(d.len);
                }
                assert_eq!(room as u64, expect, "capacity counts the leading writable buffers in memory");
                if room < self.frame.len() || room == 0 {
                    return 0;
                }
                let n = write_chain("fuzz", m, chain, &self.frame);
                assert_eq!(n, self.frame.len(), "a frame within the capacity fits");
                if exact {
                    assert_eq!(leading_written(m, &walked, n), self.frame, "the frame is in the buffers");
                }
                n as u32
            }
            Consumer::Iovecs { writable, skip, limit, truncate, advance } => {
                let (skip, limit) = (usize::from(*skip), *limit as usize);
                let mut iov = GuestIovecs::from_chain(m, chain, *writable, skip, limit);
                check_iovecs(m, &walked, *writable, skip, limit, iov.as_ref());
                if let Some(iov) = iov.as_mut() {
                    let len = iov.len();
                    iov.truncate(*truncate as usize);
                    assert_eq!(iov.len(), len.min(*truncate as usize));
                    let len = iov.len();
                    iov.advance(*advance as usize);
                    assert_eq!(iov.len(), len - len.min(*advance as usize));
                    let sum: usize = iov.iovecs().iter().map(|v| v.iov_len).sum();
                    assert_eq!(sum, iov.len(), "the pieces add up after truncate and advance");
                    assert!(iov.iovecs().iter().all(|v| v.iov_len > 0), "no empty piece");
                    assert_inside(m, iov);
                }
                0
            }
            Consumer::Rng { .. } => unreachable!("the rng serves its own queue"),
        }
    }
}

/// The chain's leading device-readable bytes as far as they are in memory, and whether
/// all of them were.
fn readable_prefix(m: &GuestMemoryMmap, chain: &Chain) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    for d in chain.descs.iter().take_while(|d| !d.writable()) {
        if out.len() >= console::MAX_CHAIN_OUTPUT {
            break;
        }
        let len = (d.len as usize).min(console::MAX_CHAIN_OUTPUT - out.len());
        let at = out.len();
        out.resize(at + len, 0);
        if m.read_slice(&mut out[at..], GuestAddress(d.addr)).is_err() {
            // Keep what can be read of it, a byte at a time is too slow: by page.
            out.truncate(at);
            let mut addr = d.addr;
            let mut left = len;
            while left > 0 {
                let n = left.min(4096);
                let mut piece = vec![0u8; n];
                if m.read_slice(&mut piece, GuestAddress(addr)).is_err() {
                    break;
                }
                out.extend(piece);
                addr += n as u64;
                left -= n;
            }
            return (out, false);
        }
    }
    (out, true)
}

/// The first `n` bytes of the chain's leading writable buffers, as they are now.
fn leading_written(m: &GuestMemoryMmap, chain: &Chain, n: usize) -> Vec<u8> {
    written_prefix(m, chain.descs.iter().take_while(|d| d.writable()), n)
}

/// The first `n` bytes of all the chain's writable buffers (the data before a status).
fn leading_written_all(m: &GuestMemoryMmap, chain: &Chain, n: usize) -> Vec<u8> {
    written_prefix(m, chain.descs.iter().filter(|d| d.writable()), n)
}

/// The first `n` bytes of the buffers `descs` (all in guest memory), as they are now.
fn written_prefix<'a>(m: &GuestMemoryMmap, descs: impl Iterator<Item = &'a Desc>, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for d in descs {
        let take = (d.len as usize).min(n - out.len());
        let at = out.len();
        out.resize(at + take, 0);
        m.read_slice(&mut out[at..], GuestAddress(d.addr)).expect("written, so in memory");
        if out.len() == n {
            break;
        }
    }
    out
}

/// Every piece lies inside one of the guest's host mappings.
fn assert_inside(m: &GuestMemoryMmap, iov: &GuestIovecs<'_>) {
    let maps: Vec<(usize, usize)> =
        REGIONS.iter().map(|&(start, len)| (m.get_host_address(GuestAddress(start)).unwrap() as usize, len)).collect();
    for v in iov.iovecs() {
        let (base, len) = (v.iov_base as usize, v.iov_len);
        assert!(
            maps.iter().any(|&(host, size)| base >= host && base + len <= host + size),
            "an iovec of {len} bytes at {base:#x} lies outside guest memory"
        );
    }
}

/// `GuestIovecs::from_chain` against the chain: when it gives iovecs they lie in guest
/// memory, number at most MAX_IOVECS, have no empty piece, and add up to the chain's
/// bytes in that direction less `skip`, within `limit`; it refuses a readable buffer after
/// a writable one and a skip past the end.
fn check_iovecs(
    m: &GuestMemoryMmap,
    chain: &Chain,
    writable: bool,
    skip: usize,
    limit: usize,
    iov: Option<&GuestIovecs<'_>>,
) {
    let Some(iov) = iov else { return };
    assert!(iov.iovecs().len() <= MAX_IOVECS);
    assert!(iov.len() <= limit);
    let sum: usize = iov.iovecs().iter().map(|v| v.iov_len).sum();
    assert_eq!(sum, iov.len());
    assert!(iov.iovecs().iter().all(|v| v.iov_len > 0), "no empty piece");
    assert_inside(m, iov);
    let total: u64 = chain.descs.iter().filter(|d| d.writable() == writable).map(|d| u64::from(d.len)).sum();
    assert_eq!(iov.len() as u64, total - skip as u64, "the chain's bytes less the skip");
    let first_writable = chain.descs.iter().position(Desc::writable).unwrap_or(chain.descs.len());
    assert!(chain.descs[first_writable..].iter().all(Desc::writable), "a readable buffer after a writable one");
}

/// What serving a block request must do, from the chain and the disk before it.
struct BlockModel {
    disk: Vec<u8>,
    /// `None` when the chain has a buffer outside memory, or nowhere for a status.
    request: Option<Request>,
}

struct Request {
    /// The header (16 bytes when the chain has them).
    header: Vec<u8>,
    /// What follows it: the payload, when it could fit on the disk at all.
    payload: Option<Vec<u8>>,
    payload_len: u64,
    /// Writable bytes, the status byte included.
    writable: u64,
    /// The status byte's guest address.
    status_at: u64,
}

impl BlockModel {
    fn before(m: &GuestMemoryMmap, chain: &Chain, disk: &MemDisk) -> Self {
        let readable: Vec<Desc> = chain.descs.iter().filter(|d| !d.writable()).copied().collect();
        let writable: Vec<Desc> = chain.descs.iter().filter(|d| d.writable()).copied().collect();
        let in_memory = |d: &Desc| m.check_range(GuestAddress(d.addr), d.len as usize);
        let total: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
        let status_at = writable.iter().rev().find(|d| d.len > 0).map(|d| d.addr.wrapping_add(u64::from(d.len) - 1));
        let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        // The header and what could be written: a payload that fits the disk, or a segment.
        let cap = 32 + disk.bytes.len();
        let request = match status_at {
            Some(status_at) if readable.iter().all(in_memory) && writable.iter().all(in_memory) => {
                let header = first_bytes(m, &readable, 16);
                let payload = ring::contents(m, &readable, cap).map(|b| b[b.len().min(16)..].to_vec());
                let payload_len = readable_len.saturating_sub(16);
                Some(Request { header, payload, payload_len, writable: total, status_at })
            }
            _ => None,
        };
        BlockModel { disk: disk.bytes.clone(), request }
    }

    fn check(self, m: &GuestMemoryMmap, chain: &Chain, disk: &MemDisk, id: &[u8; ID_LEN], len: u32) {
        let Some(req) = self.request else {
            assert_eq!(len, 0, "a request that cannot be served is used with no status");
            assert!(disk.bytes == self.disk, "a request that cannot be served changed the disk");
            return;
        };
        let status = m.read_obj::<u8>(GuestAddress(req.status_at)).unwrap();
        let data = req.writable - 1;
        let capacity = self.disk.len() as u64;
        let in_bounds = |sector: u64, bytes: u64| {
            sector.checked_mul(SECTOR_SIZE).and_then(|s| s.checked_add(bytes)).is_some_and(|e| e <= capacity)
        };
        // (status, used length, disk range that changed and to what).
        let unchanged = |status: u8| (status, 1u64, None::<(u64, Vec<u8>)>);
        let (want, want_len, change) = if req.header.len() < 16 {
            unchanged(S_IOERR)
        } else {
            let kind = u32::from_le_bytes(req.header[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(req.header[8..16].try_into().unwrap());
            let fits = req.payload_len % SECTOR_SIZE == 0 && in_bounds(sector, req.payload_len);
            match kind {
                T_IN if data % SECTOR_SIZE == 0 && in_bounds(sector, data) => {
                    let from = (sector * SECTOR_SIZE) as usize;
                    let got = leading_written_all(m, chain, data as usize);
                    assert_eq!(got, self.disk[from..from + data as usize], "a read returned the disk's bytes");
                    (S_OK, data + 1, None)
                }
                T_IN => unchanged(S_IOERR),
                T_OUT if disk.read_only => unchanged(S_IOERR),
                T_OUT if fits => {
                    let payload = req.payload.expect("a payload that fits on the disk was read");
                    (S_OK, 1, Some((sector * SECTOR_SIZE, payload)))
                }
                T_OUT => unchanged(S_IOERR),
                T_FLUSH => unchanged(S_OK),
                T_GET_ID => {
                    let n = (data as usize).min(ID_LEN);
                    assert_eq!(leading_written_all(m, chain, n), id[..n], "GET_ID wrote the ID");
                    (S_OK, n as u64 + 1, None)
                }
                T_DISCARD | T_WRITE_ZEROES if disk.read_only => unchanged(S_IOERR),
                T_DISCARD | T_WRITE_ZEROES if req.payload_len != 16 => unchanged(S_UNSUPP),
                T_DISCARD | T_WRITE_ZEROES => {
                    let payload = req.payload.expect("a 16-byte segment was read");
                    let start = u64::from_le_bytes(payload[0..8].try_into().unwrap());
                    let sectors = u64::from(u32::from_le_bytes(payload[8..12].try_into().unwrap()));
                    let flags = u32::from_le_bytes(payload[12..16].try_into().unwrap());
                    let allowed = if kind == T_DISCARD { 0 } else { 1 };
                    if flags & !allowed != 0 {
                        unchanged(S_UNSUPP)
                    } else if !in_bounds(start, sectors * SECTOR_SIZE) {
                        unchanged(S_IOERR)
                    } else {
                        (S_OK, 1, Some((start * SECTOR_SIZE, vec![0; (sectors * SECTOR_SIZE) as usize])))
                    }
                }
                _ => unchanged(S_UNSUPP),
            }
        };
        assert_eq!(status, want, "block status");
        assert_eq!(u64::from(len), want_len, "block used length");
        let mut expect = self.disk;
        if let Some((at, bytes)) = change {
            expect[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        if disk.bytes != expect {
            let at = disk.bytes.iter().zip(&expect).position(|(a, b)| a != b).unwrap();
            panic!("the disk changed at byte {at} where the request may not change it (capacity {capacity})");
        }
    }
}

/// The first `n` bytes of `descs`' buffers (all in memory), or fewer if they hold fewer.
fn first_bytes(m: &GuestMemoryMmap, descs: &[Desc], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for d in descs {
        let take = (d.len as usize).min(n - out.len());
        let at = out.len();
        out.resize(at + take, 0);
        m.read_slice(&mut out[at..], GuestAddress(d.addr)).expect("checked to be in memory");
        if out.len() == n {
            break;
        }
    }
    out
}
