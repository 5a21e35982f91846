//! The device's event loop: the unix listener, each host client still to send its
//! CONNECT line, each connection's stream, and the three queues, run by a
//! [`Worker`](crate::virtio::worker::Worker) while the driver has the device started.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, VolatileSlice};

use super::conn::{Conn, Payload, Room, Verdict, TIMEOUT};
use super::connect::{line_end, parse_line, MAX_LINE};
use super::packet::{
    check_packet, read_packet, writable_len, Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_REQUEST, OP_RST, TYPE_STREAM,
};
use super::{lock, Shared, EVENT_TRANSPORT_RESET, NAME};
use crate::virtio::iovec::{GuestIovecs, IovecBuf};
use crate::virtio::worker::{Handler, PollWindow, Wake, BACKEND};
use crate::virtio::{check_notified, write_chain, Chain, Chains, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const LISTENER: Token = Token(0);
/// RSTs waiting for receive buffers, at most (Firecracker's muxer queue holds 256); more
/// are dropped with a warning.
const MAX_RSTS: usize = 1024;
/// Transmit chains taken in one go before the receive queue gets its turn.
const TX_BATCH: usize = 256;
/// Rounds of [`TX_BATCH`] transmit chains one `pump` takes at most; if the guest keeps
/// the queue full, the loop comes back for more (a wake of its own) after looking at its
/// sockets and deadlines.
const MAX_ROUNDS: usize = 4;
/// How often a device that never sleeps (a guest that keeps notifying, a host stream that
/// keeps sending) still looks at its deadlines, and how long a failed `accept` (no file
/// descriptors left) waits before it is tried again.
const SWEEP: Duration = Duration::from_millis(100);
/// The most receive buffers one read of a host stream fills after the first (see
/// [`gather`]): a packet's worth in Linux's 4 KiB buffers, and room for smaller ones.
const MAX_GATHER: usize = 32;

/// (host-side port, guest port).
type Key = (u32, u32);

enum Owner {
    /// A host client that has not sent its CONNECT line yet.
    Client,
    /// A connection's stream.
    Conn(Key),
}

struct Client {
    stream: UnixStream,
    /// What it sent so far, at most [`MAX_LINE`] bytes.
    sent: Vec<u8>,
    /// When it is closed if its CONNECT line is not whole by then ([`TIMEOUT`] after it
    /// connected): a client that sends nothing must not hold a connection slot forever.
    deadline: Instant,
}

struct Running {
    memory: GuestMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Interrupt,
}

/// The connections and the queues.
pub(super) struct Muxer {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    shared: Arc<Shared>,
    max_connections: usize,
    running: Option<Running>,
    conns: HashMap<Key, Conn>,
    clients: HashMap<Token, Client>,
    owners: HashMap<Token, Owner>,
    /// Connections that may have a packet for the guest, each once (`Conn::queued`).
    ready: VecDeque<Key>,
    /// RSTs for the guest: (host-side port, guest port).
    rsts: VecDeque<Key>,
    next_token: usize,
    local_port_last: u32,
    local_ports: HashSet<u32>,
    /// A TRANSPORT_RESET event waits for an event buffer.
    reset_due: bool,
    /// The earliest connection expiry, as [`Handler::next_timeout`] last found it.
    earliest: Cell<Option<Instant>>,
    /// When the deadlines were last looked at: at most [`SWEEP`] apart while busy, since
    /// `earliest` is only as new as the last sleep.
    last_sweep: Instant,
    /// When to try `accept` again after it failed: the listener's events are
    /// edge-triggered, so clients waiting in its backlog would wait for the next one.
    accept_retry: Option<Instant>,
    /// How long to keep watching the queues after a round of work before sleeping.
    window: PollWindow,
    /// A guest packet's payload, at most [`MAX_PAYLOAD`] bytes.
    payload: Vec<u8>,
    /// A packet for the guest: header and payload.
    out: Vec<u8>,
    /// The pieces of the receive buffers one read fills.
    iov: IovecBuf,
}

/// The first host-side port Firecracker gives a host-initiated connection, less one.
const PORT_BEFORE_FIRST: u32 = (1 << 30) - 1;

impl Muxer {
    pub(super) fn new(
        cid: u64,
        path: PathBuf,
        listener: UnixListener,
        shared: Arc<Shared>,
        max_connections: usize,
    ) -> Self {
        Muxer {
            cid,
            path,
            listener,
            shared,
            max_connections,
            running: None,
            conns: HashMap::new(),
            clients: HashMap::new(),
            owners: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: 1,
            local_port_last: PORT_BEFORE_FIRST,
            local_ports: HashSet::new(),
            reset_due: false,
            earliest: Cell::new(None),
            last_sweep: Instant::now(),
            accept_retry: None,
            window: PollWindow::new(),
            payload: Vec::with_capacity(MAX_PAYLOAD),
            out: vec![0; HDR_LEN + MAX_PAYLOAD],
            iov: IovecBuf::new(),
        }
    }

    pub(super) fn attach(&mut self, memory: GuestMemory, queues: [Queue; 3], interrupt: Interrupt) {
        let [rx, tx, event] = queues;
        self.running = Some(Running { memory, rx, tx, event, interrupt });
    }

    fn token(&mut self) -> Token {
        // Tokens are never reused: a stale event cannot reach a new stream.
        self.next_token += 1;
        Token(self.next_token)
    }

    fn open(&self) -> usize {
        self.conns.len() + self.clients.len()
    }

    /// Firecracker's allocation: round robin over [1 << 30, 1 << 31), skipping ports in use.
    fn allocate_local_port(&mut self) -> u32 {
        loop {
            self.local_port_last = ((self.local_port_last.wrapping_add(1)) & !(1 << 31)) | (1 << 30);
            if self.local_ports.insert(self.local_port_last) {
                return self.local_port_last;
            }
        }
    }

    fn queue_ready(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued && conn.has_output() {
                conn.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn rst(&mut self, key: Key) {
        if self.rsts.len() >= MAX_RSTS {
            warn_ratelimited!("{NAME}: too many RSTs wait for receive buffers; one to port {} dropped", key.1);
            return;
        }
        self.rsts.push_back(key);
    }

    /// Closes a connection's host stream and forgets it.
    fn remove(&mut self, registry: &Registry, key: Key) {
        if let Some(mut conn) = self.conns.remove(&key) {
            if conn.queued {
                // Not left for `receive` to find: while the guest posts no receive
                // buffers, a REQUEST/RST churn would grow the list without bound.
                self.ready.retain(|k| *k != key);
            }
            let _ = registry.deregister(&mut conn.stream);
            self.owners.remove(&conn.token);
            self.local_ports.remove(&key.0);
        }
    }

    /// Resets a connection: RST to the guest, the host stream closed.
    fn kill(&mut self, registry: &Registry, key: Key) {
        if self.conns.contains_key(&key) {
            self.remove(registry, key);
            self.rst(key);
        }
    }

    fn drop_all(&mut self, registry: &Registry) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(registry, key);
        }
        self.ready.clear();
        self.rsts.clear();
        self.local_port_last = PORT_BEFORE_FIRST;
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.open() >= self.max_connections {
                        warn_ratelimited!("{NAME}: {} connections open; a host client is refused", self.open());
                        continue; // dropped: closed
                    }
                    let token = self.token();
                    if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                        warn_ratelimited!("{NAME}: cannot watch a host client: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + TIMEOUT;
                    self.clients.insert(token, Client { stream, sent: Vec::with_capacity(MAX_LINE), deadline });
                    self.owners.insert(token, Owner::Client);
                    self.client_read(registry, token);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // A client that went before it was accepted: the next one may be fine.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted || e.raw_os_error() == Some(libc::EPROTO) => {}
                Err(e) => {
                    warn_ratelimited!("{NAME}: accept failed: {e}; tried again in {} ms", SWEEP.as_millis());
                    self.accept_retry = Some(Instant::now() + SWEEP);
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self, registry: &Registry, token: Token) {
        if let Some(mut client) = self.clients.remove(&token) {
            let _ = registry.deregister(&mut client.stream);
        }
        self.owners.remove(&token);
    }

    /// Reads a host client's CONNECT line; once whole, the client becomes a connection
    /// whose REQUEST goes to the guest, or is closed if the line is malformed.
    fn client_read(&mut self, registry: &Registry, token: Token) {
        let Some(client) = self.clients.get_mut(&token) else { return };
        let end = loop {
            if let Some(end) = line_end(&client.sent) {
                break end;
            }
            let mut buf = [0u8; MAX_LINE];
            let room = MAX_LINE - client.sent.len();
            match client.stream.read(&mut buf[..room]) {
                Ok(0) => return self.drop_client(registry, token),
                Ok(n) => client.sent.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_client(registry, token),
            }
        };
        let Some(port) = parse_line(&client.sent[..end]) else {
            log::info!("{NAME}: a host client sent a malformed CONNECT line; closed");
            return self.drop_client(registry, token);
        };
        let Some(Client { mut stream, sent, .. }) = self.clients.remove(&token) else { return };
        if let Err(e) = registry.reregister(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            warn_ratelimited!("{NAME}: cannot watch a host connection: {e}");
            self.owners.remove(&token);
            return;
        }
        let mut local = self.allocate_local_port();
        // A guest's own connection may use a port of the range with the same peer port.
        while self.conns.contains_key(&(local, port)) {
            let taken = local;
            local = self.allocate_local_port();
            self.local_ports.remove(&taken);
        }
        let key = (local, port);
        self.conns.insert(key, Conn::host_initiated(stream, token, local, port, sent[end..].to_vec()));
        self.owners.insert(token, Owner::Conn(key));
        self.queue_ready(key);
    }

    /// The host end of a guest's connection to `port`: the embedder's, if it listens on
    /// the port, or a connection to the unix socket `PATH_port`.
    fn host_end(&self, port: u32) -> Option<UnixStream> {
        let sender = lock(&self.shared.ports).get(&port).cloned();
        if let Some(sender) = sender {
            match std::os::unix::net::UnixStream::pair() {
                Ok((ours, theirs)) => match sender.try_send(theirs) {
                    Ok(()) => return ours.set_nonblocking(true).is_ok().then(|| UnixStream::from_std(ours)),
                    Err(TrySendError::Full(_)) => {
                        warn_ratelimited!(
                            "{NAME}: the embedder has not taken port {port}'s last connections; one refused"
                        );
                        return None;
                    }
                    // The embedder stopped listening: the port is the socket's again.
                    Err(TrySendError::Disconnected(_)) => {
                        lock(&self.shared.ports).remove(&port);
                    }
                },
                Err(e) => {
                    warn_ratelimited!("{NAME}: cannot make a socket pair for port {port}: {e}");
                    return None;
                }
            }
        }
        let mut path = OsString::from(self.path.as_os_str());
        path.push(format!("_{port}"));
        // Non-blocking: a listener with a full backlog refuses rather than stalls the loop.
        UnixStream::connect(&path).ok()
    }

    /// A REQUEST for no known connection.
    fn guest_connects(&mut self, registry: &Registry, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.open() >= self.max_connections {
            warn_ratelimited!("{NAME}: {} connections open; the guest's to port {} is refused", self.open(), key.0);
            return self.rst(key);
        }
        let Some(mut stream) = self.host_end(hdr.dst_port) else { return self.rst(key) };
        let token = self.token();
        if let Err(e) = registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            warn_ratelimited!("{NAME}: cannot watch a host connection: {e}");
            return self.rst(key);
        }
        self.conns.insert(key, Conn::guest_initiated(stream, token, hdr));
        self.owners.insert(token, Owner::Conn(key));
        self.queue_ready(key);
    }

    /// A packet from the guest.
    pub(super) fn guest_packet(&mut self, registry: &Registry, hdr: &Header, payload: Payload<'_, '_>) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.kind != TYPE_STREAM {
            // As Firecracker: any other socket type is refused with an RST.
            return self.rst(key);
        }
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cid {
            return warn_ratelimited!(
                "{NAME}: dropped a guest packet from CID {} to CID {} (the guest is {}, the host 2)",
                hdr.src_cid,
                hdr.dst_cid,
                self.cid
            );
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connects(registry, hdr),
                // Never an RST for an RST (Linux does not either): no ping-pong.
                OP_RST => {}
                _ => self.rst(key),
            }
            return;
        };
        if hdr.op == OP_RST {
            return self.remove(registry, key);
        }
        match conn.guest_packet(hdr, payload) {
            Verdict::Keep => self.queue_ready(key),
            Verdict::Kill => self.kill(registry, key),
        }
    }

    fn conn_event(&mut self, registry: &Registry, key: Key, event: &Event) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            conn.set_readable();
        }
        if (event.is_writable() || event.is_write_closed() || event.is_error()) && conn.flush() == Verdict::Kill {
            return self.kill(registry, key);
        }
        self.queue_ready(key);
    }

    /// Resets the connections whose guest did not answer in time, closes the host
    /// clients that did not send their line in time, and tries a failed `accept` again.
    fn sweep(&mut self, registry: &Registry) {
        let now = Instant::now();
        self.last_sweep = now;
        // Until the loop next sleeps and works it out again, the 100 ms sweeps stand in.
        self.earliest.set(None);
        if self.accept_retry.is_some_and(|at| at <= now) {
            self.accept_retry = None;
            self.accept(registry);
        }
        let due: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.expiry.is_some_and(|at| at <= now)).map(|(k, _)| *k).collect();
        let late: Vec<Token> = self.clients.iter().filter(|(_, c)| c.deadline <= now).map(|(t, _)| *t).collect();
        for token in late {
            log::info!("{NAME}: a host client sent no whole CONNECT line in {} s; closed", TIMEOUT.as_secs());
            self.drop_client(registry, token);
        }
        for key in due {
            log::debug!("{NAME}: the guest's port {} did not answer in time; connection reset", key.1);
            self.kill(registry, key);
        }
    }

    /// Serves the queues until neither way can move more.
    fn pump(&mut self, registry: &Registry) {
        if self.shared.reset.swap(false, Ordering::SeqCst) {
            // The guest's driver drops every connection on the event; so does the device.
            self.drop_all(registry);
            self.reset_due = true;
        }
        let now = Instant::now();
        if self.earliest.get().is_some_and(|at| at <= now) || now >= self.last_sweep + SWEEP {
            self.sweep(registry);
        }
        let Some(mut run) = self.running.take() else { return };
        let memory = run.memory.memory();
        for round in 1.. {
            let taken = self.transmit(registry, memory, &mut Chains::new(NAME, &mut run.tx, memory, &run.interrupt));
            self.receive(registry, memory, &mut Chains::new(NAME, &mut run.rx, memory, &run.interrupt));
            if taken < TX_BATCH || run.interrupt.needs_reset() {
                break;
            }
            if round == MAX_ROUNDS {
                if let Some(wake) = lock(&self.shared.wake).as_ref() {
                    wake.wake();
                }
                break;
            }
        }
        if self.reset_due {
            let mut event = Chains::new(NAME, &mut run.event, memory, &run.interrupt);
            if let Some(chain) = event.next() {
                let head = chain.head_index();
                let written = write_chain(NAME, memory, chain, &EVENT_TRANSPORT_RESET.to_le_bytes());
                event.give_back(head, written as u32);
                self.reset_due = false;
            }
        }
        self.running = Some(run);
    }

    /// Takes up to [`TX_BATCH`] of the guest's packets; returns how many chains it took.
    fn transmit(&mut self, registry: &Registry, memory: &GuestMemoryMmap, tx: &mut Chains<'_, '_>) -> usize {
        let mut payload = std::mem::take(&mut self.payload);
        let mut taken = 0;
        while taken < TX_BATCH {
            let Some(chain) = tx.next() else { break };
            taken += 1;
            let head = chain.head_index();
            // The payload goes to the host stream straight from the guest's buffers, which
            // go back to the guest after; a chain they cannot be taken from as `iovec`s
            // (bytes past the payload, a buffer straddling two regions, too many pieces)
            // is copied out first.
            let taken = match check_packet(memory, chain.clone()) {
                Ok(hdr) => match GuestIovecs::from_chain(memory, chain.clone(), false, HDR_LEN, hdr.len as usize) {
                    Some(iov) if iov.len() == hdr.len as usize => {
                        self.guest_packet(registry, &hdr, Payload::Guest(&iov));
                        Ok(hdr.len)
                    }
                    _ => read_packet(memory, chain, &mut payload).map(|hdr| {
                        self.guest_packet(registry, &hdr, Payload::Bytes(&payload));
                        hdr.len
                    }),
                },
                Err(e) => Err(e),
            };
            match taken {
                Ok(len) => self.shared.counters.request(0, u64::from(len)),
                Err(e) => {
                    warn_ratelimited!("{NAME}: dropped a guest packet: {e}");
                    self.shared.counters.request(0, 0);
                    self.shared.counters.error();
                }
            }
            if !tx.give_back(head, 0) {
                break;
            }
        }
        self.payload = payload;
        taken
    }

    /// Fills the guest's receive buffers: RSTs first, then each connection with something
    /// to say, one packet at a time in turn.
    fn receive<'m>(&mut self, registry: &Registry, memory: &'m GuestMemoryMmap, rx: &mut Chains<'_, 'm>) {
        loop {
            if let Some(&(local, peer)) = self.rsts.front() {
                let Some(chain) = rx.next() else { return };
                let head = chain.head_index();
                let written = if writable_len(chain.clone(), HDR_LEN) < HDR_LEN {
                    warn_ratelimited!("{NAME}: a receive buffer cannot hold a packet header");
                    self.shared.counters.error();
                    0
                } else {
                    self.rsts.pop_front();
                    write_chain(NAME, memory, chain, &self.header(local, peer, OP_RST).to_bytes())
                };
                self.shared.counters.request(0, 0);
                if !rx.give_back(head, written as u32) {
                    return;
                }
                continue;
            }
            let Some(key) = self.ready.pop_front() else { return };
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.queued = false;
            if !conn.has_output() {
                continue;
            }
            let Some(chain) = rx.next() else {
                conn.queued = true;
                self.ready.push_front(key);
                return;
            };
            let head = chain.head_index();
            // The payload goes straight into the guest's buffers, after the header's room,
            // when the chain is all device-writable buffers in guest memory (Linux's are;
            // any other chain takes it through the device's buffer). One walk of the chain
            // finds the pieces and, when its first buffer holds it, the header's place.
            let mut guest = GuestIovecs::with_spill(&mut self.iov);
            let pushed = guest.push_uniform_chain_head(memory, chain.clone(), true, HDR_LEN, usize::MAX);
            let direct = pushed.is_some();
            let (room, hdr_at) = match pushed {
                Some((added, hdr_at)) => (HDR_LEN + added.min(MAX_PAYLOAD), hdr_at),
                None => (writable_len(chain.clone(), HDR_LEN + MAX_PAYLOAD), None),
            };
            if room < HDR_LEN {
                warn_ratelimited!("{NAME}: a receive buffer of {room} byte(s) cannot hold a packet header");
                self.shared.counters.request(0, 0);
                self.shared.counters.error();
                conn.queued = true;
                self.ready.push_front(key);
                if !rx.give_back(head, 0) {
                    return;
                }
                continue;
            }
            // Linux's buffers hold 4 KiB: one read fills as many as the data, the guest's
            // credit and a packet's worth take (`gather`), each a packet of its own.
            let mut more: [Option<Gathered<'_>>; MAX_GATHER] = [const { None }; MAX_GATHER];
            let mut gathered = 0;
            let produced = if direct {
                guest.truncate(room - HDR_LEN);
                if room > HDR_LEN {
                    gathered = gather(memory, rx, &mut guest, conn.data_room(), &mut more);
                }
                conn.produce(Room::Guest(&mut guest))
            } else {
                conn.produce(Room::Bytes(&mut self.out[HDR_LEN..room]))
            };
            let out = match produced {
                Ok(Some(out)) => out,
                // Data waits but the buffer holds a header only: it comes back empty (as
                // one too small for a header), and the connection waits for the next.
                Ok(None) if room == HDR_LEN && conn.has_output() => {
                    warn_ratelimited!("{NAME}: a receive buffer of {room} bytes holds no data");
                    self.shared.counters.request(0, 0);
                    self.shared.counters.error();
                    conn.queued = true;
                    self.ready.push_front(key);
                    if !rx.give_back(head, 0) {
                        return;
                    }
                    continue;
                }
                Ok(None) => {
                    rx.put_back(1 + gathered);
                    continue;
                }
                Err(()) => {
                    rx.put_back(1 + gathered);
                    self.kill(registry, key);
                    continue;
                }
            };
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            let mut hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: conn.local_port,
                dst_port: conn.peer_port,
                len: out.len as u32,
                kind: TYPE_STREAM,
                op: out.op,
                flags: out.flags,
                buf_alloc: super::conn::BUF_ALLOC,
                fwd_cnt: conn.tell_fwd_cnt(),
            };
            self.queue_ready(key);
            if !direct {
                self.out[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
                let written = write_chain(NAME, memory, chain, &self.out[..HDR_LEN + out.len]);
                self.shared.counters.request(written.saturating_sub(HDR_LEN) as u64, 0);
                if !rx.give_back(head, written as u32) {
                    return;
                }
                continue;
            }
            // The first buffer, then each gathered one the read reached, is a packet; the
            // rest go back to the ring untouched.
            let mut left = out.len;
            let mut used = 0;
            let first = Gathered { chain, room: room - HDR_LEN, hdr_at };
            let buffers = std::iter::once(first).chain(more.iter_mut().filter_map(Option::take));
            for Gathered { chain, room: payload_room, hdr_at } in buffers {
                if used > 0 && left == 0 {
                    break;
                }
                let share = left.min(payload_room);
                left -= share;
                hdr.len = share as u32;
                let head = chain.head_index();
                let bytes = hdr.to_bytes();
                // A header's place in the first buffer was checked against guest memory
                // when the chain was taken.
                let header_written = match hdr_at {
                    Some(at) => at.write(&bytes, 0).unwrap_or(0),
                    None => write_chain(NAME, memory, chain, &bytes),
                };
                let written = match header_written {
                    HDR_LEN => HDR_LEN + share,
                    short => short,
                };
                self.shared.counters.request(written.saturating_sub(HDR_LEN) as u64, 0);
                used += 1;
                // A used ring that takes no more stops the pass (the driver must reset
                // the device): the chains not reached need not go back.
                if !rx.give_back(head, written as u32) {
                    return;
                }
            }
            rx.put_back(1 + gathered - used);
        }
    }

    /// An RST's header: no credit (as Firecracker's).
    fn header(&self, local: u32, peer: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local,
            dst_port: peer,
            kind: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

/// A receive chain one read fills: its payload room after the header's, and the
/// header's place when the chain's first buffer holds it.
struct Gathered<'m> {
    chain: Chain<'m>,
    room: usize,
    hdr_at: Option<VolatileSlice<'m>>,
}

/// Takes more receive chains after the first, whose payload room `guest` holds, for one
/// read of up to `want` bytes across them all: each chain all device-writable guest
/// memory with room for data after a header, at most [`MAX_GATHER`], into `more`.
/// Returns how many were taken; a chain that does not qualify goes back to the ring and
/// ends the gathering.
fn gather<'g, 'm: 'g>(
    memory: &'m GuestMemoryMmap,
    rx: &mut Chains<'_, 'm>,
    guest: &mut GuestIovecs<'g>,
    want: usize,
    more: &mut [Option<Gathered<'m>>; MAX_GATHER],
) -> usize {
    let mut taken = 0;
    while guest.len() < want && taken < MAX_GATHER {
        let Some(chain) = rx.next() else { break };
        let before = guest.len();
        let pushed = guest.push_uniform_chain_head(memory, chain.clone(), true, HDR_LEN, usize::MAX);
        // Room for a header only adds nothing: not a buffer for data.
        let Some((added @ 1.., hdr_at)) = pushed else {
            rx.put_back(1);
            break;
        };
        let room = added.min(MAX_PAYLOAD);
        guest.truncate(before + room);
        more[taken] = Some(Gathered { chain, room, hdr_at });
        taken += 1;
    }
    taken
}

impl Handler for Muxer {
    fn set_wake(&mut self, wake: Wake) {
        *lock(&self.shared.wake) = Some(wake);
    }

    fn register(&mut self, registry: &Registry) -> std::io::Result<()> {
        registry.register(&mut self.listener, LISTENER, Interest::READABLE)
    }

    fn notified(&mut self, registry: &Registry, queues: u32) {
        self.window.woke();
        if let Some(run) = &self.running {
            let queues_only = queues & !BACKEND;
            check_notified(NAME, queues_only, &[&run.rx, &run.tx, &run.event], run.memory.memory(), &run.interrupt);
        }
        self.pump(registry);
    }

    fn ready(&mut self, registry: &Registry, event: &Event) {
        let token = event.token();
        if token == LISTENER {
            self.accept(registry);
        } else {
            match self.owners.get(&token) {
                Some(Owner::Client) => self.client_read(registry, token),
                Some(Owner::Conn(key)) => {
                    let key = *key;
                    self.conn_event(registry, key, event);
                }
                None => {}
            }
        }
        self.pump(registry);
    }

    fn poll_window(&mut self) -> Duration {
        self.window.next(self.running.is_some())
    }

    fn poll(&mut self, registry: &Registry) -> bool {
        let Some(run) = self.running.as_ref().filter(|run| !run.interrupt.needs_reset()) else { return false };
        let memory = run.memory.memory();
        let has_avail =
            |queue: &Queue| queue.avail_idx(memory, Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail());
        // Work: packets from the guest, or receive buffers for what waits for the guest.
        let waiting = !self.ready.is_empty() || !self.rsts.is_empty();
        let work = has_avail(&run.tx) || (waiting && has_avail(&run.rx));
        if !work {
            return false;
        }
        self.pump(registry);
        self.window.hit();
        true
    }

    fn poll_expired(&mut self) {
        self.window.expired();
    }

    /// Host streams turn readable (data for the guest) and writable (room for what the
    /// guest sent) while the device polls its queues. Only with connections open: the
    /// listener and clients still writing their `CONNECT` line wait for the window's end
    /// (a connection's set-up is not on a stream's path).
    fn polls_sources(&self) -> bool {
        !self.conns.is_empty()
    }

    fn next_timeout(&self) -> Option<Duration> {
        let clients = self.clients.values().map(|c| c.deadline);
        let earliest = self.conns.values().filter_map(|c| c.expiry).chain(clients).chain(self.accept_retry).min();
        self.earliest.set(earliest);
        earliest.map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn timeout(&mut self, registry: &Registry) {
        self.sweep(registry);
        self.pump(registry);
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        self.drop_all(registry);
        let tokens: Vec<Token> = self.clients.keys().copied().collect();
        for token in tokens {
            self.drop_client(registry, token);
        }
    }

    fn detach(&mut self) {
        *lock(&self.shared.wake) = None;
        self.running = None;
        self.conns.clear();
        self.clients.clear();
        self.owners.clear();
        self.ready.clear();
        self.rsts.clear();
        self.local_ports.clear();
        self.local_port_last = PORT_BEFORE_FIRST;
        self.reset_due = false;
        self.earliest.set(None);
    }
}
