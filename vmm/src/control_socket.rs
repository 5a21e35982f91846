//! `--control PATH`: a unix socket through which another program pauses, resumes and
//! stops the running VM. A client writes one JSON command per line and reads one JSON
//! answer per line:
//!
//! ```text
//! {"command": "pause"}                  -> {"ok": true}
//! {"command": "resume"}                 -> {"ok": true}
//! {"command": "status"}                 -> {"ok": true, "paused": false}
//! {"command": "stop"}                   -> {"ok": true}   (the VM stops, exit status 5)
//! {"command": "snapshot", "dir": "D"}   -> {"ok": true}   (saved in D, left paused)
//! anything else                         -> {"ok": false, "error": "..."}
//! ```
//!
//! Unknown commands and fields are errors, never ignored. A line longer than
//! [`MAX_LINE`] bytes ends the client's connection; so does a line not whole within
//! [`LINE_TIMEOUT`] of its first byte (with an error). A client may stay silent between
//! lines for as long as it likes (a supervisor keeps one connection open). At most
//! [`MAX_CLIENTS`] clients are served at once: one more takes the place of the client
//! silent longest between lines, whose connection is closed, or, if every client is in
//! the middle of a line, is answered an error. The socket file is removed when the
//! server is dropped.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backends::{bind_socket, linger, serve_clients, Clients, Presence, SocketFile};
use crate::embed::VmHandle;

/// The longest command line read, its newline included.
pub const MAX_LINE: usize = 4096;
/// Clients served at once (one more takes the place of the one silent longest between
/// lines).
pub const MAX_CLIENTS: usize = 8;
/// How long a line may take to arrive, from its first byte to its newline (and an
/// answer to be taken).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control socket acts on: a running VM ([`VmHandle`]), or a stand-in in tests.
pub trait Controls: Send + Sync + 'static {
    /// Pauses the VM; why not, if it could not.
    fn pause(&self) -> Result<(), String>;
    /// Lets a paused VM run again.
    fn resume(&self);
    /// Whether the VM is paused.
    fn paused(&self) -> bool;
    /// Stops the VM.
    fn stop(&self);
    /// Saves the VM to `dir`.
    fn snapshot(&self, dir: &Path) -> Result<(), String>;
}

impl Controls for VmHandle {
    fn pause(&self) -> Result<(), String> {
        VmHandle::pause(self).map_err(|e| e.to_string())
    }

    fn resume(&self) {
        VmHandle::resume(self);
    }

    fn paused(&self) -> bool {
        self.is_paused()
    }

    fn stop(&self) {
        VmHandle::stop(self);
    }

    fn snapshot(&self, dir: &Path) -> Result<(), String> {
        VmHandle::snapshot(self, dir).map_err(|e| e.to_string())
    }
}

/// One command line, as parsed. (The commands without arguments are struct variants:
/// serde ignores `deny_unknown_fields` on an internally tagged enum's unit variants,
/// so `{"command":"pause","now":true}` would pass as a pause.)
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Pause {},
    Resume {},
    Status {},
    Stop {},
    Snapshot { dir: PathBuf },
}

/// The answer (one JSON object, no newline) to one command line.
pub fn answer(controls: &dyn Controls, line: &str) -> String {
    let command = match serde_json::from_str::<Command>(line.trim()) {
        Ok(command) => command,
        Err(e) => return failure(&format!("bad command: {e}")),
    };
    let result = match command {
        Command::Pause {} => controls.pause(),
        Command::Resume {} => {
            controls.resume();
            Ok(())
        }
        Command::Status {} => return reply(Reply { ok: true, paused: Some(controls.paused()), error: None }),
        Command::Stop {} => {
            controls.stop();
            Ok(())
        }
        Command::Snapshot { dir } => controls.snapshot(&dir),
    };
    match result {
        Ok(()) => reply(Reply { ok: true, paused: None, error: None }),
        Err(why) => failure(&why),
    }
}

/// An answer, its fields in this order.
#[derive(Serialize)]
struct Reply<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn reply(reply: Reply<'_>) -> String {
    // A struct of a bool, an option of a bool and an option of a string always encodes.
    serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false}"#.into())
}

fn failure(why: &str) -> String {
    reply(Reply { ok: false, paused: None, error: Some(why) })
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("--control {path}: {source}")]
pub struct ControlError {
    path: String,
    source: std::io::Error,
}

/// The control socket, bound and (once [`ControlSocket::serve`] runs) served on a thread
/// of its own. Dropping it removes the socket file; the thread ends with the process.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    _file: SocketFile,
    timeouts: Timeouts,
}

/// A client's time limit: [`LINE_TIMEOUT`] (shorter in tests).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    line: Duration,
}

impl ControlSocket {
    /// Binds `path` (a socket file left by an earlier run is replaced; one a process
    /// listens on, or any other file there, is an error), before the VM starts, so that
    /// a bad path fails first.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let error = |source| ControlError { path: path.display().to_string(), source };
        let (listener, file) = bind_socket(path).map_err(error)?;
        Ok(ControlSocket { listener, _file: file, timeouts: Timeouts { line: LINE_TIMEOUT } })
    }

    /// The same with another time limit on a line.
    #[cfg(test)]
    fn with_line_timeout(self, line: Duration) -> Self {
        ControlSocket { timeouts: Timeouts { line }, ..self }
    }

    /// Serves clients on a thread of its own until the process ends. (A host that
    /// cannot give it a thread gets a warning: the VM runs on without its control
    /// socket.)
    pub fn serve(self, controls: impl Controls) -> Self {
        let controls: Arc<dyn Controls> = Arc::new(controls);
        let timeouts = self.timeouts;
        let started = self.listener.try_clone().and_then(|listener| {
            std::thread::Builder::new().name("control".into()).spawn(move || accept(&listener, controls, timeouts))
        });
        if let Err(e) = started {
            log::warn!("--control: cannot serve the control socket: {e}");
        }
        self
    }
}

fn accept(listener: &UnixListener, controls: Arc<dyn Controls>, timeouts: Timeouts) {
    let serve = move |stream, presence| serve_client(&stream, &presence, &*controls, timeouts);
    let refuse = |mut stream: UnixStream| {
        let _ = writeln!(stream, "{}", failure("too many control clients"));
    };
    serve_clients(listener, Clients { what: "--control", thread: "control-client", max: MAX_CLIENTS, serve, refuse });
}

/// Answers `stream`'s lines until it closes, sends a line over [`MAX_LINE`] bytes, runs
/// out of time, stops reading or is closed between lines to make room for a newcomer
/// (told through `presence`).
fn serve_client(stream: &UnixStream, presence: &Presence, controls: &dyn Controls, timeouts: Timeouts) {
    // Cannot fail on a connected socket; if it did, writes would only wait longer.
    let _ = stream.set_write_timeout(Some(timeouts.line));
    let mut lines = Lines { stream, presence, timeouts, pending: Vec::new(), started: None };
    let mut writer = stream;
    loop {
        let reply = match lines.next() {
            // Not UTF-8 cannot be a command; nor can what follows it be trusted.
            Ok(line) => match String::from_utf8(line) {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => answer(controls, &line),
                Err(_) => return,
            },
            Err(LineEnd::TooLong) => {
                let _ = writeln!(writer, "{}", failure(&format!("a command is at most {MAX_LINE} bytes")));
                return linger(stream);
            }
            Err(LineEnd::TimedOut) => {
                let why = format!("a command is to arrive whole within {:?} of its first byte", timeouts.line);
                let _ = writeln!(writer, "{}", failure(&why));
                return linger(stream);
            }
            Err(LineEnd::Closed) => return,
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// A client's lines, read within its time limits.
struct Lines<'a> {
    stream: &'a UnixStream,
    /// Told when the client waits between lines and when a line starts.
    presence: &'a Presence,
    timeouts: Timeouts,
    /// Bytes read and not yet part of a line taken.
    pending: Vec<u8>,
    /// When the first byte of the line being read came.
    started: Option<Instant>,
}

/// Why a client has no more lines.
#[derive(Debug, PartialEq, Eq)]
enum LineEnd {
    /// It closed the connection (or it was closed for a newcomer), or it failed.
    Closed,
    /// Its line is over [`MAX_LINE`] bytes.
    TooLong,
    /// Its line was not whole [`Timeouts::line`] after its first byte.
    TimedOut,
}

impl Lines<'_> {
    /// The next line, its newline included (a last line may have none).
    fn next(&mut self) -> Result<Vec<u8>, LineEnd> {
        // A line that came with the last one has its time from now.
        self.started = (!self.pending.is_empty()).then(Instant::now);
        match self.started {
            None => self.presence.idle(),
            Some(_) => self.presence.busy(),
        }
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                if end + 1 > MAX_LINE {
                    return Err(LineEnd::TooLong);
                }
                return Ok(self.pending.drain(..=end).collect());
            }
            if self.pending.len() > MAX_LINE {
                return Err(LineEnd::TooLong);
            }
            // Between lines, no time limit.
            let timeout = match self.started {
                None => None,
                Some(started) => match self.timeouts.line.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(LineEnd::TimedOut),
                },
            };
            self.stream.set_read_timeout(timeout).map_err(|_| LineEnd::Closed)?;
            // One byte past the limit at most: a longer line is seen as such.
            let mut chunk = [0u8; 1024];
            let want = chunk.len().min(MAX_LINE + 1 - self.pending.len());
            let mut stream = self.stream;
            match stream.read(&mut chunk[..want]) {
                Ok(0) if self.pending.is_empty() => return Err(LineEnd::Closed),
                Ok(0) => return Ok(std::mem::take(&mut self.pending)),
                Ok(n) => {
                    if self.started.is_none() {
                        self.started = Some(Instant::now());
                        self.presence.busy();
                    }
                    self.pending.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(if self.started.is_some() { LineEnd::TimedOut } else { LineEnd::Closed });
                }
                Err(_) => return Err(LineEnd::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests;
