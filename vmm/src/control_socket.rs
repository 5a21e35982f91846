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
//! [`MAX_LINE`] bytes ends the client's connection; at most [`MAX_CLIENTS`] clients are
//! served at once (more wait in the listen queue). The socket file is removed when the
//! server is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backends::{bind_socket, serve_clients, Clients, SocketFile};
use crate::embed::VmHandle;

/// The longest command line read, its newline included.
pub const MAX_LINE: usize = 4096;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;

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
}

impl ControlSocket {
    /// Binds `path` (a socket file left by an earlier run is replaced; one a process
    /// listens on, or any other file there, is an error), before the VM starts, so that
    /// a bad path fails first.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let error = |source| ControlError { path: path.display().to_string(), source };
        let (listener, file) = bind_socket(path).map_err(error)?;
        Ok(ControlSocket { listener, _file: file })
    }

    /// Serves clients on a thread of its own until the process ends. (A host that
    /// cannot give it a thread gets a warning: the VM runs on without its control
    /// socket.)
    pub fn serve(self, controls: impl Controls) -> Self {
        let controls: Arc<dyn Controls> = Arc::new(controls);
        let started = self.listener.try_clone().and_then(|listener| {
            std::thread::Builder::new().name("control".into()).spawn(move || accept(&listener, controls))
        });
        if let Err(e) = started {
            log::warn!("--control: cannot serve the control socket: {e}");
        }
        self
    }
}

fn accept(listener: &UnixListener, controls: Arc<dyn Controls>) {
    let serve = move |stream| serve_client(stream, &*controls);
    let refuse = |mut stream: UnixStream| {
        let _ = writeln!(stream, "{}", failure("too many control clients"));
    };
    serve_clients(listener, Clients { what: "--control", thread: "control-client", max: MAX_CLIENTS, serve, refuse });
}

/// Answers `stream`'s lines until it closes, sends a line over [`MAX_LINE`] bytes or
/// stops reading.
fn serve_client(stream: UnixStream, controls: &dyn Controls) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        // One byte more than the limit: a longer line is seen as such.
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let _ = writeln!(writer, "{}", failure(&format!("a command is at most {MAX_LINE} bytes")));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        if writeln!(writer, "{}", answer(controls, &line)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
