use super::*;

#[test]
fn unixgram_connects_sends_the_vfkit_magic_and_cleans_up() {
    let dir = std::env::temp_dir();
    let peer_path = dir.join(format!("hvrun-test-{}-peer.sock", std::process::id()));
    let _ = std::fs::remove_file(&peer_path);
    let peer = std::os::unix::net::UnixDatagram::bind(&peer_path).unwrap();
    let mut gram = Unixgram::connect(&peer_path, true).unwrap();
    let local = gram.local.clone().unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], VFKIT_MAGIC);
    gram.send(b"frame").unwrap();
    assert_eq!(peer.recv(&mut buf).unwrap(), 5);
    peer.send_to(b"reply", from.as_pathname().unwrap()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let n = loop {
        match gram.recv(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(&buf[..n], b"reply");
    drop(gram);
    assert!(!local.exists(), "the local socket file is removed");
    let _ = std::fs::remove_file(&peer_path);
}

#[test]
fn unixstream_frames_survive_partial_reads_and_writes() {
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut stream = Unixstream::from_std(ours).unwrap();
    let mut buf = vec![0u8; MAX_STREAM_FRAME];
    assert_eq!(stream.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    // A frame in two pieces, then two frames in one write.
    use std::io::{Read, Write};
    theirs.write_all(&[0, 0, 0, 5, b'h', b'e']).unwrap();
    assert_eq!(stream.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    theirs.write_all(&[b'l', b'l', b'o', 0, 0, 0, 2, b'o', b'k']).unwrap();
    let n = stream.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    let n = stream.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ok");
    // Sending frames the peer does not read: accepted until the socket fills, then
    // WouldBlock; a flush after the peer reads finishes the last one.
    let frame = vec![7u8; 60_000];
    let mut sent = 0;
    while stream.send(&frame).is_ok() {
        sent += 1;
        assert!(sent < 1000, "the socket never filled");
    }
    theirs.set_nonblocking(true).unwrap();
    let mut total = 0;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let flushed = stream.flush().is_ok();
        match theirs.read(&mut chunk) {
            Ok(n) => total += n,
            Err(_) if flushed => break,
            Err(_) => {}
        }
    }
    assert_eq!(total, sent * (4 + frame.len()));
    // A peer announcing an impossible frame is an error, not an allocation.
    theirs.set_nonblocking(false).unwrap();
    theirs.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert_eq!(stream.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
}

/// Issue 12, hole 8 (a path hvrun opens at start): a stream peer whose backlog is full
/// made a blocking connect wait for ever. It fails at once, or after the timeout.
#[test]
fn a_peer_that_never_accepts_is_an_error_not_a_hang() {
    let path = std::env::temp_dir().join(format!("hvrun-test-{}-backlog.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // SAFETY: listen on our own socket, with the smallest backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let target = path.clone();
    let failed = crate::virtio::testing::within_deadline("connecting to a full backlog", move || {
        let mut held = Vec::new();
        for _ in 0..1000 {
            match Unixstream::connect(&target) {
                Ok(stream) => held.push(stream),
                Err(e) => return Some(e),
            }
        }
        None
    });
    assert!(failed.is_some(), "a thousand connections to a listener that accepts none");
    let _ = std::fs::remove_file(&path);
}

/// Buffers for `recv_guest` in host memory (the backends see only `iovec`s).
fn host_iovecs(buf: &mut [u8]) -> GuestIovecs<'_> {
    let mut iov = GuestIovecs::new();
    assert!(iov.push_overflow(buf));
    iov
}

#[test]
fn unixgram_peeks_at_a_datagram_length_and_refuses_one_too_long_for_the_buffers() {
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let mut gram = Unixgram::from_fd(OwnedFd::from(ours)).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(gram.peek_len().unwrap().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    let frame: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    theirs.send(&frame).unwrap();
    theirs.send(b"").unwrap();
    theirs.send(&[1; 200]).unwrap();
    assert_eq!(gram.peek_len().unwrap().unwrap(), 3000);
    assert_eq!(gram.peek_len().unwrap().unwrap(), 3000, "a peek takes nothing");
    assert_eq!(gram.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap(), 3000);
    assert_eq!(buf[..3000], frame[..]);
    // An empty datagram is a frame of nothing (macOS cannot tell it from none).
    if cfg!(target_os = "linux") {
        assert_eq!(gram.peek_len().unwrap().unwrap(), 0);
    }
    assert_eq!(gram.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap(), 0);
    let short = gram.recv_guest(&host_iovecs(&mut buf[..100])).unwrap().unwrap_err();
    assert_eq!(short.kind(), io::ErrorKind::InvalidData, "200 bytes into 100: {short}");
    assert_eq!(gram.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap_err().kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn unixstream_receives_in_place_across_split_prefixes_bodies_and_buffered_frames() {
    use std::io::Write;
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut stream = Unixstream::from_std(ours).unwrap();
    let mut buf = vec![0u8; MAX_STREAM_FRAME];
    let mut recv = |stream: &mut Unixstream| stream.recv_guest(&host_iovecs(&mut buf)).unwrap();
    assert_eq!(recv(&mut stream).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    // The prefix in two pieces, then the body in two.
    theirs.write_all(&[0, 0]).unwrap();
    assert_eq!(stream.peek_len().unwrap().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    theirs.write_all(&[0, 5, b'h']).unwrap();
    assert_eq!(stream.peek_len().unwrap().unwrap(), 5);
    assert_eq!(recv(&mut stream).unwrap_err().kind(), io::ErrorKind::WouldBlock, "4 bytes missing");
    theirs.write_all(b"ello").unwrap();
    assert_eq!(recv(&mut stream).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    // Two frames read at once by the copying path: the second is served from the buffer.
    theirs.write_all(&[0, 0, 0, 2, b'o', b'k', 0, 0, 0, 3, b'y', b'e', b's']).unwrap();
    let mut copied = [0u8; 16];
    assert_eq!(stream.recv(&mut copied).unwrap(), 2);
    assert_eq!(stream.peek_len().unwrap().unwrap(), 3);
    assert_eq!(stream.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap(), 3);
    assert_eq!(&buf[..3], b"yes");
    // A frame longer than the buffers is refused, not cut.
    theirs.write_all(&[0, 0, 0, 9]).unwrap();
    theirs.write_all(b"too long!").unwrap();
    let e = stream.recv_guest(&host_iovecs(&mut buf[..4])).unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(stream.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap(), 9, "still there for a larger one");
    drop(theirs);
    assert_eq!(stream.recv_guest(&host_iovecs(&mut buf)).unwrap().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
}

#[cfg(target_os = "linux")]
#[test]
fn tap_names_are_checked_before_any_system_call() {
    for bad in ["", "a-name-that-is-too-long", "tap\u{e9}"] {
        assert_eq!(Tap::open(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad}");
    }
}
