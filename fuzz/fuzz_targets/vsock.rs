//! virtio-vsock: the real `Vsock` device (activated with its three queues, notified, its
//! worker woken by host sockets, reset and started again), with arbitrary guest packets
//! on the transmit queue (headers with any op, type, CIDs, ports, flags and credit, `len`
//! true or any value, the header and payload split over buffers, device-writable buffers,
//! buffers outside memory), receive buffers of any size, and host programs that connect
//! to the device's socket and write arbitrary bytes (CONNECT lines well-formed or not),
//! read or not, and close; a listener at `PATH_P` for some ports, which accepts and never
//! reads, and an embedder's in-process port.
//!
//! Oracles: no panic; every input returns within libFuzzer's -timeout (the worker stops
//! when the device is reset or dropped); the heap grows by at most [`BOUND`] while the
//! device runs (a guest sending past its credit, a host peer that never reads, RSTs the
//! guest never takes) and by no more than [`LEFT_BEHIND`] after; every receive buffer the
//! device uses holds a whole header whose `len` is the payload it wrote, from the host's
//! CID to the guest's, of the stream type, with a known op, and with a payload only in an
//! RW; the device's threads are gone after the input.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use devices::virtio::testing::{Line, Mem};
use devices::virtio::vsock::packet::{Header, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_RW, TYPE_STREAM};
use devices::virtio::vsock::{bind, Vsock, VsockHandle};
use devices::virtio::{Activation, Interrupt, VirtioDevice};
use guest_memory::GuestMemoryMmap;
use hvrun_fuzz::layout::{self, Rings};
use hvrun_fuzz::ring;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const SIZE: u16 = 64;
const RINGS: [Rings; 3] = [
    Rings { desc: 0x0000, avail: 0x0400, used: 0x0600 },
    Rings { desc: 0x1000, avail: 0x1400, used: 0x1600 },
    Rings { desc: 0x2000, avail: 0x2400, used: 0x2600 },
];
/// Receive buffers (64 of up to 64 KiB + a header), transmit buffers (one slot of 128 KiB),
/// event buffers.
const RX_DATA: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1_1000;
const TX_DATA: u64 = 0x80_0000;
const EVENT_DATA: u64 = 0x3000;
const RAM: usize = 0xa0_0000;
/// Connections at most (a small limit keeps the bound small).
const MAX_CONNECTIONS: usize = 8;
/// Steps per input.
const MAX_STEPS: usize = 48;
/// While the device runs: 8 connections of 256 KiB guest data held for host peers that
/// do not read (2 MiB), its two packet buffers (128 KiB), RSTs and maps (small); the
/// target's own: a copy of a 64 KiB payload, host reads. 4 MiB leaves the allocator
/// room; a buffer that grew with the guest's traffic would not fit.
const BOUND: usize = 4 << 20;
/// What may stay allocated once the device is gone: lazily created statics.
const LEFT_BEHIND: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Step {
    /// A packet from the guest.
    Packet {
        op: u8,
        /// Port numbers from a small range, so packets meet connections.
        src_port: u8,
        dst_port: u8,
        stream: bool,
        right_cids: bool,
        flags: u8,
        buf_alloc: u32,
        fwd_cnt: u32,
        /// `len` as the payload's, or this.
        len: Option<u32>,
        payload: Payload,
        /// Where the header ends its first buffer (modulo 45), a write-only buffer.
        split: u8,
        writable: bool,
    },
    /// A chain straight from the fuzzer: (offset into the slot, length, writable).
    Raw {
        bytes: Vec<u8>,
        descs: Vec<(u32, u32, bool)>,
    },
    /// Receive buffers of these sizes (modulo a packet and a bit).
    PostRx(Vec<u32>),
    NotifyRx,
    /// A host program connects and writes these bytes (a CONNECT line, if `port`).
    HostConnect {
        port: Option<u8>,
        bytes: Vec<u8>,
    },
    HostWrite {
        which: u8,
        bytes: Vec<u8>,
    },
    HostRead {
        which: u8,
    },
    HostClose {
        which: u8,
    },
    Event,
    TransportReset,
    /// The driver resets the device and starts it again.
    Restart,
    Settle,
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    /// `n` KiB (modulo 65) of a pattern.
    Big(u8),
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Payload::Bytes(b) => b.clone(),
            Payload::Big(n) => vec![0x5a; usize::from(*n % 65) << 10],
        }
    }
}

/// The driver's side: three rings and where it is in them.
struct Driver {
    mem: Arc<Mem>,
    next_avail: [u16; 3],
    last_used: [u16; 3],
    rx_next: u16,
    /// Receive buffers in flight, by descriptor index: (address, length).
    rx_bufs: Vec<Option<(u64, u32)>>,
}

impl Driver {
    fn m(&self) -> &GuestMemoryMmap {
        &self.mem.0
    }

    fn add(&mut self, q: usize, head: u16, descs: &[(u64, u32, bool)]) {
        let r = &RINGS[q];
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = (head + i as u16) % SIZE;
            let next = (index + 1) % SIZE;
            let flags = u16::from(i + 1 < descs.len()) | if writable { 2 } else { 0 };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.m().write_slice(&raw, GuestAddress(r.desc + 16 * u64::from(index))).unwrap();
        }
        let n = self.next_avail[q];
        self.m().write_obj(head.to_le(), GuestAddress(r.avail + 4 + 2 * u64::from(n % SIZE))).unwrap();
        self.next_avail[q] = n.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.m().write_obj(self.next_avail[q].to_le(), GuestAddress(r.avail + 2)).unwrap();
    }

    /// Checks the receive buffers the device used.
    fn check_rx(&mut self) {
        let used_at = RINGS[0].used;
        let idx = layout::le16(self.m(), used_at + 2);
        while self.last_used[0] != idx {
            let at = used_at + 4 + 8 * u64::from(self.last_used[0] % SIZE);
            let id: u32 = self.m().read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.m().read_obj(GuestAddress(at + 4)).unwrap();
            self.last_used[0] = self.last_used[0].wrapping_add(1);
            let Some(Some((addr, size))) = self.rx_bufs.get(id as usize).copied() else {
                panic!("a receive buffer used that was not offered: {id}");
            };
            self.rx_bufs[id as usize] = None;
            assert!(len <= size, "{len} bytes written into a buffer of {size}");
            if size < HDR_LEN as u32 {
                assert_eq!(len, 0, "a buffer too small for a header is given back empty");
                continue;
            }
            assert!(len as usize >= HDR_LEN, "a packet of {len} bytes");
            let mut b = [0u8; HDR_LEN];
            self.m().read_slice(&mut b, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&b);
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN, "len is the payload written");
            assert_eq!((hdr.src_cid, hdr.dst_cid, hdr.kind), (HOST_CID, CID, TYPE_STREAM));
            assert!((1..=OP_CREDIT_REQUEST).contains(&hdr.op), "op {}", hdr.op);
            assert!(hdr.op == OP_RW || hdr.len == 0, "a payload in op {}", hdr.op);
        }
    }
}

fn activate(vsock: &mut Vsock, d: &mut Driver) -> Interrupt {
    for r in &RINGS {
        d.m().write_slice(&[0u8; 0x1000], GuestAddress(r.desc)).unwrap();
    }
    d.next_avail = [0; 3];
    d.last_used = [0; 3];
    d.rx_bufs = vec![None; usize::from(SIZE)];
    let interrupt = Interrupt::new(Arc::new(Line::default()));
    let queues = RINGS.iter().map(|r| layout::queue(r, SIZE, 0, 0, false)).collect();
    let activation =
        Activation { memory: d.mem.clone(), queues, acked_features: 1 << 32, interrupt: interrupt.clone() };
    vsock.activate(activation).expect("the device starts");
    interrupt
}

fn settle(d: &Driver) {
    ring::settle(|| (layout::le16(d.m(), RINGS[0].used + 2), false));
}

fuzz_target!(|steps: Vec<Step>| {
    // SAFETY: setting SIGPIPE's disposition to ignore, before any thread could write.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let (start, threads) = (hvrun_fuzz::live_bytes(), ring::threads());
    run(&steps, start);
    ring::threads_gone(&threads);
    hvrun_fuzz::assert_bounded(start, LEFT_BEHIND, "vsock, after the device is gone");
});

fn run(steps: &[Step], start: isize) {
    let dir = std::env::temp_dir().join(format!("hvrun-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("v.sock");
    let (mut vsock, handle): (Vsock, VsockHandle) =
        Vsock::with_limit(CID, bind(&path).expect("the socket binds"), path.clone(), MAX_CONNECTIONS).unwrap();
    // Port 1's listener accepts and never reads; port 2 is the embedder's; others have none.
    let port_path = |p: u32| PathBuf::from(format!("{}_{p}", path.display()));
    let _ = std::fs::remove_file(port_path(1));
    let listener = UnixListener::bind(port_path(1)).expect("a port listener");
    listener.set_nonblocking(true).unwrap();
    let (embedder, accepted) = std::sync::mpsc::sync_channel(4);
    handle.listen(2, embedder);
    let mem = ring::guest_memory(&[(0, RAM)]);
    let mut d = Driver { mem, next_avail: [0; 3], last_used: [0; 3], rx_next: 0, rx_bufs: Vec::new() };
    let mut interrupt = activate(&mut vsock, &mut d);
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut peers: Vec<UnixStream> = Vec::new();
    let mut tx_slot = 0u16;
    for step in steps.iter().take(MAX_STEPS) {
        match step {
            Step::Packet {
                op,
                src_port,
                dst_port,
                stream,
                right_cids,
                flags,
                buf_alloc,
                fwd_cnt,
                len,
                payload,
                split,
                writable,
            } => {
                let payload = payload.bytes();
                let hdr = Header {
                    src_cid: if *right_cids { CID } else { 7 },
                    dst_cid: if *right_cids { HOST_CID } else { 9 },
                    src_port: u32::from(*src_port % 8),
                    dst_port: if *dst_port >= 0xf0 {
                        (1 << 30) + u32::from(dst_port & 7)
                    } else {
                        u32::from(dst_port % 4)
                    },
                    len: len.unwrap_or(payload.len() as u32),
                    kind: if *stream { TYPE_STREAM } else { 2 },
                    op: u16::from(*op % 9),
                    flags: u32::from(*flags),
                    buf_alloc: *buf_alloc,
                    fwd_cnt: *fwd_cnt,
                };
                let base = TX_DATA;
                d.m().write_slice(&hdr.to_bytes(), GuestAddress(base)).unwrap();
                d.m().write_slice(&payload, GuestAddress(base + 0x100)).unwrap();
                let cut = u32::from(*split) % (HDR_LEN as u32 + 1);
                let mut descs = vec![(base, cut, false), (base + u64::from(cut), HDR_LEN as u32 - cut, false)];
                descs.retain(|&(_, l, _)| l > 0);
                if !payload.is_empty() {
                    descs.push((base + 0x100, payload.len() as u32, *writable));
                }
                d.add(1, tx_slot % SIZE, &descs);
                tx_slot = tx_slot.wrapping_add(descs.len() as u16);
                vsock.queue_notify(1);
            }
            Step::Raw { bytes, descs } => {
                let bytes = &bytes[..bytes.len().min(0x2_0000)];
                d.m().write_slice(bytes, GuestAddress(TX_DATA)).unwrap();
                let descs: Vec<_> = descs
                    .iter()
                    .take(8)
                    .map(|&(at, len, w)| (TX_DATA + u64::from(at % 0x4_0000), len % 0x3_0000, w))
                    .collect();
                if !descs.is_empty() {
                    d.add(1, tx_slot % SIZE, &descs);
                    tx_slot = tx_slot.wrapping_add(descs.len() as u16);
                    vsock.queue_notify(1);
                }
            }
            Step::PostRx(sizes) => {
                for &size in sizes.iter().take(8) {
                    let id = d.rx_next % SIZE;
                    if d.rx_bufs[usize::from(id)].is_some() {
                        break;
                    }
                    d.rx_next = d.rx_next.wrapping_add(1);
                    let size = size % (RX_SLOT as u32);
                    let addr = RX_DATA + RX_SLOT * u64::from(id);
                    d.rx_bufs[usize::from(id)] = Some((addr, size));
                    d.add(0, id, &[(addr, size, true)]);
                }
                vsock.queue_notify(0);
            }
            Step::NotifyRx => vsock.queue_notify(0),
            Step::HostConnect { port, bytes } => {
                if let Ok(mut s) = UnixStream::connect(&path) {
                    s.set_nonblocking(true).unwrap();
                    if let Some(port) = port {
                        let _ = s.write_all(format!("CONNECT {}\n", port % 4).as_bytes());
                    }
                    let _ = s.write(&bytes[..bytes.len().min(4096)]);
                    hosts.push(s);
                }
            }
            Step::HostWrite { which, bytes } => {
                let n = hosts.len() + peers.len();
                if n > 0 {
                    let i = usize::from(*which) % n;
                    let s = if i < hosts.len() { &mut hosts[i] } else { &mut peers[i - hosts.len()] };
                    let _ = s.write(&bytes[..bytes.len().min(0x1_0000)]);
                }
            }
            Step::HostRead { which } => {
                let n = hosts.len() + peers.len();
                if n > 0 {
                    let i = usize::from(*which) % n;
                    let s = if i < hosts.len() { &mut hosts[i] } else { &mut peers[i - hosts.len()] };
                    let mut buf = vec![0u8; 0x1_0000];
                    while let Ok(1..) = s.read(&mut buf) {}
                }
            }
            Step::HostClose { which } => {
                if !hosts.is_empty() {
                    hosts.remove(usize::from(*which) % hosts.len());
                }
            }
            Step::Event => {
                let id = d.next_avail[2] % SIZE;
                d.add(2, id, &[(EVENT_DATA + 8 * u64::from(id), 8, true)]);
                vsock.queue_notify(2);
            }
            Step::TransportReset => handle.transport_reset(),
            Step::Restart => {
                settle(&d);
                vsock.reset();
                interrupt = activate(&mut vsock, &mut d);
            }
            Step::Settle => settle(&d),
        }
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).unwrap();
            peers.push(s);
        }
        while let Ok(s) = accepted.try_recv() {
            s.set_nonblocking(true).unwrap();
            peers.push(s);
        }
        settle(&d);
        if !interrupt.needs_reset() {
            d.check_rx();
        }
        hvrun_fuzz::assert_bounded(start, BOUND, "vsock");
    }
    drop(vsock);
    drop(hosts);
    drop(peers);
    let _ = std::fs::remove_file(port_path(1));
    let _ = std::fs::remove_file(&path);
}
