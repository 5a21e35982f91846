//! The `virtio_vsock_hdr` (virtio 1.2 section 5.10.6): 44 bytes, all fields little-endian,
//! and taking a guest's packet out of a transmit chain with every length checked.

use guest_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::Chain;

/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;
/// The most payload one packet carries, either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`, Firecracker's `MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type served.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_REQUEST`: open a connection.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: the connection is accepted.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: the connection is gone (or refused).
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: the sender will receive and/or send no more.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: data.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's buffer space.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// A packet header, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub kind: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Flags (`SHUTDOWN_*` with [`OP_SHUTDOWN`]).
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

impl Header {
    /// The header in these 44 bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// The header's 44 bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a transmit chain holds no packet the device can take. The chain is returned to
/// the driver and the packet dropped (as Firecracker does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain's device-readable bytes end before the header does.
    #[error("a chain of {0} readable byte(s) holds no 44-byte header")]
    ShortHeader(usize),
    /// The header's `len` is over [`MAX_PAYLOAD`].
    #[error("payload length {0} is over 64 KiB")]
    TooLong(u32),
    /// The chain's device-readable bytes end before the payload the header announces.
    #[error("the header announces {announced} payload byte(s), the chain holds {held}")]
    ShortPayload {
        /// The header's `len`.
        announced: u32,
        /// The readable bytes after the header.
        held: usize,
    },
    /// A device-writable buffer in a transmit chain.
    #[error("a device-writable buffer in the transmit chain")]
    WriteOnly,
    /// A buffer outside guest memory.
    #[error("a buffer at {0:#x} outside guest memory")]
    OutsideMemory(u64),
}

/// Takes the packet out of a transmit chain: its header, and its payload into `payload`
/// (cleared first; at most [`MAX_PAYLOAD`] bytes, whatever the guest says, so the
/// caller's buffer never grows past that). Bytes past the payload are ignored.
pub fn read_packet(memory: &GuestMemoryMmap, chain: Chain<'_>, payload: &mut Vec<u8>) -> Result<Header, PacketError> {
    payload.clear();
    walk(memory, chain, |at, n| {
        let start = payload.len();
        payload.resize(start + n, 0);
        memory.read_slice(&mut payload[start..], GuestAddress(at)).map_err(|_| PacketError::OutsideMemory(at))
    })
}

/// Checks a transmit chain as [`read_packet`] does and returns its header, leaving the
/// payload in guest memory (for a caller that sends it from there).
pub fn check_packet(memory: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Header, PacketError> {
    walk(memory, chain, |at, n| {
        // (`check_range`: a piece may span two adjacent regions, as `read_slice` allows.)
        if memory.check_range(GuestAddress(at), n) {
            Ok(())
        } else {
            Err(PacketError::OutsideMemory(at))
        }
    })
}

/// Walks a transmit chain: reads its header, then gives `payload` each piece of the
/// payload (guest address, length) up to the header's `len`, and checks that there was
/// as much as announced. Bytes past the payload are not looked at.
fn walk(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    mut payload: impl FnMut(u64, usize) -> Result<(), PacketError>,
) -> Result<Header, PacketError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut have_hdr = 0usize;
    let mut want: Option<usize> = None;
    let mut held = 0usize;
    for desc in chain {
        if want == Some(held) {
            break;
        }
        if desc.is_write_only() {
            return Err(PacketError::WriteOnly);
        }
        let mut addr = desc.addr().0;
        let mut left = desc.len() as usize;
        if have_hdr < HDR_LEN {
            let n = left.min(HDR_LEN - have_hdr);
            memory
                .read_slice(&mut hdr[have_hdr..have_hdr + n], GuestAddress(addr))
                .map_err(|_| PacketError::OutsideMemory(addr))?;
            have_hdr += n;
            left -= n;
            addr = addr.wrapping_add(n as u64);
            if have_hdr == HDR_LEN {
                let len = Header::from_bytes(&hdr).len;
                if len as usize > MAX_PAYLOAD {
                    return Err(PacketError::TooLong(len));
                }
                want = Some(len as usize);
            }
        }
        if let Some(want) = want {
            let n = left.min(want - held);
            if n > 0 {
                payload(addr, n)?;
                held += n;
            }
        }
    }
    let Some(want) = want else { return Err(PacketError::ShortHeader(have_hdr)) };
    let header = Header::from_bytes(&hdr);
    if held < want {
        return Err(PacketError::ShortPayload { announced: header.len, held });
    }
    Ok(header)
}

/// How many bytes the chain's leading device-writable buffers hold, counted up to `cap`.
pub fn writable_len(chain: Chain<'_>, cap: usize) -> usize {
    let mut total = 0usize;
    for desc in chain {
        if !desc.is_write_only() || total >= cap {
            break;
        }
        total = total.saturating_add(desc.len() as usize);
    }
    total.min(cap)
}
