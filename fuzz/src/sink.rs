//! The host's writer for a device's output in the fuzz targets: keeps what it is given up
//! to a cap (and counts the rest), or fails every write when told to.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// The most host output the sink keeps (the rest is counted).
pub const SINK_CAP: usize = 1 << 20;

/// Keeps the first [`SINK_CAP`] bytes written, and how many were written in all.
#[derive(Clone, Default)]
pub struct HostSink {
    /// The bytes kept, and the count of every byte written.
    pub got: Arc<Mutex<(Vec<u8>, usize)>>,
    /// Every write fails (a host writer that broke).
    pub fails: bool,
}

impl Write for HostSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.fails {
            return Err(std::io::Error::other("the host writer failed"));
        }
        let mut got = self.got.lock().unwrap();
        let room = SINK_CAP.saturating_sub(got.0.len());
        got.0.extend_from_slice(&buf[..buf.len().min(room)]);
        got.1 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
