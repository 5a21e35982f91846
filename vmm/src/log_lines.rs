//! hvrun's log on standard error, one record a write. `PUT /logger` may point standard
//! error at a FIFO, opened non-blocking as Firecracker opens it (a FIFO nobody reads
//! must not stop a vCPU that logs). A write of at most `PIPE_BUF` bytes (4096 on Linux,
//! 512 on macOS) to a pipe is all or nothing, and records of that size from several
//! threads never mix; a longer write to a pipe with less room takes what fits, and the
//! next record would be glued to the half it left. So [`LogLines`] writes each record in
//! one `write`, a record longer than `PIPE_BUF` bound for a FIFO or pipe shortened to
//! `PIPE_BUF` bytes that end in `…` and a newline, and drops a record the FIFO cannot
//! take now, counted ([`missed`], reported in the metrics as `logger.missed_lines`, as
//! Firecracker's `missed_log_count`). Keeping the end of a long record for later, as the
//! metrics lines do, would make every other thread's record wait behind it, or hold half
//! a line in the FIFO until the next record comes, however late.
//!
//! A file or a terminal gets the whole record, as before. Colours are env_logger's
//! choice for the standard error hvrun started with; once `PUT /logger` has sent the log
//! to a file or FIFO ([`redirected`]), they are taken out of the records.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Whether standard error was pointed elsewhere since the start ([`redirected`]).
static REDIRECTED: AtomicBool = AtomicBool::new(false);

/// Says that standard error now goes where `PUT /logger` asked: records lose the colours
/// chosen for the old destination (unless the new one is a terminal).
pub fn redirected() {
    REDIRECTED.store(true, Ordering::Relaxed);
}

/// Log records the destination did not take, since hvrun started.
static MISSED: AtomicU64 = AtomicU64::new(0);

/// How many log records were dropped because the destination (a FIFO nobody reads) could
/// not take them.
pub fn missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// The most bytes a pipe takes all or nothing.
const PIPE_BUF: usize = libc::PIPE_BUF;
/// The end of a shortened record.
const SHORTENED: &[u8] = "…\n".as_bytes();

/// Writes log records to a descriptor (standard error in hvrun), each whole or not at all
/// (see the module); for `env_logger`'s `Target::Pipe`, which hands it one record a write.
#[derive(Debug)]
pub struct LogLines {
    fd: BorrowedFd<'static>,
    missed: &'static AtomicU64,
}

impl LogLines {
    /// Records to standard error.
    pub fn stderr() -> Self {
        // SAFETY: descriptor 2 is open for the process's life (`PUT /logger` replaces it
        // with dup2, which never leaves it closed).
        let fd = unsafe { BorrowedFd::borrow_raw(libc::STDERR_FILENO) };
        LogLines { fd, missed: &MISSED }
    }

    /// Writes `record`: see the module.
    fn record(&self, record: &[u8]) {
        let plain;
        let mut record = record;
        // Colours were chosen for the standard error hvrun started with; a log file
        // `PUT /logger` put in its place gets none.
        if record.contains(&0x1b) && REDIRECTED.load(Ordering::Relaxed) && !is_terminal(self.fd) {
            plain = without_colours(record);
            record = &plain;
        }
        let shortened;
        // A blocking pipe (hvrun's standard error piped into another program) takes a
        // long record whole, in parts; only one hvrun must not wait on is shortened.
        if record.len() > PIPE_BUF && file_type(self.fd) == Some(libc::S_IFIFO) && non_blocking(self.fd) {
            shortened = shorten(record);
            record = &shortened;
        }
        let mut done = 0;
        while done < record.len() {
            // SAFETY: writes from a live slice to a descriptor open for the process's life.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), record[done..].as_ptr().cast(), record.len() - done) };
            match usize::try_from(n) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if done < record.len() {
            self.missed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Write for LogLines {
    fn write(&mut self, record: &[u8]) -> std::io::Result<usize> {
        self.record(record);
        Ok(record.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The type bits of what `fd` is (`S_IFIFO` for a FIFO or a pipe), if it can be told.
fn file_type(fd: BorrowedFd<'_>) -> Option<libc::mode_t> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer it is given, for a descriptor that is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    Some(unsafe { stat.assume_init() }.st_mode & libc::S_IFMT)
}

/// Whether `fd` was opened non-blocking (`PUT /logger`'s FIFO is).
fn non_blocking(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    use std::io::IsTerminal;
    fd.is_terminal()
}

/// `record` cut to `PIPE_BUF` bytes on a character's boundary, ending in `…` and a
/// newline.
fn shorten(record: &[u8]) -> Vec<u8> {
    let mut cut = PIPE_BUF - SHORTENED.len();
    // Back to the start of a UTF-8 character (continuation bytes are 0b10xxxxxx).
    while cut > 0 && record.get(cut).is_some_and(|&b| b & 0xc0 == 0x80) {
        cut -= 1;
    }
    let mut out = record[..cut].to_vec();
    out.extend_from_slice(SHORTENED);
    out
}

/// `record` without its colour sequences (`ESC [ … m`).
fn without_colours(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len());
    let mut rest = record;
    while let Some(at) = rest.iter().position(|&b| b == 0x1b) {
        out.extend_from_slice(&rest[..at]);
        let sequence = &rest[at..];
        let end = (sequence.get(1) == Some(&b'['))
            .then(|| sequence.iter().position(|&b| b == b'm'))
            .flatten()
            .filter(|&m| sequence[2..m].iter().all(|&b| b.is_ascii_digit() || b == b';'));
        match end {
            Some(m) => rest = &sequence[m + 1..],
            None => {
                out.push(0x1b);
                rest = &sequence[1..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A pipe (read end, write end), both non-blocking.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two descriptors it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        for fd in fds {
            // SAFETY: fcntl on descriptors just made.
            assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) }, 0);
        }
        // SAFETY: the descriptors are new and owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn lines_to(fd: &OwnedFd, missed: &'static AtomicU64) -> LogLines {
        // SAFETY: each test keeps the descriptor open for as long as it uses the writer.
        let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        LogLines { fd, missed }
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        use std::io::Read;
        let mut file = std::fs::File::from(fd.try_clone().unwrap());
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match file.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Standard error piped into another program (blocking): a long record goes whole.
    #[test]
    fn a_blocking_pipe_gets_long_records_whole() {
        static MISSED: AtomicU64 = AtomicU64::new(0);
        let (read, write) = pipe();
        // SAFETY: fcntl on the test's own descriptor: blocking again.
        assert_eq!(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) }, 0);
        let record = [b"x".repeat(3 * PIPE_BUF), b"\n".to_vec()].concat();
        let reader = std::thread::spawn(move || {
            let (mut got, start) = (Vec::new(), std::time::Instant::now());
            while got.len() < 3 * PIPE_BUF + 1 && start.elapsed() < std::time::Duration::from_secs(5) {
                got.extend(read_all(&read));
                std::thread::yield_now();
            }
            got
        });
        lines_to(&write, &MISSED).record(&record);
        assert_eq!(reader.join().unwrap(), record);
        assert_eq!(MISSED.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn long_records_to_a_full_pipe_are_shortened_or_dropped_never_cut() {
        static MISSED: AtomicU64 = AtomicU64::new(0);
        let (read, write) = pipe();
        #[cfg(target_os = "linux")]
        {
            // SAFETY: fcntl on a pipe of the test's: the smallest buffer, a page.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
            assert!(size >= 4096);
        }
        let mut lines = lines_to(&write, &MISSED);
        let long = format!("[WARN] {}é tail\n", "x".repeat(3 * PIPE_BUF));
        let mut sent = 0;
        // Until the pipe is full: every record whole (or shortened), then dropped.
        while MISSED.load(Ordering::Relaxed) < 3 {
            lines.write_all(long.as_bytes()).unwrap();
            lines.write_all(b"[INFO] short\n").unwrap();
            sent += 2;
            assert!(sent < 10_000, "the pipe fills");
        }
        let got = read_all(&read);
        let text = String::from_utf8(got).expect("cut on a character's boundary");
        assert!(text.ends_with('\n'));
        let mut count = 0;
        for line in text.lines() {
            count += 1;
            assert!(line == "[INFO] short" || (line.starts_with("[WARN] xxx") && line.ends_with('…')), "{line:.40}");
            assert!(line.len() < PIPE_BUF, "a long record is shortened to PIPE_BUF");
        }
        assert_eq!(count + MISSED.load(Ordering::Relaxed) as usize, sent, "each record arrived or was counted");
        // Room again: the next record goes whole.
        lines.write_all(b"[INFO] again\n").unwrap();
        assert_eq!(read_all(&read), b"[INFO] again\n");
    }

    #[test]
    fn a_file_gets_whole_records_without_colours() {
        static MISSED: AtomicU64 = AtomicU64::new(0);
        // As after `PUT /logger` (no other test here writes colours).
        redirected();
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-log-lines", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let fd = OwnedFd::from(file);
        let mut lines = lines_to(&fd, &MISSED);
        let long = format!("\x1b[33mWARN\x1b[0m {}\n", "y".repeat(3 * PIPE_BUF));
        lines.write_all(long.as_bytes()).unwrap();
        lines.write_all(b"\x1b[1;31mERROR\x1b[0m done \x1b(\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("WARN {}\nERROR done \x1b(\n", "y".repeat(3 * PIPE_BUF)));
        assert_eq!(MISSED.load(Ordering::Relaxed), 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn shortening_keeps_characters_whole() {
        let record = "é".repeat(PIPE_BUF);
        let short = shorten(record.as_bytes());
        assert!(short.len() <= PIPE_BUF);
        assert!(std::str::from_utf8(&short).unwrap().ends_with("é…\n"));
    }
}
