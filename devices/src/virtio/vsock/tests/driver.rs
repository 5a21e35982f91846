//! A guest driver's side of the vsock device for the tests: three rings of its own (the
//! mock queue's layout lets a test use only half a queue's entries once), receive buffers
//! reposted as they are read, and each transmitted packet waited for.

use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::super::packet::{Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};
use super::super::{bind, Vsock, VsockHandle, MAX_CONNECTIONS};
use crate::testing::TempDir;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{mem, read_reg, write_reg, Line, Mem, W};
use crate::virtio::Interrupt;

/// The guest's CID in the tests.
pub const CID: u64 = 3;
const RAM: usize = 16 << 20;
const RING_SIZE: u16 = 256;
const RINGS: [u64; 3] = [0x1_0000, 0x1_4000, 0x1_8000];
const EVENT_BUFS: u64 = 0x2_0000;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x40_0000;
const SLOT: u64 = 0x1_1000;
/// Receive buffers posted at any time.
pub const RX_BUFS: u16 = 32;
const TX_SLOTS: u16 = 64;
/// A receive buffer: a header and the largest payload.
const RX_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;

/// One split ring, driven by the test.
struct Ring {
    base: u64,
    next_avail: u16,
    last_used: u16,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// Makes the chain of `descs` (address, length, flags) at descriptor `head` on.
    fn add(&mut self, m: &Mem, head: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | 1 };
            let at = GuestAddress(self.desc() + 16 * u64::from(index));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(index + 1).to_le_bytes());
            m.write_slice(&raw, at).unwrap();
        }
        let slot = GuestAddress(self.avail() + 4 + 2 * u64::from(self.next_avail % RING_SIZE));
        m.write_obj(head.to_le(), slot).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        m.write_obj(self.next_avail.to_le(), GuestAddress(self.avail() + 2)).unwrap();
    }

    /// The next chain the device used: (head, bytes written).
    fn take_used(&mut self, m: &Mem) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        let idx = u16::from_le(m.read_obj::<u16>(GuestAddress(self.used() + 2)).unwrap());
        if idx == self.last_used {
            return None;
        }
        let at = self.used() + 4 + 8 * u64::from(self.last_used % RING_SIZE);
        let id = u32::from_le(m.read_obj::<u32>(GuestAddress(at)).unwrap());
        let len = u32::from_le(m.read_obj::<u32>(GuestAddress(at + 4)).unwrap());
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}

/// The guest: its memory, the transport, its rings.
pub struct Guest {
    pub m: Arc<Mem>,
    pub t: MmioTransport,
    pub handle: VsockHandle,
    pub dir: TempDir,
    rings: [Ring; 3],
    tx_next: u16,
    /// What the guest advertises in its packets.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    /// Receive buffers posted when the device starts.
    rx_bufs: u16,
}

impl Guest {
    /// A started device with its socket at `DIR/v.sock`, receive and event buffers posted.
    pub fn new(name: &str) -> Self {
        Self::with_limit(name, MAX_CONNECTIONS)
    }

    /// [`Guest::new`] with at most `max` connections.
    pub fn with_limit(name: &str, max: usize) -> Self {
        Self::build(name, max, RX_BUFS)
    }

    /// [`Guest::new`] with no receive buffers posted: the test posts its own
    /// ([`Guest::post_rx_len`], ids from 0).
    pub fn bare(name: &str) -> Self {
        Self::build(name, MAX_CONNECTIONS, 0)
    }

    fn build(name: &str, max: usize, rx_bufs: u16) -> Self {
        let dir = TempDir::new(name);
        let path = dir.0.join("v.sock");
        let (vsock, handle) = Vsock::with_limit(CID, bind(&path).unwrap(), path, max).unwrap();
        let m = Arc::new(Mem(mem(RAM)));
        let t = MmioTransport::new(Box::new(vsock), m.clone(), Interrupt::new(Arc::new(Line::default()))).unwrap();
        let rings = RINGS.map(|base| Ring { base, next_avail: 0, last_used: 0 });
        let mut g = Guest { m, t, handle, dir, rings, tx_next: 0, buf_alloc: 256 * 1024, fwd_cnt: 0, rx_bufs };
        g.start();
        g
    }

    /// The device's socket.
    pub fn path(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    /// `PATH_port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir.0.join(format!("v.sock_{port}"))
    }

    /// What a driver does to start the device, then the buffers.
    pub fn start(&mut self) {
        let t = &mut self.t;
        write_reg(t, 0x70, 0);
        write_reg(t, 0x70, 1);
        write_reg(t, 0x70, 3);
        for sel in 0..2 {
            write_reg(t, 0x14, sel);
            let offered = read_reg(t, 0x10);
            write_reg(t, 0x24, sel);
            write_reg(t, 0x20, offered);
        }
        write_reg(t, 0x70, 11);
        for (index, ring) in self.rings.iter_mut().enumerate() {
            *ring = Ring { base: ring.base, next_avail: 0, last_used: 0 };
            self.m.write_slice(&[0u8; 0x3000], GuestAddress(ring.base)).unwrap();
            write_reg(t, 0x30, index as u32);
            write_reg(t, 0x38, u32::from(RING_SIZE));
            for (low, addr) in [(0x80, ring.desc()), (0x90, ring.avail()), (0xa0, ring.used())] {
                write_reg(t, low, addr as u32);
                write_reg(t, low + 4, (addr >> 32) as u32);
            }
            write_reg(t, 0x44, 1);
        }
        write_reg(t, 0x70, 15);
        assert_eq!(read_reg(t, 0x70), 15, "the device accepted DRIVER_OK");
        for id in 0..self.rx_bufs {
            self.post_rx(id);
        }
        for id in 0..2u16 {
            self.rings[2].add(&self.m, id, &[(EVENT_BUFS + 8 * u64::from(id), 8, W)]);
        }
        write_reg(&mut self.t, 0x50, 0);
        write_reg(&mut self.t, 0x50, 2);
        self.tx_next = 0;
    }

    fn post_rx(&mut self, id: u16) {
        self.rings[0].add(&self.m, id, &[(RX_BASE + SLOT * u64::from(id), RX_LEN, W)]);
    }

    /// Notifies queue `q` with nothing new in it.
    pub fn notify(&mut self, q: u32) {
        write_reg(&mut self.t, 0x50, q);
    }

    /// Posts receive buffer `id` of `len` bytes and notifies.
    pub fn post_rx_len(&mut self, id: u16, len: u32) {
        self.rings[0].add(&self.m, id, &[(RX_BASE + SLOT * u64::from(id), len, W)]);
        write_reg(&mut self.t, 0x50, 0);
    }

    /// Posts receive buffers `ids` of `len` bytes each, then notifies once.
    pub fn post_rx_lens(&mut self, ids: std::ops::Range<u16>, len: u32) {
        for id in ids {
            self.rings[0].add(&self.m, id, &[(RX_BASE + SLOT * u64::from(id), len, W)]);
        }
        write_reg(&mut self.t, 0x50, 0);
    }

    /// Posts `descs` as receive chain `id` (addresses relative to buffer `id`'s slot) and
    /// notifies.
    pub fn post_rx_chain(&mut self, id: u16, descs: &[(u64, u32, u16)]) {
        let base = RX_BASE + SLOT * u64::from(id);
        let descs: Vec<_> = descs.iter().map(|&(at, len, flags)| (base + at, len, flags)).collect();
        self.rings[0].add(&self.m, id, &descs);
        write_reg(&mut self.t, 0x50, 0);
    }

    /// `len` bytes from `at` in receive buffer `id`'s slot.
    pub fn rx_bytes(&self, id: u16, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.m.read_slice(&mut b, GuestAddress(RX_BASE + SLOT * u64::from(id) + at)).unwrap();
        b
    }

    /// The next receive buffer the device used, within 10 s: (id, bytes written, the
    /// header if it holds one).
    pub fn rx_used(&mut self) -> (u16, u32, Option<Header>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((id, len)) = self.rings[0].take_used(&self.m) {
                let mut b = [0u8; HDR_LEN];
                self.m.read_slice(&mut b, GuestAddress(RX_BASE + SLOT * u64::from(id))).unwrap();
                return (id, len, (len as usize >= HDR_LEN).then(|| Header::from_bytes(&b)));
            }
            assert!(Instant::now() < deadline, "no receive buffer used");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A header from the guest's `src` port to the host's `dst`, with the guest's credit.
    pub fn hdr(&self, op: u16, src: u32, dst: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Sends `descs` as one transmit chain (addresses relative to a free slot) and waits
    /// for the device to return it.
    pub fn send_chain(&mut self, bytes: &[u8], descs: &[(u64, u32, u16)]) {
        let slot = self.tx_next % TX_SLOTS;
        self.tx_next = self.tx_next.wrapping_add(1);
        let base = TX_BASE + SLOT * u64::from(slot);
        self.m.write_slice(bytes, GuestAddress(base)).unwrap();
        let descs: Vec<_> = descs.iter().map(|&(at, len, flags)| (base + at, len, flags)).collect();
        self.rings[1].add(&self.m, slot * 4, &descs);
        write_reg(&mut self.t, 0x50, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((id, _)) = self.rings[1].take_used(&self.m) {
                assert_eq!(id, slot * 4, "chains come back in order");
                return;
            }
            assert!(Instant::now() < deadline, "the device did not take a transmit chain");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sends a packet: the header (its `len` set to the payload's) and payload in two
    /// buffers.
    pub fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let mut bytes = vec![0u8; 0x100 + payload.len()];
        bytes[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
        bytes[0x100..].copy_from_slice(payload);
        if payload.is_empty() {
            self.send_chain(&bytes, &[(0, HDR_LEN as u32, 0)]);
        } else {
            self.send_chain(&bytes, &[(0, HDR_LEN as u32, 0), (0x100, payload.len() as u32, 0)]);
        }
    }

    /// The next packet for the guest within `wait`; its buffer is posted again.
    pub fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((id, len)) = self.rings[0].take_used(&self.m) {
                assert!(len as usize >= HDR_LEN, "a packet of {len} bytes");
                let mut bytes = vec![0u8; len as usize];
                self.m.read_slice(&mut bytes, GuestAddress(RX_BASE + SLOT * u64::from(id))).unwrap();
                let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
                assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN, "the header's len is the payload's");
                assert_eq!((hdr.src_cid, hdr.dst_cid, hdr.kind), (HOST_CID, CID, TYPE_STREAM));
                self.post_rx(id);
                write_reg(&mut self.t, 0x50, 0);
                return Some((hdr, bytes.split_off(HDR_LEN)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The next packet for the guest (within 10 s).
    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(Duration::from_secs(10)).expect("a packet for the guest")
    }

    /// Asserts that nothing comes for the guest for `wait`.
    pub fn quiet(&mut self, wait: Duration) {
        if let Some((hdr, _)) = self.try_recv(wait) {
            panic!("an unexpected packet: {hdr:?}");
        }
    }

    /// The next used event buffer's first 4 bytes, within 10 s.
    pub fn event(&mut self) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((id, len)) = self.rings[2].take_used(&self.m) {
                assert_eq!(len, 4);
                let at = GuestAddress(EVENT_BUFS + 8 * u64::from(id));
                return Some(u32::from_le(self.m.read_obj::<u32>(at).unwrap()));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
