//! Helpers shared by this crate's unit tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use hypervisor::Kicker;

/// A kicker that counts its kicks.
#[derive(Debug, Default)]
pub struct CountingKicker(AtomicUsize);

impl CountingKicker {
    /// How many kicks so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Kicker for CountingKicker {
    fn kick(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writes `bytes` to a file unique to this process and `name`; returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hvrun-test-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Whether the server has closed `stream` or answered it (it has not if a read would
/// wait): for the tests of the API's and the control socket's client limits.
pub fn ended(stream: &std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    stream.set_nonblocking(true).unwrap();
    let waits = matches!((&*stream).read(&mut [0u8; 64]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    !waits
}
