//! What a listener learns of a newcomer on a host unix stream socket.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// How long a server gives a newcomer that would displace a client to show it stays
/// ([`stays`]): a connection that closes at once (another hvrun's check of the path, a
/// health check) is gone well within it.
pub const NEWCOMER_GRACE: Duration = Duration::from_millis(200);

/// Whether the peer of a connected stream socket has already closed it, with nothing
/// left to read: a client that connected and went at once, as a probe for a live
/// listener does (another hvrun's start-up check of a socket path, a health check). Such
/// a client needs no serving, and must not take the place of one that is served (the
/// console's one client, the API's client idle longest). A peer that only shut down its
/// writing side (`nc -N`, a client that only reads) is not gone: writing to it must fail
/// too. Never blocks; false when the peer is there, has sent something, or the socket
/// cannot tell.
pub fn peer_gone(socket: &impl AsRawFd) -> bool {
    let fd = socket.as_raw_fd();
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most one byte, into `byte`, which outlives the call;
    // MSG_PEEK leaves what it sees in the socket and MSG_DONTWAIT never blocks. The
    // descriptor is borrowed from `socket`, open for the call.
    let got = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if got != 0 {
        return false;
    }
    // Nothing to read and never will be; sending nothing tells whether the other way is
    // closed too (EPIPE). Linux is asked not to raise SIGPIPE; elsewhere the Rust runtime
    // ignores it, as every other write to a host socket here relies on.
    #[cfg(target_os = "linux")]
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::MSG_DONTWAIT;
    // SAFETY: send(2) of zero bytes reads nothing from the (dangling but unread) pointer;
    // the descriptor is borrowed from `socket`, open for the call.
    let sent = unsafe { libc::send(fd, std::ptr::NonNull::<u8>::dangling().as_ptr().cast(), 0, flags) };
    sent < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE)
}

/// Waits up to `grace` for the peer of a connected stream socket to send something or go;
/// true if it is still there then ([`peer_gone`] says no): it sent something, shut only
/// its writing side, or stayed silent the whole time. A server that must displace a
/// client to serve a newcomer asks this first, so that a connection that closes at once
/// (another hvrun's check of the path) displaces nobody even if it is accepted before
/// it closes.
pub fn stays(socket: &impl AsRawFd, grace: Duration) -> bool {
    let mut poll = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(grace.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll(2) on one pollfd that outlives the call; the descriptor is borrowed
    // from `socket`, open for the call. An interrupted wait only ends it early.
    let _ = unsafe { libc::poll(&mut poll, 1, ms) };
    !peer_gone(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_a_peer_that_closed_with_nothing_unread_is_gone() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert!(!peer_gone(&ours), "connected and silent");
        (&theirs).write_all(b"x").unwrap();
        drop(theirs);
        assert!(!peer_gone(&ours), "gone, but it said something first");
        (&ours).read_exact(&mut [0u8; 1]).unwrap();
        assert!(peer_gone(&ours), "gone, and all it said is read");
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!peer_gone(&ours), "it only reads");
        drop(theirs);
        assert!(peer_gone(&ours), "and then it went");
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(peer_gone(&ours), "connected and went at once");
    }

    #[test]
    fn a_peer_that_goes_within_the_grace_does_not_stay() {
        use std::time::Instant;
        let long = Duration::from_secs(10);
        // It goes a moment after: the wait ends then, not at the grace's end.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(theirs);
        });
        assert!(!stays(&ours, long));
        assert!(start.elapsed() < long);
        closer.join().unwrap();
        // It says something, or shuts only its writing side: it stays, at once.
        let (ours, theirs) = UnixStream::pair().unwrap();
        (&theirs).write_all(b"GET").unwrap();
        drop(theirs);
        assert!(stays(&ours, long));
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        let start = Instant::now();
        assert!(stays(&ours, long));
        assert!(start.elapsed() < long);
        // Silent the whole time: it stays, once the grace is over.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let start = Instant::now();
        assert!(stays(&ours, Duration::from_millis(50)));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
