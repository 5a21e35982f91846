//! Serving one virtio-blk request (virtio spec v1.2 section 5.2.6).
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable memory, then
//! data, then one status byte at the very end of the device-writable memory. Nothing is
//! assumed about how the driver split these across descriptors: [`serve`] reads the
//! readable part as one stream and writes the writable part as another (`virtio-queue`'s
//! `Reader`/`Writer`, which also check every descriptor lies in guest memory). Reads and
//! writes go straight between the disk and the guest's buffers when the disk can
//! (`preadv`/`pwritev` over [`GuestIovecs`], every piece checked against guest memory);
//! otherwise data moves through a bounded bounce buffer. Either way no guest-chosen
//! length sizes an allocation.

use std::io::{Read, Write};

use guest_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;

use super::disk::Disk;
use crate::virtio::iovec::GuestIovecs;
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

/// What a request works with besides its chain.
pub struct Context<'a> {
    /// The disk.
    pub disk: &'a mut dyn Disk,
    /// The device's ID string, zero-padded.
    pub id: &'a [u8; ID_LEN],
    /// The bounce buffer for data.
    pub bounce: &'a mut [u8],
}

/// Whether `len` bytes at `sector` lie inside a disk of `capacity` bytes.
fn in_bounds(sector: u64, len: u64, capacity: u64) -> bool {
    sector.checked_mul(SECTOR_SIZE).and_then(|start| start.checked_add(len)).is_some_and(|end| end <= capacity)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Serves the request in `chain` and writes its status. Returns how many bytes it wrote
/// into the chain (the used length); 0 when the chain has nowhere to put a status.
pub fn serve(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, ctx: Context<'_>) -> u32 {
    let (reader, writer) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            warn_ratelimited!("virtio-blk: request with buffers outside guest memory dropped");
            return 0;
        }
    };
    let mut reader = reader;
    let mut data = writer;
    let writable = data.available_bytes();
    if writable == 0 {
        warn_ratelimited!("virtio-blk: request without a writable status byte dropped");
        return 0;
    }
    let Ok(mut status_out) = data.split_at(writable - 1) else { return 0 };
    let direct = Direct { mem, chain };
    let mut written = None;
    let status = execute(&mut reader, &mut data, direct, ctx, &mut written);
    if status_out.write_all(&[status]).is_err() {
        return 0;
    }
    (written.unwrap_or(data.bytes_written()) + 1) as u32
}

/// The chain again, for moving data straight between the disk and guest memory.
struct Direct<'m> {
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
}

impl<'m> Direct<'m> {
    /// The request's data buffers: the `len` device-writable bytes before the status
    /// byte (`writable`), or the device-readable bytes after the 16-byte header.
    fn data(self, writable: bool, len: usize) -> Option<GuestIovecs<'m>> {
        let skip = if writable { 0 } else { 16 };
        let mut iov = GuestIovecs::from_chain(self.mem, self.chain, writable, skip, usize::MAX)?;
        iov.truncate(len);
        (iov.len() == len).then_some(iov)
    }
}

type ChainReader<'a> = virtio_queue::Reader<'a>;
type ChainWriter<'a> = virtio_queue::Writer<'a>;

/// Serves the request and returns its status. `written` gets how many data bytes went
/// into the chain when they did not go through `data` (which counts its own).
fn execute(
    reader: &mut ChainReader<'_>,
    data: &mut ChainWriter<'_>,
    direct: Direct<'_>,
    ctx: Context<'_>,
    written: &mut Option<usize>,
) -> u8 {
    let mut header = [0u8; 16];
    if reader.read_exact(&mut header).is_err() {
        warn_ratelimited!("virtio-blk: request without a 16-byte device-readable header");
        return S_IOERR;
    }
    let (kind, sector) = (le32(&header[0..4]), le64(&header[8..16]));
    let Context { disk, id, bounce } = ctx;
    match kind {
        T_IN => {
            let len = data.available_bytes() as u64;
            if len > MAX_DATA {
                warn_ratelimited!("virtio-blk: read of {len} bytes; the device takes at most {MAX_DATA}");
                return S_IOERR;
            }
            if len % SECTOR_SIZE != 0 || !in_bounds(sector, len, disk.capacity()) {
                warn_ratelimited!(
                    "virtio-blk: read of {len} bytes at sector {sector} is outside the disk or not whole sectors"
                );
                return S_IOERR;
            }
            if let Some(mut iov) = direct.data(true, len as usize) {
                if let Some(result) = disk.read_guest(&mut iov, sector * SECTOR_SIZE) {
                    *written = Some(len as usize);
                    return status_of("read", result);
                }
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(bounce.len() as u64) as usize;
                if disk.read_at(&mut bounce[..n], sector * SECTOR_SIZE + done).is_err()
                    || data.write_all(&bounce[..n]).is_err()
                {
                    return S_IOERR;
                }
                done += n as u64;
            }
            S_OK
        }
        T_OUT => {
            let len = reader.available_bytes() as u64;
            if disk.read_only() {
                return S_IOERR;
            }
            if len > MAX_DATA {
                warn_ratelimited!("virtio-blk: write of {len} bytes; the device takes at most {MAX_DATA}");
                return S_IOERR;
            }
            if len % SECTOR_SIZE != 0 || !in_bounds(sector, len, disk.capacity()) {
                warn_ratelimited!(
                    "virtio-blk: write of {len} bytes at sector {sector} is outside the disk or not whole sectors"
                );
                return S_IOERR;
            }
            if let Some(mut iov) = direct.data(false, len as usize) {
                if let Some(result) = disk.write_guest(&mut iov, sector * SECTOR_SIZE) {
                    return status_of("write", result);
                }
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(bounce.len() as u64) as usize;
                if reader.read_exact(&mut bounce[..n]).is_err()
                    || disk.write_at(&bounce[..n], sector * SECTOR_SIZE + done).is_err()
                {
                    return S_IOERR;
                }
                done += n as u64;
            }
            S_OK
        }
        T_FLUSH => match disk.flush() {
            Ok(()) => S_OK,
            Err(e) => {
                warn_ratelimited!("virtio-blk: flush failed: {e}");
                S_IOERR
            }
        },
        T_GET_ID => {
            let n = data.available_bytes().min(ID_LEN);
            if data.write_all(&id[..n]).is_err() {
                return S_IOERR;
            }
            S_OK
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.read_only() {
                return S_IOERR;
            }
            let len = reader.available_bytes();
            if len == 0 || len % 16 != 0 || len / 16 > MAX_SEGMENTS {
                warn_ratelimited!("virtio-blk: discard/write-zeroes with {len} bytes of segments");
                return S_UNSUPP;
            }
            let mut segment = [0u8; 16];
            while reader.read_exact(&mut segment).is_ok() {
                let (start, sectors, flags) = (le64(&segment[0..8]), le32(&segment[8..12]), le32(&segment[12..16]));
                let allowed = if kind == T_DISCARD { 0 } else { FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return S_UNSUPP;
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                if sectors > MAX_ZEROES_SECTORS || !in_bounds(start, bytes, disk.capacity()) {
                    return S_IOERR;
                }
                let done = if kind == T_DISCARD {
                    disk.discard(start * SECTOR_SIZE, bytes)
                } else {
                    disk.punch_hole(start * SECTOR_SIZE, bytes)
                };
                if done.is_err() {
                    return S_IOERR;
                }
            }
            S_OK
        }
        other => {
            warn_ratelimited!("virtio-blk: unsupported request type {other}");
            S_UNSUPP
        }
    }
}

/// The status for a disk read or write's `result`.
fn status_of(what: &str, result: std::io::Result<()>) -> u8 {
    match result {
        Ok(()) => S_OK,
        Err(e) => {
            warn_ratelimited!("virtio-blk: {what} failed: {e}");
            S_IOERR
        }
    }
}

/// A request header, for tests and benchmarks that play the driver.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
