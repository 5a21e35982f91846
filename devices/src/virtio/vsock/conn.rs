//! One connection between a guest port and a host unix stream: its state, and credit-based
//! flow control both ways (virtio 1.2 section 5.10.6.3).
//!
//! Guest to host: the device advertises [`BUF_ALLOC`] bytes and `fwd_cnt`, the bytes it has
//! written to the host stream. What the host stream does not take at once waits in the
//! connection's buffer, which a guest keeping to its credit never fills past
//! [`BUF_ALLOC`]; a packet that would is a guest breaking the rule, and the connection is
//! reset. Host to guest: the device reads from the host stream only as much as the guest's
//! `buf_alloc - (tx_cnt - fwd_cnt)` allows, so bytes the guest cannot take stay in the
//! host's socket, not in hvrun.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::Token;

use crate::virtio::iovec::GuestIovecs;

use super::packet::{
    Header, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// The receive buffer the device advertises per connection (`buf_alloc`), and the most
/// guest data it holds for a host stream that is not reading.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// How long the guest has to answer a host-initiated REQUEST, and to finish a shutdown
/// (Firecracker's `CONN_REQUEST_TIMEOUT_MS` and `CONN_SHUTDOWN_TIMEOUT_MS`).
pub const TIMEOUT: Duration = Duration::from_millis(2000);

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is (to be) sent, the guest has not answered.
    LocalInit,
    /// Guest-initiated: the RESPONSE is to be sent.
    PeerInit,
    /// Data flows both ways.
    Established,
    /// The guest sent SHUTDOWN: it will receive no more (`rcv`), send no more (`send`).
    PeerClosed {
        /// The guest will receive no more.
        rcv: bool,
        /// The guest will send no more.
        send: bool,
    },
    /// The host stream ended; the guest was told with SHUTDOWN and should reset.
    LocalClosed,
}

/// What the connection's owner must do after a guest packet or a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: the connection goes on.
    Keep,
    /// Reset it: RST to the guest, the host stream closed.
    Kill,
}

/// A packet the connection has for the guest: op, flags, payload length (the payload is
/// in the [`Room`] passed to [`Conn::produce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// The operation.
    pub op: u16,
    /// The flags.
    pub flags: u32,
    /// Payload bytes.
    pub len: usize,
}

/// A guest packet's payload: copied out of guest memory, or still in it.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a, 'm> {
    /// Bytes in a buffer of the device's.
    Bytes(&'a [u8]),
    /// The guest's buffers, checked against guest memory: sent to the host stream from
    /// there, with no copy of the device's.
    Guest(&'a GuestIovecs<'m>),
}

impl Payload<'_, '_> {
    /// Its bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(bytes) => bytes.len(),
            Payload::Guest(iov) => iov.len(),
        }
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes as much as `stream` takes now: how much, `Err` when the stream failed.
    fn send(&self, stream: &mut UnixStream) -> Result<usize, ()> {
        match self {
            Payload::Bytes(bytes) => write_some(stream, bytes),
            Payload::Guest(iov) => iov.send_stream(stream.as_raw_fd()).map_err(|e| {
                log::debug!("vsock: writing to a host stream failed: {e}");
            }),
        }
    }

    /// Appends its bytes from `from` on to `out`.
    fn append_from(&self, from: usize, out: &mut VecDeque<u8>) {
        match self {
            Payload::Bytes(bytes) => out.extend(&bytes[from..]),
            Payload::Guest(iov) => iov.append_to(from, iov.len() - from, out),
        }
    }
}

/// Where [`Conn::produce`] puts a packet's payload: a buffer of the device's, or the
/// guest's receive buffer itself (its bytes after the header), so that the host stream is
/// read straight into guest memory with no copy of the device's.
#[derive(Debug)]
pub enum Room<'a, 'm> {
    /// Bytes in a buffer of the device's.
    Bytes(&'a mut [u8]),
    /// The guest's buffers, checked against guest memory.
    Guest(&'a mut GuestIovecs<'m>),
}

impl Room<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Room::Bytes(bytes) => bytes.len(),
            Room::Guest(iov) => iov.len(),
        }
    }

    /// Keeps only the first `n` bytes.
    fn truncate(&mut self, n: usize) {
        match self {
            Room::Bytes(bytes) => {
                let all = std::mem::take(bytes);
                let n = n.min(all.len());
                *bytes = &mut all[..n];
            }
            Room::Guest(iov) => iov.truncate(n),
        }
    }

    /// Copies the start of `data` in; returns how much fitted.
    fn copy_in(&mut self, data: &[u8]) -> usize {
        match self {
            Room::Bytes(bytes) => {
                let n = bytes.len().min(data.len());
                bytes[..n].copy_from_slice(&data[..n]);
                n
            }
            Room::Guest(iov) => iov.write_bytes(0, &data[..iov.len().min(data.len())]),
        }
    }

    /// Reads from `stream` once, into the room (all of it may not fill).
    fn read_from(&mut self, stream: &mut UnixStream) -> std::io::Result<usize> {
        match self {
            Room::Bytes(bytes) => stream.read(bytes),
            Room::Guest(iov) => {
                let pieces = iov.iovecs();
                // SAFETY: the pieces were checked to lie in guest memory, which `iov`
                // keeps mapped for the call; readv writes at most their lengths. The
                // descriptor is the stream's own, open while `stream` is borrowed.
                let n = unsafe { libc::readv(stream.as_raw_fd(), pieces.as_ptr(), pieces.len() as libc::c_int) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        }
    }
}

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
/// A proactive credit update: any packet carries the credit, so any packet clears it.
const PENDING_CREDIT_UPDATE: u8 = 4;
/// The answer to the guest's CREDIT_REQUEST: a CREDIT_UPDATE, whatever else is sent.
const PENDING_CREDIT_ANSWER: u8 = 8;

/// A connection.
pub struct Conn {
    /// The host side.
    pub stream: UnixStream,
    /// The stream's token in the worker's loop.
    pub token: Token,
    /// The host-side port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Where it stands.
    pub state: State,
    /// When the guest's answer (to a REQUEST or a SHUTDOWN) is overdue: reset then.
    pub expiry: Option<Instant>,
    /// Whether the connection is in its owner's list of those with output.
    pub queued: bool,
    /// Guest data the host stream has not taken yet (at most [`BUF_ALLOC`] bytes).
    tx_buf: VecDeque<u8>,
    /// Guest data written to the host stream, ever (wrapping).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// Guest data received, ever (wrapping).
    recv_cnt: Wrapping<u32>,
    /// The host stream's write half is shut (the guest sends no more).
    write_shut: bool,
    /// The guest's receive buffer and what it has taken out of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Data sent to the guest, ever (wrapping).
    tx_cnt: Wrapping<u32>,
    /// Host bytes read before the connection was established (after a CONNECT line).
    early: Vec<u8>,
    /// The host stream may have data (or its end) to read: set by readiness, cleared by a
    /// read that would block (the loop's events are edge-triggered).
    readable: bool,
    /// A CREDIT_REQUEST was sent and the guest has sent nothing since.
    credit_asked: bool,
    pending: u8,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("local_port", &self.local_port)
            .field("peer_port", &self.peer_port)
            .field("state", &self.state)
            .field("buffered", &self.tx_buf.len())
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn new(stream: UnixStream, token: Token, local_port: u32, peer_port: u32, state: State, pending: u8) -> Self {
        Conn {
            stream,
            token,
            local_port,
            peer_port,
            state,
            expiry: None,
            queued: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            recv_cnt: Wrapping(0),
            write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            early: Vec::new(),
            readable: true,
            credit_asked: false,
            pending,
        }
    }

    /// A host-initiated connection: a REQUEST for the guest's `peer_port` is due; `early`
    /// is what the client sent after its CONNECT line.
    pub fn host_initiated(stream: UnixStream, token: Token, local_port: u32, peer_port: u32, early: Vec<u8>) -> Self {
        let mut conn = Conn::new(stream, token, local_port, peer_port, State::LocalInit, PENDING_REQUEST);
        conn.early = early;
        conn
    }

    /// A guest-initiated connection, from the guest's REQUEST: a RESPONSE is due.
    pub fn guest_initiated(stream: UnixStream, token: Token, request: &Header) -> Self {
        let mut conn = Conn::new(stream, token, request.dst_port, request.src_port, State::PeerInit, PENDING_RESPONSE);
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    /// `fwd_cnt` for a packet to the guest, which from then on knows it.
    pub fn tell_fwd_cnt(&mut self) -> u32 {
        self.fwd_cnt_told = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
        self.fwd_cnt.0
    }

    /// What the guest may still be sent: `buf_alloc - (tx_cnt - fwd_cnt)`, 0 if the guest
    /// claims to have taken more than it was sent.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The stream may be read (a readiness event).
    pub fn set_readable(&mut self) {
        self.readable = true;
    }

    fn may_send_data(&self) -> bool {
        matches!(self.state, State::Established | State::PeerClosed { rcv: false, .. })
    }

    /// Whether [`Conn::produce`] may have something.
    pub fn has_output(&self) -> bool {
        self.pending != 0
            || (self.may_send_data()
                && (self.readable || !self.early.is_empty())
                && (self.peer_credit() > 0 || !self.credit_asked))
    }

    /// The most payload the next packet [`Conn::produce`] gives may carry: 0 unless it is
    /// data, else the guest's credit up to a packet's worth (and the bytes that came
    /// with the CONNECT line, when those go first).
    pub fn data_room(&self) -> usize {
        let before_data = PENDING_RESPONSE | PENDING_REQUEST | PENDING_CREDIT_ANSWER;
        let has_data = self.readable || !self.early.is_empty();
        if self.pending & before_data != 0 || !self.may_send_data() || !has_data {
            return 0;
        }
        let most = if self.early.is_empty() { MAX_PAYLOAD } else { self.early.len().min(MAX_PAYLOAD) };
        (self.peer_credit() as usize).min(most)
    }

    /// The next packet for the guest, its payload (if any) read into `room` (at most
    /// `room.len()` bytes, and never past the guest's credit), or `None` when there is
    /// none now. `Err` when the host stream failed: the connection is to be reset.
    pub fn produce(&mut self, mut room: Room<'_, '_>) -> Result<Option<Out>, ()> {
        let control = |op| Ok(Some(Out { op, flags: 0, len: 0 }));
        if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            self.state = State::Established;
            return control(OP_RESPONSE);
        }
        if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            self.expiry = Some(Instant::now() + TIMEOUT);
            return control(OP_REQUEST);
        }
        if self.pending & PENDING_CREDIT_ANSWER != 0 {
            self.pending &= !PENDING_CREDIT_ANSWER;
            return control(OP_CREDIT_UPDATE);
        }
        if self.may_send_data() && (self.readable || !self.early.is_empty()) {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_asked {
                    self.credit_asked = true;
                    return control(OP_CREDIT_REQUEST);
                }
            } else if room.len() > 0 {
                room.truncate(room.len().min(credit).min(MAX_PAYLOAD));
                if !self.early.is_empty() {
                    let n = room.copy_in(&self.early);
                    self.early.drain(..n);
                    self.tx_cnt += n as u32;
                    return Ok(Some(Out { op: OP_RW, flags: 0, len: n }));
                }
                loop {
                    match room.read_from(&mut self.stream) {
                        Ok(0) => {
                            // The host closed: as Firecracker, the guest is told it will get
                            // and may send nothing more, and has a while to reset.
                            self.readable = false;
                            self.state = State::LocalClosed;
                            self.expiry = Some(Instant::now() + TIMEOUT);
                            return Ok(Some(Out { op: OP_SHUTDOWN, flags: SHUTDOWN_RCV | SHUTDOWN_SEND, len: 0 }));
                        }
                        Ok(n) => {
                            self.tx_cnt += n as u32;
                            return Ok(Some(Out { op: OP_RW, flags: 0, len: n }));
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            self.readable = false;
                            break;
                        }
                        Err(e) => {
                            log::debug!("vsock: reading the host stream of port {} failed: {e}", self.local_port);
                            return Err(());
                        }
                    }
                }
            }
        }
        if self.pending & PENDING_CREDIT_UPDATE != 0 {
            return control(OP_CREDIT_UPDATE);
        }
        Ok(None)
    }

    /// A packet from the guest for this connection (not RST, which the owner handles).
    pub fn guest_packet(&mut self, hdr: &Header, payload: Payload<'_, '_>) -> Verdict {
        if (hdr.buf_alloc, hdr.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt.0) {
            // New credit: the device may ask again once it is used up (asking again for
            // none would ping-pong with a guest that answers every request).
            self.peer_buf_alloc = hdr.buf_alloc;
            self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            self.credit_asked = false;
        }
        match (self.state, hdr.op) {
            (State::Established | State::PeerClosed { send: false, .. }, OP_RW) => {
                if payload.is_empty() {
                    return Verdict::Keep;
                }
                if self.tx_buf.len() + payload.len() > BUF_ALLOC as usize {
                    crate::warn_ratelimited!(
                        "vsock: the guest's port {} sent past the credit it was given; connection reset",
                        self.peer_port
                    );
                    return Verdict::Kill;
                }
                self.recv_cnt += payload.len() as u32;
                let written = if self.tx_buf.is_empty() {
                    match payload.send(&mut self.stream) {
                        Ok(n) => n,
                        Err(()) => return Verdict::Kill,
                    }
                } else {
                    0
                };
                self.fwd_cnt += written as u32;
                payload.append_from(written, &mut self.tx_buf);
                self.check_credit();
                Verdict::Keep
            }
            // A RESPONSE to a REQUEST the guest has not been sent yet (host ports are
            // predictable) is not an answer: the REQUEST still goes out and is answered.
            (State::LocalInit, OP_RESPONSE) if self.pending & PENDING_REQUEST != 0 => {
                crate::warn_ratelimited!("vsock: a RESPONSE for port {} before its REQUEST; dropped", self.local_port);
                Verdict::Keep
            }
            (State::LocalInit, OP_RESPONSE) => {
                self.expiry = None;
                self.state = State::Established;
                // As Firecracker: the client learns its port; a fresh stream that cannot
                // take a dozen bytes is broken.
                let ok = format!("OK {}\n", self.local_port);
                match write_some(&mut self.stream, ok.as_bytes()) {
                    Ok(n) if n == ok.len() => Verdict::Keep,
                    _ => Verdict::Kill,
                }
            }
            (State::Established | State::PeerClosed { .. }, OP_SHUTDOWN) => {
                let (mut rcv, mut send) = match self.state {
                    State::PeerClosed { rcv, send } => (rcv, send),
                    _ => (false, false),
                };
                rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                send |= hdr.flags & SHUTDOWN_SEND != 0;
                self.state = State::PeerClosed { rcv, send };
                if rcv && send {
                    if self.tx_buf.is_empty() {
                        return Verdict::Kill;
                    }
                    self.expiry.get_or_insert(Instant::now() + TIMEOUT);
                }
                self.shut_write_if_done();
                Verdict::Keep
            }
            // The credit was taken above, in any state (Linux sends updates as its reader
            // drains, shut down or not).
            (_, OP_CREDIT_UPDATE) => Verdict::Keep,
            (State::Established | State::PeerInit | State::PeerClosed { send: false, .. }, OP_CREDIT_REQUEST) => {
                self.pending |= PENDING_CREDIT_ANSWER;
                Verdict::Keep
            }
            // The host closed and the guest shuts down too (Linux does as its socket
            // closes): the connection is done, reset it now rather than at the timeout;
            // guest data still buffered for a host that only half-closed is written first
            // (within the timeout already running), as after a guest shutdown.
            (State::LocalClosed, OP_SHUTDOWN) => {
                if self.tx_buf.is_empty() {
                    return Verdict::Kill;
                }
                self.state = State::PeerClosed { rcv: true, send: true };
                self.expiry.get_or_insert(Instant::now() + TIMEOUT);
                self.shut_write_if_done();
                Verdict::Keep
            }
            // Packets in flight when the guest learnt that the host closed.
            (State::LocalClosed, _) => Verdict::Keep,
            (state, op) => {
                crate::warn_ratelimited!(
                    "vsock: dropped a guest packet with op {op} for port {} in state {state:?}",
                    self.local_port
                );
                Verdict::Keep
            }
        }
    }

    /// Writes buffered guest data to the host stream (it was writable).
    pub fn flush(&mut self) -> Verdict {
        while !self.tx_buf.is_empty() {
            let n = match write_some(&mut self.stream, self.tx_buf.as_slices().0) {
                Ok(0) => break,
                Ok(n) => n,
                Err(()) => return Verdict::Kill,
            };
            self.tx_buf.drain(..n);
            self.fwd_cnt += n as u32;
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > MAX_PAYLOAD {
            self.tx_buf = VecDeque::new();
        }
        if self.state == (State::PeerClosed { rcv: true, send: true }) && self.tx_buf.is_empty() {
            return Verdict::Kill;
        }
        self.shut_write_if_done();
        self.check_credit();
        Verdict::Keep
    }

    /// The guest sends no more and all it sent is written: the host reader sees the end.
    fn shut_write_if_done(&mut self) {
        if matches!(self.state, State::PeerClosed { send: true, .. }) && self.tx_buf.is_empty() && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Asks for a CREDIT_UPDATE when the guest may be starved: the space it believes it
    /// has is under half the buffer and either less than a packet or a packet's worth
    /// smaller than the truth.
    fn check_credit(&mut self) {
        let believed = BUF_ALLOC.saturating_sub((self.recv_cnt - self.fwd_cnt_told).0);
        let freed = (self.fwd_cnt - self.fwd_cnt_told).0;
        let packet = MAX_PAYLOAD as u32;
        if freed > 0 && believed < BUF_ALLOC / 2 && (believed < packet || freed >= packet) {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }
}

/// Writes what the stream takes now; `Err` when it is gone. `send` with `MSG_NOSIGNAL`:
/// a host peer that went away is an error, never a SIGPIPE.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> Result<usize, ()> {
    loop {
        // SAFETY: `data` is a live slice of `data.len()` bytes that `send` only reads; the
        // descriptor is the stream's own, open while `stream` is borrowed.
        let n = unsafe { libc::send(stream.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::Interrupted => {}
            ErrorKind::WouldBlock => return Ok(0),
            _ => {
                log::debug!("vsock: writing to a host stream failed: {e}");
                return Err(());
            }
        }
    }
}
