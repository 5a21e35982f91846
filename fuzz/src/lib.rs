//! What every fuzz target shares: the memory oracle.
//!
//! libFuzzer already fails an input that panics (a crash), runs past `-timeout` (a
//! hang: a device that spins, a reset that waits for ever) or pushes the process past
//! `-rss_limit_mb` / `-malloc_limit_mb`. On top, [`Allocations`] counts the bytes live
//! on the heap, so a target can assert that whatever the guest does, the VMM's
//! buffers and queues stay within a bound ([`assert_bounded`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// The system allocator, counting the bytes live on the heap.
pub struct Allocations;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counter is an atomic.
unsafe impl GlobalAlloc for Allocations {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Allocations = Allocations;

/// Bytes live on the heap now.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Fails (panics, which libFuzzer reports as a crash) if the heap grew by more than
/// `limit` bytes since `start` (a [`live_bytes`] reading): `what` says whose buffers.
pub fn assert_bounded(start: isize, limit: usize, what: &str) {
    let grown = live_bytes() - start;
    assert!(grown <= limit as isize, "{what}: the heap grew by {grown} bytes (limit {limit})");
}

pub mod dtb {
    //! A reader of flattened device trees (devicetree specification 0.4, chapter 5),
    //! independent of the `vm-fdt` writer hvrun uses, to check what it wrote.

    const MAGIC: u32 = 0xd00d_feed;
    const BEGIN_NODE: u32 = 1;
    const END_NODE: u32 = 2;
    const PROP: u32 = 3;
    const NOP: u32 = 4;
    const END: u32 = 9;

    fn be32(blob: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(blob.get(at..at.checked_add(4)?)?.try_into().ok()?))
    }

    fn string_at(block: &[u8], at: usize) -> Option<&[u8]> {
        let rest = block.get(at..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    }

    /// The value of property `name` of the node at `path` (e.g. `/chosen`), or `None`
    /// when the blob is malformed or has no such property.
    pub fn property<'a>(blob: &'a [u8], path: &str, name: &str) -> Option<&'a [u8]> {
        if be32(blob, 0)? != MAGIC || be32(blob, 4)? as usize != blob.len() {
            return None;
        }
        let (off_struct, off_strings) = (be32(blob, 8)? as usize, be32(blob, 12)? as usize);
        let (size_strings, size_struct) = (be32(blob, 32)? as usize, be32(blob, 36)? as usize);
        let structure = blob.get(off_struct..off_struct.checked_add(size_struct)?)?;
        let strings = blob.get(off_strings..off_strings.checked_add(size_strings)?)?;
        let wanted: Vec<&[u8]> = path.split('/').filter(|p| !p.is_empty()).map(str::as_bytes).collect();
        let mut stack: Vec<&[u8]> = Vec::new();
        let mut found = None;
        let mut at = 0usize;
        loop {
            match be32(structure, at)? {
                BEGIN_NODE => {
                    let name = string_at(structure, at + 4)?;
                    stack.push(name);
                    at += 4 + (name.len() + 1).next_multiple_of(4);
                }
                END_NODE => {
                    stack.pop()?;
                    at += 4;
                }
                PROP => {
                    let len = be32(structure, at + 4)? as usize;
                    let nameoff = be32(structure, at + 8)? as usize;
                    let value = structure.get(at + 12..at + 12 + len)?;
                    let here = stack.len() == wanted.len() + 1 && stack[1..] == wanted[..];
                    if here && string_at(strings, nameoff)? == name.as_bytes() {
                        found = Some(value);
                    }
                    at += 12 + len.next_multiple_of(4);
                }
                NOP => at += 4,
                END => return if stack.is_empty() { found } else { None },
                _ => return None,
            }
        }
    }
}

pub mod ring {
    //! The driver's view of a split virtqueue (virtio 1.2, section 2.7), independent of the
    //! devices' code, for the oracles of the virtqueue targets: what a chain is, which bytes
    //! of guest memory a device may write, and waiting (boundedly) for a device thread.

    use std::cell::RefCell;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use devices::virtio::testing::Mem;
    use guest_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    /// `VIRTQ_DESC_F_NEXT`.
    pub const NEXT: u16 = 1;
    /// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
    pub const WRITE: u16 = 2;
    /// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
    pub const INDIRECT: u16 = 4;

    /// One descriptor, as the driver lays it out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Desc {
        /// Guest address of the buffer.
        pub addr: u64,
        /// Its length.
        pub len: u32,
        /// `NEXT`, `WRITE`, `INDIRECT`.
        pub flags: u16,
        /// The next descriptor's index when `NEXT` is set.
        pub next: u16,
    }

    impl Desc {
        /// Whether the device writes this buffer.
        pub fn writable(&self) -> bool {
            self.flags & WRITE != 0
        }

        /// The 16 bytes of the descriptor in guest memory.
        pub fn bytes(&self) -> [u8; 16] {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&self.addr.to_le_bytes());
            b[8..12].copy_from_slice(&self.len.to_le_bytes());
            b[12..14].copy_from_slice(&self.flags.to_le_bytes());
            b[14..16].copy_from_slice(&self.next.to_le_bytes());
            b
        }

        /// The buffer as a range of guest addresses (saturating at the top of the space).
        pub fn span(&self) -> Span {
            (self.addr, self.addr.saturating_add(u64::from(self.len)))
        }
    }

    /// A half-open range of guest addresses.
    pub type Span = (u64, u64);

    /// Whether two ranges share a byte.
    pub fn overlap(a: Span, b: Span) -> bool {
        a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
    }

    /// A chain as the specification defines it: the buffers in order, and the indirect
    /// tables read on the way.
    #[derive(Debug, Clone, Default)]
    pub struct Chain {
        /// The buffers, in chain order.
        pub descs: Vec<Desc>,
        /// The indirect descriptor tables the chain goes through.
        pub tables: Vec<Span>,
    }

    impl Chain {
        /// Bytes of all device-writable buffers.
        pub fn writable_bytes(&self) -> u64 {
            self.descs.iter().filter(|d| d.writable()).map(|d| u64::from(d.len)).sum()
        }

        /// Bytes of the device-writable buffers before the first device-readable one.
        pub fn leading_writable_bytes(&self) -> u64 {
            self.descs.iter().take_while(|d| d.writable()).map(|d| u64::from(d.len)).sum()
        }

        /// Whether no two device-writable buffers share a byte.
        pub fn writes_disjoint(&self) -> bool {
            disjoint(self.descs.iter().filter(|d| d.writable()).map(Desc::span))
        }
    }

    /// Whether no two of the ranges share a byte.
    pub fn disjoint(spans: impl IntoIterator<Item = Span>) -> bool {
        let mut spans: Vec<Span> = spans.into_iter().filter(|s| s.0 < s.1).collect();
        spans.sort_unstable();
        spans.windows(2).all(|w| w[0].1 <= w[1].0)
    }

    /// Reads descriptor `index` of the table at `table`.
    pub fn read_desc(mem: &GuestMemoryMmap, table: u64, index: u16) -> Option<Desc> {
        let at = table.checked_add(u64::from(index) * 16)?;
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(at)).ok()?;
        Some(Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        })
    }

    /// The chain whose head is descriptor `head` of the table at `table` in a queue of
    /// `size` (virtio 1.2, 2.7.5 and 2.7.5.3): at most `size` descriptors (an indirect
    /// table: as many as it holds), one level of indirection with a table a whole number
    /// of descriptors long, and no more than 2^32 bytes in all; a descriptor that cannot
    /// be read, or an index past the table, ends it.
    pub fn walk(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Chain {
        let mut chain = Chain::default();
        let (mut table, mut entries, mut index, mut ttl) = (table, size, head, size);
        let (mut indirect, mut total) = (false, 0u32);
        while ttl > 0 && index < entries {
            let Some(d) = read_desc(mem, table, index) else { break };
            if d.flags & INDIRECT != 0 {
                if indirect || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                    break;
                }
                chain.tables.push(d.span());
                (table, entries, index, indirect) = (d.addr, (d.len / 16) as u16, 0, true);
                ttl = entries;
                continue;
            }
            let Some(sum) = total.checked_add(d.len) else { break };
            total = sum;
            chain.descs.push(d);
            if d.flags & NEXT != 0 {
                index = d.next;
                ttl -= 1;
            } else {
                ttl = 0;
            }
        }
        chain
    }

    /// The bytes of `descs`' buffers, concatenated; `None` if one is not in guest memory or
    /// they come to more than `cap` bytes.
    pub fn contents<'a>(
        mem: &GuestMemoryMmap,
        descs: impl IntoIterator<Item = &'a Desc>,
        cap: usize,
    ) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for d in descs {
            let at = out.len();
            if d.len as usize > cap - at {
                return None;
            }
            out.resize(at + d.len as usize, 0);
            mem.read_slice(&mut out[at..], GuestAddress(d.addr)).ok()?;
        }
        Some(out)
    }

    /// Zeroed guest memory of `regions` (start, length), as devices hold it. The mapping is
    /// reused from one input to the next when nothing else holds it any more: fresh
    /// mappings cost page faults that would be much of a target's time.
    pub fn guest_memory(regions: &[(u64, usize)]) -> Arc<Mem> {
        /// The regions of the memory kept, and the memory.
        type Kept = Option<(Vec<(u64, usize)>, Arc<Mem>)>;
        thread_local! {
            static REUSE: RefCell<Kept> = const { RefCell::new(None) };
        }
        REUSE.with(|reuse| {
            let mut reuse = reuse.borrow_mut();
            if let Some((layout, mem)) = reuse.as_ref() {
                if layout[..] == *regions && Arc::strong_count(mem) == 1 {
                    let zeros = vec![0u8; regions.iter().map(|r| r.1).max().unwrap_or(0)];
                    for &(start, len) in regions {
                        mem.0.write_slice(&zeros[..len], GuestAddress(start)).expect("the region is there");
                    }
                    return mem.clone();
                }
            }
            let ranges: Vec<(GuestAddress, usize)> = regions.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            let mem = Arc::new(Mem(GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")));
            *reuse = Some((regions.to_vec(), mem.clone()));
            mem
        })
    }

    /// What guest memory held at [`snapshot`], region by region, and a buffer to compare it with.
    type Snapshot = (Vec<(u64, Vec<u8>)>, Vec<u8>);

    thread_local! {
        static SNAPSHOT: RefCell<Snapshot> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Remembers what every region of guest memory holds now (for [`assert_written_only`];
    /// the buffers are reused, for the same reason as the memory).
    pub fn snapshot(mem: &GuestMemoryMmap, regions: &[(u64, usize)]) {
        SNAPSHOT.with(|s| {
            let (before, _) = &mut *s.borrow_mut();
            before.resize_with(regions.len(), Default::default);
            for ((start, bytes), &(at, len)) in before.iter_mut().zip(regions) {
                *start = at;
                bytes.resize(len, 0);
                mem.read_slice(bytes, GuestAddress(at)).expect("a region of the guest's memory");
            }
        })
    }

    /// Fails (names `what`) if a byte of guest memory differs from the last [`snapshot`]
    /// outside the ranges in `allowed`.
    pub fn assert_written_only(mem: &GuestMemoryMmap, allowed: &[Span], what: &str) {
        SNAPSHOT.with(|s| {
            let (before, now) = &mut *s.borrow_mut();
            for (start, old) in before.iter() {
                now.resize(old.len(), 0);
                mem.read_slice(now, GuestAddress(*start)).expect("a region of the guest's memory");
                // By blocks, compared with memcmp: most of memory is unchanged, and a loop
                // over every byte would be most of the target's time.
                const BLOCK: usize = 256;
                for (n, (a, b)) in old.chunks(BLOCK).zip(now.chunks(BLOCK)).enumerate() {
                    if a == b {
                        continue;
                    }
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        let at = start + (n * BLOCK + i) as u64;
                        if x != y && !allowed.iter().any(|&(lo, hi)| lo <= at && at < hi) {
                            panic!(
                                "{what}: guest byte {at:#x} changed ({x:#04x} -> {y:#04x}) outside the buffers the device may write"
                            );
                        }
                    }
                }
            }
        })
    }

    /// How long a device thread may take to settle after the driver's last move.
    pub const SETTLE_MAX: Duration = Duration::from_secs(1);
    /// How long nothing may change before the devices count as idle even if their
    /// threads do not look asleep.
    pub const QUIET: Duration = Duration::from_millis(3);

    /// Whether every device thread of this process (`virtio-*`, `vblk-*`) is asleep
    /// (Linux: state `S` in `/proc/self/task/*/stat`). A thread woken by the driver's
    /// last move is runnable from the moment the waking call returns, so two looks that
    /// find all asleep mean the work it caused is done (or waits on a timer). Elsewhere:
    /// never, and [`settle`] waits for [`QUIET`].
    pub fn device_threads_asleep() -> bool {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return false };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            // "tid (comm) state ...": comm may hold spaces and parentheses; it ends at the last ')'.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let comm = &stat[open + 1..close];
            if !(comm.starts_with("virtio-") || comm.starts_with("vblk-")) {
                continue;
            }
            match stat[close + 1..].split_whitespace().next() {
                Some("S") | Some("Z") | Some("X") | Some("I") => {}
                _ => return false,
            }
        }
        true
    }

    /// The threads of this process now (Linux: their ids; elsewhere, none).
    pub fn threads() -> Vec<u64> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
        tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect()
    }

    /// Waits, at most [`SETTLE_MAX`], until every thread that was not there `before` (a
    /// [`threads`] reading at the start of an input) has ended: the device workers are
    /// joined when a device stops, but the console's output thread is let go and ends on
    /// its own. Waiting keeps one input's threads out of the next, and out of
    /// LeakSanitizer's look at the end of an input (which takes a thread in the middle of
    /// starting or exiting for a leak). Threads are told apart by id, not by name: one
    /// that has not run yet still has its parent's name.
    pub fn threads_gone(before: &[u64]) -> bool {
        let start = Instant::now();
        while threads().iter().any(|t| !before.contains(t)) {
            if start.elapsed() >= SETTLE_MAX {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }

    /// Waits, boundedly, for the device threads after a driver's move: until `look` says
    /// the work is done, or what it returns as progress stays put while the device threads
    /// sleep (two looks in a row), or for [`QUIET`]; at most [`SETTLE_MAX`]. Returns
    /// whether it settled (devices that keep moving for a whole second have not).
    pub fn settle<P: PartialEq>(mut look: impl FnMut() -> (P, bool)) -> bool {
        let start = Instant::now();
        let (mut last, done) = look();
        if done {
            return true;
        }
        let mut since = Instant::now();
        let mut asleep = 0;
        loop {
            std::thread::sleep(Duration::from_micros(50));
            let (now, done) = look();
            if done {
                return true;
            }
            if now != last {
                last = now;
                since = Instant::now();
                asleep = 0;
            } else {
                asleep = if device_threads_asleep() { asleep + 1 } else { 0 };
                if asleep >= 2 || since.elapsed() >= QUIET {
                    return true;
                }
            }
            if start.elapsed() >= SETTLE_MAX {
                return false;
            }
        }
    }
}

pub mod layout {
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
    pub fn used_entries(
        mem: &GuestMemoryMmap,
        at: &Rings,
        offer: &Offer,
        next_used: u16,
        what: &str,
    ) -> Vec<(usize, u32)> {
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
}
