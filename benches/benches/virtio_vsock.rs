//! virtio-vsock driven through guest memory and its virtqueues: a stream, one connection
//! to a host client over the hybrid protocol (`CONNECT 5000\n`, `OK <port>\n` on the
//! device's unix socket). Each iteration moves 64 KiB, and iterations stream: the bytes of
//! a batch are in flight together, as far as the credit allows, and the time is that of
//! the whole batch, so 64 KiB / (time per iteration) is the stream's throughput.
//! - `host-to-guest`: a host thread writes the batch to the client's socket; the guest's
//!   receive buffers fill and are posted again. The guest does as Linux's driver: a
//!   queue full of buffers of a header and 4 KiB each, its credit told in a
//!   CREDIT_UPDATE once less than 64 KiB of its 256 KiB would be left, and a
//!   CREDIT_REQUEST answered with one;
//! - `guest-to-host`: the guest sends RW packets of 64 KiB (header and payload in two
//!   buffers), up to [`DATA_SLOTS`] in flight and never past the device's credit; a host
//!   thread reads the client's socket.
//!
//! The `host` twin streams the same bytes through a unix stream socketpair, a thread
//! writing at one end and another reading at the other, with no VMM in between, so
//! `cargo xtask bench` can print hvrun/host.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::vsock::packet::{
    Header, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
};
use devices::virtio::vsock::{bind, Vsock, QUEUE_SIZE};
use hvrun_benches::{Driver, DATA, WRITE};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
/// Bytes per iteration.
const CHUNK: usize = 64 * 1024;
/// The guest's CID and the port it listens on.
const CID: u64 = 3;
const PORT: u32 = 5000;
/// Receive buffers posted: the whole queue, as Linux fills it.
const RX_BUFS: u16 = QUEUE_SIZE;
/// A receive buffer: a header and 4 KiB, Linux's (`VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`).
const RX_LEN: u32 = (HDR_LEN + 4096) as u32;
/// Room per receive buffer.
const RX_SLOT: u64 = 0x2000;
/// Data packets the guest has in flight at most, each with two descriptors of its own
/// (`2 * slot`, `2 * slot + 1`) and a header of its own; they share one payload buffer.
const DATA_SLOTS: u16 = 8;
/// The transmit area: the data packets' headers, their payload, then control headers.
const TX_HDR: u64 = DATA + RX_SLOT * RX_BUFS as u64;
const TX_PAYLOAD: u64 = TX_HDR + 0x1000;
const TX_CONTROL: u64 = TX_PAYLOAD + 0x1_1000;
/// Control packets (credit updates) in flight at most, each with a descriptor of its own
/// (from [`CONTROL_FIRST`] on).
const CONTROL_SLOTS: u16 = 16;
const CONTROL_FIRST: u16 = 2 * DATA_SLOTS;
/// What the guest advertises (Linux's default).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

fn rx_buffer(id: u16) -> u64 {
    DATA + RX_SLOT * u64::from(id)
}

/// The guest's side of one connection.
struct Guest {
    driver: Driver,
    /// The host's port of the connection.
    host_port: u32,
    /// Bytes the guest has taken from its receive buffer, and what it last told.
    fwd_cnt: u32,
    told: u32,
    /// Bytes the guest sent, and the device's credit: its `buf_alloc` and `fwd_cnt`.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Control chains not seen used yet, and the next control slot.
    control_pending: u16,
    control_next: u16,
    /// Data slots free to send from.
    free_slots: Vec<u16>,
    /// The receive buffers one look at the used ring found (kept to spare an allocation).
    used: Vec<(u16, u32)>,
}

impl Guest {
    fn header(&self, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: PORT,
            dst_port: self.host_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Takes back the transmit chains the device used.
    fn reap_tx(&mut self) {
        let (mut control, free) = (0, &mut self.free_slots);
        self.driver.take_used(TX, |id, _| {
            if id >= CONTROL_FIRST {
                control += 1;
            } else {
                free.push(id / 2);
            }
        });
        self.control_pending -= control;
    }

    /// Waits until every transmit chain is back.
    fn drain_tx(&mut self) {
        while self.control_pending > 0 || self.free_slots.len() < usize::from(DATA_SLOTS) {
            self.reap_tx();
            std::thread::yield_now();
        }
    }

    /// Sends a packet with no payload (a control packet) without waiting for it.
    fn send_control(&mut self, op: u16) {
        while self.control_pending >= CONTROL_SLOTS {
            self.reap_tx();
            std::thread::yield_now();
        }
        let slot = self.control_next % CONTROL_SLOTS;
        self.control_next = self.control_next.wrapping_add(1);
        let at = TX_CONTROL + 64 * u64::from(slot);
        self.driver.mem.write_slice(&self.header(op, 0).to_bytes(), GuestAddress(at)).expect("control header");
        self.driver.post(TX, CONTROL_FIRST + slot, &[(at, HDR_LEN as u32, 0)]);
        self.control_pending += 1;
        self.driver.notify(TX);
    }

    /// Sends one 64 KiB data packet once a data slot is free and the device's credit
    /// allows it, without waiting for it to be used.
    fn send_data(&mut self) {
        loop {
            self.reap_tx();
            self.repost_rx();
            let credit = self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt));
            if !self.free_slots.is_empty() && credit >= CHUNK as u32 {
                break;
            }
            std::thread::yield_now();
        }
        let slot = self.free_slots.pop().expect("a free slot");
        let hdr_at = TX_HDR + 64 * u64::from(slot);
        let hdr = self.header(OP_RW, CHUNK as u32);
        self.driver.mem.write_slice(&hdr.to_bytes(), GuestAddress(hdr_at)).expect("header");
        self.driver.post(TX, 2 * slot, &[(hdr_at, HDR_LEN as u32, 0), (TX_PAYLOAD, CHUNK as u32, 0)]);
        self.tx_cnt = self.tx_cnt.wrapping_add(CHUNK as u32);
        self.driver.notify(TX);
    }

    /// Notes the device's credit in a packet it sent.
    fn note_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Looks at the used receive buffers: the payload bytes they hold (each buffer is
    /// posted again, the queue notified once), noting the device's credit and answering
    /// its credit requests.
    fn take_rx(&mut self) -> usize {
        let (mut bytes, mut asked) = (0, false);
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        self.driver.take_used(RX, |id, len| used.push((id, len)));
        for &(id, len) in &used {
            let mut raw = [0u8; HDR_LEN];
            self.driver.mem.read_slice(&mut raw, GuestAddress(rx_buffer(id))).expect("rx header");
            let hdr = Header::from_bytes(&raw);
            self.note_credit(&hdr);
            debug_assert!(len as usize == HDR_LEN || hdr.op == OP_RW);
            bytes += (len as usize).saturating_sub(HDR_LEN);
            asked |= hdr.op == OP_CREDIT_REQUEST;
            self.driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
        }
        if !used.is_empty() {
            self.driver.notify(RX);
        }
        self.used = used;
        if asked {
            self.told = self.fwd_cnt;
            self.send_control(OP_CREDIT_UPDATE);
        }
        bytes
    }

    /// Posts again the receive buffers the device used (its credit updates while the
    /// guest sends), without waiting.
    fn repost_rx(&mut self) {
        let _ = self.take_rx();
    }

    /// Waits for the next packet for the guest: its header.
    fn next_packet(&mut self) -> Header {
        loop {
            self.driver.take_used(RX, |id, len| self.used.push((id, len)));
            if let Some(&(id, _)) = self.used.first() {
                self.used.clear();
                let mut raw = [0u8; HDR_LEN];
                self.driver.mem.read_slice(&mut raw, GuestAddress(rx_buffer(id))).expect("rx header");
                self.driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
                self.driver.notify(RX);
                let hdr = Header::from_bytes(&raw);
                self.note_credit(&hdr);
                return hdr;
            }
            std::thread::yield_now();
        }
    }

    /// Takes `n` payload bytes out of the receive buffer, telling the device the credit
    /// as Linux does.
    fn consumed(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if GUEST_BUF_ALLOC - self.fwd_cnt.wrapping_sub(self.told) < CHUNK as u32 {
            self.told = self.fwd_cnt;
            self.send_control(OP_CREDIT_UPDATE);
        }
    }
}

/// A started device with a host client connected to the guest's port: the guest and the
/// client, which has read its `OK` line.
fn connect(dir: &std::path::Path) -> (Guest, UnixStream) {
    let path = dir.join("v.sock");
    let (vsock, _handle) = Vsock::new(CID, bind(&path).expect("bind"), path.clone()).expect("device");
    let mut driver = Driver::start(Box::new(vsock), 3, 256, 16 << 20);
    for id in 0..RX_BUFS {
        driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
    }
    driver.notify(RX);
    let mut guest = Guest {
        driver,
        host_port: 0,
        fwd_cnt: 0,
        told: 0,
        tx_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        control_pending: 0,
        control_next: 0,
        free_slots: (0..DATA_SLOTS).collect(),
        used: Vec::new(),
    };
    let mut client = UnixStream::connect(&path).expect("connect");
    client.write_all(format!("CONNECT {PORT}\n").as_bytes()).expect("CONNECT");
    let request = guest.next_packet();
    assert_eq!((request.op, request.dst_port), (OP_REQUEST, PORT), "the device asks for the guest's port");
    guest.host_port = request.src_port;
    guest.send_control(OP_RESPONSE);
    guest.drain_tx();
    let ok = format!("OK {}\n", guest.host_port);
    let mut line = vec![0u8; ok.len()];
    client.read_exact(&mut line).expect("OK line");
    assert_eq!(line, ok.as_bytes());
    (guest, client)
}

/// A thread that, for each count of chunks it is sent, writes that many 64 KiB chunks to
/// `stream`, then says it is done.
fn writer(mut stream: UnixStream) -> (Sender<u64>, Receiver<()>) {
    let (order, orders) = channel::<u64>();
    let (done, dones) = channel();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; CHUNK];
        for n in orders {
            for _ in 0..n {
                stream.write_all(&chunk).expect("host write");
            }
            let _ = done.send(());
        }
    });
    (order, dones)
}

/// A thread that, for each count of chunks it is sent, reads that many 64 KiB from
/// `stream` (in reads of up to 64 KiB), then says it is done. It polls, as the device's
/// worker and the benchmark's guest do (a read that would block yields the CPU and
/// tries again), so both sides of the comparison are scheduled alike; with a blocking
/// reader the host's own stream took 49 to 57 µs per 64 KiB on the 2-core machine of
/// docs/BENCHMARKS.md, most of it in waking the reader.
fn reader(mut stream: UnixStream) -> (Sender<u64>, Receiver<()>) {
    let (order, orders) = channel::<u64>();
    let (done, dones) = channel();
    stream.set_nonblocking(true).expect("a non-blocking reader");
    std::thread::spawn(move || {
        let mut scratch = vec![0u8; CHUNK];
        for n in orders {
            let mut left = n * CHUNK as u64;
            while left > 0 {
                let want = scratch.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match stream.read(&mut scratch[..want]) {
                    Ok(0) => panic!("the stream ended"),
                    Ok(got) => left -= got as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => panic!("host read: {e}"),
                }
            }
            let _ = done.send(());
        }
    });
    (order, dones)
}

fn virtio_vsock(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("hvrun-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let mut group = c.benchmark_group("virtio-vsock/64KiB");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    let (mut guest, client) = connect(&dir);

    let (order, done) = writer(client.try_clone().expect("clone"));
    group.bench_function(BenchmarkId::new("hvrun", "host-to-guest"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            order.send(iters).expect("writer");
            let mut left = iters * CHUNK as u64;
            while left > 0 {
                let n = guest.take_rx();
                if n == 0 {
                    guest.reap_tx();
                    std::thread::yield_now();
                    continue;
                }
                left -= n as u64;
                guest.consumed(n);
            }
            done.recv().expect("writer done");
            start.elapsed()
        })
    });
    drop(order);
    guest.drain_tx();

    guest.driver.mem.write_slice(&vec![0x5au8; CHUNK], GuestAddress(TX_PAYLOAD)).expect("payload");
    let (order, done) = reader(client);
    group.bench_function(BenchmarkId::new("hvrun", "guest-to-host"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            order.send(iters).expect("reader");
            for _ in 0..iters {
                guest.send_data();
            }
            done.recv().expect("reader done");
            start.elapsed()
        })
    });
    drop(order);

    for op in ["host-to-guest", "guest-to-host"] {
        let (a, b_end) = UnixStream::pair().expect("socketpair");
        let (write, written) = writer(a);
        let (read, read_done) = reader(b_end);
        group.bench_function(BenchmarkId::new("host", op), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                read.send(iters).expect("reader");
                write.send(iters).expect("writer");
                written.recv().expect("writer done");
                read_done.recv().expect("reader done");
                start.elapsed()
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, virtio_vsock);
criterion_main!(benches);
