//! What a listener learns of a newcomer on a host unix stream socket.

use std::os::fd::AsRawFd;

/// Whether the peer of a connected stream socket has already closed its end, with
/// nothing left to read: a client that connected and went at once, as a probe for a
/// live listener does (another hvrun's start-up check of a socket path, a health check).
/// Such a client needs no serving, and must not take the place of one that is served
/// (the console's one client, the API's client idle longest). Never blocks; false when
/// the peer is there, has sent something, or the socket cannot be asked.
pub fn peer_gone(socket: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most one byte, into `byte`, which outlives the call;
    // MSG_PEEK leaves what it sees in the socket and MSG_DONTWAIT never blocks. The
    // descriptor is borrowed from `socket`, open for the call.
    let got = unsafe {
        libc::recv(socket.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    got == 0
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
        drop(theirs);
        assert!(peer_gone(&ours), "connected and went at once");
    }
}
