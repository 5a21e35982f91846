//! `vsock-peer`'s host side against hvrun's vsock device, whose guest is this test (the
//! benchmarks' driver and a few packets by hand): what the `vsock` scenario's rig script
//! relies on, short of a guest kernel.

#![cfg(target_os = "linux")]

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devices::testing::TempDir;
use devices::virtio::vsock::packet::{
    Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};
use devices::virtio::vsock::{bind, Vsock};
use hvrun_benches::{Driver, DATA, WRITE};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const CID: u64 = 3;
const RX_BUFS: u16 = 16;
const RX_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;
const SLOT: u64 = 0x1_1000;
const TX_AREA: u64 = DATA + SLOT * RX_BUFS as u64;

fn rx_buffer(id: u16) -> u64 {
    DATA + SLOT * u64::from(id)
}

/// The guest: the device started, receive buffers posted.
struct Guest {
    driver: Driver,
    /// Packets taken from the ring and not yet looked at.
    pending: std::collections::VecDeque<(Header, Vec<u8>)>,
}

impl Guest {
    fn new(path: &Path) -> Self {
        let (vsock, _handle) = Vsock::new(CID, bind(path).unwrap(), path.to_path_buf()).unwrap();
        let mut driver = Driver::start(Box::new(vsock), 3, 256, 16 << 20);
        for id in 0..RX_BUFS {
            driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
        }
        driver.notify(RX);
        Guest { driver, pending: Default::default() }
    }

    /// The next packet for the guest, within 10 s.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pending.is_empty() {
            let mut seen = Vec::new();
            self.driver.take_used(RX, |id, len| seen.push((id, len)));
            for &(id, len) in &seen {
                let mut bytes = vec![0u8; len as usize];
                self.driver.mem.read_slice(&mut bytes, GuestAddress(rx_buffer(id))).unwrap();
                let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
                self.driver.post(RX, id, &[(rx_buffer(id), RX_LEN, WRITE)]);
                self.pending.push_back((hdr, bytes.split_off(HDR_LEN)));
            }
            if !seen.is_empty() {
                self.driver.notify(RX);
            }
            assert!(!self.pending.is_empty() || Instant::now() < deadline, "no packet for the guest");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.pending.pop_front().unwrap()
    }

    /// Sends a packet from guest port `src` to host port `dst` and waits for the device
    /// to take it.
    fn send(&mut self, op: u16, flags: u32, src: u32, dst: u32, payload: &[u8]) {
        let hdr = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        };
        self.driver.mem.write_slice(&hdr.to_bytes(), GuestAddress(TX_AREA)).unwrap();
        if payload.is_empty() {
            self.driver.post(TX, 0, &[(TX_AREA, HDR_LEN as u32, 0)]);
        } else {
            self.driver.mem.write_slice(payload, GuestAddress(TX_AREA + 0x1000)).unwrap();
            self.driver.post(TX, 0, &[(TX_AREA, HDR_LEN as u32, 0), (TX_AREA + 0x1000, payload.len() as u32, 0)]);
        }
        self.driver.notify(TX);
        self.driver.wait_used(TX, 1);
    }
}

/// Starts vsock-peer with `args`, its stdout and stderr in files in `dir` (a pipe nobody
/// reads yet would stop it).
fn peer(dir: &TempDir, args: &[&str], stdin: Stdio) -> Child {
    let file = |name: &str| std::fs::File::create(dir.0.join(name)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_vsock-peer"))
        .args(args)
        .stdin(stdin)
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap()
}

/// Waits for `child` (10 s at most): its status code, stdout and stderr.
fn finish(dir: &TempDir, mut child: Child) -> (Option<i32>, Vec<u8>, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vsock-peer did not end");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = std::fs::read(dir.0.join("stdout")).unwrap();
    let stderr = std::fs::read_to_string(dir.0.join("stderr")).unwrap();
    (status.code(), stdout, stderr)
}

#[test]
fn the_echo_client_closes_once_its_bytes_came_back() {
    let dir = TempDir::new("echo");
    let path = dir.0.join("v.sock");
    let mut g = Guest::new(&path);
    let mut child = peer(&dir, &["hybrid", "--echo", path.to_str().unwrap(), "5000"], Stdio::piped());
    child.stdin.take().unwrap().write_all(b"ping-42\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 5000));
    let host = req.src_port;
    g.send(OP_RESPONSE, 0, 5000, host, &[]);
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"ping-42\n"[..]));
    g.send(OP_RW, 0, 5000, host, &data);
    // Only now, its bytes back, does the client end the stream.
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    g.send(OP_RST, 0, 5000, host, &[]);
    let (code, out, err) = finish(&dir, child);
    assert_eq!((code, out.as_slice()), (Some(0), &b"ping-42\n"[..]), "{err}");
    assert!(err.contains(&format!("vsock-peer: OK {host}")), "{err}");
}

#[test]
fn a_refused_connect_exits_with_status_3() {
    let dir = TempDir::new("refused");
    let path = dir.0.join("v.sock");
    let mut g = Guest::new(&path);
    let child = peer(&dir, &["hybrid", path.to_str().unwrap(), "7777"], Stdio::null());
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 7777));
    g.send(OP_RST, 0, 7777, req.src_port, &[]);
    let (code, out, err) = finish(&dir, child);
    assert_eq!(code, Some(3), "{err}");
    assert!(out.is_empty() && err.contains("without an OK line"), "{err}");
}

#[test]
fn the_receiving_client_keeps_the_stream_until_the_guest_is_done() {
    let dir = TempDir::new("receive");
    let path = dir.0.join("v.sock");
    let mut g = Guest::new(&path);
    let child = peer(&dir, &["hybrid", path.to_str().unwrap(), "5002"], Stdio::null());
    let (req, _) = g.recv();
    let host = req.src_port;
    g.send(OP_RESPONSE, 0, 5002, host, &[]);
    // The client's stdin is empty from the start, yet nothing ends the stream for the
    // guest while it sends (a host EOF would cut it off both ways).
    let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    for piece in data.chunks(50_000) {
        g.send(OP_RW, 0, 5002, host, piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    g.send(OP_SHUTDOWN, SHUTDOWN_SEND, 5002, host, &[]);
    // The device's packets so far are credit updates at most; then, the client having
    // read to the end and closed, the SHUTDOWN.
    loop {
        let (hdr, _) = g.recv();
        if hdr.op == OP_SHUTDOWN {
            assert_eq!(hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
            break;
        }
        assert_ne!(hdr.op, OP_RST, "the connection was reset");
    }
    g.send(OP_RST, 0, 5002, host, &[]);
    let (code, out, err) = finish(&dir, child);
    assert_eq!(code, Some(0), "{err}");
    assert!(out == data, "{} bytes of {} arrived", out.len(), data.len());
}

#[test]
fn a_guest_connection_reaches_the_unix_listener_at_path_port() {
    let dir = TempDir::new("uds");
    let path = dir.0.join("v.sock");
    let mut g = Guest::new(&path);
    let ready = dir.0.join("ready");
    let listen_at = dir.0.join("v.sock_6000");
    let child =
        peer(&dir, &["uds-listen", "--ready", ready.to_str().unwrap(), listen_at.to_str().unwrap()], Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "uds-listen never got ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    g.send(OP_REQUEST, 0, 1234, 6000, &[]);
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RESPONSE, 6000, 1234));
    g.send(OP_RW, 0, 1234, 6000, b"hello-from-guest\n");
    g.send(OP_SHUTDOWN, SHUTDOWN_SEND, 1234, 6000, &[]);
    loop {
        let (hdr, _) = g.recv();
        if hdr.op == OP_SHUTDOWN {
            assert_eq!(hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
            break;
        }
        assert_ne!(hdr.op, OP_RST, "the connection was reset");
    }
    g.send(OP_RST, 0, 1234, 6000, &[]);
    let (code, out, err) = finish(&dir, child);
    assert_eq!((code, out.as_slice()), (Some(0), &b"hello-from-guest\n"[..]), "{err}");
}

#[test]
fn the_sending_client_sends_all_then_ends_the_stream() {
    let dir = TempDir::new("send");
    let path = dir.0.join("v.sock");
    let mut g = Guest::new(&path);
    let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(dir.0.join("input"), &data).unwrap();
    let input = std::fs::File::open(dir.0.join("input")).unwrap();
    let child = peer(&dir, &["hybrid", path.to_str().unwrap(), "5001"], Stdio::from(input));
    let (req, _) = g.recv();
    let host = req.src_port;
    g.send(OP_RESPONSE, 0, 5001, host, &[]);
    // As `vsock-peer listen 5001 </dev/null` in the guest: nothing to send.
    g.send(OP_SHUTDOWN, SHUTDOWN_SEND, 5001, host, &[]);
    let mut got = Vec::new();
    loop {
        let (hdr, payload) = g.recv();
        match hdr.op {
            OP_RW => got.extend_from_slice(&payload),
            OP_SHUTDOWN => break,
            op => assert_ne!(op, OP_RST, "the connection was reset"),
        }
    }
    g.send(OP_RST, 0, 5001, host, &[]);
    let (code, _, err) = finish(&dir, child);
    assert_eq!(code, Some(0), "{err}");
    assert!(got == data, "{} bytes of {} arrived", got.len(), data.len());
}
