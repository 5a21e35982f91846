//! Virtqueues the fuzzer lays out in guest memory (descriptor tables, indirect tables,
//! available rings, buffers with what the driver put in them), and what the spec lets
//! a device do with them: the chains it may take, whether the layout keeps the device
//! from rewriting its own work, and the checks of the used ring.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::ring::{overlap, walk, Chain, Desc, Span, INDIRECT, NEXT, WRITE};
use guest_memory::GuestMemoryMmap;

/// Where things go in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// The indirect-table area and how many descriptors it holds.
    pub tables: u64,
    /// Descriptors in the indirect-table area.
    pub table_entries: u64,
    /// The buffer area, up to the end of guest memory.
    pub data: u64,
    /// Where the first region ends and the second begins (separate host mappings).
    pub split: u64,
    /// The end of guest memory.
    pub end: u64,
}

/// A queue's rings.
#[derive(Debug, Clone, Copy)]
pub struct Rings {
    /// The descriptor table (room for 256).
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
}

impl Rings {
    /// What the device only reads, and the used ring, for a queue of `size`.
    pub fn spans(&self, size: u16) -> [Span; 3] {
        let size = u64::from(size);
        [(self.desc, self.desc + 16 * size), (self.avail, self.avail + 6 + 2 * size), self.used_span(size as u16)]
    }

    /// The used ring of a queue of `size`, its avail event included.
    pub fn used_span(&self, size: u16) -> Span {
        (self.used, self.used + 6 + 8 * u64::from(size))
    }
}

/// A buffer's guest address.
#[derive(Arbitrary, Debug)]
pub enum Addr {
    /// In the buffer area.
    Data(u32),
    /// `n` bytes before the boundary between the two regions.
    Straddle(u8),
    /// `n` bytes before the end of guest memory.
    End(u8),
    /// Over an indirect table (the device may rewrite its own descriptors).
    Table(u16),
    /// Anything.
    Raw(u64),
}

impl Addr {
    /// The address in `space`.
    pub fn get(&self, space: &Space) -> u64 {
        match *self {
            Addr::Data(off) => space.data + u64::from(off) % (space.end - space.data),
            Addr::Straddle(n) => space.split - u64::from(n),
            Addr::End(n) => space.end - u64::from(n),
            Addr::Table(i) => space.tables + 16 * (u64::from(i) % space.table_entries),
            Addr::Raw(a) => a,
        }
    }
}

/// A buffer's length.
#[derive(Arbitrary, Debug)]
pub enum Len {
    /// Up to 255.
    Small(u8),
    /// Whole sectors, up to 64.
    Sectors(u8),
    /// Up to 64 KiB.
    Medium(u16),
    /// Anything.
    Raw(u32),
}

impl Len {
    /// The length.
    pub fn get(&self) -> u32 {
        match *self {
            Len::Small(n) => u32::from(n),
            Len::Sectors(n) => 512 * u32::from(n % 65),
            Len::Medium(n) => u32::from(n),
            Len::Raw(n) => n,
        }
    }
}

/// Where a descriptor's chain goes on.
#[derive(Arbitrary, Debug)]
pub enum Link {
    /// Nowhere.
    End,
    /// The descriptor after this one in its table.
    Next,
    /// Descriptor `n`.
    To(u16),
}

/// A virtio-blk sector.
#[derive(Arbitrary, Debug)]
pub enum Sector {
    /// A small one.
    Near(u8),
    /// Anything.
    Raw(u64),
}

impl Sector {
    /// The sector.
    pub fn get(&self) -> u64 {
        match *self {
            Sector::Near(n) => u64::from(n),
            Sector::Raw(n) => n,
        }
    }
}

/// The virtio-blk request type for `kind`: mostly one the device knows.
pub fn block_kind(kind: u8) -> u32 {
    [0, 1, 4, 8, 11, 13].get(usize::from(kind % 8)).copied().unwrap_or(u32::from(kind))
}

/// A descriptor, with what the driver put in its buffer.
#[derive(Arbitrary, Debug)]
pub enum DescIn {
    /// A buffer.
    Buf {
        /// Where.
        addr: Addr,
        /// How long.
        len: Len,
        /// Device-writable.
        write: bool,
        /// What follows.
        link: Link,
        /// Its first bytes.
        fill: Vec<u8>,
    },
    /// A device-readable virtio-blk request header.
    Header {
        /// Where.
        at: Addr,
        /// The request type ([`block_kind`]).
        kind: u8,
        /// The sector.
        sector: Sector,
        /// What follows.
        link: Link,
    },
    /// A device-readable discard / write-zeroes segment.
    Segment {
        /// Where.
        at: Addr,
        /// The first sector.
        start: Sector,
        /// How many.
        sectors: u16,
        /// Its flags.
        flags: u8,
        /// What follows.
        link: Link,
    },
    /// An indirect table in the table area.
    Indirect {
        /// Its first entry there.
        first: u16,
        /// Its entries.
        count: u16,
        /// What follows (a driver must not, the spec says).
        link: Link,
    },
    /// Anything.
    Raw {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
        /// Flags.
        flags: u16,
        /// Next.
        next: u16,
    },
}

/// A well-formed chain laid in consecutive table entries from `slot`, so the fuzzer
/// starts from what a driver would post.
#[derive(Arbitrary, Debug)]
pub enum Template {
    /// A virtio-blk request: header, data buffers (device-writable for IN and GET_ID,
    /// or the other way round with `flip`), status byte.
    Block {
        /// The first entry.
        slot: u8,
        /// Where the header goes.
        header: Addr,
        /// The request type ([`block_kind`]).
        kind: u8,
        /// The sector.
        sector: Sector,
        /// The data buffers (at most 4).
        data: Vec<(Addr, Len)>,
        /// Data buffers the wrong way round.
        flip: bool,
        /// Where the status byte goes.
        status: Addr,
    },
    /// Buffers all device-readable (a frame, console output) or all device-writable.
    Buffers {
        /// The first entry.
        slot: u8,
        /// The buffers (at most 8) and what the first bytes of each hold.
        parts: Vec<(Addr, Len, Vec<u8>)>,
        /// Device-writable.
        write: bool,
    },
}

/// How far the available index is ahead of the device.
#[derive(Arbitrary, Debug)]
pub enum Ahead {
    /// That many chains (at most a queue).
    Chains(u8),
    /// The available index, as the driver wrote it (it may run away).
    Index(u16),
}

/// One queue as the driver sets it up.
#[derive(Arbitrary, Debug)]
pub struct RingIn {
    /// The queue holds 2^(this % 9) entries.
    pub size_log2: u8,
    /// Where the device starts taking chains.
    pub next_avail: u16,
    /// Where the device starts using them.
    pub next_used: u16,
    /// The available index.
    pub ahead: Ahead,
    /// The available ring's flags.
    pub avail_flags: u16,
    /// The used event (EVENT_IDX).
    pub used_event: u16,
    /// The heads in the ring, taken modulo the size, cycled; none: 0, 1, 2...
    pub heads: Vec<u8>,
    /// One entry of the ring (modulo the chains offered) with any value.
    pub bad_head: Option<(u8, u16)>,
    /// The descriptor table from entry 0.
    pub table: Vec<DescIn>,
    /// Chains laid over it.
    pub templates: Vec<Template>,
}

/// Writes `d` as descriptor `index` of the table at `table`, with its buffer's contents.
pub fn lay(mem: &GuestMemoryMmap, space: &Space, table: u64, index: u16, d: &DescIn) {
    let next_of = |link: &Link| match *link {
        Link::End => (0, 0),
        Link::Next => (NEXT, index.wrapping_add(1)),
        Link::To(to) => (NEXT, to),
    };
    let (desc, contents): (Desc, Vec<u8>) = match d {
        DescIn::Buf { addr, len, write, link, fill } => {
            let (flag, next) = next_of(link);
            let flags = flag | if *write { WRITE } else { 0 };
            let len = len.get();
            (Desc { addr: addr.get(space), len, flags, next }, fill[..fill.len().min(len as usize)].to_vec())
        }
        DescIn::Header { at, kind, sector, link } => {
            let (flags, next) = next_of(link);
            let header = devices::virtio::block::request::header(block_kind(*kind), sector.get());
            (Desc { addr: at.get(space), len: 16, flags, next }, header.to_vec())
        }
        DescIn::Segment { at, start, sectors, flags: seg_flags, link } => {
            let (flags, next) = next_of(link);
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&start.get().to_le_bytes());
            seg[8..12].copy_from_slice(&u32::from(*sectors).to_le_bytes());
            seg[12..16].copy_from_slice(&u32::from(*seg_flags).to_le_bytes());
            (Desc { addr: at.get(space), len: 16, flags, next }, seg.to_vec())
        }
        DescIn::Indirect { first, count, link } => {
            let (flags, next) = next_of(link);
            let first = u64::from(*first) % space.table_entries;
            let count = u64::from(*count) % (space.table_entries - first + 1);
            let addr = space.tables + 16 * first;
            (Desc { addr, len: 16 * count as u32, flags: flags | INDIRECT, next }, Vec::new())
        }
        DescIn::Raw { addr, len, flags, next } => {
            (Desc { addr: *addr, len: *len, flags: *flags, next: *next }, Vec::new())
        }
    };
    let _ = mem.write_slice(&contents, GuestAddress(desc.addr));
    let _ = mem.write_slice(&desc.bytes(), GuestAddress(table + 16 * u64::from(index)));
}

/// Lays the indirect-table area's descriptors.
pub fn lay_tables(mem: &GuestMemoryMmap, space: &Space, descs: &[DescIn]) {
    for (i, d) in descs.iter().take(space.table_entries as usize).enumerate() {
        lay(mem, space, space.tables, i as u16, d);
    }
}

/// Lays `t` in the descriptor table at `table` of a queue of `size`.
pub fn lay_template(mem: &GuestMemoryMmap, space: &Space, table: u64, size: u16, t: &Template) {
    let (slot, mut descs) = match t {
        Template::Block { slot, header, kind, sector, data, flip, status } => {
            let kind = block_kind(*kind);
            let at = header.get(space);
            let _ = mem.write_slice(&devices::virtio::block::request::header(kind, sector.get()), GuestAddress(at));
            let write = if matches!(kind, 0 | 8) { WRITE } else { 0 };
            let write = if *flip { write ^ WRITE } else { write };
            let mut descs = vec![(at, 16, 0)];
            descs.extend(data.iter().take(4).map(|(a, l)| (a.get(space), l.get(), write)));
            descs.push((status.get(space), 1, WRITE));
            (*slot, descs)
        }
        Template::Buffers { slot, parts, write } => {
            let flags = if *write { WRITE } else { 0 };
            let mut descs = Vec::new();
            for (a, l, fill) in parts.iter().take(8) {
                let (addr, len) = (a.get(space), l.get());
                let _ = mem.write_slice(&fill[..fill.len().min(len as usize)], GuestAddress(addr));
                descs.push((addr, len, flags));
            }
            (*slot, descs)
        }
    };
    descs.truncate(usize::from(size));
    let count = descs.len();
    for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
        let index = (u16::from(slot) + i as u16) % size;
        let (flags, next) = if i + 1 < count { (flags | NEXT, (index + 1) % size) } else { (flags, 0) };
        let d = Desc { addr, len, flags, next };
        mem.write_slice(&d.bytes(), GuestAddress(table + 16 * u64::from(index))).unwrap();
    }
}

/// The queue's size.
pub fn size_of(r: &RingIn) -> u16 {
    1u16 << (r.size_log2 % 9)
}

/// Lays queue `r` at `at` (its table, its chains, its available ring, the used index at
/// next_used) and returns the device's `Queue` for it, ready, at the driver's positions.
pub fn lay_ring(mem: &GuestMemoryMmap, space: &Space, at: &Rings, r: &RingIn, event_idx: bool) -> Queue {
    let size = size_of(r);
    for (i, d) in r.table.iter().take(usize::from(size)).enumerate() {
        lay(mem, space, at.desc, i as u16, d);
    }
    for t in r.templates.iter().take(8) {
        lay_template(mem, space, at.desc, size, t);
    }
    let ahead = match r.ahead {
        Ahead::Chains(n) => u16::from(n).min(size),
        Ahead::Index(idx) => idx.wrapping_sub(r.next_avail),
    };
    for i in 0..ahead.min(size) {
        let head = match r.heads.get(usize::from(i) % r.heads.len().max(1)) {
            Some(&h) => u16::from(h) % size,
            None => i % size,
        };
        let head = match r.bad_head {
            Some((pos, raw)) if u16::from(pos) % ahead.max(1) == i => raw,
            _ => head,
        };
        let slot = at.avail + 4 + 2 * u64::from(r.next_avail.wrapping_add(i) % size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
    }
    mem.write_obj(r.avail_flags, GuestAddress(at.avail)).unwrap();
    mem.write_obj(r.next_avail.wrapping_add(ahead), GuestAddress(at.avail + 2)).unwrap();
    mem.write_obj(r.used_event, GuestAddress(at.avail + 4 + 2 * u64::from(size))).unwrap();
    mem.write_obj(r.next_used, GuestAddress(at.used + 2)).unwrap();
    queue(at, size, r.next_avail, r.next_used, event_idx)
}

/// A device's `Queue` over the rings at `at`, ready.
pub fn queue(at: &Rings, size: u16, next_avail: u16, next_used: u16, event_idx: bool) -> Queue {
    let mut queue = Queue::new(256).unwrap();
    queue.try_set_size(size).unwrap();
    queue.try_set_desc_table_address(GuestAddress(at.desc)).unwrap();
    queue.try_set_avail_ring_address(GuestAddress(at.avail)).unwrap();
    queue.try_set_used_ring_address(GuestAddress(at.used)).unwrap();
    queue.set_event_idx(event_idx);
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_used);
    queue.set_ready(true);
    queue
}

/// A little-endian u16 of guest memory.
pub fn le16(mem: &GuestMemoryMmap, at: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(at)).expect("inside guest memory")
}

/// The most descriptors (over all offered chains of a queue) a target models: 1 MiB
/// of its own memory.
pub const MAX_MODELLED: usize = 65_536;

/// What the driver offered on a queue.
#[derive(Debug)]
pub struct Offer {
    /// The queue's size.
    pub size: u16,
    /// The heads in the available ring, in order, when the index is at most a queue
    /// ahead of next_avail; `None` for a runaway index.
    pub heads: Option<Vec<u16>>,
    /// Each head's chain (empty for a head past the table).
    pub chains: Vec<Chain>,
    /// No device-writable buffer of an offered chain overlaps a ring or table the device
    /// reads (nor `also`): what the device reads stays what the driver wrote.
    pub clean: bool,
}

impl Offer {
    /// The position of the first head that is not a descriptor of the queue.
    pub fn first_bad(&self) -> Option<usize> {
        self.heads.as_ref()?.iter().position(|&h| h >= self.size)
    }

    /// The device-writable buffers of the first `n` chains.
    pub fn writable(&self, n: usize) -> impl Iterator<Item = Span> + '_ {
        self.chains[..n.min(self.chains.len())]
            .iter()
            .flat_map(|c| c.descs.iter().filter(|d| d.writable()).map(Desc::span))
    }
}

/// What the driver offered on the queue at `at` of `size`, the device starting at
/// `next_avail`; `also`: more ranges the device must not write (other queues' rings).
pub fn offer(mem: &GuestMemoryMmap, at: &Rings, size: u16, next_avail: u16, also: &[Span]) -> Offer {
    let ahead = le16(mem, at.avail + 2).wrapping_sub(next_avail);
    if ahead > size {
        return Offer { size, heads: None, chains: Vec::new(), clean: true };
    }
    let heads: Vec<u16> =
        (0..ahead).map(|i| le16(mem, at.avail + 4 + 2 * u64::from(next_avail.wrapping_add(i) % size))).collect();
    let chains: Vec<Chain> =
        heads.iter().map(|&h| if h < size { walk(mem, at.desc, size, h) } else { Chain::default() }).collect();
    if chains.iter().map(|c| c.descs.len()).sum::<usize>() > MAX_MODELLED {
        return Offer { size, heads: Some(heads), chains: Vec::new(), clean: false };
    }
    let mut read_only: Vec<Span> = at.spans(size).to_vec();
    read_only.extend_from_slice(also);
    read_only.extend(chains.iter().flat_map(|c| c.tables.iter().copied()));
    let clean = chains
        .iter()
        .flat_map(|c| c.descs.iter().filter(|d| d.writable()))
        .all(|d| read_only.iter().all(|r| !overlap(d.span(), *r)));
    Offer { size, heads: Some(heads), chains, clean }
}

/// Checks the used ring at `at` after the device ran from `next_used`, against what was
/// offered (`offer.clean` must hold): entries in order name the heads offered, their
/// lengths within the chains' writable bytes, and no more than offered. Returns the
/// entries, as (chain index, used length).
pub fn used_entries(mem: &GuestMemoryMmap, at: &Rings, offer: &Offer, next_used: u16, what: &str) -> Vec<(usize, u32)> {
    let used = le16(mem, at.used + 2).wrapping_sub(next_used);
    let Some(heads) = &offer.heads else {
        assert_eq!(used, 0, "{what}: nothing is used from a runaway ring");
        return Vec::new();
    };
    assert!(usize::from(used) <= heads.len(), "{what}: {used} chains used of {} offered", heads.len());
    let mut out = Vec::new();
    for k in 0..used {
        let slot = at.used + 4 + 8 * u64::from(next_used.wrapping_add(k) % offer.size);
        let id = mem.read_obj::<u32>(GuestAddress(slot)).unwrap();
        let len = mem.read_obj::<u32>(GuestAddress(slot + 4)).unwrap();
        let k = usize::from(k);
        assert_eq!(id, u32::from(heads[k]), "{what}: used entry {k} names the head offered");
        let chain = &offer.chains[k];
        assert!(
            u64::from(len) <= chain.writable_bytes(),
            "{what}: used length {len} > the chain's {} writable bytes",
            chain.writable_bytes()
        );
        out.push((k, len));
    }
    out
}
