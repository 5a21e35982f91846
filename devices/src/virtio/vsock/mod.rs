//! virtio-vsock (virtio 1.2 section 5.10, device ID 19): stream sockets between the guest
//! and host programs, over unix sockets on the host (no vhost), the way Firecracker and
//! Cloud Hypervisor do it ("hybrid vsock").
//!
//! Configuration space: `guest_cid` (u64, little-endian). Queues: rx 0, tx 1, event 2.
//! Features: none beyond `VIRTIO_F_VERSION_1` (no EVENT_IDX, no SEQPACKET). Only
//! `VIRTIO_VSOCK_TYPE_STREAM`; the guest may talk to the host (CID 2) only.
//!
//! # The host side
//!
//! The device listens on a unix socket, `PATH`:
//! - **Host-initiated**: a host program connects to `PATH` and writes `CONNECT <port>\n`.
//!   The guest gets a REQUEST to `<port>` from a host-side port allocated as Firecracker
//!   does (round robin over `[1 << 30, 1 << 31)`, from `1 << 30` = 1073741824 after each
//!   driver start). When the guest accepts (RESPONSE), the program reads
//!   `OK <host-side port>\n` and the stream is spliced. If the guest refuses (RST) or does
//!   not answer within 2 s, the program's connection is closed. The line is read as
//!   Firecracker reads it ([`connect`]: at most 32 bytes, ending at the first `\n` from the
//!   tenth byte on; `connect` in any case; a decimal `u32`; words after it ignored); a
//!   malformed line closes the connection. Unlike Firecracker, the line may arrive in
//!   pieces (Firecracker closes a client whose whole line is not there at its first
//!   read), within [`TIMEOUT`] (2 s) of connecting; a client that has not sent a whole
//!   line by then is closed (Firecracker keeps a client that sends nothing), so silent
//!   clients cannot hold the connection slots.
//! - **Guest-initiated**: a guest connecting to CID 2, port P makes the device connect to
//!   the unix socket `PATH_P` (`PATH`, `_`, P in decimal); if nothing listens there (or its
//!   backlog is full: the connect never blocks the device), the guest gets an RST. An
//!   embedder may take port P itself ([`VsockHandle::listen`]): it gets one end of a
//!   fresh socket pair per connection through a bounded channel (full: the guest gets an
//!   RST), and `PATH_P` is not tried.
//! - A host stream's end (EOF) sends the guest SHUTDOWN (receive and send) and gives it
//!   2 s to reset (a SHUTDOWN from the guest then resets it at once; Firecracker waits for
//!   the timeout); a guest SHUTDOWN with both flags resets the connection once the data
//!   the guest sent is written (or after 2 s). A guest's SHUTDOWN SEND shuts the host
//!   stream's write half once its data is written (Firecracker does not), so the host
//!   reader sees the end.
//!
//! # Limits a guest cannot break
//!
//! - At most [`MAX_CONNECTIONS`] (Firecracker's 1023) connections and host clients
//!   waiting to send their CONNECT line; past it, a guest REQUEST gets an RST and a host
//!   client is closed at once.
//! - Host to guest: the device reads from a host stream only what the guest's credit
//!   (`buf_alloc - (tx_cnt - fwd_cnt)`) and the receive buffer in hand allow, at most
//!   64 KiB a packet: a guest that does not read leaves the bytes in the host's socket.
//! - Guest to host: the device advertises [`BUF_ALLOC`] (256 KiB) per connection and holds
//!   at most that much for a host stream that is not reading; a guest that sends past its
//!   credit gets an RST for the connection (as Firecracker). Worst case: 1023 × 256 KiB
//!   (`VecDeque` growth may hold up to twice that in capacity).
//! - The list of connections with a packet for the guest holds each live connection at
//!   most once: a connection's entry leaves it when the connection goes, so a guest that
//!   posts no receive buffers while it opens and resets connections cannot grow it.
//! - A transmit chain without a whole 44-byte header, with `len` over 64 KiB or beyond the
//!   chain's readable bytes, or with a device-writable buffer, is dropped with a
//!   rate-limited warning (as Firecracker). A packet of another socket type gets an RST (as
//!   Firecracker); one not from the guest's CID or not to the host's is dropped. A packet
//!   for no connection gets an RST, except a REQUEST (a new connection) and an RST (never
//!   answered, so no ping-pong). RSTs waiting for receive buffers are bounded too.
//! - Every chain is taken through [`Chains`](super::Chains), with the driver's indexes
//!   checked; the device's work runs on its [`Worker`](super::worker::Worker), never on a
//!   vCPU.
//!
//! # Firecracker's rules: matched, and where hvrun differs
//!
//! Matched (read in Firecracker's `unix/muxer.rs`, `csm/connection.rs`, `csm/mod.rs` and
//! `docs/vsock.md`): the CONNECT line as above; `OK <port>\n` written once the guest's
//! RESPONSE arrives (a client that cannot take it is reset); host ports from `1 << 30`,
//! round robin in `[1 << 30, 1 << 31)`, starting over after a driver reset; `PATH_P` for
//! guest connections, RST when the connect fails; 1023 connections, a host client past
//! them accepted and closed; the 2 s request and shutdown timeouts, after which the
//! guest gets an RST; a host EOF as SHUTDOWN with both flags; a guest SHUTDOWN with both
//! flags answered with RST once the buffered data is written; RW past the advertised
//! credit resets the connection; a CREDIT_REQUEST when the guest's credit is used up;
//! RST for another socket type and for packets of no connection; malformed chains
//! dropped; an RST's header carries no credit.
//!
//! Different: the CONNECT line may come in pieces within 2 s (Firecracker: closed unless
//! whole at the first read, kept forever if nothing was sent); an RST for no connection is not answered (Firecracker answers it); a
//! packet not from the guest's CID is dropped (Firecracker does not look); the device
//! advertises 256 KiB per connection (Firecracker 64 KiB) and sends CREDIT_UPDATE when the
//! space the guest believes it has is under half the buffer and under a packet, or a
//! packet's worth behind (Firecracker: when it forwarded all but 4 KiB of its buffer
//! since it last said); it answers a CREDIT_REQUEST with a CREDIT_UPDATE even when other
//! packets carry the credit; a guest SHUTDOWN SEND half-closes the host stream; a guest
//! SHUTDOWN after the host's EOF resets at once; queued RSTs are bounded at 1024
//! (Firecracker's queue: 256); a stale socket file at `PATH` is replaced, a live one is
//! an error (Firecracker removes only its own previous socket when reconfigured).
//!
//! # Moving the bytes
//!
//! A guest packet's payload goes to the host stream with one `sendmsg` straight from the
//! guest's buffers ([`packet::check_packet`], then the buffers as `iovec`s; a chain that
//! cannot be taken that way is copied out with [`packet::read_packet`]); only what the
//! stream does not take is copied into the connection's buffer. The device polls its
//! queues for a short adaptive window after work (as virtio-blk does), so a guest that
//! streams is served without a thread wake-up per packet; deadlines are looked at at
//! least every 100 ms while it is busy, and an `accept` that failed (no descriptors
//! left) is tried again 100 ms later, since the listener's readiness is edge-triggered.
//!
//! # Events
//!
//! [`VsockHandle::transport_reset`] drops every connection and sends the driver
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` in its next event buffer (the driver then drops its
//! connections and reads `guest_cid` again: after a snapshot is restored, say). The
//! driver's event buffers are otherwise left alone.

mod conn;
pub mod connect;
mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

pub use self::conn::{BUF_ALLOC, TIMEOUT};
use self::muxer::Muxer;
use super::counters::{DeviceCounters, DeviceStats};
use super::notifier::QueueNotifier;
use super::worker::{Slot, Wake};
use super::{read_config_bytes, ActivateError, Activation, VirtioDevice};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue's index.
pub const TX_QUEUE: u16 = 1;
/// The event queue's index.
pub const EVENT_QUEUE: u16 = 2;
/// The most connections (and host clients yet to send their CONNECT line) at once:
/// Firecracker's `MAX_CONNECTIONS`.
pub const MAX_CONNECTIONS: usize = 1023;
/// The lowest CID a guest may have (0 to 2 are the hypervisor, the loopback, the host).
pub const MIN_CID: u64 = 3;
/// The highest CID a guest may have (`u32::MAX` is `VMADDR_CID_ANY`; the upper 32 bits of
/// `guest_cid` are reserved).
pub const MAX_CID: u64 = u32::MAX as u64 - 1;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

const NAME: &str = "virtio-vsock";

/// Errors setting up a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is not a guest's.
    #[error("vsock CID {0} is invalid: a guest's CID is 3 to 4294967294")]
    InvalidCid(u64),
    /// Something that is not a socket is at the path.
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live socket is at the path (another VM's?).
    #[error("{0}: a program is listening on it already")]
    InUse(PathBuf),
    /// The path cannot be bound or set up.
    #[error("{path}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Checks a guest CID.
pub fn check_cid(cid: u64) -> Result<(), VsockError> {
    if (MIN_CID..=MAX_CID).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::InvalidCid(cid))
    }
}

/// Checks what is at `path`, for a socket the device will bind there: nothing, or a
/// socket file nobody listens on (a previous run's, which [`bind`] removes). Anything else
/// is an error.
pub fn check_socket_path(path: &Path) -> Result<(), VsockError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VsockError::Socket { path: path.into(), source }),
        Ok(meta) if !meta.file_type().is_socket() => Err(VsockError::NotASocket(path.into())),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(VsockError::InUse(path.into())),
        Ok(_) => Ok(()),
    }
}

/// Binds the device's listening socket at `path`, removing a stale socket file left by a
/// previous run first (see [`check_socket_path`]).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, VsockError> {
    check_socket_path(path)?;
    let socket_err = |source| VsockError::Socket { path: path.into(), source };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(socket_err)?;
    listener.set_nonblocking(true).map_err(socket_err)?;
    Ok(listener)
}

/// What the device and its [`VsockHandle`]s share.
#[derive(Default)]
struct Shared {
    /// Ports an embedder listens on, each with where its connections go.
    ports: Mutex<HashMap<u32, SyncSender<UnixStream>>>,
    /// A TRANSPORT_RESET was asked for.
    reset: AtomicBool,
    /// The running worker's wake, while the driver has the device started.
    wake: Mutex<Option<Wake>>,
    /// Packets each way, for metrics.
    counters: DeviceCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host's hold on a vsock device: ports it serves in-process, and the transport
/// reset event. Cheap to clone; any thread.
#[derive(Clone)]
pub struct VsockHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHandle").finish_non_exhaustive()
    }
}

impl VsockHandle {
    /// Serves the guest's connections to host port `port` in-process: each one the guest
    /// opens is sent down `connections` as the host end of a connected [`UnixStream`]
    /// (blocking; the other end is the device's). The channel's bound is how many
    /// connections may wait for the embedder to take them: while it is full, the guest's
    /// connections to the port are refused (RST), so a guest that opens and resets
    /// connections faster than the embedder takes them cannot pile up file descriptors
    /// here. Replaces an earlier listener on the port. While it listens, `PATH_port` is
    /// not tried; once the receiver is dropped, the next connection to the port stops
    /// listening and goes to `PATH_port` again.
    pub fn listen(&self, port: u32, connections: SyncSender<UnixStream>) {
        lock(&self.shared.ports).insert(port, connections);
    }

    /// Stops serving `port` in-process.
    pub fn unlisten(&self, port: u32) {
        lock(&self.shared.ports).remove(&port);
    }

    /// Drops every connection and sends the driver `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`,
    /// in its next event buffer (once the driver has the device started).
    pub fn transport_reset(&self) {
        self.shared.reset.store(true, Ordering::SeqCst);
        if let Some(wake) = lock(&self.shared.wake).as_ref() {
            wake.wake();
        }
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    muxer: Slot<Muxer>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock").field("cid", &self.cid).field("muxer", &self.muxer).finish()
    }
}

impl Vsock {
    /// A device for the guest `cid`, serving host connections on `listener`, which is
    /// bound at `path` (see [`bind`]); guest connections to port P go to `path`_P.
    pub fn new(
        cid: u64,
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    ) -> Result<(Self, VsockHandle), VsockError> {
        Self::with_limit(cid, listener, path, MAX_CONNECTIONS)
    }

    /// [`Vsock::new`] with at most `max_connections` connections (and host clients yet to
    /// send their CONNECT line), fewer than [`MAX_CONNECTIONS`].
    pub fn with_limit(
        cid: u64,
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
        max_connections: usize,
    ) -> Result<(Self, VsockHandle), VsockError> {
        check_cid(cid)?;
        listener.set_nonblocking(true).map_err(|source| VsockError::Socket { path: path.clone(), source })?;
        let shared = Arc::new(Shared::default());
        let listener = mio::net::UnixListener::from_std(listener);
        let max = max_connections.min(MAX_CONNECTIONS);
        let muxer = Muxer::new(cid, path, listener, Arc::clone(&shared), max);
        Ok((Vsock { cid, muxer: Slot::new(NAME, muxer), shared: Arc::clone(&shared) }, VsockHandle { shared }))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::warn_ratelimited!("{NAME}: driver wrote {} byte(s) at config offset {offset:#x}; ignored", data.len());
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        let got = queues.len();
        let queues: [_; 3] = queues
            .into_iter()
            .take(3)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| ActivateError::MissingQueues { needed: 3, got })?;
        self.muxer.start(|muxer| {
            muxer.attach(memory, queues, interrupt);
            Ok(())
        })
    }

    fn queue_notify(&mut self, index: u16) {
        self.muxer.notify(index);
    }

    fn wants_notifiers(&self) -> bool {
        true
    }

    fn set_notifiers(&mut self, notifiers: Vec<QueueNotifier>) {
        self.muxer.watch_all(notifiers);
    }

    fn reset(&mut self) {
        self.muxer.stop();
    }

    fn counters(&self) -> Option<DeviceStats> {
        Some(self.shared.counters.snapshot())
    }

    /// Nothing to restore (connections are host sockets and do not carry over), but the
    /// driver must learn that its connections are gone: the restored device starts with
    /// a TRANSPORT_RESET, as Firecracker's does after a snapshot.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if !state.is_empty() {
            return Err(format!("{} bytes of state; virtio-vsock keeps none", state.len()));
        }
        self.shared.reset.store(true, Ordering::SeqCst);
        Ok(())
    }
}
