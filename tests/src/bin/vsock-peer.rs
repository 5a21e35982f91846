//! `vsock-peer`: an nc-style plumber for the `vsock` scenario, in the guest (AF_VSOCK) and
//! on the rig host (hvrun's hybrid unix sockets). Each subcommand opens one kind of
//! connection and copies the socket to stdout and stdin to the socket:
//!
//! - `listen [--ready FILE] PORT` (guest): accepts one AF_VSOCK connection on PORT;
//! - `echo-server [--ready FILE] PORT` (guest): serves any number of connections on PORT,
//!   one thread each, echoing what each sends until its end;
//! - `connect CID PORT` (guest): connects to CID:PORT (the host is CID 2);
//! - `hybrid [--echo] PATH PORT` (rig host): connects to the device's unix socket PATH,
//!   writes `CONNECT PORT\n` and requires `OK <host port>\n` (printed to stderr); exits
//!   with status 3 when the connection closes without it (nobody listens on PORT);
//! - `uds-listen [--ready FILE] PATH` (rig host): listens on the unix socket PATH (a guest's
//!   connection to port P arrives at the device's `PATH_P`) and accepts one connection;
//! - `hybrid-hold PATH PORT` (rig host): connects as `hybrid` does, then never reads,
//!   sleeping until it is killed;
//! - `uds-connect PATH` (rig host): connects to the unix socket PATH (`nc -U`, for
//!   hvrun's `--control` socket) and half-closes at stdin's end.
//!
//! `--ready FILE` creates FILE once the socket listens, so a script knows when to connect.
//!
//! How a connection ends differs by side. The guest's end shuts its write half at stdin's
//! end and the program exits once the other direction has ended too (a guest's
//! SHUTDOWN SEND half-closes the host stream). The host's end does not: in the hybrid
//! protocol (Firecracker's rules), the end of a host stream ends the connection both ways
//! for the guest (a SHUTDOWN with both flags), so a guest still sending would be cut off.
//! The host keeps its write half open after stdin's end until the guest ends its side,
//! then closes; with `--echo` it closes instead once as many bytes came back as it sent
//! (the guest's echo server waits for the end to end).
//!
//! Linux only.

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    peer::main(&args)
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("vsock-peer runs on Linux only");
}

#[cfg(target_os = "linux")]
mod peer {
    use std::fs::File;
    use std::io::{self, ErrorKind, Read, Write};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;
    use std::process::ExitCode;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    const USAGE: &str = "usage: vsock-peer listen [--ready FILE] PORT\n\
        \x20      vsock-peer echo-server [--ready FILE] PORT\n\
        \x20      vsock-peer connect CID PORT\n\
        \x20      vsock-peer hybrid [--echo] PATH PORT\n\
        \x20      vsock-peer uds-listen [--ready FILE] PATH\n\
        \x20      vsock-peer hybrid-hold PATH PORT\n\
        \x20      vsock-peer uds-connect PATH";

    /// The exit status of a hybrid connection closed without an `OK` line.
    pub const REFUSED: u8 = 3;
    /// The most bytes of an `OK <port>\n` line read before giving up on it.
    const MAX_LINE: usize = 64;
    /// The copy buffer's size.
    const CHUNK: usize = 64 * 1024;

    /// Why the program failed.
    #[derive(Debug)]
    pub enum Failure {
        /// Bad arguments.
        Usage(String),
        /// The device closed a hybrid connection without `OK`.
        Refused(String),
        /// Anything else.
        Io(String, io::Error),
    }

    fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
        let what = what.into();
        move |e| Failure::Io(what, e)
    }

    pub fn main(args: &[String]) -> ExitCode {
        match run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Usage(why)) => {
                eprintln!("vsock-peer: {why}\n{USAGE}");
                ExitCode::from(2)
            }
            Err(Failure::Refused(why)) => {
                eprintln!("vsock-peer: {why}");
                ExitCode::from(REFUSED)
            }
            Err(Failure::Io(what, e)) => {
                eprintln!("vsock-peer: {what}: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// The arguments: positional ones, `--ready FILE` and `--echo`.
    #[derive(Debug, Default, PartialEq)]
    pub struct Args {
        pub positional: Vec<String>,
        pub ready: Option<String>,
        pub echo: bool,
    }

    pub fn parse(args: &[String]) -> Result<Args, Failure> {
        let mut parsed = Args::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--ready" => {
                    let file = it.next().ok_or_else(|| Failure::Usage("--ready needs a file".into()))?;
                    parsed.ready = Some(file.clone());
                }
                "--echo" => parsed.echo = true,
                other if other.starts_with("--") => return Err(Failure::Usage(format!("unknown option {other}"))),
                other => parsed.positional.push(other.to_string()),
            }
        }
        Ok(parsed)
    }

    fn number<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, Failure> {
        text.parse().map_err(|_| Failure::Usage(format!("{what} `{text}` is not a number")))
    }

    fn run(args: &[String]) -> Result<(), Failure> {
        let Some((command, rest)) = args.split_first() else {
            return Err(Failure::Usage("no subcommand".into()));
        };
        let a = parse(rest)?;
        let p: Vec<&str> = a.positional.iter().map(String::as_str).collect();
        match (command.as_str(), p.as_slice()) {
            ("listen", [port]) => {
                let listener = vsock_listen(number("port", port)?, 1)?;
                ready(a.ready.as_deref())?;
                let conn = vsock_accept(&listener)?;
                drop(listener);
                plumb_stdio(conn, Ending::HalfClose)
            }
            ("echo-server", [port]) => {
                let listener = vsock_listen(number("port", port)?, 64)?;
                ready(a.ready.as_deref())?;
                loop {
                    let conn = vsock_accept(&listener)?;
                    std::thread::spawn(move || {
                        if let Err(e) = echo(conn) {
                            eprintln!("vsock-peer: echo-server: {e}");
                        }
                    });
                }
            }
            ("connect", [cid, port]) => {
                let conn = vsock_connect(number("CID", cid)?, number("port", port)?)?;
                plumb_stdio(conn, Ending::HalfClose)
            }
            ("hybrid", [path, port]) => {
                let conn = hybrid_connect(Path::new(path), number("port", port)?)?;
                plumb_stdio(conn, if a.echo { Ending::Echo } else { Ending::HoldWrite })
            }
            ("uds-listen", [path]) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).map_err(io_err(format!("binding {path}")))?;
                ready(a.ready.as_deref())?;
                let (conn, _) = listener.accept().map_err(io_err(format!("accepting on {path}")))?;
                drop(listener);
                plumb_stdio(conn.into(), Ending::HoldWrite)
            }
            ("uds-connect", [path]) => {
                let conn = UnixStream::connect(path).map_err(io_err(format!("connecting to {path}")))?;
                plumb_stdio(conn.into(), Ending::HalfClose)
            }
            ("hybrid-hold", [path, port]) => {
                let _conn = hybrid_connect(Path::new(path), number("port", port)?)?;
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            (command, _) => Err(Failure::Usage(format!("bad arguments for `{command}`"))),
        }
    }

    /// Creates the `--ready` file, if one was asked for.
    fn ready(file: Option<&str>) -> Result<(), Failure> {
        match file {
            Some(file) => File::create(file).map(drop).map_err(io_err(format!("creating {file}"))),
            None => Ok(()),
        }
    }

    fn last_os_error(what: &str) -> Failure {
        Failure::Io(what.to_string(), io::Error::last_os_error())
    }

    fn vsock_socket() -> Result<OwnedFd, Failure> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(last_os_error("an AF_VSOCK socket"));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        addr
    }

    const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

    fn vsock_listen(port: u32, backlog: i32) -> Result<OwnedFd, Failure> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) } < 0 {
            return Err(last_os_error(&format!("binding vsock port {port}")));
        }
        // SAFETY: listen() takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
            return Err(last_os_error(&format!("listening on vsock port {port}")));
        }
        Ok(fd)
    }

    fn vsock_accept(listener: &OwnedFd) -> Result<Socket, Failure> {
        loop {
            // SAFETY: null address pointers ask accept() not to return the peer's address.
            let fd = unsafe {
                libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
            };
            if fd >= 0 {
                // SAFETY: `fd` was just accepted and nothing else owns it.
                return Ok(Socket(File::from(unsafe { OwnedFd::from_raw_fd(fd) })));
            }
            if io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                return Err(last_os_error("accepting a vsock connection"));
            }
        }
    }

    fn vsock_connect(cid: u32, port: u32) -> Result<Socket, Failure> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
        if unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) } < 0 {
            return Err(last_os_error(&format!("connecting to vsock {cid}:{port}")));
        }
        Ok(Socket(File::from(fd)))
    }

    /// Connects to the device's unix socket at `path` and asks for guest port `port`: the
    /// stream, once the device said `OK <port>` (printed to stderr).
    pub fn hybrid_connect(path: &Path, port: u32) -> Result<Socket, Failure> {
        let mut s = UnixStream::connect(path).map_err(io_err(format!("connecting to {}", path.display())))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io_err("writing the CONNECT line"))?;
        let line = read_line(&mut s).map_err(io_err("reading the OK line"))?;
        match line {
            None => Err(Failure::Refused(format!("port {port}: the connection closed without an OK line (refused)"))),
            Some(line) => match line.strip_prefix("OK ").map(|n| n.trim().parse::<u32>()) {
                Some(Ok(_)) => {
                    eprintln!("vsock-peer: {line}");
                    Ok(s.into())
                }
                _ => Err(Failure::Io(
                    format!("port {port}: the device answered `{}`", line.escape_debug()),
                    io::Error::from(ErrorKind::InvalidData),
                )),
            },
        }
    }

    /// Reads one line, byte by byte so nothing after it is taken: the line without its
    /// `\n`, or `None` when the stream ended (or was reset) before it.
    fn read_line(s: &mut impl Read) -> io::Result<Option<String>> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < MAX_LINE {
            match s.read(&mut byte) {
                Ok(0) => return Ok(None),
                Ok(_) if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(ErrorKind::InvalidData, format!("no end of line in {MAX_LINE} bytes")))
    }

    /// A connected stream socket of any family.
    #[derive(Debug)]
    pub struct Socket(File);

    impl From<UnixStream> for Socket {
        fn from(s: UnixStream) -> Self {
            Socket(File::from(OwnedFd::from(s)))
        }
    }

    impl Socket {
        fn try_clone(&self) -> io::Result<Socket> {
            self.0.try_clone().map(Socket)
        }

        fn shutdown(&self, how: libc::c_int) {
            // SAFETY: shutdown() takes no pointers; a failure (not connected) is harmless.
            unsafe { libc::shutdown(self.0.as_raw_fd(), how) };
        }
    }

    impl Read for &Socket {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            (&self.0).read(buf)
        }
    }

    impl Write for &Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            (&self.0).write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// How the side that copies stdin to the socket ends, at stdin's end.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Ending {
        /// Shut the socket's write half, then wait for the other direction's end.
        HalfClose,
        /// Wait for the other direction's end with the write half open, then close.
        HoldWrite,
        /// Close as soon as as many bytes came back as were sent (or the other direction
        /// ended).
        Echo,
    }

    /// What the copy from the socket has done so far.
    #[derive(Default)]
    struct Progress {
        read: u64,
        done: bool,
    }

    fn plumb_stdio(conn: Socket, ending: Ending) -> Result<(), Failure> {
        let stdin = io::stdin().as_fd().try_clone_to_owned().map_err(io_err("stdin"))?;
        let stdout = io::stdout().as_fd().try_clone_to_owned().map_err(io_err("stdout"))?;
        plumb(conn, File::from(stdin), File::from(stdout), ending)
    }

    /// Copies `conn` to `output` on a thread of its own and `input` to `conn`, ending as
    /// `ending` says; returns once both directions are done.
    pub fn plumb(
        conn: Socket,
        mut input: impl Read,
        mut output: impl Write + Send + 'static,
        ending: Ending,
    ) -> Result<(), Failure> {
        let progress = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let reader = {
            let conn = conn.try_clone().map_err(io_err("duplicating the socket"))?;
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || -> Result<(), Failure> {
                let mut buf = vec![0u8; CHUNK];
                let result = loop {
                    let n = match (&conn).read(&mut buf) {
                        Ok(0) => break Ok(()),
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => break Err(Failure::Io("reading from the socket".into(), e)),
                    };
                    if let Err(e) = output.write_all(&buf[..n]).and_then(|()| output.flush()) {
                        break Err(Failure::Io("writing the output".into(), e));
                    }
                    let (lock, changed) = &*progress;
                    lock.lock().unwrap_or_else(|e| e.into_inner()).read += n as u64;
                    changed.notify_all();
                };
                let (lock, changed) = &*progress;
                lock.lock().unwrap_or_else(|e| e.into_inner()).done = true;
                changed.notify_all();
                result
            })
        };
        let mut written = 0u64;
        let mut buf = vec![0u8; CHUNK];
        let sent = loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(Failure::Io("reading the input".into(), e)),
            };
            if let Err(e) = (&conn).write_all(&buf[..n]) {
                break Err(Failure::Io("writing to the socket".into(), e));
            }
            written += n as u64;
        };
        if sent.is_err() {
            conn.shutdown(libc::SHUT_RDWR);
        } else {
            if ending == Ending::HalfClose {
                conn.shutdown(libc::SHUT_WR);
            }
            let (lock, changed) = &*progress;
            let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !(p.done || ending == Ending::Echo && p.read >= written) {
                p = changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            drop(p);
            if ending == Ending::Echo {
                conn.shutdown(libc::SHUT_RDWR);
            }
        }
        let received = reader.join().unwrap_or_else(|_| {
            Err(Failure::Io("the socket's reader".into(), io::Error::other("the reader thread failed")))
        });
        sent.and(received)
    }

    /// Echoes what `conn` sends until its end.
    fn echo(conn: Socket) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match (&conn).read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            (&conn).write_all(&buf[..n])?;
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use devices::testing::TempDir;

    use super::peer::{hybrid_connect, parse, plumb, Ending, Failure, Socket};

    /// An output the test reads afterwards.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    /// Reads the CONNECT line byte by byte (as the device does, leaving what follows).
    fn connect_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// A fake device socket at `DIR/v.sock` serving one client with `serve`.
    fn fake_device(dir: &TempDir, serve: impl FnOnce(UnixStream) + Send + 'static) -> (PathBuf, JoinHandle<()>) {
        let path = dir.0.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        (path, server)
    }

    #[test]
    fn the_hybrid_client_says_connect_takes_ok_and_closes_once_echoed() {
        let dir = TempDir::new("echo");
        let (path, server) = fake_device(&dir, |mut s| {
            assert_eq!(connect_line(&mut s), "CONNECT 5000");
            // The OK line and the first echoed bytes in one write: the client must
            // not take the data as part of the line.
            s.write_all(b"OK 1073741824\nping").unwrap();
            let mut buf = [0u8; 64];
            let mut got = Vec::new();
            // Echo until the client closes: it must, once its bytes came back.
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                let from = got.len().max(4);
                got.extend_from_slice(&buf[..n]);
                if got.len() > from {
                    s.write_all(&got[from..]).unwrap();
                }
            }
            assert_eq!(got, b"ping-42\n");
        });
        let conn = hybrid_connect(&path, 5000).unwrap();
        let out = Sink::default();
        // The fake echoed "ping" early; "-42\n" follows as the rest arrives.
        plumb(conn, &b"ping-42\n"[..], out.clone(), Ending::Echo).unwrap();
        server.join().unwrap();
        assert_eq!(out.bytes(), b"ping-42\n");
    }

    #[test]
    fn a_connection_closed_without_ok_is_refused() {
        let dir = TempDir::new("refused");
        let (path, server) = fake_device(&dir, |mut s| {
            assert_eq!(connect_line(&mut s), "CONNECT 7777");
        });
        match hybrid_connect(&path, 7777) {
            Err(Failure::Refused(why)) => assert!(why.contains("without an OK line"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        server.join().unwrap();
        let (path, server) = {
            let _ = std::fs::remove_file(dir.0.join("v.sock"));
            fake_device(&dir, |mut s| {
                connect_line(&mut s);
                s.write_all(b"NO\n").unwrap();
            })
        };
        assert!(matches!(hybrid_connect(&path, 1), Err(Failure::Io(..))), "a bad answer is an error");
        server.join().unwrap();
    }

    #[test]
    fn the_host_side_keeps_its_write_half_until_the_guest_is_done() {
        let dir = TempDir::new("hold");
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 4096) as u8).collect();
        let sent = data.clone();
        let (path, server) = fake_device(&dir, move |mut s| {
            connect_line(&mut s);
            s.write_all(b"OK 1073741825\n").unwrap();
            // The "guest" sends 3 MiB: the client's input is empty, yet it must not
            // close before the guest's end, here after a pause.
            std::thread::sleep(std::time::Duration::from_millis(200));
            s.write_all(&sent).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        });
        let out = Sink::default();
        plumb(hybrid_connect(&path, 5002).unwrap(), std::io::empty(), out.clone(), Ending::HoldWrite).unwrap();
        server.join().unwrap();
        assert!(out.bytes() == data, "the 3 MiB arrived intact");
    }

    #[test]
    fn the_guest_side_half_closes_at_its_inputs_end() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).unwrap();
            theirs.write_all(b"bye\n").unwrap();
            got
        });
        let out = Sink::default();
        let input = vec![5u8; 1 << 20];
        plumb(Socket::from(mine), &input[..], out.clone(), Ending::HalfClose).unwrap();
        assert_eq!(peer.join().unwrap(), input);
        assert_eq!(out.bytes(), b"bye\n");
    }

    #[test]
    fn arguments() {
        let args = |a: &[&str]| parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let a = args(&["--ready", "/tmp/r", "5000"]).unwrap();
        assert_eq!((a.positional, a.ready.as_deref(), a.echo), (vec!["5000".to_string()], Some("/tmp/r"), false));
        let a = args(&["/tmp/v.sock", "--echo", "5000"]).unwrap();
        assert_eq!((a.positional.len(), a.echo), (2, true));
        assert!(matches!(args(&["--ready"]), Err(Failure::Usage(_))));
        assert!(matches!(args(&["--nope"]), Err(Failure::Usage(_))));
    }
}
