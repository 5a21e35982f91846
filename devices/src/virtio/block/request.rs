//! Serving one virtio-blk request (virtio spec v1.2 section 5.2.6).
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable memory, then
//! data, then one status byte at the very end of the device-writable memory. Nothing is
//! assumed about how the driver split these across descriptors. The device walks the
//! chain once (`Request::parse`): it copies the header (and a DISCARD/WRITE_ZEROES
//! segment) out, records every other non-empty buffer as a piece of guest memory, checked
//! against it and kept inline, and the status byte's address. Then it validates the
//! request against the disk (`Request::prepare`), does the disk I/O (`Request::run`), on
//! the queue's worker or an I/O thread, straight between the disk and the guest's buffers
//! when the disk can (`preadv`/`pwritev`) and through a bounded bounce buffer otherwise,
//! and writes the status (`Request::finish`). No guest-chosen length sizes an allocation,
//! and a request allocates nothing.
//!
//! [`serve`] does all four at once, for one request at a time.

use std::io;

use guest_memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::buffers::{GuestBuffers, Pieces, MAX_PIECES};
use super::disk::{Disk, SharedDisk};
use crate::virtio::counters::DeviceCounters;
use crate::virtio::Chain;
use crate::warn_ratelimited;

/// Bytes in a sector, the unit of `sector` and `capacity`.
pub const SECTOR_SIZE: u64 = 512;
/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Read the device's ID string.
pub const T_GET_ID: u32 = 8;
/// Discard sectors.
pub const T_DISCARD: u32 = 11;
/// Write zeroes to sectors.
pub const T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error (also for malformed requests and writes to a read-only disk).
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Length of the ID string GET_ID returns.
pub const ID_LEN: usize = 20;
/// Segments a DISCARD or WRITE_ZEROES request may carry (advertised in the config).
pub const MAX_SEGMENTS: usize = 1;
/// The most data one read or write may carry: what the device advertises (SEG_MAX
/// segments of SIZE_MAX bytes, see `super::Block`). A driver asking for more is refused,
/// so no one request keeps the worker (and so a reset, or the VMM's exit) for long.
pub const MAX_DATA: u64 = 254 << 20;
/// The most sectors one DISCARD or WRITE_ZEROES segment may cover (advertised in the
/// config): zeros a filesystem cannot punch are written, and this bounds how many.
pub const MAX_ZEROES_SECTORS: u32 = (128 << 20) / SECTOR_SIZE as u32;
/// The `unmap` flag of a WRITE_ZEROES segment.
const FLAG_UNMAP: u32 = 1;
/// Bytes in a request header and in a DISCARD/WRITE_ZEROES segment.
const HEADER_LEN: usize = 16;

/// What a request works with besides its chain, for [`serve`].
pub struct Context<'a> {
    /// The disk.
    pub disk: &'a mut dyn Disk,
    /// The device's ID string, zero-padded.
    pub id: &'a [u8; ID_LEN],
    /// The bounce buffer for data, for a disk that cannot reach guest memory itself.
    pub bounce: &'a mut [u8],
}

/// Serves the request in `chain` and writes its status. Returns how many bytes it wrote
/// into the chain (the used length); 0 when the chain has nowhere to put a status.
pub fn serve(mem: &GuestMemoryMmap, chain: Chain<'_>, ctx: Context<'_>) -> u32 {
    let Context { disk, id, bounce } = ctx;
    let info = DiskInfo { capacity: disk.capacity(), read_only: disk.read_only() };
    let mut request = Request::new();
    request.parse(mem, chain);
    let (status, op) = match request.prepare(&info, id) {
        Plan::Drop => return 0,
        Plan::Done(status) => (status, None),
        Plan::Io(op) => (request.run(op, &mut Target::Serial(disk, bounce)), Some(op)),
    };
    request.finish(mem, op, status)
}

/// What the device knows of its disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DiskInfo {
    /// Size in bytes.
    pub(crate) capacity: u64,
    /// Whether writes are refused.
    pub(crate) read_only: bool,
}

/// What to do with a request, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Give the chain back with nothing written: it has nowhere to put a status, or a
    /// buffer outside guest memory.
    Drop,
    /// Answer at once with this status (malformed or refused requests, GET_ID).
    Done(u8),
    /// Disk work, then the status it earns.
    Io(Op),
}

/// The disk work a request asks for, checked against the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Fill the data buffers from this byte offset.
    Read(u64),
    /// Write the data buffers at this byte offset.
    Write(u64),
    /// Make completed writes durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Discard { offset: u64, len: u64 },
    /// Zero `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64 },
}

/// Why a walk over a chain found it unusable as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// A buffer outside guest memory: nothing is written, not even a status.
    OutsideMemory,
    /// More pieces than [`MAX_PIECES`]: an I/O error.
    TooManyPieces,
}

/// One request: what the walk over its chain found, kept for as long as the request is in
/// flight. Inline (its pieces too), so requests are recycled, never allocated one by one.
pub(crate) struct Request {
    head: u16,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The first bytes after the header (a DISCARD/WRITE_ZEROES segment).
    segment: [u8; HEADER_LEN],
    segment_len: usize,
    /// Device-readable bytes after the header.
    readable_len: u64,
    /// Device-writable bytes, the status byte included.
    writable_len: u64,
    /// The status byte: the last byte of the last non-empty device-writable buffer.
    status: Option<GuestAddress>,
    fault: Option<Fault>,
    pieces: Pieces,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("head", &self.head).field("kind", &self.kind()).finish_non_exhaustive()
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Whether `len` bytes at `sector` lie inside a disk of `capacity` bytes.
fn in_bounds(sector: u64, len: u64, capacity: u64) -> bool {
    sector.checked_mul(SECTOR_SIZE).and_then(|start| start.checked_add(len)).is_some_and(|end| end <= capacity)
}

impl Request {
    /// An empty request.
    pub(crate) const fn new() -> Self {
        Request {
            head: 0,
            header: [0; HEADER_LEN],
            header_len: 0,
            segment: [0; HEADER_LEN],
            segment_len: 0,
            readable_len: 0,
            writable_len: 0,
            status: None,
            fault: None,
            pieces: Pieces::new(),
        }
    }

    /// The chain's head descriptor, for the used ring.
    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    /// The request type, once the header is whole.
    fn kind(&self) -> Option<u32> {
        (self.header_len == HEADER_LEN).then(|| le32(&self.header[0..4]))
    }

    /// Walks `chain` once, recording what [`Request::prepare`] and [`Request::run`]
    /// need; whatever this request held before is forgotten. Zero-length buffers are
    /// skipped; a buffer outside guest memory ends the walk.
    pub(crate) fn parse(&mut self, memory: &GuestMemoryMmap, chain: Chain<'_>) {
        self.head = chain.head_index();
        self.header_len = 0;
        self.segment_len = 0;
        self.readable_len = 0;
        self.writable_len = 0;
        self.status = None;
        self.fault = None;
        self.pieces.clear();
        for desc in chain {
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let writable = desc.is_write_only();
            for slice in memory.get_slices(desc.addr(), len) {
                let Ok(slice) = slice else {
                    self.fault = Some(Fault::OutsideMemory);
                    return;
                };
                let (at, base) = if writable {
                    (0, slice.ptr_guard_mut().as_ptr())
                } else {
                    (self.take_header(&slice), slice.ptr_guard().as_ptr().cast_mut())
                };
                if at == slice.len() {
                    continue;
                }
                if !writable && self.segment_len < HEADER_LEN && matches!(self.kind(), Some(T_DISCARD | T_WRITE_ZEROES))
                {
                    let n = (HEADER_LEN - self.segment_len).min(slice.len() - at);
                    if let Ok(part) = slice.subslice(at, n) {
                        part.copy_to(&mut self.segment[self.segment_len..self.segment_len + n]);
                        self.segment_len += n;
                    }
                }
                let piece = slice.len() - at;
                // SAFETY: `at + piece` is the slice's length, and the slice was just checked
                // to lie in guest memory, which the holder of this request keeps mapped
                // while it is in flight.
                if !unsafe { self.pieces.push(writable, base.wrapping_add(at), piece) } {
                    self.fault.get_or_insert(Fault::TooManyPieces);
                }
                if writable {
                    self.writable_len += piece as u64;
                } else {
                    self.readable_len += piece as u64;
                }
            }
            if writable {
                // The whole buffer is in guest memory, so its last byte's address exists.
                self.status = desc.addr().checked_add(len as u64 - 1);
            }
        }
        self.pieces.seal();
    }

    /// Copies the start of a device-readable slice into the header while it is short of
    /// 16 bytes; returns how many bytes of the slice went there.
    fn take_header(&mut self, slice: &vm_memory::VolatileSlice<'_, impl vm_memory::bitmap::BitmapSlice>) -> usize {
        let n = (HEADER_LEN - self.header_len).min(slice.len());
        if n == 0 {
            return 0;
        }
        match slice.subslice(0, n) {
            Ok(part) => {
                part.copy_to(&mut self.header[self.header_len..self.header_len + n]);
                self.header_len += n;
                n
            }
            Err(_) => 0,
        }
    }

    /// Checks the request against the disk and says what to do. GET_ID is answered here
    /// (its ID is written into the buffers); so is any request that is malformed or
    /// refused.
    pub(crate) fn prepare(&mut self, disk: &DiskInfo, id: &[u8; ID_LEN]) -> Plan {
        let Some(_) = self.status.filter(|_| self.fault != Some(Fault::OutsideMemory)) else {
            warn_ratelimited!(
                "virtio-blk: request with a buffer outside guest memory or no writable status byte dropped"
            );
            return Plan::Drop;
        };
        let Some(kind) = self.kind() else {
            warn_ratelimited!("virtio-blk: request without a 16-byte device-readable header");
            return Plan::Done(S_IOERR);
        };
        if self.fault == Some(Fault::TooManyPieces) {
            warn_ratelimited!("virtio-blk: request in more than {MAX_PIECES} pieces refused");
            return Plan::Done(S_IOERR);
        }
        self.pieces.drop_last_writable_byte();
        let sector = le64(&self.header[8..16]);
        let data_in = self.writable_len - 1;
        match kind {
            T_IN => Self::check_data("read", sector, data_in, disk).map_or(Plan::Done(S_IOERR), Plan::Io),
            T_OUT if disk.read_only => Plan::Done(S_IOERR),
            T_OUT => Self::check_data("write", sector, self.readable_len, disk).map_or(Plan::Done(S_IOERR), Plan::Io),
            T_FLUSH => Plan::Io(Op::Flush),
            T_GET_ID => {
                let n = (data_in as usize).min(ID_LEN);
                self.pieces.buffers(true, n).fill_from(&id[..n]);
                Plan::Done(S_OK)
            }
            T_DISCARD | T_WRITE_ZEROES => self.check_segment(kind, disk),
            other => {
                warn_ratelimited!("virtio-blk: unsupported request type {other}");
                Plan::Done(S_UNSUPP)
            }
        }
    }

    /// The read or write of `len` bytes at `sector`, if the device takes it.
    fn check_data(what: &str, sector: u64, len: u64, disk: &DiskInfo) -> Option<Op> {
        if len > MAX_DATA {
            warn_ratelimited!("virtio-blk: {what} of {len} bytes; the device takes at most {MAX_DATA}");
            return None;
        }
        if len % SECTOR_SIZE != 0 || !in_bounds(sector, len, disk.capacity) {
            warn_ratelimited!(
                "virtio-blk: {what} of {len} bytes at sector {sector} is outside the disk or not whole sectors"
            );
            return None;
        }
        let offset = sector * SECTOR_SIZE;
        Some(if what == "read" { Op::Read(offset) } else { Op::Write(offset) })
    }

    /// A DISCARD or WRITE_ZEROES request's one segment, checked.
    fn check_segment(&self, kind: u32, disk: &DiskInfo) -> Plan {
        if disk.read_only {
            return Plan::Done(S_IOERR);
        }
        let len = self.readable_len;
        if len == 0 || len % HEADER_LEN as u64 != 0 || len / HEADER_LEN as u64 > MAX_SEGMENTS as u64 {
            warn_ratelimited!("virtio-blk: discard/write-zeroes with {len} bytes of segments");
            return Plan::Done(S_UNSUPP);
        }
        let s = &self.segment;
        let (start, sectors, flags) = (le64(&s[0..8]), le32(&s[8..12]), le32(&s[12..16]));
        let allowed = if kind == T_DISCARD { 0 } else { FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Plan::Done(S_UNSUPP);
        }
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        if sectors > MAX_ZEROES_SECTORS || !in_bounds(start, bytes, disk.capacity) {
            return Plan::Done(S_IOERR);
        }
        let offset = start * SECTOR_SIZE;
        Plan::Io(if kind == T_DISCARD {
            Op::Discard { offset, len: bytes }
        } else {
            Op::WriteZeroes { offset, len: bytes }
        })
    }

    /// Does the disk work of `op` (from [`Request::prepare`]) and returns the status.
    pub(crate) fn run(&mut self, op: Op, target: &mut Target<'_>) -> u8 {
        let (what, result) = match op {
            Op::Read(offset) => {
                let mut data = self.pieces.buffers(true, (self.writable_len - 1) as usize);
                ("read", target.read(&mut data, offset))
            }
            Op::Write(offset) => {
                let mut data = self.pieces.buffers(false, self.readable_len as usize);
                ("write", target.write(&mut data, offset))
            }
            Op::Flush => ("flush", target.flush()),
            Op::Discard { offset, len } => ("discard", target.zero(true, offset, len)),
            Op::WriteZeroes { offset, len } => ("write-zeroes", target.zero(false, offset, len)),
        };
        match result {
            Ok(()) => S_OK,
            Err(e) => {
                warn_ratelimited!("virtio-blk: {what} failed: {e}");
                S_IOERR
            }
        }
    }

    /// Writes `status` into the request's status byte; returns the used length: the data
    /// a successful read or GET_ID wrote, and the status byte. 0 for a dropped request.
    /// `op` is what ran (`None`: answered by [`Request::prepare`]).
    pub(crate) fn finish(&self, memory: &GuestMemoryMmap, op: Option<Op>, status: u8) -> u32 {
        let Some(at) = self.status.filter(|_| self.fault != Some(Fault::OutsideMemory)) else { return 0 };
        if memory.write_obj(status, at).is_err() {
            return 0;
        }
        let data_in = self.writable_len - 1;
        let data = match (op, status) {
            (Some(Op::Read(_)), S_OK) => data_in,
            (None, S_OK) if self.kind() == Some(T_GET_ID) => data_in.min(ID_LEN as u64),
            _ => 0,
        };
        // The chain holds at most 4 GiB (virtio-queue stops a longer one).
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }

    /// Counts the request in `counters`, answered with `status` (`None`: given back
    /// without one) after `op` ran: a read's or a write's data when it succeeded, and an
    /// error for any status but OK.
    pub(crate) fn count(&self, counters: &DeviceCounters, op: Option<Op>, status: Option<u8>) {
        let ok = status == Some(S_OK);
        let data_in = self.writable_len.saturating_sub(1);
        let (rx, tx) = match op {
            Some(Op::Read(_)) if ok => (data_in, 0),
            Some(Op::Write(_)) if ok => (0, self.readable_len),
            None if ok && self.kind() == Some(T_GET_ID) => (data_in.min(ID_LEN as u64), 0),
            _ => (0, 0),
        };
        counters.request(rx, tx);
        if !ok {
            counters.error();
        }
    }
}

/// What a request's disk work runs against.
pub(crate) enum Target<'a> {
    /// A [`Disk`] that serves one request at a time, on the queue's worker, with the
    /// bounce buffer (at least a byte) for a disk that cannot reach guest memory itself.
    Serial(&'a mut dyn Disk, &'a mut [u8]),
    /// A [`SharedDisk`], from any thread.
    Shared(&'a dyn SharedDisk),
}

impl Target<'_> {
    fn read(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        match self {
            Target::Shared(disk) => disk.read_guest(bufs, offset),
            Target::Serial(disk, bounce) => disk.read_guest(bufs, offset).unwrap_or_else(|| {
                through(bufs, offset, bounce, |bufs, chunk, at| {
                    disk.read_at(chunk, at)?;
                    bufs.fill_from(chunk);
                    Ok(())
                })
            }),
        }
    }

    fn write(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        match self {
            Target::Shared(disk) => disk.write_guest(bufs, offset),
            Target::Serial(disk, bounce) => disk.write_guest(bufs, offset).unwrap_or_else(|| {
                through(bufs, offset, bounce, |bufs, chunk, at| {
                    bufs.drain_into(chunk);
                    disk.write_at(chunk, at)
                })
            }),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::Shared(disk) => disk.flush(),
            Target::Serial(disk, _) => disk.flush(),
        }
    }

    /// Discards (`discard`) or zeroes `len` bytes at `offset`.
    fn zero(&mut self, discard: bool, offset: u64, len: u64) -> io::Result<()> {
        match (self, discard) {
            (Target::Shared(disk), true) => disk.discard(offset, len),
            (Target::Shared(disk), false) => disk.punch_hole(offset, len),
            (Target::Serial(disk, _), true) => disk.discard(offset, len),
            (Target::Serial(disk, _), false) => disk.punch_hole(offset, len),
        }
    }
}

/// Moves `bufs` through `bounce` a chunk at a time: `step` gets the buffers, a chunk of
/// the bounce buffer as long as the next piece of data, and its offset on the disk.
fn through(
    bufs: &mut GuestBuffers<'_>,
    mut offset: u64,
    bounce: &mut [u8],
    mut step: impl FnMut(&mut GuestBuffers<'_>, &mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    while !bufs.is_empty() {
        let n = bufs.len().min(bounce.len());
        if n == 0 {
            return Err(io::Error::other("no bounce buffer"));
        }
        step(bufs, &mut bounce[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// A request header, for tests and benchmarks that play the driver.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
