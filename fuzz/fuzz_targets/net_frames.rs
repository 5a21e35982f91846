//! virtio-net's frame handling. Two kinds of input:
//! - the real `Net` device (activated with its two queues, notified, its worker thread
//!   woken by a readable backend, reset and started again) over rings the fuzzer lays out
//!   in guest memory, with either a scripted `NetBackend` (receive lengths and contents,
//!   would-block, interrupted calls, errors, sends taken partly and finished by later
//!   flushes, the zero-copy path offered or not, offloads refused; its mio source is one
//!   end of a unix datagram socketpair the target pokes to make it readable) or the real
//!   `Unixstream` backend over a socketpair whose peer writes arbitrary bytes;
//! - the `Unixstream` length-prefix framing on arbitrary byte streams through a
//!   socketpair: reads with buffers of every size, sends the peer does not read, flushes,
//!   a peer that closes.
//!
//! Oracles: no panic; every input returns within libFuzzer's -timeout (the worker stops
//! when the device is reset or dropped); the heap grows by at most [`BOUND`] while the
//! device runs and by no more than [`LEFT_BEHIND`] after. On a layout the device cannot
//! rewrite (see `hvrun_fuzz::layout::Offer::clean`): used entries name the heads offered,
//! in order, within the chains' writable bytes, never past a head that is not a
//! descriptor; a queue whose available index runs more than a queue ahead gets
//! DEVICE_NEEDS_RESET and nothing used; guest memory changes only in the used rings and
//! the writable buffers of the receive chains offered (used or not: a stream frame read
//! in place that has not all arrived lands in buffers that go back to the ring, which
//! the device owns until it uses them or is reset); every frame the backend took is the
//! next frame of a transmit chain (header dropped unless the backend carries it), in
//! order, none twice; every frame the guest got is the next frame the backend handed
//! out, behind a header whose num_buffers counts its buffers (one without MRG_RXBUF).
//! The stream framing matches a reference parser exactly: whole frames in order,
//! truncated to the reader's buffer, an impossible length an error, a closed peer the
//! end; and what the peer reads is exactly the frames the sender took, each behind its
//! length.

#![no_main]

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use devices::virtio::iovec::GuestIovecs;
use devices::virtio::net::backend::{NetBackend, Unixstream, MAX_STREAM_FRAME, VNET_HDR_LEN};
use devices::virtio::net::{Net, MAX_FRAME};
use devices::virtio::testing::{Line, Mem};
use devices::virtio::{Activation, Interrupt, VirtioDevice};
use guest_memory::GuestMemoryMmap;
use hvrun_fuzz::layout::{self, le16, DescIn, Offer, RingIn, Rings, Space};
use hvrun_fuzz::ring::{self, Span};
use vm_memory::{Bytes, GuestAddress};

const RX: Rings = Rings { desc: 0x0000, avail: 0x1000, used: 0x2000 };
const TX: Rings = Rings { desc: 0x3000, avail: 0x4000, used: 0x5000 };
const SPLIT: u64 = 0x1_0000;
const END: u64 = 0x2_0000;
const SPACE: Space = Space { tables: 0x6000, table_entries: 512, data: 0x8000, split: SPLIT, end: END };
const REGIONS: [(u64, usize); 2] = [(0, SPLIT as usize), (SPLIT, (END - SPLIT) as usize)];
const MRG_RXBUF: u64 = 1 << 15;
/// Events per input.
const MAX_EVENTS: usize = 32;

/// How much the heap may grow while a device runs: its two frame buffers (2 x 64 KiB and
/// change); a `Unixstream`'s input and output buffers (a frame and its length each); the
/// target's own: a receive buffer (70 KiB), two 128 KiB copies of guest memory, the peer's
/// stream as written (at most 32 events of 64 KiB: 2 MiB; what it reads is counted, not kept),
/// the chains modelled (at most 1 MiB, `layout::MAX_MODELLED`). About 4 MiB; 8 MiB leaves
/// the allocator room, and a buffer that grew with the traffic would not fit.
const BOUND: usize = 8 << 20;
/// What may stay allocated once the device is gone: lazily created statics.
const LEFT_BEHIND: usize = 1 << 20;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RecvStep {
    /// A frame of `len` bytes (twice that with `big`), cut to the device's buffer.
    Frame {
        len: u16,
        big: bool,
        seed: u8,
    },
    /// As many bytes as the device's buffer takes.
    Full {
        seed: u8,
    },
    /// Fewer bytes than a virtio-net header.
    Short(u8),
    Empty,
    WouldBlock,
    Interrupted,
    Fail,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SendStep {
    Take,
    /// Taken, but the next `n` flushes (1 to 4) would block.
    TakePartly(u8),
    WouldBlock,
    Interrupted,
    Fail,
}

#[derive(Arbitrary, Debug)]
struct Script {
    vnet_hdr: bool,
    /// Per activation: the backend refuses the offloads.
    offloads_fail: Vec<bool>,
    recv: Vec<RecvStep>,
    send: Vec<SendStep>,
    /// Per frame sent: the zero-copy path offered (with what it does) or not.
    direct: Vec<Option<SendStep>>,
}

#[derive(Arbitrary, Debug)]
enum BackendIn {
    Scripted(Script),
    /// The real stream backend; the peer writes these bytes first.
    Stream(Vec<Chunk>),
}

/// Bytes a stream peer writes.
#[derive(Arbitrary, Debug)]
enum Chunk {
    Bytes(Vec<u8>),
    /// A well-formed frame.
    Frame {
        len: u16,
        big: bool,
        seed: u8,
    },
    /// A length prefix, any value.
    Length(u32),
}

#[derive(Arbitrary, Debug)]
enum Event {
    NotifyRx,
    NotifyTx,
    /// The backend becomes readable (the worker wakes with no notify).
    Kick,
    /// Stream backend: the peer writes more.
    PeerWrites(Chunk),
    /// Stream backend: the peer reads what the device sent.
    PeerReads,
    /// The driver resets the device and starts it again where the used rings are.
    Restart,
    Settle,
}

#[derive(Arbitrary, Debug)]
struct DeviceRun {
    rx: RingIn,
    tx: RingIn,
    indirect: Vec<DescIn>,
    event_idx: bool,
    mergeable: bool,
    /// Offload bits the driver acked (passed to the backend).
    offloads: u8,
    backend: BackendIn,
    events: Vec<Event>,
}

#[derive(Arbitrary, Debug)]
enum StreamOp {
    PeerWrites(Chunk),
    /// `recv` with a buffer of this many bytes (modulo a frame and a bit).
    Recv(u32),
    Send {
        len: u16,
        big: bool,
        seed: u8,
    },
    Flush,
    PeerReads,
    PeerCloses,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Device(Box<DeviceRun>),
    Stream(Vec<StreamOp>),
}

fuzz_target!(|input: Input| {
    // What Rust's runtime does for a program (libFuzzer's main is not Rust's): a write
    // to a closed socket is EPIPE, not the end of the process.
    // SAFETY: setting SIGPIPE's disposition to ignore, before any thread could write.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let (start, threads) = (hvrun_fuzz::live_bytes(), ring::threads());
    match input {
        Input::Device(run) => device(*run, start),
        Input::Stream(ops) => stream(&ops, start),
    }
    ring::threads_gone(&threads);
    hvrun_fuzz::assert_bounded(start, LEFT_BEHIND, "net_frames, after the device is gone");
});

/// The bytes of a test frame.
fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| seed ^ (i as u8).wrapping_mul(7) ^ (i >> 8) as u8).collect()
}

/// A frame's fingerprint: its length and FNV-1a hash.
fn print(frame: &[u8]) -> (usize, u64) {
    let hash = frame.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (frame.len(), hash)
}

impl Chunk {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Chunk::Bytes(b) => b.clone(),
            Chunk::Frame { len, big, seed } => {
                let n = usize::from(*len) * if *big { 2 } else { 1 } % (MAX_STREAM_FRAME + 1);
                let mut out = (n as u32).to_be_bytes().to_vec();
                out.extend(pattern(*seed, n));
                out
            }
            Chunk::Length(len) => len.to_be_bytes().to_vec(),
        }
    }
}

/// What the scripted backend did, for the target.
#[derive(Default)]
struct Log {
    recv: VecDeque<RecvStep>,
    send: VecDeque<SendStep>,
    direct: VecDeque<Option<SendStep>>,
    offloads_fail: VecDeque<bool>,
    /// Flushes that will still block.
    pending: u8,
    /// Steps taken: what moves while the device works.
    steps: u64,
    /// Frames handed to the device, as it got them (header included when it carries one).
    handed: Vec<(usize, u64)>,
    /// Frames the backend took, as sent.
    taken: Vec<(usize, u64)>,
}

/// A `NetBackend` that does what the script says. Its file descriptor is a real socket,
/// which the target makes readable to wake the device's worker.
struct Scripted {
    socket: mio::net::UnixDatagram,
    vnet_hdr: bool,
    log: Arc<Mutex<Log>>,
}

fn failed(step: SendStep) -> std::io::Result<()> {
    match step {
        SendStep::Take | SendStep::TakePartly(_) => Ok(()),
        SendStep::WouldBlock => Err(ErrorKind::WouldBlock.into()),
        SendStep::Interrupted => Err(ErrorKind::Interrupted.into()),
        SendStep::Fail => Err(std::io::Error::other("the backend failed")),
    }
}

impl Scripted {
    fn take(&self, frame: &[u8], step: SendStep) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap();
        log.steps += 1;
        if let SendStep::TakePartly(n) = step {
            log.pending = n % 4 + 1;
        }
        let result = failed(step);
        if result.is_ok() {
            log.taken.push(print(frame));
        }
        result
    }
}

impl NetBackend for Scripted {
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.socket))
    }

    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn set_offloads(&mut self, _features: u64) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap();
        match log.offloads_fail.pop_front() {
            Some(true) => Err(std::io::Error::other("offloads refused")),
            _ => Ok(()),
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        assert!(frame.len() <= MAX_FRAME, "a {}-byte frame", frame.len());
        let step = self.log.lock().unwrap().send.pop_front().unwrap_or(SendStep::Take);
        self.take(frame, step)
    }

    fn send_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<std::io::Result<()>> {
        let step = self.log.lock().unwrap().direct.pop_front().flatten()?;
        assert!(frame.len() <= MAX_FRAME, "a {}-byte frame", frame.len());
        let mut bytes = Vec::with_capacity(frame.len());
        for piece in frame.iovecs() {
            // SAFETY: the pieces lie in guest memory that `frame` keeps mapped for this
            // call (GuestIovecs checked each against the guest's regions); we only read.
            bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(piece.iov_base.cast::<u8>(), piece.iov_len) });
        }
        Some(self.take(&bytes, step))
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Consume a wake-up the target sent, so they never fill the socket.
        let _ = self.socket.recv(&mut [0u8; 1]);
        let mut log = self.log.lock().unwrap();
        let Some(step) = log.recv.pop_front() else { return Err(ErrorKind::WouldBlock.into()) };
        log.steps += 1;
        let (n, seed) = match step {
            RecvStep::Frame { len, big, seed } => ((usize::from(len) * if big { 2 } else { 1 }).min(buf.len()), seed),
            RecvStep::Full { seed } => (buf.len(), seed),
            RecvStep::Short(n) => (usize::from(n) % VNET_HDR_LEN, n),
            RecvStep::Empty => (0, 0),
            RecvStep::WouldBlock => return Err(ErrorKind::WouldBlock.into()),
            RecvStep::Interrupted => return Err(ErrorKind::Interrupted.into()),
            RecvStep::Fail => return Err(std::io::Error::other("the backend failed")),
        };
        let mut frame = pattern(seed, n);
        buf[..n].copy_from_slice(&frame);
        if self.vnet_hdr && n >= VNET_HDR_LEN {
            // The device fills in num_buffers: compare without it.
            frame[10..12].fill(0);
        }
        log.handed.push(print(&frame));
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap();
        if log.pending > 0 {
            log.pending -= 1;
            log.steps += 1;
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(())
    }
}

/// The host's end of the device's backend.
enum Peer {
    Scripted { log: Arc<Mutex<Log>>, kick: UnixDatagram },
    Stream { peer: Option<UnixStream>, written: Vec<u8>, read: ReadPrints },
}

impl Peer {
    fn steps(&self) -> u64 {
        match self {
            Peer::Scripted { log, .. } => log.lock().unwrap().steps,
            Peer::Stream { read, .. } => read.bytes,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Peer::Stream { peer: Some(peer), written, .. } = self {
            let n = peer.write(bytes).unwrap_or(0);
            written.extend_from_slice(&bytes[..n]);
        }
    }

    fn read(&mut self) {
        if let Peer::Stream { peer: Some(peer), read, .. } = self {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = peer.read(&mut buf) {
                read.take(&buf[..n]);
            }
        }
    }
}

/// What the stream's peer read, as the fingerprints of the frames in it (as
/// [`reference_frames`] would give them from the whole stream), not the bytes: the guest's
/// transmit chains can send a queue's worth of 64 KiB frames, more than [`BOUND`].
#[derive(Default)]
struct ReadPrints {
    bytes: u64,
    /// The frame being read (its length prefix first), at most a prefix and a frame.
    partial: Vec<u8>,
    prints: Vec<(usize, u64)>,
    /// A length past the largest frame was read: nothing after it is a frame.
    broken: bool,
}

impl ReadPrints {
    fn take(&mut self, mut bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        while !bytes.is_empty() && !self.broken {
            let need = match self.partial.get(..4) {
                Some(prefix) => 4 + u32::from_be_bytes(prefix.try_into().unwrap()) as usize,
                None => 4,
            };
            let n = (need - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            let Some(prefix) = self.partial.get(..4) else { continue };
            let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
            if len > MAX_STREAM_FRAME {
                self.broken = true;
            } else if self.partial.len() == 4 + len {
                self.prints.push(print(&self.partial[4..]));
                self.partial.clear();
            }
        }
    }
}

/// The device and what drives it.
struct Rig {
    mem: Arc<Mem>,
    net: Net,
    peer: Peer,
    interrupt: Interrupt,
    /// Whether the last activation took.
    running: bool,
    event_idx: bool,
    acked: u64,
}

impl Rig {
    fn m(&self) -> &GuestMemoryMmap {
        &self.mem.0
    }

    /// Starts the device with queues where the driver put them the first time, and then
    /// where the device left off (a driver that resets and posts the same rings again).
    fn activate(&mut self, rx: &RingIn, tx: &RingIn, first: bool) {
        let (rx_size, tx_size) = (layout::size_of(rx), layout::size_of(tx));
        let (rx_q, tx_q) = if first {
            (
                layout::queue(&RX, rx_size, rx.next_avail, rx.next_used, self.event_idx),
                layout::queue(&TX, tx_size, tx.next_avail, tx.next_used, self.event_idx),
            )
        } else {
            // Where the device left off: as many chains taken as used.
            let at = |rings: &Rings, r: &RingIn| {
                let used = le16(self.m(), rings.used + 2);
                (r.next_avail.wrapping_add(used.wrapping_sub(r.next_used)), used)
            };
            let ((rx_avail, rx_used), (tx_avail, tx_used)) = (at(&RX, rx), at(&TX, tx));
            (
                layout::queue(&RX, rx_size, rx_avail, rx_used, self.event_idx),
                layout::queue(&TX, tx_size, tx_avail, tx_used, self.event_idx),
            )
        };
        self.interrupt = Interrupt::new(Arc::new(Line::default()));
        let activation = Activation {
            memory: self.mem.clone(),
            queues: vec![rx_q, tx_q],
            acked_features: self.acked,
            interrupt: self.interrupt.clone(),
        };
        self.running = self.net.activate(activation).is_ok();
    }

    fn progress(&self) -> (u16, u16, u64, u32) {
        (le16(self.m(), RX.used + 2), le16(self.m(), TX.used + 2), self.peer.steps(), self.interrupt.status())
    }

    fn settle(&mut self) {
        if self.running {
            ring::settle(|| (self.progress(), false));
        }
    }
}

fn device(run: DeviceRun, start: isize) {
    let mem = ring::guest_memory(&REGIONS);
    let m: &GuestMemoryMmap = &mem.0;
    layout::lay_tables(m, &SPACE, &run.indirect);
    layout::lay_ring(m, &SPACE, &RX, &run.rx, run.event_idx);
    layout::lay_ring(m, &SPACE, &TX, &run.tx, run.event_idx);
    // The second queue's buffers may have landed on the first's used index: the used
    // rings start where the device will (the rest of what was written stays).
    m.write_obj(run.rx.next_used, GuestAddress(RX.used + 2)).unwrap();
    m.write_obj(run.tx.next_used, GuestAddress(TX.used + 2)).unwrap();
    let (rx_size, tx_size) = (layout::size_of(&run.rx), layout::size_of(&run.tx));
    let rx = layout::offer(m, &RX, rx_size, run.rx.next_avail, &TX.spans(tx_size));
    let tx = layout::offer(m, &TX, tx_size, run.tx.next_avail, &RX.spans(rx_size));
    // What the transmit side reads (buffers and tables) must not overlap what the device
    // writes (receive buffers, used rings) for its frames to be known: otherwise what it
    // sends depends on timing.
    let mut writes: Vec<Span> = rx.writable(rx.chains.len()).collect();
    writes.extend([RX.used_span(rx_size), TX.used_span(tx_size)]);
    let tx_exact = tx
        .chains
        .iter()
        .flat_map(|c| c.tables.iter().copied().chain(c.descs.iter().filter(|d| !d.writable()).map(|d| d.span())))
        .all(|r| writes.iter().all(|w| !ring::overlap(*w, r)));
    ring::snapshot(m, &REGIONS);
    let (vnet_hdr, peer, backend): (bool, Peer, Box<dyn NetBackend>) = match &run.backend {
        BackendIn::Scripted(script) => {
            let (ours, kick) = UnixDatagram::pair().expect("a socketpair");
            ours.set_nonblocking(true).unwrap();
            kick.set_nonblocking(true).unwrap();
            let log = Arc::new(Mutex::new(Log {
                recv: script.recv.iter().take(64).copied().collect(),
                send: script.send.iter().take(64).copied().collect(),
                direct: script.direct.iter().take(64).copied().collect(),
                offloads_fail: script.offloads_fail.iter().take(8).copied().collect(),
                ..Log::default()
            }));
            let socket = mio::net::UnixDatagram::from_std(ours);
            let backend = Scripted { socket, vnet_hdr: script.vnet_hdr, log: log.clone() };
            (script.vnet_hdr, Peer::Scripted { log, kick }, Box::new(backend))
        }
        BackendIn::Stream(chunks) => {
            let (ours, theirs) = UnixStream::pair().expect("a socketpair");
            theirs.set_nonblocking(true).unwrap();
            let backend = Unixstream::from_std(ours).expect("a stream backend");
            let mut peer = Peer::Stream { peer: Some(theirs), written: Vec::new(), read: ReadPrints::default() };
            for c in chunks.iter().take(8) {
                peer.write(&c.bytes());
            }
            (false, peer, Box::new(backend))
        }
    };
    let acked = if run.mergeable { MRG_RXBUF } else { 0 } | u64::from(run.offloads) << 7;
    let mut rig = Rig {
        mem: mem.clone(),
        net: Net::new(backend, [2, 0, 0, 0, 0, 1]),
        peer,
        interrupt: Interrupt::new(Arc::new(Line::default())),
        running: false,
        event_idx: run.event_idx,
        acked,
    };
    rig.activate(&run.rx, &run.tx, true);
    for event in run.events.iter().take(MAX_EVENTS) {
        match event {
            Event::NotifyRx => rig.net.queue_notify(0),
            Event::NotifyTx => rig.net.queue_notify(1),
            Event::Kick => match &mut rig.peer {
                Peer::Scripted { kick, .. } => drop(kick.send(&[1])),
                Peer::Stream { .. } => rig.peer.write(&[]),
            },
            Event::PeerWrites(chunk) => rig.peer.write(&chunk.bytes()),
            Event::PeerReads => rig.peer.read(),
            Event::Restart => {
                rig.settle();
                rig.net.reset();
                rig.activate(&run.rx, &run.tx, false);
            }
            Event::Settle => {}
        }
        rig.settle();
        hvrun_fuzz::assert_bounded(start, BOUND, "net_frames");
    }
    // A runaway ring is found when the worker first looks, which it does on starting.
    let runaway = rx.heads.is_none() || tx.heads.is_none();
    if rig.running && runaway {
        let deadline = std::time::Instant::now() + ring::SETTLE_MAX;
        while !rig.interrupt.needs_reset() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert!(rig.interrupt.needs_reset(), "a runaway available index needs a reset");
    }
    let needs_reset = rig.interrupt.needs_reset();
    let Rig { net, mut peer, .. } = rig;
    drop(net);
    peer.read();
    check(m, &run, &rx, &tx, needs_reset, (vnet_hdr, tx_exact), acked, &peer);
}

/// What the rings, guest memory and the backend show once the device is gone.
#[allow(clippy::too_many_arguments)]
fn check(
    m: &GuestMemoryMmap,
    run: &DeviceRun,
    rx: &Offer,
    tx: &Offer,
    needs_reset: bool,
    (vnet_hdr, tx_exact): (bool, bool),
    acked: u64,
    peer: &Peer,
) {
    if needs_reset {
        let broken = rx.heads.is_none() || tx.heads.is_none() || rx.first_bad().is_some() || tx.first_bad().is_some();
        assert!(broken || !(rx.clean && tx.clean), "DEVICE_NEEDS_RESET with rings that follow the rules");
    }
    if !(rx.clean && tx.clean) {
        return;
    }
    let rx_used = layout::used_entries(m, &RX, rx, run.rx.next_used, "net receive");
    let tx_used = layout::used_entries(m, &TX, tx, run.tx.next_used, "net transmit");
    for (offer, used) in [(rx, &rx_used), (tx, &tx_used)] {
        if let Some(bad) = offer.first_bad() {
            assert!(used.len() <= bad, "a chain used past a head that is not a descriptor");
        }
    }
    let mut allowed = vec![RX.used_span(rx.size), TX.used_span(tx.size)];
    // Chains not used too: see the module (what they hold is checked for those used).
    allowed.extend(rx.writable(rx.chains.len()));
    ring::assert_written_only(m, &allowed, "net_frames");

    // Transmit: each frame the backend took is the next frame of a chain.
    let skip = if vnet_hdr { 0 } else { VNET_HDR_LEN };
    let sent: Vec<(usize, u64)> = tx_used
        .iter()
        .filter_map(|&(k, _)| {
            let chain = &tx.chains[k];
            let bytes = ring::contents(m, chain.descs.iter().filter(|d| !d.writable()), MAX_FRAME)?;
            (bytes.len() >= skip).then(|| print(&bytes[skip..]))
        })
        .collect();
    let taken: Vec<(usize, u64)> = match peer {
        Peer::Scripted { log, .. } => log.lock().unwrap().taken.clone(),
        Peer::Stream { read, .. } => read.prints.clone(),
    };
    let mut at = 0;
    for frame in taken.iter().filter(|_| tx_exact) {
        match sent[at..].iter().position(|s| s == frame) {
            Some(i) => at += i + 1,
            None => panic!("the backend took a {}-byte frame that is not the next one a chain carried", frame.0),
        }
    }

    // Receive: the buffers used, grouped into frames by num_buffers.
    let writes: Vec<Span> = rx.writable(rx_used.len()).collect();
    if !ring::disjoint(writes) {
        return;
    }
    let handed: Vec<(usize, u64)> = match peer {
        Peer::Scripted { log, .. } => log.lock().unwrap().handed.clone(),
        Peer::Stream { written, .. } => reference_frames(written).0.iter().map(|f| print(f)).collect(),
    };
    let mut from = 0;
    let mut entries = rx_used.iter().peekable();
    while let Some(&(k, len)) = entries.next() {
        if len == 0 {
            continue; // a frame dropped, buffers given back empty
        }
        let mut frame = written(m, &rx.chains[k], len);
        let mut count = 1u16;
        while frame.len() < VNET_HDR_LEN {
            let Some(&(k, len)) = entries.next() else { return };
            assert!(len > 0, "an empty buffer inside a frame");
            frame.extend(written(m, &rx.chains[k], len));
            count += 1;
        }
        let buffers = u16::from_le_bytes([frame[10], frame[11]]);
        assert!(buffers >= count, "num_buffers {buffers} but the header took {count}");
        if acked & MRG_RXBUF == 0 {
            assert_eq!(buffers, 1, "one buffer a frame without MRG_RXBUF");
        }
        while count < buffers {
            let Some(&(k, len)) = entries.next() else { return };
            assert!(len > 0, "an empty buffer inside a frame");
            frame.extend(written(m, &rx.chains[k], len));
            count += 1;
        }
        let got = if vnet_hdr {
            // The backend's header, num_buffers aside.
            frame[10..12].fill(0);
            frame
        } else {
            assert_eq!(frame[..10], [0; 10], "a header with no offloads");
            frame[VNET_HDR_LEN..].to_vec()
        };
        let got = print(&got);
        match handed[from..].iter().position(|h| *h == got) {
            Some(i) => from += i + 1,
            None => panic!("the guest got a {}-byte frame the backend did not hand out (in that order)", got.0),
        }
    }
}

/// The first `len` bytes of the chain's leading writable buffers.
fn written(m: &GuestMemoryMmap, chain: &hvrun_fuzz::ring::Chain, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    for d in chain.descs.iter().take_while(|d| d.writable()) {
        let take = (d.len as usize).min(len as usize - out.len());
        let at = out.len();
        out.resize(at + take, 0);
        m.read_slice(&mut out[at..], GuestAddress(d.addr)).expect("written, so in memory");
        if out.len() == len as usize {
            break;
        }
    }
    assert_eq!(out.len(), len as usize, "the used length fits the leading writable buffers");
    out
}

/// A stream of length-prefixed frames as QEMU's stream netdev protocol defines it: the
/// whole frames in order, and whether it stops at a length no frame may have.
fn reference_frames(stream: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(prefix) = stream.get(at..at + 4) {
        let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
        if len > MAX_STREAM_FRAME {
            return (frames, true);
        }
        let Some(frame) = stream.get(at + 4..at + 4 + len) else { break };
        frames.push(frame);
        at += 4 + len;
    }
    (frames, false)
}

/// The stream framing against the reference, through a socketpair.
fn stream(ops: &[StreamOp], start: isize) {
    let (ours, theirs) = UnixStream::pair().expect("a socketpair");
    theirs.set_nonblocking(true).unwrap();
    let mut s = Unixstream::from_std(ours).expect("a stream backend");
    let mut peer = Some(theirs);
    // What the peer wrote, and where the reader is in it.
    let (mut written, mut at) = (Vec::new(), 0usize);
    // What the sender took (each behind its length), and what the peer read.
    let (mut took, mut read) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; MAX_STREAM_FRAME + 100];
    for op in ops.iter().take(64) {
        match op {
            StreamOp::PeerWrites(chunk) => {
                if let Some(p) = &mut peer {
                    let bytes = chunk.bytes();
                    let n = p.write(&bytes).unwrap_or(0);
                    written.extend_from_slice(&bytes[..n]);
                }
            }
            StreamOp::Recv(n) => {
                let n = *n as usize % buf.len();
                let got = s.recv(&mut buf[..n]);
                let rest = &written[at..];
                match rest.get(..4).map(|p| u32::from_be_bytes(p.try_into().unwrap()) as usize) {
                    Some(len) if len > MAX_STREAM_FRAME => {
                        assert_eq!(got.map_err(|e| e.kind()), Err(ErrorKind::InvalidData), "a {len}-byte length");
                    }
                    Some(len) if rest.len() >= 4 + len => {
                        let got = got.expect("a whole frame is there");
                        assert_eq!(got, len.min(n), "a frame, cut to the buffer");
                        assert_eq!(buf[..got], rest[4..4 + got], "the frame's bytes");
                        at += 4 + len;
                    }
                    _ => {
                        let got = got.map_err(|e| e.kind());
                        if peer.is_some() {
                            assert_eq!(got, Err(ErrorKind::WouldBlock), "no whole frame yet");
                        } else {
                            // The end; or a reset, when the peer closed with our bytes unread.
                            let end = [ErrorKind::UnexpectedEof, ErrorKind::ConnectionReset];
                            assert!(got.is_err_and(|e| end.contains(&e)), "{got:?} after the peer closed");
                        }
                    }
                }
            }
            StreamOp::Send { len, big, seed } => {
                let n = usize::from(*len) * if *big { 2 } else { 1 } % (MAX_STREAM_FRAME + 1);
                let frame = pattern(*seed, n);
                match s.send(&frame) {
                    Ok(()) => {
                        took.extend_from_slice(&(n as u32).to_be_bytes());
                        took.extend_from_slice(&frame);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || peer.is_none() => {}
                    Err(e) => panic!("send: {e}"),
                }
            }
            StreamOp::Flush => match s.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock || peer.is_none() => {}
                Err(e) => panic!("flush: {e}"),
            },
            StreamOp::PeerReads => drain(peer.as_mut(), &mut read),
            StreamOp::PeerCloses => peer = None,
        }
        hvrun_fuzz::assert_bounded(start, BOUND, "net_frames, stream");
    }
    if let Some(p) = peer.as_mut() {
        // Everything the sender took reaches the peer once it reads.
        for _ in 0..10_000 {
            let flushed = s.flush().is_ok();
            let before = read.len();
            drain(Some(p), &mut read);
            if flushed && read.len() == before {
                break;
            }
        }
        assert!(read == took, "the peer read {} bytes; the sender took {} bytes of frames", read.len(), took.len());
    }
}

fn drain(peer: Option<&mut UnixStream>, into: &mut Vec<u8>) {
    let Some(peer) = peer else { return };
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n @ 1..) = peer.read(&mut buf) {
        into.extend_from_slice(&buf[..n]);
    }
}
