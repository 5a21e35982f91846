//! `net-forwarder [--stream] SOCKET TAP`: forwards ethernet frames between a unix socket
//! and a tap device, for the `--net unixgram=` and `--net unixstream=` scenarios in the rig.
//!
//! It creates TAP (without a virtio-net header) and binds SOCKET. A datagram socket by
//! default: each datagram goes to the tap and each tap frame to whoever sent the last
//! datagram, the protocol of gvproxy's unixgram mode with none of its network stack; a
//! datagram that is vfkit's magic `VFKT` only introduces the peer. With `--stream`, it
//! listens, takes one connection and moves frames behind 4-byte big-endian lengths, as
//! socket_vmnet does. Linux only; it runs as root in the rig.

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let stream = args.first().is_some_and(|a| a == "--stream");
    if stream {
        args.remove(0);
    }
    let [socket, tap] = args.as_slice() else {
        eprintln!("usage: net-forwarder [--stream] SOCKET TAP");
        return std::process::ExitCode::from(2);
    };
    let result = if stream { forward::run_stream(socket, tap) } else { forward::run(socket, tap) };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-forwarder: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("net-forwarder runs on Linux only");
}

#[cfg(target_os = "linux")]
mod forward {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

    /// Opens tap `name` (created if missing) for whole frames without headers.
    fn open_tap(name: &str) -> io::Result<File> {
        let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all zeroes is valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(tun)
    }

    pub fn run(socket_path: &str, tap_name: &str) -> io::Result<()> {
        let mut tap = open_tap(tap_name)?;
        let _ = std::fs::remove_file(socket_path);
        let socket = UnixDatagram::bind(socket_path)?;
        println!("net-forwarder: {socket_path} <-> {tap_name}");
        let mut peer: Option<SocketAddr> = None;
        let mut buf = vec![0u8; 65_536 + 64];
        loop {
            let (from_peer, from_tap) = wait(socket.as_raw_fd(), tap.as_raw_fd())?;
            if from_peer {
                let (n, from) = socket.recv_from(&mut buf)?;
                if from.as_pathname().is_some() {
                    peer = Some(from);
                }
                if &buf[..n] != b"VFKT" {
                    tap.write_all(&buf[..n])?;
                }
            }
            if from_tap {
                let n = tap.read(&mut buf)?;
                if let Some(path) = peer.as_ref().and_then(SocketAddr::as_pathname) {
                    match socket.send_to(&buf[..n], path) {
                        Ok(_) => {}
                        // The VM is gone or slow: drop the frame, as a switch would.
                        Err(e) => eprintln!("net-forwarder: frame dropped: {e}"),
                    }
                }
            }
        }
    }

    /// Waits until `a` or `b` is readable; returns which are.
    fn wait(a: i32, b: i32) -> io::Result<(bool, bool)> {
        loop {
            let mut fds = [
                libc::pollfd { fd: a, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: b, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: poll on two valid pollfds, blocking.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } >= 0 {
                return Ok((fds[0].revents != 0, fds[1].revents != 0));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub fn run_stream(socket_path: &str, tap_name: &str) -> io::Result<()> {
        let mut tap = open_tap(tap_name)?;
        let _ = std::fs::remove_file(socket_path);
        let listener = UnixListener::bind(socket_path)?;
        println!("net-forwarder: {socket_path} (stream) <-> {tap_name}");
        let (mut peer, _) = listener.accept()?;
        let mut buf = vec![0u8; 65_536 + 64];
        loop {
            let (from_peer, from_tap) = wait(peer.as_raw_fd(), tap.as_raw_fd())?;
            if from_peer {
                let mut len = [0u8; 4];
                if peer.read_exact(&mut len).is_err() {
                    return Ok(()); // the VM is gone
                }
                let len = u32::from_be_bytes(len) as usize;
                if len > buf.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {len}-byte frame")));
                }
                peer.read_exact(&mut buf[..len])?;
                tap.write_all(&buf[..len])?;
            }
            if from_tap {
                let n = tap.read(&mut buf)?;
                peer.write_all(&(n as u32).to_be_bytes())?;
                peer.write_all(&buf[..n])?;
            }
        }
    }
}
