//! The virtio-mmio transport (`devices::virtio::mmio::MmioTransport`) with each virtio
//! device behind it, driven by a sequence of operations: register reads and writes of 1,
//! 2, 4 or 8 bytes anywhere in the 0x200 window, guest-memory pokes, queue notifies,
//! resets, and a driver's helpers (negotiate features, set up a queue at plausible
//! addresses, DRIVER_OK, add a chain, move the available index far ahead) so inputs get
//! past feature negotiation and into the devices' queue work. The devices: virtio-rng;
//! virtio-blk over a `MemDisk` (its worker thread); virtio-console over a
//! `Backend::Stream` (an `Output` to a sink, an input pipe the target feeds or closes);
//! virtio-net over one end of a unix datagram socketpair (the target sends frames from the
//! other end and drains it); the virtio-input power button (the target presses it). Device
//! threads are waited for with a bounded loop.
//!
//! Oracles: no panic; every operation, every reset and the final drop return (libFuzzer's
//! -timeout: a worker that does not stop is a hang); the heap grows by at most [`BOUND`]
//! while the devices run and by no more than [`LEFT_BEHIND`] once they are gone. While
//! only the driver helpers have configured the queues (the rings where they put them,
//! nothing poked into them):
//! - an available index more than a queue ahead of where the device can be shows
//!   DEVICE_NEEDS_RESET (0x40) in Status once the device has looked at that queue (after
//!   a notify of it, within a second);
//! - every used entry names a chain the driver offered on that queue and not yet used,
//!   and its length does not exceed the chain's writable bytes;
//! - the device writes nothing outside the used rings and the buffer area: the descriptor
//!   tables, available rings and guard pages hold what the driver wrote;
//! - with buffers the driver does not share between chains in flight: the console's host
//!   input reaches the guest exactly, in order (a prefix of it); the guest's console
//!   output reaches the host writer exactly, in order (a prefix); every frame the peer
//!   receives is the next frame a transmit chain carried, none skipped (only an empty
//!   frame waiting for a reset may be lost); every frame delivered to the guest is a
//!   frame the peer sent, in order, behind a header whose num_buffers counts its buffers.

#![no_main]

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use devices::bus::MmioDeviceMut;
use devices::virtio::block::disk::MemDisk;
use devices::virtio::block::Block;
use devices::virtio::console::{self, stream_output, Backend, Console};
use devices::virtio::input::{PowerButton, PowerButtonDevice};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::backend::{Unixgram, VNET_HDR_LEN};
use devices::virtio::net::{self, Net};
use devices::virtio::rng::Rng;
use devices::virtio::testing::{Line, Mem};

use devices::virtio::{Interrupt, VirtioDevice};
use hvrun_fuzz::ring::{self, overlap, Desc, Span, NEXT, WRITE};
use hvrun_fuzz::sink::{HostSink, SINK_CAP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest memory: one region.
const MEM_END: u64 = 0x4_0000;
const REGIONS: [(u64, usize); 1] = [(0, MEM_END as usize)];
/// Where the helpers put queue `q`'s rings: the descriptor table at +0, the available
/// ring at +0x1000, the used ring at +0x2000 (room for 256 entries each).
const RINGS: [u64; 2] = [0x0000, 0x4000];
/// The device must never write here: no ring or buffer the helpers set up is in them.
const GUARDS: [Span; 2] = [(0x8000, 0x9000), (0x3_e000, 0x3_f000)];
/// Buffers.
const DATA: Span = (0x9000, 0x3_e000);
/// Buffers that run off the end of guest memory start here.
const END_ZONE: Span = (0x3_f000, MEM_END);
/// Virtio feature bits the helpers care about.
const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
/// Register offsets.
const STATUS: u64 = 0x70;
const NOTIFY: u64 = 0x50;
const NEEDS_RESET: u32 = 0x40;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// How much the heap may grow while the devices run. Their fixed buffers: the net
/// device's two frame buffers (2 x 64 KiB and change), the block device's bounce buffer
/// (256 KiB), the console's output buffer (64 KiB), its pending output (one chain, 64 KiB,
/// plus what the buffer could not take, 64 KiB at most) and input chunk (4 KiB), the rng's
/// 4 KiB; the host sink (capped at [`SINK_CAP`]), the target's own model (a shadow of guest
/// memory, 256 KiB; chains in flight; frames pushed and received, at most 64 x 64 KiB = 4 MiB
/// for frames sent by the peer), thread stacks being outside the heap. 8 MiB covers that
/// with room for the allocator; a queue that grew with what the guest or the host sends
/// would not stay inside it.
const BOUND: usize = 8 << 20;
/// What may stay allocated after everything of an input is dropped: lazily created
/// statics (rate limiters, thread-local buffers of the target's own).
const LEFT_BEHIND: usize = 1 << 20;
/// The rng's device type.
const RNG: u32 = 4;
/// Operations per input.
const MAX_OPS: usize = 64;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    B1,
    B2,
    B4,
    B8,
}

impl Size {
    fn bytes(self) -> usize {
        match self {
            Size::B1 => 1,
            Size::B2 => 2,
            Size::B4 => 4,
            Size::B8 => 8,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Place {
    /// The next free bytes of the buffer area.
    Next,
    /// Anywhere in the buffer area (it may share bytes with other chains).
    At(u32),
    /// `n` bytes before the end of guest memory (running off it).
    PastEnd(u8),
}

#[derive(Arbitrary, Debug)]
enum Fill {
    Zero,
    Bytes(Vec<u8>),
    /// A virtio-blk request header.
    Header {
        kind: u8,
        sector: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Buf {
    len: u16,
    big: bool,
    write: bool,
    place: Place,
    fill: Fill,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        size: Size,
    },
    Write {
        offset: u16,
        size: Size,
        value: u64,
    },
    /// Guest memory, anywhere (the rings too: a hostile driver).
    Poke {
        addr: u32,
        bytes: Vec<u8>,
    },
    Notify {
        queue: u8,
    },
    Reset,
    /// ACKNOWLEDGE, DRIVER, the offered features masked, FEATURES_OK.
    Negotiate {
        mask: u64,
    },
    SetupQueue {
        queue: u8,
        size_log2: u8,
    },
    DriverOk,
    /// Reset, negotiate, set up every queue, DRIVER_OK.
    Start {
        mask: u64,
        size_log2: u8,
    },
    AddChain {
        queue: u8,
        bufs: Vec<Buf>,
        notify: bool,
    },
    /// Moves the available index more than a queue past where the device can be, and
    /// notifies.
    Runaway {
        queue: u8,
        extra: u16,
    },
    Settle,
    /// Console: bytes into the input pipe; net: a frame from the peer.
    HostSend {
        len: u16,
        seed: u8,
    },
    /// Console: closes the input; net: drains the peer.
    HostDrain,
    Ack {
        bits: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Rng,
    Block { sectors: u8, read_only: bool },
    Console { sink_fails: bool },
    Net,
    PowerButton,
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    ops: Vec<Op>,
}

/// A chain the driver offered and the device has not used yet.
struct InFlight {
    descs: Vec<u16>,
    bufs: Vec<Desc>,
    writable: u64,
    /// Whether every buffer lies wholly in guest memory.
    all_in: bool,
}

#[derive(Default)]
struct QueueMirror {
    size: u16,
    ready: bool,
    free: Vec<u16>,
    avail: u16,
    used_seen: u16,
    in_flight: HashMap<u16, InFlight>,
    /// The driver broke this queue (a runaway index): no more chains or checks on it.
    broken: bool,
}

impl QueueMirror {
    fn base(q: usize) -> u64 {
        RINGS[q]
    }
}

/// The host's side of the device's backend.
enum Host {
    None,
    Console { input: Option<mio::unix::pipe::Sender>, sink: HostSink },
    Net { peer: UnixDatagram },
    Button(PowerButton),
}

/// Frames of the net model.
#[derive(Default)]
struct NetModel {
    /// Frames a transmit chain carried (used), in order; `true` for one that may be lost.
    sent: VecDeque<(Vec<u8>, bool)>,
    /// Frames the peer received and not yet matched.
    received: VecDeque<Vec<u8>>,
    /// Frames the peer sent, not yet delivered or skipped.
    pushed: VecDeque<Vec<u8>>,
    /// A frame being delivered across several used buffers: (bytes so far, buffers left).
    partial: Option<(Vec<u8>, u16)>,
}

struct Driver {
    /// `None` once dropped, at the end.
    t: Option<MmioTransport>,
    mem: Arc<Mem>,
    kind: u32,
    queues: Vec<QueueMirror>,
    /// Only the helpers configured the queues, and nothing was poked into the rings.
    clean: bool,
    ever_unclean: bool,
    /// No buffer of a chain in flight shares bytes with another, and nothing was poked
    /// into one: content oracles hold.
    exact: bool,
    active: bool,
    acked: u64,
    bump: u64,
    shadow: Vec<u8>,
    host: Host,
    /// Console: host input written, and the part the guest has got.
    console_in: Vec<u8>,
    console_in_got: usize,
    /// Console: guest output that must reach the host, in order.
    console_out: Vec<u8>,
    net: NetModel,
}

fuzz_target!(|input: Input| {
    let (start, threads) = (hvrun_fuzz::live_bytes(), ring::threads());
    run(input, start);
    ring::threads_gone(&threads);
    hvrun_fuzz::assert_bounded(start, LEFT_BEHIND, "mmio_transport, after the devices are gone");
});

fn run(input: Input, start: isize) {
    let mem = ring::guest_memory(&REGIONS);
    let line = Arc::new(Line::default());
    let (device, host): (Box<dyn VirtioDevice>, Host) = match input.kind {
        Kind::Rng => (Box::new(Rng::new(Box::new(std::io::repeat(0xa5)))), Host::None),
        Kind::Block { sectors, read_only } => {
            let bytes = (0..512 * (usize::from(sectors) + 1)).map(|i| (i % 251) as u8).collect();
            (Box::new(Block::new(Box::new(MemDisk { bytes, read_only, flushes: 0 }), "fuzz")), Host::None)
        }
        Kind::Console { sink_fails } => {
            let (sender, receiver) = mio::unix::pipe::new().expect("a pipe");
            let sink = HostSink { fails: sink_fails, ..HostSink::default() };
            let output = stream_output(Box::new(sink.clone()));
            (
                Box::new(Console::new(Backend::Stream { output, input: Some(receiver) })),
                Host::Console { input: Some(sender), sink },
            )
        }
        Kind::Net => {
            let (ours, peer) = UnixDatagram::pair().expect("a socketpair");
            peer.set_nonblocking(true).unwrap();
            let backend = Unixgram::from_fd(OwnedFd::from(ours)).expect("a datagram backend");
            (Box::new(Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1])), Host::Net { peer })
        }
        Kind::PowerButton => {
            let (device, button) = PowerButtonDevice::new();
            (Box::new(device), Host::Button(button))
        }
    };
    let kind = device.device_type();
    let queues = device.queue_max_sizes().len();
    let t = MmioTransport::new(device, mem.clone(), Interrupt::new(line.clone())).expect("a transport");
    let mut d = Driver {
        t: Some(t),
        mem,
        kind,
        queues: (0..queues).map(|_| QueueMirror::default()).collect(),
        clean: true,
        ever_unclean: false,
        exact: true,
        active: false,
        acked: 0,
        bump: DATA.0,
        shadow: vec![0; MEM_END as usize],
        host,
        console_in: Vec::new(),
        console_in_got: 0,
        console_out: Vec::new(),
        net: NetModel::default(),
    };
    for op in input.ops.iter().take(MAX_OPS) {
        d.op(op);
        hvrun_fuzz::assert_bounded(start, BOUND, "mmio_transport");
    }
    d.finish();
}

impl Driver {
    fn m(&self) -> &vm_memory::GuestMemoryMmap<guest_memory::Mapping> {
        &self.mem.0
    }

    fn t(&mut self) -> &mut MmioTransport {
        self.t.as_mut().expect("the transport is there until the end")
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t().read(0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.t().write(0, offset, &value.to_le_bytes());
        self.after_write(offset);
    }

    /// After any register write: a write of 0 to Status reset the device.
    fn after_write(&mut self, offset: u64) {
        if offset == STATUS && self.read(STATUS) == 0 {
            self.reset_mirror();
        }
    }

    fn reset_mirror(&mut self) {
        self.harvest_all();
        for q in &mut self.queues {
            *q = QueueMirror::default();
        }
        self.net.partial = None;
        self.clean = true;
        self.active = false;
        self.acked = 0;
    }

    /// Writes guest memory as the driver, keeping the shadow.
    fn poke(&mut self, addr: u64, bytes: &[u8]) {
        if self.m().write_slice(bytes, GuestAddress(addr)).is_ok() {
            self.shadow[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
        }
    }

    fn status(&mut self) -> u32 {
        self.read(STATUS)
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::Read { offset, size } => {
                let n = size.bytes();
                let offset = u64::from(*offset) % (0x200 - n as u64 + 1);
                let mut b = [0u8; 8];
                self.t().read(0, offset, &mut b[..n]);
            }
            Op::Write { offset, size, value } => {
                let n = size.bytes();
                let offset = u64::from(*offset) % (0x200 - n as u64 + 1);
                self.harvest_all();
                // What the transport takes: aligned 32-bit writes.
                let reg = (n == 4 && offset.is_multiple_of(4)).then_some(*value as u32);
                match (offset, reg) {
                    // The driver configures a queue itself: its rings may be anywhere.
                    (0x38..=0x44 | 0x80..=0xa4, Some(_)) => self.taint(true),
                    // Features or status the model does not follow (a reset it does).
                    (0x20 | STATUS, Some(v)) if !(offset == STATUS && v == 0) => self.taint(false),
                    _ => {}
                }
                self.t().write(0, offset, &value.to_le_bytes()[..n]);
                self.after_write(offset);
                if offset == NOTIFY || offset == STATUS {
                    self.settle();
                }
            }
            Op::Poke { addr, bytes } => {
                let addr = u64::from(*addr) % MEM_END;
                let bytes = &bytes[..bytes.len().min((MEM_END - addr) as usize)];
                let span = (addr, addr + bytes.len() as u64);
                if overlap(span, (0, GUARDS[0].0)) {
                    // Into the rings: descriptors may now point anywhere.
                    self.taint(true);
                }
                let hits_flight = self
                    .queues
                    .iter()
                    .flat_map(|q| q.in_flight.values())
                    .any(|f| f.bufs.iter().any(|b| overlap(b.span(), span)));
                if hits_flight {
                    self.exact = false;
                }
                self.poke(addr, bytes);
            }
            Op::Notify { queue } => {
                self.write(NOTIFY, u32::from(*queue % 4));
                self.settle();
            }
            Op::Reset => {
                self.write(STATUS, 0);
            }
            Op::Negotiate { mask } => self.negotiate(*mask),
            Op::SetupQueue { queue, size_log2 } => {
                let q = usize::from(*queue) % self.queues.len();
                self.setup_queue(q, *size_log2);
            }
            Op::DriverOk => self.driver_ok(),
            Op::Start { mask, size_log2 } => {
                self.write(STATUS, 0);
                self.negotiate(*mask);
                for q in 0..self.queues.len() {
                    self.setup_queue(q, *size_log2);
                }
                self.driver_ok();
            }
            Op::AddChain { queue, bufs, notify } => {
                let q = usize::from(*queue) % self.queues.len();
                self.add_chain(q, bufs);
                if *notify {
                    self.write(NOTIFY, q as u32);
                    self.settle();
                }
            }
            Op::Runaway { queue, extra } => {
                let q = usize::from(*queue) % self.queues.len();
                self.runaway(q, *extra);
            }
            Op::Settle => self.settle(),
            Op::HostSend { len, seed } => self.host_send(usize::from(*len), *seed),
            Op::HostDrain => self.host_drain(),
            Op::Ack { bits } => {
                self.write(0x64, u32::from(*bits & 3));
            }
        }
    }

    /// The driver did something the model does not follow: the queue oracles are off
    /// until a reset, the content oracles for good; with `anywhere`, the device may now
    /// write anywhere, so the final check of guest memory is off too.
    fn taint(&mut self, anywhere: bool) {
        self.clean = false;
        self.exact = false;
        self.ever_unclean |= anywhere;
    }

    fn negotiate(&mut self, mask: u64) {
        let before = self.status();
        self.write(STATUS, 1);
        self.write(STATUS, 3);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(0x14, sel);
            offered |= u64::from(self.read(0x10)) << (32 * sel);
        }
        // Mostly a modern driver: VERSION_1 unless the mask's top bit says otherwise.
        let accepted = offered & (mask | if mask >> 63 == 0 { VERSION_1 } else { 0 });
        for sel in 0..2u32 {
            self.write(0x24, sel);
            self.write(0x20, (accepted >> (32 * sel)) as u32);
        }
        self.write(STATUS, 11);
        // Features written once FEATURES_OK is set are ignored.
        if before & FEATURES_OK == 0 && self.status() & FEATURES_OK != 0 {
            self.acked = accepted;
        }
    }

    fn setup_queue(&mut self, q: usize, size_log2: u8) {
        let size = 1u16 << (size_log2 % 9);
        let base = QueueMirror::base(q);
        if self.status() & (FEATURES_OK | DRIVER_OK) != FEATURES_OK {
            return; // the transport would ignore it
        }
        // A driver gives a queue fresh rings.
        let zeros = vec![0u8; 0x3000];
        self.poke(base, &zeros);
        self.write(0x30, q as u32);
        self.write(0x38, u32::from(size));
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(0x44, 1);
        let open = self.status() & (FEATURES_OK | DRIVER_OK) == FEATURES_OK;
        if open && self.read(0x44) == 1 {
            self.queues[q] =
                QueueMirror { size, ready: true, free: (0..size).rev().collect(), ..QueueMirror::default() };
        }
    }

    fn driver_ok(&mut self) {
        let status = self.status();
        self.write(STATUS, status | DRIVER_OK);
        if self.status() & DRIVER_OK != 0 && !self.active {
            self.active = true;
            // The device got the ready queues up to the first one that is not.
            let mut on = true;
            for q in &mut self.queues {
                on &= q.ready;
                q.ready = on;
            }
        }
        self.settle();
    }

    /// Whether the device runs queue `q` as the model knows it.
    fn modelled(&self, q: usize) -> bool {
        self.clean && self.active && self.queues[q].ready && !self.queues[q].broken
    }

    fn add_chain(&mut self, q: usize, bufs: &[Buf]) {
        if !self.modelled(q) || bufs.is_empty() {
            return;
        }
        self.harvest(q);
        let bufs = &bufs[..bufs.len().min(8)];
        if self.queues[q].free.len() < bufs.len() {
            return;
        }
        let mut laid = Vec::new();
        for b in bufs {
            let len = if b.big { u32::from(b.len) * 2 } else { u32::from(b.len) % 2048 };
            let addr = match b.place {
                Place::Next => {
                    if self.bump + u64::from(len) > DATA.1 {
                        self.bump = DATA.0;
                    }
                    let at = self.bump;
                    self.bump = (at + u64::from(len) + 15) & !15;
                    at
                }
                Place::At(off) => DATA.0 + u64::from(off) % (DATA.1 - DATA.0),
                Place::PastEnd(n) => MEM_END - 1 - u64::from(n),
            };
            // Buffers stay out of the rings and the guards.
            let addr = if addr + u64::from(len) > DATA.1 && !matches!(b.place, Place::PastEnd(_)) {
                DATA.1 - u64::from(len)
            } else {
                addr
            };
            let fill: Vec<u8> = match &b.fill {
                Fill::Zero => Vec::new(),
                Fill::Bytes(v) => v[..v.len().min(len as usize)].to_vec(),
                Fill::Header { kind, sector } => {
                    let kind = [0u32, 1, 4, 8, 11, 13][usize::from(*kind) % 6];
                    let h = devices::virtio::block::request::header(kind, u64::from(*sector));
                    h[..16.min(len as usize)].to_vec()
                }
            };
            let flags = if b.write { WRITE } else { 0 };
            laid.push((Desc { addr, len, flags, next: 0 }, fill));
        }
        // The content oracles need the buffers of chains in flight, this one's included,
        // not to share bytes.
        let mut spans: Vec<Span> =
            self.queues.iter().flat_map(|q| q.in_flight.values()).flat_map(|f| f.bufs.iter().map(Desc::span)).collect();
        spans.extend(laid.iter().map(|(d, _)| d.span()));
        if !ring::disjoint(spans) {
            self.exact = false;
        }
        let base = QueueMirror::base(q);
        let descs: Vec<u16> = laid.iter().map(|_| self.queues[q].free.pop().unwrap()).collect();
        let mut chain = Vec::new();
        for (i, (mut d, fill)) in laid.into_iter().enumerate() {
            if !fill.is_empty() {
                self.poke(d.addr, &fill);
            }
            chain.push(d);
            if i + 1 < descs.len() {
                d.flags |= NEXT;
                d.next = descs[i + 1];
            }
            self.poke(base + 16 * u64::from(descs[i]), &d.bytes());
        }
        let head = descs[0];
        let all_in = chain.iter().all(|d| self.m().check_range(GuestAddress(d.addr), d.len as usize));
        let writable = chain.iter().filter(|d| d.writable()).map(|d| u64::from(d.len)).sum();
        let mirror = &mut self.queues[q];
        let slot = base + 0x1000 + 4 + 2 * u64::from(mirror.avail % mirror.size);
        mirror.avail = mirror.avail.wrapping_add(1);
        let avail = mirror.avail;
        mirror.in_flight.insert(head, InFlight { descs, bufs: chain, writable, all_in });
        self.poke(slot, &head.to_le_bytes());
        self.poke(base + 0x1000 + 2, &avail.to_le_bytes());
    }

    fn runaway(&mut self, q: usize, extra: u16) {
        if !self.modelled(q) {
            return;
        }
        self.settle();
        self.harvest(q);
        let base = QueueMirror::base(q);
        let used = self.m().read_obj::<u16>(GuestAddress(base + 0x2000 + 2)).unwrap();
        let mirror = &self.queues[q];
        let (size, avail) = (u32::from(mirror.size), mirror.avail);
        // The device's next_avail is between the used index it wrote and the available
        // index: make the new index more than a queue past all of those.
        let behind = u32::from(avail.wrapping_sub(used));
        let room = 65_535 - size - behind;
        let index = avail.wrapping_add((size + 1 + u32::from(extra) % room) as u16);
        self.queues[q].broken = true;
        self.poke(base + 0x1000 + 2, &index.to_le_bytes());
        self.write(NOTIFY, q as u32);
        let mut status = 0;
        let seen = ring::settle(|| {
            status = self.read(STATUS);
            ((), status & NEEDS_RESET != 0)
        }) && status & NEEDS_RESET != 0;
        if !seen {
            // Give a loaded machine the whole second before calling it a failure.
            let deadline = std::time::Instant::now() + ring::SETTLE_MAX;
            while std::time::Instant::now() < deadline && self.read(STATUS) & NEEDS_RESET == 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        let status = self.read(STATUS);
        assert!(
            status & NEEDS_RESET != 0,
            "device {}: available index {index} with the device between {used} and {avail} in a queue of {size}: \
             Status {status:#x} lacks DEVICE_NEEDS_RESET",
            self.kind
        );
    }

    /// Used indices and what the host saw: what moves while a device works.
    fn progress(&mut self) -> (Vec<u16>, u32, u32, usize) {
        let used = (0..self.queues.len())
            .map(|q| self.m().read_obj::<u16>(GuestAddress(RINGS[q] + 0x2000 + 2)).unwrap())
            .collect();
        let sink = match &self.host {
            Host::Console { sink, .. } => sink.got.lock().unwrap().1,
            _ => 0,
        };
        (used, self.read(0x60), self.read(STATUS), sink)
    }

    /// Waits (boundedly) until the device has used every chain in flight, or stopped
    /// moving, then takes in what it used.
    fn settle(&mut self) {
        if self.active {
            let targets: Vec<Option<u16>> =
                (0..self.queues.len()).map(|q| self.modelled(q).then(|| self.queues[q].avail)).collect();
            ring::settle(|| {
                let p = self.progress();
                let done = p.2 & NEEDS_RESET != 0 || targets.iter().zip(&p.0).all(|(t, u)| t.is_none_or(|t| t == *u));
                (p, done)
            });
        }
        self.harvest_all();
    }

    fn harvest_all(&mut self) {
        for q in 0..self.queues.len() {
            self.harvest(q);
        }
    }

    /// Takes in what the device used on queue `q`: each used entry must name a chain in
    /// flight there, with a length within its writable bytes.
    fn harvest(&mut self, q: usize) {
        if !self.modelled(q) {
            return;
        }
        let base = QueueMirror::base(q);
        let used = self.m().read_obj::<u16>(GuestAddress(base + 0x2000 + 2)).unwrap();
        let in_flight = self.queues[q].in_flight.len();
        let new = used.wrapping_sub(self.queues[q].used_seen);
        assert!(
            usize::from(new) <= in_flight,
            "device {}: queue {q}'s used index moved {new} entries with {in_flight} chains in flight",
            self.kind
        );
        for _ in 0..new {
            let mirror = &mut self.queues[q];
            let at = base + 0x2000 + 4 + 8 * u64::from(mirror.used_seen % mirror.size);
            mirror.used_seen = mirror.used_seen.wrapping_add(1);
            let id = self.m().read_obj::<u32>(GuestAddress(at)).unwrap();
            let len = self.m().read_obj::<u32>(GuestAddress(at + 4)).unwrap();
            let chain = u16::try_from(id).ok().and_then(|id| self.queues[q].in_flight.remove(&id));
            let Some(chain) = chain else {
                panic!("device {}: queue {q} used descriptor {id}, which heads no chain in flight", self.kind);
            };
            assert!(
                u64::from(len) <= chain.writable,
                "device {}: queue {q}: used length {len} > the chain's {} writable bytes",
                self.kind,
                chain.writable
            );
            self.used(q, &chain, len);
            self.queues[q].free.extend(chain.descs.iter().rev());
        }
    }

    /// What the device did with a chain it used, for the content oracles.
    fn used(&mut self, q: usize, chain: &InFlight, len: u32) {
        use virtio_bindings::virtio_ids::{VIRTIO_ID_CONSOLE, VIRTIO_ID_INPUT, VIRTIO_ID_NET};
        match (self.kind, q) {
            (VIRTIO_ID_CONSOLE, 0) => {
                let got = self.leading_written(chain, len as usize);
                if self.exact {
                    let from = self.console_in_got;
                    let want = &self.console_in[from.min(self.console_in.len())..];
                    assert!(
                        want.starts_with(&got),
                        "console: the guest got bytes that are not the next host input ({} bytes in)",
                        from
                    );
                }
                self.console_in_got += got.len();
            }
            (VIRTIO_ID_CONSOLE, 1) if chain.all_in => {
                // The leading readable buffers, at most 64 KiB.
                let leading = chain.bufs.iter().take_while(|b| !b.writable());
                let mut out = ring::contents(self.m(), leading, usize::MAX).expect("in memory");
                out.truncate(console::MAX_CHAIN_OUTPUT);
                if self.console_out.len() < SINK_CAP {
                    self.console_out.extend(out);
                }
            }
            (VIRTIO_ID_CONSOLE, 1) => self.exact = false,
            (VIRTIO_ID_NET, 1) => {
                let readable = chain.bufs.iter().all(|b| !b.writable());
                let total: u64 = chain.bufs.iter().map(|b| u64::from(b.len)).sum();
                if !readable {
                    // Sent straight from the readable buffers, or dropped: not modelled.
                    self.exact = false;
                } else if chain.all_in && total >= VNET_HDR_LEN as u64 && total <= net::MAX_FRAME as u64 {
                    let bytes = ring::contents(self.m(), &chain.bufs, net::MAX_FRAME).expect("in memory");
                    let frame = bytes[VNET_HDR_LEN..].to_vec();
                    // An empty frame goes through the device's own buffer, which a reset
                    // empties: it may be lost.
                    let may_be_lost = frame.is_empty();
                    self.net.sent.push_back((frame, may_be_lost));
                }
                self.match_frames();
            }
            (VIRTIO_ID_NET, 0) => self.delivered(chain, len),
            // An event is 8 bytes, written whole or not at all; status buffers are only read.
            (VIRTIO_ID_INPUT, 0) => assert!(len == 0 || len == 8, "input: an event buffer used with {len} bytes"),
            (VIRTIO_ID_INPUT, _) => assert_eq!(len, 0, "input: a status buffer written"),
            _ => {}
        }
    }

    /// The first `n` bytes of the chain's leading writable buffers.
    fn leading_written(&self, chain: &InFlight, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for b in chain.bufs.iter().take_while(|b| b.writable()) {
            let take = (b.len as usize).min(n - out.len());
            let at = out.len();
            out.resize(at + take, 0);
            if self.m().read_slice(&mut out[at..], GuestAddress(b.addr)).is_err() {
                panic!("device wrote {n} bytes into a chain whose buffer at {:#x} is not in memory", b.addr);
            }
            if out.len() == n {
                break;
            }
        }
        assert_eq!(out.len(), n, "the used length fits the leading writable buffers");
        out
    }

    /// A receive buffer the net device used: part of a frame the peer sent.
    fn delivered(&mut self, chain: &InFlight, len: u32) {
        if !self.exact {
            self.net.partial = None;
            return;
        }
        if len == 0 {
            // A frame dropped (buffers too small or malformed), or nothing.
            assert!(self.net.partial.is_none(), "net: an empty buffer inside a frame's buffers");
            return;
        }
        let bytes = self.leading_written(chain, len as usize);
        let (mut frame, left) = match self.net.partial.take() {
            Some((frame, left)) => (frame, left),
            None => {
                assert!(bytes.len() >= VNET_HDR_LEN, "net: a frame's first buffer holds its header");
                let count = u16::from_le_bytes([bytes[10], bytes[11]]);
                assert!(count >= 1, "net: num_buffers is at least 1");
                if self.acked & MRG_RXBUF == 0 {
                    assert_eq!(count, 1, "net: one buffer a frame without MRG_RXBUF");
                }
                assert_eq!(bytes[..10], [0; 10], "net: no offloads in the header");
                (Vec::new(), count)
            }
        };
        frame.extend_from_slice(&bytes);
        if left > 1 {
            self.net.partial = Some((frame, left - 1));
            return;
        }
        let frame = &frame[VNET_HDR_LEN..];
        // Frames the peer sent that did not fit were dropped; this is one of the later ones.
        while let Some(next) = self.net.pushed.pop_front() {
            if next == frame {
                return;
            }
        }
        panic!("net: the guest got a {}-byte frame the peer never sent (or out of order)", frame.len());
    }

    /// Frames the peer received must be the frames transmitted, in order.
    fn match_frames(&mut self) {
        while let Some(got) = self.net.received.front() {
            let Some((want, may_be_lost)) = self.net.sent.front() else { break };
            if got == want {
                self.net.received.pop_front();
                self.net.sent.pop_front();
            } else if *may_be_lost {
                self.net.sent.pop_front();
            } else if self.exact {
                panic!("net: the peer got a {}-byte frame where the guest sent {} bytes", got.len(), want.len());
            } else {
                self.net.received.clear();
                self.net.sent.clear();
            }
        }
    }

    fn host_send(&mut self, len: usize, seed: u8) {
        let bytes: Vec<u8> = (0..len % 9000).map(|i| seed.wrapping_add(i as u8)).collect();
        match &mut self.host {
            Host::Console { input: Some(pipe), .. } => {
                let n = pipe.write(&bytes).unwrap_or(0);
                self.console_in.extend_from_slice(&bytes[..n]);
            }
            Host::Button(button) => {
                button.press();
            }
            Host::Net { peer } => {
                if peer.send(&bytes).is_ok() && self.net.pushed.len() < 64 {
                    self.net.pushed.push_back(bytes);
                } else if self.net.pushed.len() >= 64 {
                    self.exact = false;
                }
            }
            _ => return,
        }
        self.settle();
    }

    fn host_drain(&mut self) {
        match &mut self.host {
            Host::Console { input, .. } => {
                // End of input: the device lets go of the pipe.
                *input = None;
                self.settle();
            }
            Host::Net { peer } => {
                let mut buf = vec![0u8; 70_000];
                while let Ok(n) = peer.recv(&mut buf) {
                    assert!(n <= net::MAX_FRAME - VNET_HDR_LEN, "net: a frame longer than a device may send");
                    if self.net.received.len() < 64 {
                        self.net.received.push_back(buf[..n].to_vec());
                    } else {
                        self.exact = false;
                    }
                }
                self.settle();
                self.match_frames();
            }
            Host::None | Host::Button(_) => {}
        }
    }

    /// Drops the transport (every device thread must stop) and checks what the model
    /// can only check at the end.
    fn finish(mut self) {
        self.settle();
        // Whatever the driver wrote to the registers, the transport's state saves and
        // restores: a snapshot of this guest loads. The rng only, whose restart repeats
        // nothing the content oracles count.
        if self.kind == RNG {
            if let Some(Ok(saved)) = self.t.as_mut().map(|t| t.save()) {
                let restored = self.t.as_mut().map(|t| t.restore(&saved));
                assert!(matches!(restored, Some(Ok(()))), "rng: its own saved state {saved:?} does not restore");
                self.settle();
            }
        }
        self.t = None;
        self.harvest_all();
        if let Host::Net { .. } = self.host {
            self.host_drain_final();
        }
        if let Host::Console { sink, .. } = &self.host {
            if !sink.fails && self.exact {
                let got = sink.got.lock().unwrap();
                let n = got.0.len().min(self.console_out.len());
                assert!(
                    self.console_out.starts_with(&got.0[..n]),
                    "console: the host got output the guest did not send, or out of order"
                );
            }
        }
        if !self.ever_unclean {
            let mut now = vec![0u8; MEM_END as usize];
            self.m().read_slice(&mut now, GuestAddress(0)).unwrap();
            let mut allowed: Vec<Span> = RINGS.iter().map(|&b| (b + 0x2000, b + 0x2000 + 6 + 8 * 256)).collect();
            allowed.extend([DATA, END_ZONE]);
            for (i, (a, b)) in now.chunks(256).zip(self.shadow.chunks(256)).enumerate() {
                if a == b {
                    continue;
                }
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    let at = (i * 256 + j) as u64;
                    assert!(
                        x == y || allowed.iter().any(|r| r.0 <= at && at < r.1),
                        "device {}: guest byte {at:#x} changed ({y:#04x} -> {x:#04x}) outside the used rings and buffers",
                        self.kind
                    );
                }
            }
        }
    }

    fn host_drain_final(&mut self) {
        if let Host::Net { peer } = &self.host {
            let mut buf = vec![0u8; 70_000];
            while let Ok(n) = peer.recv(&mut buf) {
                if self.net.received.len() < 64 {
                    self.net.received.push_back(buf[..n].to_vec());
                } else {
                    self.exact = false;
                }
            }
        }
        self.match_frames();
        if self.exact {
            assert!(self.net.received.is_empty(), "net: the peer got frames no transmit chain carried");
        }
    }
}
