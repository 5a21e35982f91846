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
pub fn contents<'a>(mem: &GuestMemoryMmap, descs: impl IntoIterator<Item = &'a Desc>, cap: usize) -> Option<Vec<u8>> {
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
