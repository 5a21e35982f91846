//! What a listener learns of a newcomer on a host unix stream socket.

use std::os::fd::AsRawFd;

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
}
