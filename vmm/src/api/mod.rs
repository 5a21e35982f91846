//! Firecracker's REST API (`hvrun --api-sock PATH`): the same paths, methods, JSON
//! objects and status codes, over HTTP/1.1 on a unix socket, so that tools written for
//! Firecracker (its SDKs, orchestrators, `curl --unix-socket`) drive hvrun.
//!
//! - [`http`]: requests off a connection, responses onto it (`httparse`, with limits).
//! - [`model`]: Firecracker's JSON objects.
//! - [`setup`]: the configuration put before the VM starts, turned into a [`crate::VmConfig`].
//! - [`router`]: what each path and method does, in which phase ([`router::Api`]).
//!
//! Threads: one accepts connections; each connection (at most [`MAX_CLIENTS`] at once:
//! one more takes the place of the one idle longest, see [`http`]) has a thread that reads its requests
//! and hands them to one dispatcher thread, which owns the [`router::Api`] and answers
//! them one at a time, in arrival order, as Firecracker does. The VM is started and driven through [`router::Host`] and
//! [`router::Running`] (the CLI's are [`crate::VmHandle`] and a host that hands the VM
//! to the main thread), so the API is a thin layer like the CLI.

#[cfg(test)]
mod contract;
pub mod http;
pub mod model;
pub mod router;
pub mod setup;
pub mod sink;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};

use self::http::{Connection, ConnectionEnd, Limits, Request, Response};
use self::router::Api;
pub use crate::backends::SocketId;
use crate::backends::{bind_socket, linger, serve_clients, Clients, Presence, SocketFile};

impl router::Running for crate::VmHandle {
    fn pause(&self) -> Result<(), String> {
        crate::VmHandle::pause(self).map_err(|e| e.to_string())
    }

    fn resume(&self) {
        crate::VmHandle::resume(self);
    }

    fn paused(&self) -> bool {
        self.is_paused()
    }

    fn ctrl_alt_del(&self) -> bool {
        self.request_shutdown()
    }

    fn snapshot(&self, files: &crate::snapshot::machine::SnapshotFiles) -> Result<(), String> {
        self.snapshot_files(files).map_err(|e| e.to_string())
    }

    fn balloon(&self) -> Option<devices::virtio::balloon::BalloonHandle> {
        crate::VmHandle::balloon(self)
    }

    fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), String> {
        crate::VmHandle::replace_disk(self, id, path).map_err(|e| e.to_string())
    }

    fn metrics(&self) -> serde_json::Value {
        crate::VmHandle::metrics(self)
    }
}

/// Connections served at once. One more takes the place of the connection idle
/// longest (waiting for a request, nothing of it read yet), which is closed; if none is
/// idle, it gets 503 and is closed.
pub const MAX_CLIENTS: usize = 16;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("--api-sock {path}: {source}")]
pub struct ApiError {
    path: String,
    source: std::io::Error,
}

/// The API socket, bound; [`ApiServer::serve`] serves it. Dropping it removes the
/// socket file.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    file: SocketFile,
}

/// A request on its way to the dispatcher, with where its response goes.
type Job = (Request, Sender<Response>);

impl ApiServer {
    /// Binds `path` (a socket left by an earlier run is replaced; one a process listens
    /// on, another hvrun's, or any other file there is an error), before anything else,
    /// so that a bad path fails first.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let error = |source| ApiError { path: path.display().to_string(), source };
        let (listener, file) = bind_socket(path).map_err(error)?;
        Ok(ApiServer { listener, file })
    }

    /// The socket file, for removing it where the server is not dropped (before
    /// `std::process::exit`).
    pub fn socket_id(&self) -> SocketId {
        self.file.id()
    }

    /// Serves `api` on threads of its own until the process ends, taking bodies up to
    /// `limits`. Returns self (keep it: dropping it removes the socket file).
    pub fn serve(self, api: Api, limits: Limits) -> std::io::Result<Self> {
        let (jobs, queue) = channel::<Job>();
        std::thread::Builder::new().name("api".into()).spawn(move || dispatch(api, &queue))?;
        let listener = self.listener.try_clone()?;
        std::thread::Builder::new().name("api-accept".into()).spawn(move || accept(&listener, jobs, limits))?;
        Ok(self)
    }
}

/// Answers requests one at a time, in arrival order.
fn dispatch(mut api: Api, queue: &Receiver<Job>) {
    loop {
        // Between requests, the periodic metrics line.
        let job = match api.next_tick() {
            Some(wait) => match queue.recv_timeout(wait) {
                Ok(job) => job,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    api.tick();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let (request, reply) = job;
        log::info!("api: {} {}", request.method, request.path);
        let response = api.handle(&request);
        if response.status >= 400 {
            log::info!("api: {} {}: {}", request.method, request.path, response.body.as_deref().unwrap_or(""));
        }
        let _ = reply.send(response);
    }
}

fn accept(listener: &UnixListener, jobs: Sender<Job>, limits: Limits) {
    let serve = move |stream, presence| serve_client(stream, presence, &jobs, limits);
    serve_clients(
        listener,
        Clients { what: "api", thread: "api-client", max: MAX_CLIENTS, serve, refuse: refuse_busy },
    );
}

/// Tells a client past [`MAX_CLIENTS`] to come back later. What it sent is read first
/// (for at most 100 ms): a socket closed with unread data resets the connection, and
/// the client would see that instead of the answer.
fn refuse_busy(mut stream: UnixStream) {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = stream.read(&mut [0u8; http::MAX_HEAD]);
    Connection::new(stream, Limits::default()).refuse(&Response::fault(503, "Too many API connections."));
}

/// Serves one connection until the client closes it, sends what ends it, runs out of
/// time ([`Limits::request_timeout`]) or is closed between requests to make room for
/// a newcomer.
fn serve_client(stream: UnixStream, presence: Presence, jobs: &Sender<Job>, limits: Limits) {
    let mut connection = Connection::new(stream, limits).watched(presence);
    loop {
        let request = match connection.next_request() {
            Ok(request) => request,
            Err(ConnectionEnd::Closed) => return,
            Err(ConnectionEnd::Refused(response)) => {
                connection.refuse(&response);
                return linger(&connection.into_inner());
            }
        };
        let (reply, response) = channel();
        if jobs.send((request, reply)).is_err() {
            return connection.refuse(&Response::fault(503, "The API is shutting down."));
        }
        let response = response.recv().unwrap_or_else(|_| Response::fault(500, "The request was not answered."));
        if !connection.respond(&response) {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
