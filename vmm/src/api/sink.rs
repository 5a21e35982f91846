//! `PUT /metrics`: where metrics go (a file that exists, appended to, or a FIFO, never
//! waited on), and the lines written there: one JSON object per line with the time, the
//! API's own counters and the machine's ([`crate::metrics::collect`]), each counter the
//! increment since the previous line written, as Firecracker writes them. A line is
//! written at `FlushMetrics` and every [`PERIOD`] once the VM runs.
//!
//! The destination is non-blocking: the API's dispatcher writes the lines, and a FIFO
//! nobody reads must not stop it. A reader must still only ever see whole lines. A write
//! of at most `PIPE_BUF` bytes (4096 on Linux) to a pipe is all or nothing, but a line is
//! longer with many vCPUs, and a longer write to a pipe with less room takes what fits:
//! neither POSIX nor the pipe says beforehand how much that will be, so a line cannot be
//! written all or nothing. A line once started is therefore always finished, and nothing
//! else is written until it is: the sink keeps the end the destination did not take
//! (never more than one line) and writes it, without waiting, before the next line and
//! every few milliseconds to a second ([`RETRY_FIRST`] doubling to [`RETRY_MOST`]) when the
//! dispatcher has nothing else to do ([`Sink::finish_line`]). A reader may see a line
//! arrive in pieces, never cut nor glued to another.
//!
//! A line that cannot start (the FIFO is full, or the previous line is not finished) is
//! dropped whole and counted (`metrics.missed_lines`, as Firecracker's
//! `missed_metrics_count`), and `FlushMetrics` fails. The totals a dropped line was made
//! from are forgotten: the next line written holds the increments since the last line
//! written, so the lines a reader gets add up to the totals.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::model::Metrics;

/// How often a line is written while the VM runs (Firecracker's period).
pub const PERIOD: Duration = Duration::from_secs(60);
/// How soon the end of a line the destination took only in part is tried again.
pub const RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between tries at the end of a line (the wait doubles from
/// [`RETRY_FIRST`] while the destination takes nothing).
pub const RETRY_MOST: Duration = Duration::from_secs(1);

/// The API's own counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiCounters {
    /// Requests answered.
    pub requests: u64,
    /// Of those, refused (4xx or 5xx).
    pub errors: u64,
}

/// The end of a line the destination has not taken yet, and when to try again.
#[derive(Debug)]
struct Unfinished {
    rest: Vec<u8>,
    retry_at: Instant,
    wait: Duration,
}

/// An open metrics destination.
#[derive(Debug)]
pub struct Sink {
    file: File,
    id: Option<String>,
    properties: Option<BTreeMap<String, String>>,
    /// The totals the previous line written was made from.
    previous: Option<Value>,
    /// When the next periodic line is due.
    due: Instant,
    /// Lines the destination did not take (a FIFO nobody reads, say).
    missed: u64,
    /// The end of the line being written, if the destination took only its start.
    unfinished: Option<Unfinished>,
}

/// Writes as much of `bytes` as `file` takes without waiting; returns how much. An error
/// only when it took nothing.
fn write_some(file: &mut File, bytes: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match file.write(&bytes[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Sink {
    /// Opens `metrics.metrics_path`, which must exist, as in Firecracker (a file is
    /// appended to; a FIFO is opened without waiting for a reader), for instance `id`.
    pub fn open(metrics: &Metrics, id: &str) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&metrics.metrics_path)
            .map_err(|e| format!("Cannot open the metrics file {}: {e}", metrics.metrics_path))?;
        Ok(Sink {
            file,
            id: metrics.emit_id.unwrap_or(false).then(|| id.to_string()),
            properties: metrics.properties.clone(),
            previous: None,
            due: Instant::now() + PERIOD,
            missed: 0,
            unfinished: None,
        })
    }

    /// Whether a periodic line is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.due
    }

    /// How long until the next periodic line.
    pub fn until_due(&self) -> Duration {
        self.due.saturating_duration_since(Instant::now())
    }

    /// How long until the next try at the end of a line, if one is unfinished.
    pub fn until_retry(&self) -> Option<Duration> {
        Some(self.unfinished.as_ref()?.retry_at.saturating_duration_since(Instant::now()))
    }

    /// Writes what the destination takes now of the line it took only in part. Returns
    /// whether no line is left unfinished.
    pub fn finish_line(&mut self) -> bool {
        let Some(mut unfinished) = self.unfinished.take() else { return true };
        let took = write_some(&mut self.file, &unfinished.rest).unwrap_or(0);
        unfinished.rest.drain(..took);
        if unfinished.rest.is_empty() {
            return true;
        }
        // Sooner again while the reader makes progress; less often while it does not.
        unfinished.wait = if took > 0 { RETRY_FIRST } else { (unfinished.wait * 2).min(RETRY_MOST) };
        unfinished.retry_at = Instant::now() + unfinished.wait;
        self.unfinished = Some(unfinished);
        false
    }

    /// Writes one line from the machine's totals `machine` (an empty object before it
    /// starts) and the API's counters; or drops it, counted, when the destination cannot
    /// take its start now (see the module).
    pub fn write(&mut self, machine: Value, api: ApiCounters) -> Result<(), String> {
        self.due = Instant::now() + PERIOD;
        if !self.finish_line() {
            self.missed += 1;
            return Err("the metrics file has not taken the previous line yet; this one is dropped".into());
        }
        let mut totals = machine;
        if let Some(object) = totals.as_object_mut() {
            object.insert("api_server".into(), json!({ "requests": api.requests, "errors": api.errors }));
            object.insert("metrics".into(), json!({ "missed_lines": self.missed }));
            object.insert("logger".into(), json!({ "missed_lines": crate::log_lines::missed() }));
        }
        let mut line = super::super::metrics::increments(&totals, self.previous.as_ref());
        if let Some(object) = line.as_object_mut() {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            object.insert("utc_timestamp_ms".into(), ms.into());
            if let Some(id) = &self.id {
                object.insert("id".into(), id.clone().into());
            }
            if let Some(properties) = &self.properties {
                object.insert("properties".into(), json!(properties));
            }
        }
        let mut text = line.to_string().into_bytes();
        text.push(b'\n');
        let took = match write_some(&mut self.file, &text) {
            Ok(0) => Err("the metrics file takes nothing now".to_string()),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("the metrics file cannot be written: {e}")),
        };
        let took = took.inspect_err(|_| self.missed += 1)?;
        self.previous = Some(totals);
        if took < text.len() {
            text.drain(..took);
            let retry_at = Instant::now() + RETRY_FIRST;
            self.unfinished = Some(Unfinished { rest: text, retry_at, wait: RETRY_FIRST });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_increments_with_the_time_id_and_properties() {
        let path = std::env::temp_dir().join(format!("hvrun-metrics-{}.json", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let metrics = Metrics {
            metrics_path: path.display().to_string(),
            emit_id: Some(true),
            properties: Some([("team".to_string(), "a".to_string())].into()),
        };
        let mut sink = Sink::open(&metrics, "vm7").unwrap();
        assert!(!sink.due() && sink.until_due() <= PERIOD);
        sink.write(json!({"vcpu": {"exit_mmio_read": 5}}), ApiCounters { requests: 3, errors: 1 }).unwrap();
        sink.write(json!({"vcpu": {"exit_mmio_read": 9}}), ApiCounters { requests: 4, errors: 1 }).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["vcpu"]["exit_mmio_read"], 5);
        assert_eq!(lines[1]["vcpu"]["exit_mmio_read"], 4);
        assert_eq!(lines[1]["api_server"]["requests"], 1);
        assert_eq!(lines[1]["api_server"]["errors"], 0);
        assert_eq!(lines[1]["id"], "vm7");
        assert!(lines[1]["logger"]["missed_lines"].is_u64(), "the log records dropped (crate::log_lines)");
        assert_eq!(lines[1]["properties"]["team"], "a");
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        std::fs::remove_file(&path).unwrap();
    }

    /// A FIFO made for one test, its reading end (non-blocking), and a sink writing to
    /// it through a pipe of the smallest size Linux allows (a page); returns the size.
    #[cfg(target_os = "linux")]
    fn small_fifo(name: &str) -> (std::path::PathBuf, File, Sink, usize) {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).unwrap();
        let metrics = Metrics { metrics_path: path.display().to_string(), emit_id: None, properties: None };
        let sink = Sink::open(&metrics, "vm").unwrap();
        // SAFETY: fcntl on a descriptor the sink owns; F_SETPIPE_SZ only resizes the
        // pipe's buffer (to at least 4096 bytes: the page size, PIPE_BUF).
        let size = unsafe { libc::fcntl(sink.file.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        assert!(size >= 4096, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
        (path, reader, sink, size as usize)
    }

    /// Totals for a machine of `vcpus` vCPUs that each made `reads` MMIO reads (a line of
    /// about 60 bytes a vCPU).
    #[cfg(target_os = "linux")]
    fn machine(vcpus: usize, reads: u64) -> Value {
        let each: Vec<Value> = (0..vcpus).map(|_| json!({"exit_mmio_read": reads, "exit_mmio_write": 0})).collect();
        json!({ "vcpus": each })
    }

    /// Reads what `reader` holds now onto `into`; returns how many bytes.
    #[cfg(target_os = "linux")]
    fn read_now(mut reader: &File, into: &mut Vec<u8>, most: usize) -> usize {
        use std::io::Read;
        let mut buf = vec![0u8; most];
        match reader.read(&mut buf) {
            Ok(n) => {
                into.extend_from_slice(&buf[..n]);
                n
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(e) => panic!("reading the FIFO: {e}"),
        }
    }

    /// Every line of `bytes`, parsed: each must be whole JSON, and the last end in a
    /// newline.
    #[cfg(target_os = "linux")]
    fn whole_lines(bytes: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "the stream ends with a whole line");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a cut line ({e}): {l:.80}"))).collect()
    }

    /// From the audit: a line longer than PIPE_BUF went out in part when the pipe had
    /// less room, and the next line was glued to its first half.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_line_longer_than_the_pipe_is_finished_before_another_starts() {
        let (path, reader, mut sink, size) = small_fifo("metrics-long-line");
        let vcpus = size / 20; // lines of about three pipes
        sink.write(machine(vcpus, 5), ApiCounters::default()).unwrap();
        assert!(sink.until_retry().is_some(), "the pipe took only the start of the line");
        let e = sink.write(machine(vcpus, 7), ApiCounters::default()).unwrap_err();
        assert!(e.contains("dropped"), "{e}");
        assert!(!sink.finish_line(), "nobody read: the line is still unfinished");
        // The wait itself, not the time left until the next try: that shrinks while a
        // loaded host keeps this thread off the CPU.
        let wait = sink.unfinished.as_ref().expect("unfinished").wait;
        assert!(wait > RETRY_FIRST, "tries grow rarer while the pipe takes nothing ({wait:?})");
        let mut got = Vec::new();
        let mut drain = |sink: &mut Sink| {
            for _ in 0..1000 {
                read_now(&reader, &mut got, size);
                if sink.finish_line() {
                    break;
                }
            }
            while read_now(&reader, &mut got, size) > 0 {}
        };
        drain(&mut sink);
        assert!(sink.until_retry().is_none());
        sink.write(machine(vcpus, 12), ApiCounters::default()).unwrap();
        drain(&mut sink);
        let lines = whole_lines(&got);
        assert_eq!(lines.len(), 2, "the first line and the third; the second was dropped");
        assert!(got.len() > 4 * size, "lines longer than the pipe");
        assert_eq!(lines[0]["vcpus"][0]["exit_mmio_read"], 5);
        assert_eq!(lines[1]["vcpus"][vcpus - 1]["exit_mmio_read"], 7, "since the last line written");
        assert_eq!(lines[1]["metrics"]["missed_lines"], 1);
        std::fs::remove_file(&path).unwrap();
    }

    /// A reader reading in pieces of every size while lines short and long are written
    /// (the dispatcher's ticks between them) sees only whole lines; the lines it does not
    /// get were counted as missed.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_reader_only_ever_sees_whole_lines() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let (path, reader, mut sink, size) = small_fifo("metrics-whole-lines");
        let done = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let reading = std::thread::spawn(move || {
            let mut got = Vec::new();
            for step in 1usize.. {
                let over = finished.load(Ordering::SeqCst);
                if read_now(&reader, &mut got, 1 + step * 997 % 3000) == 0 {
                    if over {
                        return got;
                    }
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            unreachable!()
        });
        let lines = 60;
        let (mut written, mut missed) = (0, 0);
        for i in 0..lines {
            // From a few vCPUs (under PIPE_BUF) to lines of several pipes.
            let vcpus = [2, size / 30, 4, size / 8][i % 4];
            match sink.write(machine(vcpus, i as u64), ApiCounters::default()) {
                Ok(()) => written += 1,
                Err(_) => missed += 1,
            }
            for _ in 0..(i % 3) {
                std::thread::sleep(Duration::from_micros(200));
                sink.finish_line();
            }
        }
        // A last line, tried until it starts, carries the count of those dropped before.
        let start = Instant::now();
        let last = || {
            assert!(start.elapsed() < Duration::from_secs(20), "the reader reads: the lines go");
            std::thread::sleep(Duration::from_millis(1));
        };
        while sink.write(machine(2, 0), ApiCounters::default()).is_err() {
            missed += 1;
            last();
        }
        written += 1;
        while !sink.finish_line() {
            last();
        }
        done.store(true, Ordering::SeqCst);
        let got = whole_lines(&reading.join().unwrap());
        assert_eq!(got.len(), written, "every line written arrived whole");
        assert!(written + missed > lines);
        let counted: u64 = got.iter().map(|l| l["metrics"]["missed_lines"].as_u64().unwrap()).sum();
        assert_eq!(counted, missed as u64, "each dropped line is counted in a line written later");
        std::fs::remove_file(&path).unwrap();
    }
}
