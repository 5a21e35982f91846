//! Where a virtio-net device's frames go: a tap device (Linux), a unix datagram socket
//! carrying one ethernet frame per datagram (vfkit, gvproxy, vmnet-helper, socketpairs),
//! or a unix stream socket carrying frames behind 4-byte big-endian lengths (QEMU's
//! stream netdev protocol, spoken by socket_vmnet and passt).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use mio::net::UnixDatagram;

use crate::virtio::iovec::{GuestIovecs, IovecBuf};
pub use crate::virtio::worker::Wake;

/// Size of `struct virtio_net_hdr_v1`, which leads every frame on the queues.
pub const VNET_HDR_LEN: usize = 12;

/// A network backend: sends and receives whole frames without blocking.
///
/// The device's event loop learns when to try again one of two ways: from a file
/// descriptor it watches ([`NetBackend::fd`]: a tap, a socket), or from the backend
/// itself, which calls the [`Wake`] it was given ([`NetBackend::set_wake`]) when a frame
/// arrives or room frees up: an in-process network stack, a channel, a test double.
pub trait NetBackend: Send {
    /// The file descriptor the device watches: readable when a frame may be waiting,
    /// writable when a send that returned `WouldBlock` may go through. Watched
    /// edge-triggered, so the device receives and flushes until `WouldBlock`. `None` for
    /// a backend that is no file descriptor and wakes the device itself.
    fn fd(&self) -> Option<RawFd>;
    /// Hands the backend what wakes the device's loop, each time the device starts: a
    /// backend without [`NetBackend::fd`] calls [`Wake::wake`] (from any thread) when a
    /// frame arrives or a blocked send may go through. Others may ignore it.
    fn set_wake(&mut self, wake: Wake) {
        let _ = wake;
    }
    /// Whether frames on this backend carry a `virtio_net_hdr_v1` in front (a tap with
    /// `IFF_VNET_HDR`), so checksum and segmentation offloads can pass through.
    fn vnet_hdr(&self) -> bool;
    /// Tells the backend which offloads the guest accepted (the `VIRTIO_NET_F_GUEST_*`
    /// bits of `features`): what it may hand the guest unsegmented or unchecksummed.
    fn set_offloads(&mut self, features: u64) -> io::Result<()> {
        let _ = features;
        Ok(())
    }
    /// Sends one frame (with the header when [`NetBackend::vnet_hdr`]). `WouldBlock`:
    /// nothing was sent, try again later.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sends one frame straight from the guest's buffers in one vectored call, as
    /// [`NetBackend::send`] would send their bytes; `None` when this backend cannot (the
    /// device then copies the frame and calls `send`).
    fn send_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<()>> {
        let _ = frame;
        None
    }
    /// Receives one frame into `buf` (with the header when [`NetBackend::vnet_hdr`]);
    /// `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Receives one frame straight into `frame` (the guest's buffers, then possibly a
    /// host buffer for what overflows them) in one vectored call, as [`NetBackend::recv`]
    /// would into one buffer of `frame.len()` bytes: its length, at most `frame.len()`
    /// (`InvalidData` for a longer frame, which is dropped, or left for a larger `frame`).
    /// `None` when this backend cannot (the device then calls `recv` and copies).
    fn recv_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<usize>> {
        let _ = frame;
        None
    }
    /// The length of the frame [`NetBackend::recv`] would return next (with the header
    /// when [`NetBackend::vnet_hdr`]), without taking it, so the device can pick exactly
    /// the guest buffers it needs; `WouldBlock` when none is waiting. `None` when this
    /// backend cannot tell.
    fn peek_len(&mut self) -> Option<io::Result<usize>> {
        None
    }
    /// Writes out what an earlier [`NetBackend::send`] accepted but could not finish;
    /// `WouldBlock` while some remains.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Maps "the peer's queue is full" to `WouldBlock`: macOS reports it as ENOBUFS on
/// datagram sockets (and sends no writable event, so callers retry on a timer).
fn full_is_would_block(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOBUFS) {
        io::Error::from(io::ErrorKind::WouldBlock)
    } else {
        e
    }
}

/// The first datagram vfkit sends, which gvproxy's `--listen-vfkit` waits for to learn
/// the VM's address.
pub const VFKIT_MAGIC: &[u8; 4] = b"VFKT";
/// Socket buffer sizes asked for: several 64 KiB frames in flight each way.
const SOCKET_BUFFER: usize = 4 << 20;

static LOCAL_SOCKETS: AtomicU32 = AtomicU32::new(0);

/// One ethernet frame per datagram over a unix socket.
#[derive(Debug)]
pub struct Unixgram {
    socket: UnixDatagram,
    /// The local address we bound, removed on drop.
    local: Option<PathBuf>,
}

impl Unixgram {
    /// Connects to the peer listening at `peer`, from a socket bound next to the
    /// system's temporary files (a datagram peer needs our address to answer). With
    /// `vfkit`, first sends the magic datagram vfkit's protocol starts with.
    pub fn connect(peer: &Path, vfkit: bool) -> io::Result<Self> {
        let name = format!("hvrun-net-{}-{}.sock", std::process::id(), LOCAL_SOCKETS.fetch_add(1, Ordering::Relaxed));
        let local = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&local);
        let socket = UnixDatagram::bind(&local)?;
        let this = Unixgram { socket, local: Some(local) };
        this.socket.connect(peer)?;
        this.tune();
        if vfkit {
            // A fresh socket's buffer is empty: the first datagram cannot block.
            this.socket.send(VFKIT_MAGIC)?;
        }
        Ok(this)
    }

    /// Uses `fd`, a connected datagram socket (a socketpair end from vmnet-helper, or a
    /// test). Takes ownership.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        let this = Unixgram { socket: UnixDatagram::from_std(socket), local: None };
        this.tune();
        Ok(this)
    }

    /// A second descriptor for the same socket, for a consumer that wants a plain file
    /// descriptor (Virtualization.framework's file-handle attachment). Keep `self` alive
    /// meanwhile: it owns the local socket file the peer answers to.
    pub fn duplicate_fd(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.socket.as_fd().try_clone_to_owned()
    }

    fn tune(&self) {
        for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let size = SOCKET_BUFFER as libc::c_int;
            // SAFETY: setsockopt on our own socket with a c_int option value and its size.
            let rc = unsafe {
                libc::setsockopt(
                    self.socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                log::debug!("virtio-net: socket buffer size not set: {}", io::Error::last_os_error());
            }
        }
    }
}

impl Drop for Unixgram {
    fn drop(&mut self) {
        if let Some(local) = &self.local {
            let _ = std::fs::remove_file(local);
        }
    }
}

impl NetBackend for Unixgram {
    fn fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        false
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.socket.send(frame).map(drop).map_err(full_is_would_block)
    }

    fn send_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<()>> {
        let iov = frame.iovecs();
        // SAFETY: an all-zero msghdr is valid (no address, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at `iov`, whose pieces were checked to lie in guest memory
        // that `frame` keeps mapped for the call; sendmsg only reads them. One datagram.
        let n = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
        Some(if n < 0 { Err(full_is_would_block(io::Error::last_os_error())) } else { Ok(()) })
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }

    fn recv_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<usize>> {
        let iov = frame.iovecs();
        // SAFETY: an all-zero msghdr is valid (no address, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at `iov`, whose pieces lie in guest memory (or the host
        // buffer after it) that `frame` keeps mapped for the call; recvmsg writes at most
        // their lengths. One datagram.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Some(Err(io::Error::last_os_error()));
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            let why = format!("a datagram over {} bytes", frame.len());
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
        Some(Ok(n as usize))
    }

    fn peek_len(&mut self) -> Option<io::Result<usize>> {
        datagram_len(self.socket.as_raw_fd())
    }
}

/// The length of the datagram waiting on `fd`, left in place: Linux says it for a
/// zero-length peek with MSG_TRUNC.
#[cfg(target_os = "linux")]
fn datagram_len(fd: RawFd) -> Option<io::Result<usize>> {
    // SAFETY: a zero-length receive into no buffer; MSG_PEEK leaves the datagram queued.
    let n = unsafe { libc::recv(fd, std::ptr::null_mut(), 0, libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT) };
    Some(if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) })
}

/// The length of the datagram waiting on `fd`, left in place: macOS says it in SO_NREAD
/// (the first record's bytes). 0 is also what it says with nothing queued: then the
/// device is told nothing and receives as without a peek.
#[cfg(target_os = "macos")]
fn datagram_len(fd: RawFd) -> Option<io::Result<usize>> {
    let mut n: libc::c_int = 0;
    let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_NREAD writes one c_int into `n`, whose size `size` gives.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_NREAD, (&mut n as *mut libc::c_int).cast(), &mut size)
    };
    match rc {
        0 if n > 0 => Some(Ok(n as usize)),
        0 => None,
        _ => Some(Err(io::Error::last_os_error())),
    }
}

/// Other systems cannot say how long a datagram is without taking it.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn datagram_len(_fd: RawFd) -> Option<io::Result<usize>> {
    None
}

/// Frames over a unix stream socket, each behind its length as a 4-byte big-endian
/// number. Partial reads and writes are buffered here, at most one frame each way.
#[derive(Debug)]
pub struct Unixstream {
    socket: mio::net::UnixStream,
    /// Bytes read that do not make a whole frame yet.
    inbuf: Vec<u8>,
    /// Bytes of accepted frames not yet written: `outbuf[out_at..]`.
    outbuf: Vec<u8>,
    out_at: usize,
    /// The guest buffers the rest of a frame is read into (reused).
    window: IovecBuf,
}

/// The largest frame a stream peer may announce: a 64 KiB packet and its headers.
pub const MAX_STREAM_FRAME: usize = 65_536 + 64;
/// How long [`Unixstream::connect`] waits for the peer to accept.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Unixstream {
    /// Connects to the peer listening at `path` (socket_vmnet's socket, passt's), without
    /// blocking: a peer that does not accept within [`CONNECT_TIMEOUT`] (its backlog
    /// full, say) is an error, not a hang.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let socket = mio::net::UnixStream::connect(path)?;
        let mut poll = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let timeout = CONNECT_TIMEOUT.as_millis() as libc::c_int;
        // SAFETY: one pollfd, ours, for the call's duration.
        match unsafe { libc::poll(&mut poll, 1, timeout) } {
            n if n < 0 => return Err(io::Error::last_os_error()),
            0 => return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not accept the connection")),
            _ => {}
        }
        if let Some(e) = socket.take_error()? {
            return Err(e);
        }
        Ok(Self::from_mio(socket))
    }

    /// Uses a connected stream socket.
    pub fn from_std(socket: std::os::unix::net::UnixStream) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self::from_mio(mio::net::UnixStream::from_std(socket)))
    }

    fn from_mio(socket: mio::net::UnixStream) -> Self {
        let window = IovecBuf::new();
        Unixstream { socket, inbuf: Vec::with_capacity(4 + MAX_STREAM_FRAME), outbuf: Vec::new(), out_at: 0, window }
    }

    /// The first whole frame in `inbuf`, as (start, length).
    fn whole_frame(&self) -> io::Result<Option<(usize, usize)>> {
        let Some(len) = self.frame_len()? else { return Ok(None) };
        Ok((self.inbuf.len() >= 4 + len).then_some((4, len)))
    }

    /// The length of the frame `inbuf` starts, once its prefix is in.
    fn frame_len(&self) -> io::Result<Option<usize>> {
        let Some(prefix) = self.inbuf.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_STREAM_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the peer sent a {len}-byte frame")));
        }
        Ok(Some(len))
    }

    /// The next frame's length, reading the rest of its prefix (and nothing past it) if
    /// need be.
    fn next_len(&mut self) -> io::Result<usize> {
        use std::io::Read;
        loop {
            if let Some(len) = self.frame_len()? {
                return Ok(len);
            }
            let mut prefix = [0u8; 4];
            let want = 4 - self.inbuf.len();
            match self.socket.read(&mut prefix[..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.inbuf.extend_from_slice(&prefix[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// [`NetBackend::recv_guest`]: the frame's body goes straight into the guest's
    /// buffers, after what of it was already read; a short read is copied back into
    /// `inbuf` (the buffers are the guest's again if the device puts them back).
    fn recv_into(&mut self, frame: &GuestIovecs<'_>) -> io::Result<usize> {
        loop {
            let len = self.next_len()?;
            if len > frame.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {len}-byte frame")));
            }
            let have = (self.inbuf.len() - 4).min(len);
            frame.write_bytes(0, &self.inbuf[4..4 + have]);
            if have == len {
                self.inbuf.drain(..4 + len);
                return Ok(len);
            }
            frame.window(have, len - have, &mut self.window);
            let pieces = self.window.as_slice();
            // SAFETY: the pieces are a window on `frame`'s, which lie in guest memory
            // (or the host buffer after it) kept mapped for this call; readv writes at
            // most their lengths.
            let n = unsafe { libc::readv(self.socket.as_raw_fd(), pieces.as_ptr(), pieces.len() as _) };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n if n as usize == len - have => {
                    self.inbuf.clear();
                    return Ok(len);
                }
                n => {
                    let at = self.inbuf.len();
                    self.inbuf.resize(at + n as usize, 0);
                    frame.read_bytes(have, &mut self.inbuf[at..]);
                }
            }
        }
    }
}

impl NetBackend for Unixstream {
    fn fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        false
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.flush()?;
        self.outbuf.clear();
        self.out_at = 0;
        self.outbuf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.outbuf.extend_from_slice(frame);
        match self.flush() {
            // Accepted: whatever is left goes out with the next flush.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.out_at > 0 => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.outbuf.clear();
                Err(e)
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        use std::io::Write;
        while self.out_at < self.outbuf.len() {
            match self.socket.write(&self.outbuf[self.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.outbuf.clear();
        self.out_at = 0;
        Ok(())
    }

    fn recv_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<usize>> {
        Some(self.recv_into(frame))
    }

    fn peek_len(&mut self) -> Option<io::Result<usize>> {
        Some(self.next_len())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        loop {
            if let Some((start, len)) = self.whole_frame()? {
                let n = len.min(buf.len());
                buf[..n].copy_from_slice(&self.inbuf[start..start + n]);
                self.inbuf.drain(..start + len);
                return Ok(n);
            }
            let have = self.inbuf.len();
            self.inbuf.resize(4 + MAX_STREAM_FRAME, 0);
            let read = self.socket.read(&mut self.inbuf[have..]);
            self.inbuf.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A Linux tap device with a virtio-net header on every frame.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

#[cfg(target_os = "linux")]
impl Tap {
    /// Opens (or creates, with CAP_NET_ADMIN) the tap device `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.is_ascii() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a tap name has 1 to 15 ASCII characters"));
        }
        // SAFETY: open with a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a file descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `request` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads a c_int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap { fd, name: name.to_string() };
        tap.set_tun_offloads(0)?;
        Ok(tap)
    }

    fn set_tun_offloads(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(target_os = "linux")]
impl NetBackend for Tap {
    fn fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, features: u64) -> io::Result<()> {
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6};
        let has = |bit: u32| features & (1 << bit) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        self.set_tun_offloads(flags)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: writes `frame.len()` bytes from a valid slice to our fd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<()>> {
        let iov = frame.iovecs();
        // SAFETY: the pieces were checked to lie in guest memory that `frame` keeps mapped
        // for the call; writev only reads them. A tap takes one frame per write.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        Some(if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) })
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into a valid, writable slice.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn recv_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<io::Result<usize>> {
        let iov = frame.iovecs();
        // SAFETY: the pieces lie in guest memory (or the host buffer after it) that
        // `frame` keeps mapped for the call; readv writes at most their lengths. A tap
        // gives one frame per read (the device's buffers hold the largest a tap gives).
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        Some(if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) })
    }
}

#[cfg(test)]
mod tests;
