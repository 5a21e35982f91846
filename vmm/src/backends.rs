//! Opening the backends the configuration names (the virtio console's, the network
//! interfaces'), before any vCPU runs, so a bad path or a missing tap is one clear
//! error at start.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::console::{stream_output, Backend};
use devices::virtio::net::backend::{NetBackend, Unixgram, Unixstream};
use devices::virtio::net::Mac;
use mio::net::UnixListener;

use crate::config::{ConsoleConfig, NetBackendConfig, NetConfig};
use crate::Error;

/// An opened console configuration.
#[derive(Debug)]
pub struct OpenConsole {
    /// The virtio console's backend (`None`: no virtio console).
    pub backend: Option<Backend>,
    /// Where standard input goes when hvc0 has the terminal: the virtio console's input
    /// pipe, in blocking mode. `None`: standard input goes to the serial port.
    pub stdin_pipe: Option<File>,
    /// Removes the socket file when the VM is gone.
    pub socket: Option<SocketFile>,
}

/// A unix socket's file that this process bound, removed on drop if the path still
/// names it (see [`SocketId`]).
#[derive(Debug)]
pub struct SocketFile(SocketId);

impl SocketFile {
    /// Which file it is, for removing it where a drop will not run (before an exit).
    pub(crate) fn id(&self) -> SocketId {
        self.0.clone()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// A socket file bound by this process: its path, and the device and inode it had when
/// bound, so that a file another process has put at the path since (after removing
/// ours) is never removed in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketId {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketId {
    /// Removes the file if the path still names the one bound here.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listening unix socket at `path` for this process (see [`remove_stale_socket`]
/// for what may be there already). The [`SocketFile`] removes it when dropped.
pub(crate) fn bind_socket(path: &Path) -> std::io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    remove_stale_socket(path)?;
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((listener, SocketFile(SocketId { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() })))
}

/// Opens what `config` names. `stdin` says whether standard input is the guest's.
pub fn open_console(config: &ConsoleConfig, stdin: bool) -> Result<OpenConsole, Error> {
    let mut open = OpenConsole { backend: None, stdin_pipe: None, socket: None };
    match config {
        ConsoleConfig::Serial => {}
        ConsoleConfig::Terminal => {
            let input = if stdin {
                let (sender, receiver) = mio::unix::pipe::new().map_err(|e| console_error("hvc", e))?;
                sender.set_nonblocking(false).map_err(|e| console_error("hvc", e))?;
                open.stdin_pipe = Some(File::from(OwnedFd::from(sender)));
                Some(receiver)
            } else {
                None
            };
            open.backend = Some(Backend::Stream { output: stream_output(Box::new(std::io::stdout())), input });
        }
        ConsoleConfig::File(path) => {
            let file = devices::host_file::open_output(path)
                .map_err(|e| console_error(&format!("file={}", path.display()), e))?;
            // A regular file is written by the device itself; a FIFO or a terminal,
            // which may block, through an output thread.
            let regular = file.metadata().is_ok_and(|m| m.is_file());
            open.backend = Some(if regular {
                Backend::File(file)
            } else {
                Backend::Stream { output: stream_output(Box::new(file)), input: None }
            });
        }
        ConsoleConfig::Socket(path) => {
            let what = format!("socket={}", path.display());
            let (listener, file) = bind_socket(path).map_err(|e| console_error(&what, e))?;
            // What mio's own bind does: the console's worker polls it.
            listener.set_nonblocking(true).map_err(|e| console_error(&what, e))?;
            open.socket = Some(file);
            open.backend = Some(Backend::Socket(UnixListener::from_std(listener)));
        }
    }
    Ok(open)
}

/// The virtio console's backend for an embedder's writer and optional reader: the
/// reader, when there is one, comes back with the (blocking) pipe that a thread copies
/// it into, the device reading the other end.
pub fn open_console_io(io: crate::embed::ConsoleIo) -> Result<(Backend, Option<ConsoleInput>), Error> {
    let crate::embed::ConsoleIo { input, output } = io;
    let output = stream_output(output);
    let Some(reader) = input else { return Ok((Backend::Stream { output, input: None }, None)) };
    let (sender, receiver) = mio::unix::pipe::new().map_err(|e| console_error("input", e))?;
    sender.set_nonblocking(false).map_err(|e| console_error("input", e))?;
    Ok((Backend::Stream { output, input: Some(receiver) }, Some((reader, File::from(OwnedFd::from(sender))))))
}

/// A pipe with both ends blocking, as `(write end, read end)`: for threads that pump
/// bytes between a reader or writer and a consumer that wants a file descriptor.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))] // Virtualization.framework's consoles
pub fn blocking_pipe() -> std::io::Result<(File, File)> {
    let (sender, receiver) = mio::unix::pipe::new()?;
    sender.set_nonblocking(false)?;
    receiver.set_nonblocking(false)?;
    Ok((File::from(OwnedFd::from(sender)), File::from(OwnedFd::from(receiver))))
}

/// An embedder's console reader and the pipe to copy it into.
pub type ConsoleInput = (Box<dyn std::io::Read + Send>, File);

/// A network interface's opened backend and its MAC address.
pub type OpenNet = (Box<dyn NetBackend>, Mac);

/// Opens each network interface's backend; returns them with their MAC addresses
/// ([`NetConfig::macs`] for the VM `identity`).
pub fn open_nets(nets: &[NetConfig], identity: &str) -> Result<Vec<OpenNet>, Error> {
    nets.iter()
        .zip(NetConfig::macs(nets, identity))
        .map(|(net, mac)| {
            let what = net.mac_seed();
            let fail = |source: std::io::Error, hint: &'static str| Error::Net { what: what.clone(), source, hint };
            let backend: Box<dyn NetBackend> = match &net.backend {
                #[cfg(target_os = "linux")]
                NetBackendConfig::Tap(name) => {
                    Box::new(devices::virtio::net::backend::Tap::open(name).map_err(|e| {
                        fail(e, " (a tap needs CAP_NET_ADMIN to create, or an existing tap you may use)")
                    })?)
                }
                #[cfg(not(target_os = "linux"))]
                NetBackendConfig::Tap(_) => {
                    return Err(fail(std::io::Error::other("tap devices exist on Linux only; use unixgram=PATH"), ""))
                }
                NetBackendConfig::Unixgram { path, vfkit } => Box::new(
                    Unixgram::connect(path, *vfkit).map_err(|e| fail(e, " (is the network proxy listening?)"))?,
                ),
                NetBackendConfig::Unixstream(path) => {
                    Box::new(Unixstream::connect(path).map_err(|e| fail(e, " (is the network proxy listening?)"))?)
                }
                NetBackendConfig::Nat => {
                    return Err(fail(std::io::Error::other("only Virtualization.framework has NAT (--backend vz)"), ""))
                }
                NetBackendConfig::Fd(fd) => {
                    let own = fd.duplicate().map_err(|e| fail(e, ""))?;
                    Box::new(Unixgram::from_fd(own).map_err(|e| fail(e, ""))?)
                }
            };
            Ok((backend, mac))
        })
        .collect()
}

fn console_error(what: &str, e: std::io::Error) -> Error {
    Error::Console { what: format!("--console {what}"), source: e }
}

/// Why a socket path is refused when a process listens on it.
pub(crate) const IN_USE: &str = "in use by another process; stop it or choose another path";

/// Removes a socket file left by an earlier run: one that refuses a connection. A
/// socket something answers on (another hvrun's) is an error ([`IN_USE`]) and left
/// alone, as is anything else at `path`, so a typo never deletes a user's file. (The
/// probe is a connection that closes at once: hvrun's own servers do not serve one gone
/// when they accept it, and give a newcomer that would take a client's place
/// `NEWCOMER_GRACE` to go first (`devices::host_socket`). It never waits: a listener
/// whose backlog is full, as a stopped or hung process's is, is in use too.)
pub(crate) fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match mio::net::UnixStream::connect(path) {
            // Connected, or in the listener's backlog, or not even there (it is full).
            Ok(_) => Err(Error::new(ErrorKind::AddrInUse, IN_USE)),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EINPROGRESS) => {
                Err(Error::new(ErrorKind::AddrInUse, IN_USE))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            // Removed since: nothing to do.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::new(e.kind(), format!("cannot tell whether a process listens on it: {e}"))),
        },
        Ok(_) => Err(Error::new(ErrorKind::AlreadyExists, "exists and is not a socket")),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// After a last answer (a refusal): reads what the client still sends, such as the rest
/// of a request refused for its size, until it pauses for 100 ms, for at most 500 ms in
/// all and at most 1 MiB, so that it reads the answer rather than a connection reset for
/// unread data. A client that keeps sending is not waited for past that.
pub(crate) fn linger(stream: &std::os::unix::net::UnixStream) {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut left = 1usize << 20;
    let mut chunk = [0u8; 4096];
    let mut reader = stream;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Who serves the clients of a unix socket (the API's, the control socket's), for
/// [`serve_clients`].
pub(crate) struct Clients<S, R> {
    /// The socket's name in logs ("api", "--control").
    pub what: &'static str,
    /// Each client's thread's name.
    pub thread: &'static str,
    /// Clients served at once at most.
    pub max: usize,
    /// Serves one client, on its own thread, until it is done, telling its
    /// [`Presence`] when it waits for a request and when one starts.
    pub serve: S,
    /// Answers a client past `max` when none is idle (on the accepting thread: briefly).
    pub refuse: R,
}

/// The clients [`serve_clients`] serves, by number.
#[derive(Debug, Default)]
struct Registry {
    next: u64,
    clients: std::collections::HashMap<u64, Client>,
}

/// One client of a [`Registry`].
#[derive(Debug)]
struct Client {
    /// Since when it has waited for a request (`None`: one is under way).
    idle_since: Option<Instant>,
    /// Its connection, to close it by.
    stream: UnixStream,
}

/// A client's place among the `max` of [`serve_clients`], given back when dropped. Its
/// connection tells it when it waits for a request, with nothing of it read yet
/// ([`Presence::idle`]: it may be closed then to make room for a newcomer), and when a
/// request's first byte comes ([`Presence::busy`]).
#[derive(Debug)]
pub(crate) struct Presence {
    registry: Arc<Mutex<Registry>>,
    id: u64,
}

impl Presence {
    /// The client waits for its next request (from now, unless it waited already).
    pub fn idle(&self) {
        if let Some(client) = lock(&self.registry).clients.get_mut(&self.id) {
            client.idle_since.get_or_insert_with(Instant::now);
        }
    }

    /// A request's first byte came: the client is not to be closed for a newcomer.
    pub fn busy(&self) {
        if let Some(client) = lock(&self.registry).clients.get_mut(&self.id) {
            client.idle_since = None;
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        lock(&self.registry).clients.remove(&self.id);
    }
}

/// The registry, even if a thread panicked holding it (its entries stay consistent:
/// each change is one assignment).
fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A place for the client on `stream` (idle until it sends a byte), if there is one or
/// one can be made: with `max` clients already, the one idle longest is closed (both
/// ways, so that its thread's read returns and the thread ends) and its place given to
/// the newcomer. `None` when every client is in the middle of a request.
fn admit(registry: &Arc<Mutex<Registry>>, stream: &UnixStream, max: usize) -> std::io::Result<Option<Presence>> {
    let handle = stream.try_clone()?;
    let mut guard = lock(registry);
    if guard.clients.len() >= max {
        let longest = guard
            .clients
            .iter()
            .filter_map(|(id, client)| client.idle_since.map(|since| (since, *id)))
            .min()
            .map(|(_, id)| id);
        let Some(client) = longest.and_then(|id| guard.clients.remove(&id)) else {
            return Ok(None);
        };
        let _ = client.stream.shutdown(std::net::Shutdown::Both);
    }
    let id = guard.next;
    guard.next += 1;
    guard.clients.insert(id, Client { idle_since: Some(Instant::now()), stream: handle });
    Ok(Some(Presence { registry: Arc::clone(registry), id }))
}

/// Accepts `listener`'s clients for as long as it lasts: each on a thread of its own,
/// at most `clients.max` at once. One more takes the place of the client idle longest
/// (between requests: a client that connected and said nothing too), which is closed,
/// unless it goes within [`devices::host_socket::NEWCOMER_GRACE`] (a check that the
/// socket is in use connects and closes at once);
/// it is refused if none is idle (all are in the middle of a request, which their time
/// limit bounds). Idle clients are never closed otherwise, as Firecracker's are not:
/// its clients keep connections open between requests for as long as they like. A
/// failed accept (out of file descriptors, say) waits a little rather than spin on it.
pub(crate) fn serve_clients<S, R>(listener: &std::os::unix::net::UnixListener, clients: Clients<S, R>)
where
    S: Fn(UnixStream, Presence) + Clone + Send + 'static,
    R: Fn(UnixStream),
{
    let Clients { what, thread, max, serve, refuse } = clients;
    let registry = Arc::new(Mutex::new(Registry::default()));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                devices::warn_ratelimited!("{what}: cannot accept a client: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        // A client that connected and went at once (another hvrun checking whether the
        // socket is in use, a health check) needs no thread, and takes no one's place:
        // when its place would be another's, it is given a moment to go (or to speak).
        let full = lock(&registry).clients.len() >= max;
        let gone = if full {
            !devices::host_socket::stays(&stream, devices::host_socket::NEWCOMER_GRACE)
        } else {
            devices::host_socket::peer_gone(&stream)
        };
        if gone {
            continue;
        }
        let presence = match admit(&registry, &stream, max) {
            Ok(Some(presence)) => presence,
            Ok(None) => {
                refuse(stream);
                continue;
            }
            Err(e) => {
                devices::warn_ratelimited!("{what}: cannot serve a client: {e}");
                refuse(stream);
                continue;
            }
        };
        // The client's place is given back however its thread ends (a panic too), or
        // when there is no thread for it.
        let serve = serve.clone();
        let spawned = std::thread::Builder::new().name(thread.into()).spawn(move || serve(stream, presence));
        if let Err(e) = spawned {
            log::warn!("{what}: cannot serve a client: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_file;

    #[test]
    fn each_console_opens_its_backend() {
        let open = open_console(&ConsoleConfig::Serial, true).unwrap();
        assert!(open.backend.is_none() && open.stdin_pipe.is_none());
        let open = super::open_console(&ConsoleConfig::Terminal, true).unwrap();
        assert!(matches!(open.backend, Some(Backend::Stream { input: Some(_), .. })) && open.stdin_pipe.is_some());
        let open = super::open_console(&ConsoleConfig::Terminal, false).unwrap();
        assert!(matches!(open.backend, Some(Backend::Stream { input: None, .. })) && open.stdin_pipe.is_none());
        let log = std::env::temp_dir().join(format!("hvrun-test-{}-console.log", std::process::id()));
        let open = super::open_console(&ConsoleConfig::File(log.clone()), true).unwrap();
        assert!(matches!(open.backend, Some(Backend::File(_))) && log.exists(), "a regular file: written in place");
        let _ = std::fs::remove_file(&log);
        let open = super::open_console(&ConsoleConfig::File("/dev/null".into()), true).unwrap();
        assert!(matches!(open.backend, Some(Backend::Stream { input: None, .. })), "a device: through a thread");
    }

    #[test]
    fn network_backends_open_or_say_why_not() {
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-net.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let missing = NetConfig::parse(&format!("unixgram={}", path.display())).unwrap();
        let e = open_nets(std::slice::from_ref(&missing), "vm").err().unwrap().to_string();
        assert!(e.starts_with("--net unixgram=") && e.contains("is the network proxy listening?"), "{e}");
        let _peer = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let opened = open_nets(std::slice::from_ref(&missing), "vm").unwrap();
        assert_eq!(opened[0].1, devices::virtio::net::mac_from_seed(&missing.mac_seed()));
        let _ = std::fs::remove_file(&path);
    }

    /// Issue 12, hole 7: `--net fd=N` became an `OwnedFd` inside this safe function while
    /// `VmConfig` is `Clone`, so two VMs started from clones of one configuration both
    /// owned descriptor N and closed it twice. Now the configuration owns it and each VM
    /// a duplicate.
    #[test]
    fn clones_of_a_configuration_share_one_descriptor_and_each_vm_owns_a_duplicate() {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let net = NetConfig {
            backend: NetBackendConfig::Fd(crate::config::NetFd::new(OwnedFd::from(ours))),
            mac: None,
            id: None,
        };
        let config = crate::VmConfig { nets: vec![net], ..crate::VmConfig::new("Image") };
        let clone = config.clone();
        let first = open_nets(&config.nets, "vm").unwrap();
        let second = open_nets(&clone.nets, "vm").unwrap();
        drop((first, second, clone));
        let mut third = open_nets(&config.nets, "vm").unwrap();
        third[0].0.send(b"still the same socket").unwrap();
        let mut buf = [0u8; 64];
        let n = theirs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still the same socket");
    }

    fn socket_path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A second hvrun on the same path used to remove the first one's socket and take
    /// the path over.
    #[test]
    fn a_socket_a_process_listens_on_is_refused_and_left_working() {
        use std::os::unix::net::{UnixListener, UnixStream};
        let path = socket_path("live");
        let theirs = UnixListener::bind(&path).unwrap();
        let e = bind_socket(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(e.to_string(), IN_USE);
        // Their socket is still there and still theirs: the probe, then a client.
        let _probe = theirs.accept().unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(theirs.accept().is_ok());
        let e = open_console(&ConsoleConfig::Socket(path.clone()), false).unwrap_err().to_string();
        assert!(e.ends_with(&format!("--console socket={}: {IN_USE}", path.display())), "{e}");
        assert!(UnixStream::connect(&path).is_ok());
        drop(theirs);
        // Nobody listens now: the file is stale, and replaced.
        let (ours, file) = bind_socket(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(ours.accept().is_ok());
        drop(file);
        assert!(!path.exists());
    }

    /// The probe used to be a blocking connect: on a listener whose backlog is full (a
    /// stopped or hung process's) it waited for ever, and hvrun hung at start.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_socket_whose_backlog_is_full_is_in_use_and_the_probe_does_not_wait() {
        use std::os::fd::AsRawFd;
        let path = socket_path("full");
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on a socket this test owns and keeps open over the call; it
        // only makes the backlog as short as it gets.
        assert_eq!(unsafe { libc::listen(theirs.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        while queued.len() < 64 {
            match mio::net::UnixStream::connect(&path) {
                Ok(stream) => queued.push(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queued.len() < 64, "the backlog never filled");
        let (done, result) = std::sync::mpsc::channel();
        let probed = path.clone();
        std::thread::spawn(move || done.send(remove_stale_socket(&probed)));
        let e = result.recv_timeout(std::time::Duration::from_secs(10)).expect("the probe waits").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(e.to_string(), IN_USE);
        assert!(path.exists(), "their socket is left alone");
        drop((queued, theirs));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_file_is_removed_only_while_it_is_still_ours() {
        use std::os::unix::net::{UnixListener, UnixStream};
        let path = socket_path("replaced");
        let (ours, file) = bind_socket(&path).unwrap();
        // Another process removes ours and binds its own at the path.
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop((ours, file));
        assert!(path.exists(), "another process's socket is not removed");
        let _client = UnixStream::connect(&path).unwrap();
        assert!(theirs.accept().is_ok());
        drop(theirs);
        // A file that is gone already is no error either.
        let (_ours, file) = bind_socket(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(file);
        assert!(!path.exists());
    }

    /// Past the limit the client idle longest makes room (its connection is closed both
    /// ways); one in the middle of a request never does; a place given back is room.
    #[test]
    fn past_the_limit_the_client_idle_longest_makes_room_and_busy_ones_never_do() {
        use std::io::Read;
        let registry = Arc::new(Mutex::new(Registry::default()));
        let pairs: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let places: Vec<Presence> = pairs.iter().map(|(ours, _)| admit(&registry, ours, 3).unwrap().unwrap()).collect();
        // Idle in the order 2, 0, 1 (apart, so that their times differ).
        places.iter().for_each(Presence::busy);
        for i in [2, 0, 1] {
            std::thread::sleep(std::time::Duration::from_millis(2));
            places[i].idle();
        }
        let (newcomer, _theirs) = UnixStream::pair().unwrap();
        let fourth = admit(&registry, &newcomer, 3).unwrap().expect("an idle client makes room");
        assert_eq!(pairs[2].1.try_clone().unwrap().read(&mut [0u8; 1]).unwrap(), 0, "the one idle longest is closed");
        for open in [&pairs[0].1, &pairs[1].1] {
            open.set_nonblocking(true).unwrap();
            let e = open.try_clone().unwrap().read(&mut [0u8; 1]).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the others stay open");
        }
        // Calling idle again keeps the time it became idle; busy ones are never closed.
        places[0].idle();
        places[0].busy();
        places[1].busy();
        fourth.busy();
        let (late, _theirs) = UnixStream::pair().unwrap();
        assert!(admit(&registry, &late, 3).unwrap().is_none(), "every client is mid-request");
        drop(places);
        assert_eq!(lock(&registry).clients.len(), 1, "places given back, the closed one's too");
        assert!(admit(&registry, &late, 3).unwrap().is_some());
    }

    /// A second hvrun's check of a live API or control socket (a connection that closes
    /// at once) took the place of the client idle longest when the server was full.
    #[test]
    fn a_client_gone_before_it_is_accepted_takes_no_place() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixListener;
        let path = socket_path("gone");
        let listener = UnixListener::bind(&path).unwrap();
        // Both wait in the backlog, in this order, before the server accepts either.
        let mut client = UnixStream::connect(&path).unwrap();
        drop(UnixStream::connect(&path).unwrap());
        let clients = Clients {
            what: "test",
            thread: "test-client",
            max: 1,
            serve: |mut stream: UnixStream, presence: Presence| {
                let mut byte = [0u8; 1];
                while stream.read_exact(&mut byte).is_ok() {
                    presence.busy();
                    let _ = stream.write_all(&byte);
                    presence.idle();
                }
            },
            refuse: |_stream: UnixStream| {},
        };
        std::thread::spawn(move || serve_clients(&listener, clients));
        client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        client.write_all(b"x").unwrap();
        let mut echoed = [0u8; 1];
        client.read_exact(&mut echoed).expect("the first client is still served");
        assert_eq!(&echoed, b"x");
        let _ = std::fs::remove_file(&path);
    }

    /// It used to read until 100 ms passed with nothing read: a client sending a byte
    /// now and then kept its thread (and its place) for up to 1 MiB of them.
    #[test]
    fn lingering_after_a_refusal_ends_even_while_the_client_sends() {
        use std::io::Write;
        let (ours, mut client) = std::os::unix::net::UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            for _ in 0..200 {
                if client.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        let start = std::time::Instant::now();
        linger(&ours);
        assert!(start.elapsed() < std::time::Duration::from_millis(1500), "{:?}", start.elapsed());
        drop(ours);
        sender.join().unwrap();
    }

    #[test]
    fn a_socket_replaces_a_stale_one_refuses_other_files_and_is_removed_after() {
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-console.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // a stale socket
        let open = open_console(&ConsoleConfig::Socket(path.clone()), false).unwrap();
        assert!(matches!(open.backend, Some(Backend::Socket(_))));
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(open);
        assert!(!path.exists(), "the socket file is removed with the VM");
        let file = temp_file("not-a-socket", b"keep me");
        let e = super::open_console(&ConsoleConfig::Socket(file.clone()), false).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let _ = std::fs::remove_file(&file);
    }
}
