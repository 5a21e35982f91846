//! virtio-vsock driven through guest memory and its virtqueues, one stream connection to a
//! host client over the hybrid protocol (`CONNECT 5000\n`, `OK <port>\n` on the device's
//! unix socket), 64 KiB per iteration:
//! - `host-to-guest`: the host client writes 64 KiB; the guest's posted receive buffers
//!   (a header and 64 KiB each) fill, and are posted again; the guest tells its credit
//!   as Linux does (a CREDIT_UPDATE once less than 64 KiB of its 256 KiB would be left);
//! - `guest-to-host`: the guest sends one RW packet of 64 KiB (header and payload in two
//!   buffers); the host client reads it.
//!
//! The `host` twin moves the same 64 KiB through a unix stream socketpair with `write` and
//! `read` and no VMM in between, so `cargo xtask bench` can print hvrun/host.

use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::vsock::packet::{
    Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
};
use devices::virtio::vsock::{bind, Vsock};
use hvrun_benches::{Driver, DATA, WRITE};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
/// Bytes per iteration.
const CHUNK: usize = 64 * 1024;
/// The guest's CID and the port it listens on.
const CID: u64 = 3;
const PORT: u32 = 5000;
/// Receive buffers posted.
const RX_BUFS: u16 = 16;
/// A receive buffer: a header and the largest payload.
const RX_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;
/// Room per receive buffer.
const SLOT: u64 = 0x1_1000;
/// The transmit area: a data packet's header, its payload, then control headers.
const TX_HDR: u64 = DATA + SLOT * RX_BUFS as u64;
const TX_PAYLOAD: u64 = TX_HDR + 0x1000;
const TX_CONTROL: u64 = TX_PAYLOAD + 0x1_1000;
/// Control packets (credit updates) in flight at most, each with a descriptor of its own.
const CONTROL_SLOTS: u16 = 16;
/// What the guest advertises (Linux's default).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

fn rx_buffer(id: u16) -> u64 {
    DATA + SLOT * u64::from(id)
}

/// The guest's side of one connection.
struct Guest {
    driver: Driver,
    /// The host's port of the connection.
    host_port: u32,
    /// Bytes the guest has taken from its receive buffer, and what it last told.
    fwd_cnt: u32,
    told: u32,
    /// Transmit chains not seen used yet, and the next control slot.
    tx_pending: u16,
    control_next: u16,
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
        let done = self.driver.take_used(TX, |_, _| {});
        self.tx_pending -= done;
    }

    /// Waits until every transmit chain is back.
    fn drain_tx(&mut self) {
        while self.tx_pending > 0 {
            self.reap_tx();
            if self.tx_pending > 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Sends a packet with no payload (a control packet) without waiting for it.
    fn send_control(&mut self, op: u16) {
        while self.tx_pending >= CONTROL_SLOTS {
            self.reap_tx();
            std::thread::yield_now();
        }
        let slot = self.control_next % CONTROL_SLOTS;
        self.control_next = self.control_next.wrapping_add(1);
        let at = TX_CONTROL + 64 * u64::from(slot);
        self.driver.mem.write_slice(&self.header(op, 0).to_bytes(), GuestAddress(at)).expect("control header");
        self.driver.post(TX, 2 + slot, &[(at, HDR_LEN as u32, 0)]);
        self.tx_pending += 1;
        self.driver.notify(TX);
    }

    /// Waits for receive buffers the device used: the payload bytes they hold (each
    /// buffer is posted again, the queue notified once) and the last header.
    fn receive(&mut self) -> (usize, Header) {
        let mut bytes = 0;
        let mut last = Header::default();
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        while used.is_empty() {
            self.driver.take_used(RX, |id, len| used.push((id, len)));
            if used.is_empty() {
                std::thread::yield_now();
            }
        }
        for &(id, len) in &used {
            let mut raw = [0u8; HDR_LEN];
            self.driver.mem.read_slice(&mut raw, GuestAddress(rx_buffer(id))).expect("rx header");
            last = Header::from_bytes(&raw);
            bytes += (len as usize).saturating_sub(HDR_LEN);
            self.driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
        }
        self.driver.notify(RX);
        self.used = used;
        (bytes, last)
    }

    /// Posts again the receive buffers the device used, if any (its credit updates while
    /// the guest sends), without waiting.
    fn repost_rx(&mut self) {
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        self.driver.take_used(RX, |id, len| used.push((id, len)));
        for &(id, _) in &used {
            self.driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
        }
        if !used.is_empty() {
            self.driver.notify(RX);
        }
        self.used = used;
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
    let mut guest =
        Guest { driver, host_port: 0, fwd_cnt: 0, told: 0, tx_pending: 0, control_next: 0, used: Vec::new() };
    let mut client = UnixStream::connect(&path).expect("connect");
    client.write_all(format!("CONNECT {PORT}\n").as_bytes()).expect("CONNECT");
    let (_, request) = guest.receive();
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

fn virtio_vsock(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("hvrun-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let mut group = c.benchmark_group("virtio-vsock/64KiB");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    let (mut guest, mut client) = connect(&dir);
    let chunk = vec![0x5au8; CHUNK];
    let mut scratch = vec![0u8; CHUNK];

    group.bench_function(BenchmarkId::new("hvrun", "host-to-guest"), |b| {
        b.iter(|| {
            client.write_all(&chunk).expect("host write");
            let mut got = 0;
            while got < CHUNK {
                let (n, hdr) = guest.receive();
                debug_assert!(n == 0 || hdr.op == OP_RW);
                got += n;
                guest.consumed(n);
            }
            guest.reap_tx();
            black_box(got)
        })
    });
    guest.drain_tx();

    guest.driver.mem.write_slice(&chunk, GuestAddress(TX_PAYLOAD)).expect("payload");
    group.bench_function(BenchmarkId::new("hvrun", "guest-to-host"), |b| {
        b.iter(|| {
            let hdr = guest.header(OP_RW, CHUNK as u32);
            guest.driver.mem.write_slice(&hdr.to_bytes(), GuestAddress(TX_HDR)).expect("header");
            guest.driver.post(TX, 0, &[(TX_HDR, HDR_LEN as u32, 0), (TX_PAYLOAD, CHUNK as u32, 0)]);
            guest.tx_pending += 1;
            guest.driver.notify(TX);
            client.read_exact(&mut scratch).expect("host read");
            guest.drain_tx();
            guest.repost_rx();
            black_box(scratch[0])
        })
    });

    let (mut a, mut b_end) = UnixStream::pair().expect("socketpair");
    for op in ["host-to-guest", "guest-to-host"] {
        group.bench_function(BenchmarkId::new("host", op), |b| {
            b.iter(|| {
                a.write_all(&chunk).expect("write");
                b_end.read_exact(&mut scratch).expect("read");
                black_box(scratch[0])
            })
        });
    }
    group.finish();
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, virtio_vsock);
criterion_main!(benches);
