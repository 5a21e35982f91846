//! The console's port: its backend, the bytes in flight, and the queue work, run by a
//! [`Worker`](crate::virtio::worker::Worker) while the driver has the device started.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Backend;
use crate::virtio::counters::DeviceCounters;
use crate::virtio::iovec::{GuestIovecs, IovecBuf, MAX_IOVECS};
use crate::virtio::worker::{Handler, PollWindow, Wake, BACKEND};
use crate::virtio::{check_notified, has_pending, write_chain, Chains, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-console";
const INPUT: Token = Token(0);
const LISTENER: Token = Token(1);
const CLIENT: Token = Token(2);
/// Host input read at a time.
const INPUT_CHUNK: usize = 4096;
/// The most output taken from one transmit chain; the rest is dropped (Linux sends at
/// most a page per buffer).
pub const MAX_CHAIN_OUTPUT: usize = 64 * 1024;
/// Output kept while no socket client is connected.
pub const KEPT_OUTPUT: usize = 64 * 1024;
/// The most transmit chains handed to the backend in one call.
const BATCH: usize = 64;
/// How long a new socket client waits before it takes the console over: one that goes
/// within it (another hvrun's check of the path, a health check, which connect and close
/// at once) never does, so the client it would have displaced keeps the console.
const TAKEOVER_GRACE: Duration = crate::host_socket::NEWCOMER_GRACE;
/// New socket clients waiting to take over at most; past it the oldest is let go.
const MAX_NEWCOMERS: usize = 4;

struct Running {
    memory: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A port and its backend, running or idle.
pub(super) struct Port {
    backend: Backend,
    client: Option<UnixStream>,
    /// Whether the socket client may still send input: one that shut its writing side
    /// (a client that only reads, such as `nc -N` or `socat -u`) keeps getting output.
    client_sends: bool,
    /// Socket clients accepted and not yet the client, oldest first, each with the time
    /// it may take over ([`TAKEOVER_GRACE`]).
    newcomers: Vec<(UnixStream, Instant)>,
    running: Option<Running>,
    /// Host input read but not yet given to the guest: `input[input_at..]`.
    input: Vec<u8>,
    input_at: usize,
    /// Guest output not yet written to the backend, copied out of the guest's buffers
    /// (the rest of one the backend took part of, one that cannot be written in place).
    output: VecDeque<u8>,
    /// The pieces of the transmit chains written in one call, and those chains (head,
    /// bytes), reused.
    out_iov: IovecBuf,
    out_chains: Vec<(u16, usize)>,
    /// Whether the guest has written to the port since the driver started it. Host
    /// input waits until then: Linux posts receive buffers before it marks the console
    /// port connected, and discards what arrives in between.
    guest_spoke: bool,
    /// How long the loop keeps looking at the transmit queue after a pass: a guest
    /// writing a stream of output is then served without a thread wake-up per write.
    window: PollWindow,
    /// Buffers each way, for metrics (shared with the device).
    counters: Arc<DeviceCounters>,
}

impl Port {
    pub(super) fn new(backend: Backend, counters: Arc<DeviceCounters>) -> Self {
        Port {
            backend,
            client: None,
            client_sends: false,
            newcomers: Vec::new(),
            running: None,
            input: Vec::new(),
            input_at: 0,
            output: VecDeque::new(),
            out_iov: IovecBuf::new(),
            out_chains: Vec::with_capacity(BATCH),
            guest_spoke: false,
            window: PollWindow::new(),
            counters,
        }
    }

    pub(super) fn attach(&mut self, memory: GuestMemory, rx: Queue, tx: Queue, interrupt: Interrupt) {
        self.running = Some(Running { memory, rx, tx, interrupt });
    }

    /// Moves bytes both ways until neither side can take more, then interrupts the
    /// driver if it asked to be.
    fn pump(&mut self, registry: &Registry) {
        self.settle_newcomers(registry);
        let Some(mut run) = self.running.take() else { return };
        let memory = run.memory.memory();
        // Each pass interrupts the driver, if it asked to be, when it ends.
        self.transmit(registry, memory, &mut Chains::new(NAME, &mut run.tx, memory, &run.interrupt));
        self.receive(registry, memory, &mut Chains::new(NAME, &mut run.rx, memory, &run.interrupt));
        self.running = Some(run);
    }

    /// Hands the guest's output to the backend: up to [`BATCH`] chains at a time, in one
    /// call and straight from the guest's buffers (a `writev` to a socket client; one
    /// copy into the host writer's buffer). Chains the backend did not take go back to
    /// the ring until it has room; the rest of one it took part of waits in `output`.
    fn transmit(&mut self, registry: &Registry, memory: &GuestMemoryMmap, tx: &mut Chains<'_, '_>) {
        while self.flush(registry) {
            let mut iov = GuestIovecs::with_spill(&mut self.out_iov);
            self.out_chains.clear();
            let mut copied = false;
            while self.out_chains.len() < BATCH && iov.iovecs().len() < MAX_IOVECS {
                let Some(chain) = tx.next() else { break };
                self.guest_spoke = true;
                let head = chain.head_index();
                match iov.push_uniform_chain(memory, chain.clone(), false, 0, MAX_CHAIN_OUTPUT) {
                    Some(n) => self.out_chains.push((head, n)),
                    None if self.out_chains.is_empty() => {
                        // Copied instead: `collect` takes what it can and says what is
                        // wrong with the rest (too long, device-writable buffers...).
                        let before = self.output.len();
                        let whole = collect(memory, chain, &mut self.output);
                        self.counters.request(0, (self.output.len() - before) as u64);
                        if !whole {
                            self.counters.error();
                        }
                        if !tx.give_back(head, 0) {
                            return;
                        }
                        copied = true;
                        break;
                    }
                    None => {
                        tx.put_back(1);
                        break;
                    }
                }
            }
            if self.out_chains.is_empty() {
                if copied {
                    continue; // flushed first, then the next chains
                }
                return;
            }
            let taken = write_out(&mut self.backend, &mut self.client, registry, &iov, &mut self.output);
            // The chains the backend took whole go back to the driver; the rest of one
            // it took part of is copied out; those it did not touch go back to the ring.
            let (mut at, mut whole) = (0usize, true);
            for (i, &(head, n)) in self.out_chains.iter().enumerate() {
                if at >= taken && n > 0 {
                    tx.put_back(self.out_chains.len() - i);
                    whole = false;
                    break;
                }
                if at + n > taken {
                    iov.append_to(taken, at + n - taken, &mut self.output);
                    whole = false;
                }
                at += n;
                self.counters.request(0, n as u64);
                if !tx.give_back(head, 0) {
                    return;
                }
            }
            // A backend that took only part waits for room, and says when it has some
            // (a socket's writable event, an output thread's wake). A file gives no such
            // sign: it is offered the rest at once (it took some, or refused and had
            // the output dropped).
            if !whole && !matches!(self.backend, Backend::File(_)) {
                return;
            }
        }
    }

    /// Writes buffered output to the backend; false if some is still waiting (a socket
    /// client that is not reading, a host writer that is behind).
    fn flush(&mut self, registry: &Registry) -> bool {
        match &mut self.backend {
            Backend::Stream { output, .. } => {
                while !self.output.is_empty() {
                    let taken = output.offer(self.output.as_slices().0);
                    if taken == 0 {
                        return false;
                    }
                    self.output.drain(..taken);
                }
                true
            }
            Backend::File(file) => {
                while !self.output.is_empty() {
                    let n = write_file(file, self.output.as_slices().0);
                    self.output.drain(..n);
                }
                true
            }
            Backend::Socket(_) => {
                let Some(client) = &mut self.client else {
                    let excess = self.output.len().saturating_sub(KEPT_OUTPUT);
                    self.output.drain(..excess);
                    return true;
                };
                while !self.output.is_empty() {
                    match client.write(self.output.as_slices().0) {
                        Ok(0) => break,
                        Ok(n) => {
                            self.output.drain(..n);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                        Err(e) => {
                            log::info!("{NAME}: socket client gone ({e})");
                            self.drop_client(registry);
                            return true;
                        }
                    }
                }
                self.output.is_empty()
            }
        }
    }

    fn receive(&mut self, registry: &Registry, memory: &GuestMemoryMmap, rx: &mut Chains<'_, '_>) {
        if !self.guest_spoke {
            return;
        }
        loop {
            if self.input_at == self.input.len() && !self.read_input(registry) {
                return;
            }
            let Some(chain) = rx.next() else { return };
            let head = chain.head_index();
            let written = write_chain(NAME, memory, chain, &self.input[self.input_at..]);
            self.input_at += written;
            self.counters.request(written as u64, 0);
            if written == 0 {
                self.counters.error(); // a buffer the device cannot write (`write_chain` said why)
            }
            if !rx.give_back(head, written as u32) {
                return;
            }
        }
    }

    /// Reads a chunk of host input; false when none is available now.
    fn read_input(&mut self, registry: &Registry) -> bool {
        self.input.resize(INPUT_CHUNK, 0);
        self.input_at = 0;
        let read = match (&mut self.backend, &mut self.client) {
            (Backend::Stream { input: Some(pipe), .. }, _) => pipe.read(&mut self.input),
            (Backend::Socket(_), Some(client)) if self.client_sends => client.read(&mut self.input),
            (Backend::Socket(_), _) => {
                self.input.clear();
                return false;
            }
            _ => Ok(0),
        };
        let n = match read {
            Ok(0) => {
                self.end_input(registry);
                0
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => 0,
            Err(e) => {
                log::info!("{NAME}: input ends ({e})");
                self.end_input(registry);
                0
            }
        };
        self.input.truncate(n);
        n > 0
    }

    /// The input reached its end: a pipe is closed for good; a socket client is read no
    /// more but keeps getting output until writing to it fails (it may have shut only
    /// its writing side).
    fn end_input(&mut self, registry: &Registry) {
        match &mut self.backend {
            Backend::Stream { input, .. } => {
                if let Some(mut pipe) = input.take() {
                    let _ = registry.deregister(&mut pipe);
                }
            }
            Backend::File(_) => {}
            Backend::Socket(_) => {
                self.client_sends = false;
                if let Some(client) = &mut self.client {
                    let _ = registry.reregister(client, CLIENT, Interest::WRITABLE);
                }
            }
        }
    }

    /// Lets go of the newcomers that are gone; the newest whose grace has passed takes
    /// the console over (any older one is let go, as that newer client would have
    /// displaced it).
    fn settle_newcomers(&mut self, registry: &Registry) {
        if self.newcomers.is_empty() {
            return;
        }
        self.newcomers.retain(|(stream, _)| !crate::host_socket::peer_gone(stream));
        let now = Instant::now();
        let Some(due) = self.newcomers.iter().rposition(|(_, at)| *at <= now) else { return };
        let Some((mut stream, _)) = self.newcomers.drain(..=due).last() else { return };
        if self.client.is_some() {
            log::info!("{NAME}: a new client takes the console over from the previous one");
            self.drop_client(registry);
        }
        match registry.register(&mut stream, CLIENT, Interest::READABLE | Interest::WRITABLE) {
            Ok(()) => (self.client, self.client_sends) = (Some(stream), true),
            Err(e) => warn_ratelimited!("{NAME}: cannot watch the new client: {e}"),
        }
    }

    fn drop_client(&mut self, registry: &Registry) {
        if let Some(mut client) = self.client.take() {
            let _ = registry.deregister(&mut client);
        }
    }

    /// Accepts new socket clients: each waits [`TAKEOVER_GRACE`] before it takes the
    /// console over (see [`Port::settle_newcomers`]), unless it is gone already.
    fn accept(&mut self) {
        loop {
            let Backend::Socket(listener) = &self.backend else { return };
            match listener.accept() {
                Ok((stream, _)) => {
                    if crate::host_socket::peer_gone(&stream) {
                        continue;
                    }
                    if self.newcomers.len() == MAX_NEWCOMERS {
                        self.newcomers.remove(0);
                    }
                    self.newcomers.push((stream, Instant::now() + TAKEOVER_GRACE));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn_ratelimited!("{NAME}: accept failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Hands the guest's output in `iov` to the backend in one call; returns how many bytes
/// it took. Output with no socket client to take it is kept (copied into `kept`, of which
/// the last [`KEPT_OUTPUT`] bytes stay), as is output a client that went away left.
fn write_out(
    backend: &mut Backend,
    client: &mut Option<UnixStream>,
    registry: &Registry,
    iov: &GuestIovecs<'_>,
    kept: &mut VecDeque<u8>,
) -> usize {
    match backend {
        Backend::Stream { output, .. } => output.offer_with(iov.len(), |room| iov.read_bytes(0, room)),
        Backend::File(file) => match iov.write_file(file.as_raw_fd()) {
            Ok(n) if n > 0 || iov.is_empty() => n,
            result => file_refused(result.err(), iov.len()),
        },
        Backend::Socket(_) => {
            if let Some(stream) = client {
                match iov.send_stream(stream.as_raw_fd()) {
                    Ok(n) => return n,
                    Err(e) => {
                        log::info!("{NAME}: socket client gone ({e})");
                        if let Some(mut stream) = client.take() {
                            let _ = registry.deregister(&mut stream);
                        }
                    }
                }
            }
            iov.append_to(0, iov.len(), kept);
            iov.len()
        }
    }
}

/// Writes some of `bytes` to the output file: how many it took. Output the file refuses
/// (a full disk) is dropped, with a rate-limited warning: the guest keeps going.
fn write_file(file: &std::fs::File, bytes: &[u8]) -> usize {
    match (&*file).write(bytes) {
        Ok(n) if n > 0 => n,
        Err(e) if e.kind() == ErrorKind::Interrupted => 0,
        result => file_refused(result.err(), bytes.len()),
    }
}

/// The output file took none of `len` bytes (`error`, or a zero-byte write): they are
/// dropped, with a rate-limited warning. Returns `len`, as if written.
fn file_refused(error: Option<std::io::Error>, len: usize) -> usize {
    let why = error.map_or_else(|| "it takes no more".into(), |e| e.to_string());
    warn_ratelimited!("{NAME}: cannot write the output file ({why}); {len} bytes of output are dropped");
    len
}

/// Appends the chain's device-readable bytes to `out`, at most [`MAX_CHAIN_OUTPUT`]
/// (how the port takes a transmit chain; public for the fuzz targets). Returns false
/// if the chain was malformed or too long, and only its first bytes were taken.
pub fn collect(memory: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, out: &mut VecDeque<u8>) -> bool {
    let mut taken = 0usize;
    let mut buf = [0u8; 4096];
    for desc in chain {
        if desc.is_write_only() {
            warn_ratelimited!("{NAME}: device-writable descriptor in the transmit queue; chain ends");
            return false;
        }
        let mut left = desc.len() as usize;
        let mut addr = desc.addr();
        while left > 0 {
            if taken >= MAX_CHAIN_OUTPUT {
                warn_ratelimited!("{NAME}: transmit chain over {MAX_CHAIN_OUTPUT} bytes; the rest is dropped");
                return false;
            }
            let n = left.min(buf.len()).min(MAX_CHAIN_OUTPUT - taken);
            if memory.read_slice(&mut buf[..n], addr).is_err() {
                warn_ratelimited!("{NAME}: buffer at {:#x} is outside guest memory; chain ends", addr.0);
                return false;
            }
            out.extend(&buf[..n]);
            taken += n;
            left -= n;
            addr = GuestAddress(addr.0.wrapping_add(n as u64));
        }
    }
    true
}

impl Handler for Port {
    fn set_wake(&mut self, wake: Wake) {
        // A host writer that was behind sends no event when it catches up: its output
        // thread wakes the loop instead, which offers the rest again.
        if let Backend::Stream { output, .. } = &self.backend {
            output.on_room(move || wake.wake());
        }
    }

    fn register(&mut self, registry: &Registry) -> std::io::Result<()> {
        match &mut self.backend {
            Backend::Stream { input: Some(pipe), .. } => registry.register(pipe, INPUT, Interest::READABLE)?,
            Backend::Stream { input: None, .. } | Backend::File(_) => {}
            Backend::Socket(listener) => registry.register(listener, LISTENER, Interest::READABLE)?,
        }
        if let Some(client) = &mut self.client {
            let interest = if self.client_sends { Interest::READABLE | Interest::WRITABLE } else { Interest::WRITABLE };
            registry.register(client, CLIENT, interest)?;
        }
        Ok(())
    }

    fn notified(&mut self, registry: &Registry, queues: u32) {
        if queues & !BACKEND != 0 {
            // The driver's notification, not the output thread's: the time asleep
            // tells how close together the guest's requests come.
            self.window.woke();
        }
        if let Some(run) = &self.running {
            check_notified(NAME, queues, &[&run.rx, &run.tx], run.memory.memory(), &run.interrupt);
        }
        self.pump(registry);
    }

    fn ready(&mut self, registry: &Registry, event: &Event) {
        if event.token() == LISTENER {
            self.accept();
        }
        self.pump(registry);
    }

    fn detach(&mut self) {
        self.running = None;
        self.guest_spoke = false;
        self.window = PollWindow::new();
    }

    fn poll_window(&mut self) -> Duration {
        self.window.next(self.running.is_some())
    }

    /// Output the guest queued since the last pass (and input for buffers it added):
    /// a hit only if the pass moved some, so a backend with no room ends the spin.
    fn poll(&mut self, registry: &Registry) -> bool {
        let Some(run) = self.running.as_ref() else { return false };
        let memory = run.memory.memory();
        let avail = |queue: &Queue| has_pending(NAME, queue, memory, &run.interrupt);
        let input = self.input_at < self.input.len();
        if !(avail(&run.tx) || input && avail(&run.rx)) {
            return false;
        }
        let positions = |run: &Running| (run.tx.next_avail(), run.rx.next_avail());
        let before = positions(run);
        self.pump(registry);
        if self.running.as_ref().map(positions) == Some(before) {
            return false;
        }
        self.window.hit();
        true
    }

    fn poll_expired(&mut self) {
        self.window.expired();
    }

    /// Due when the first newcomer may take the console over.
    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.newcomers.iter().map(|(_, at)| at.saturating_duration_since(now)).min()
    }

    fn timeout(&mut self, registry: &Registry) {
        self.pump(registry);
    }

    fn deregister(&mut self, registry: &Registry) {
        match &mut self.backend {
            Backend::Stream { input: Some(pipe), .. } => {
                let _ = registry.deregister(pipe);
            }
            Backend::Stream { input: None, .. } | Backend::File(_) => {}
            Backend::Socket(listener) => {
                let _ = registry.deregister(listener);
            }
        }
        if let Some(client) = &mut self.client {
            let _ = registry.deregister(client);
        }
    }
}
