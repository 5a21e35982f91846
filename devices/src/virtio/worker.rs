//! An event-loop thread for devices whose backends are file descriptors (console, net).
//!
//! The loop is `mio` (epoll on Linux, kqueue on macOS). A [`Worker`] owns a
//! [`Handler`]: the running device with its queues and backend. Queue notifications
//! from vCPU threads set a bit and wake the loop through a `mio::Waker`, so a vCPU never
//! does backend I/O. Stopping the worker hands the handler back, so the device can keep
//! its backend (an open tap, a connected socket) across a driver reset.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::event::Event;
use mio::{Events, Poll, Registry, Token, Waker};

use super::ActivateError;

/// The token of the waker; handlers use any other.
pub const WAKE: Token = Token(usize::MAX);
/// The bit of [`Handler::notified`]'s mask a [`Wake`] sets: not a queue, the backend.
pub const BACKEND: u32 = 1 << 31;

/// A running device, driven by a [`Worker`].
pub trait Handler: Send + 'static {
    /// Registers the backend's sources with the loop (any token but [`WAKE`]). Called on
    /// the activating thread, so it must not do I/O: the loop calls
    /// [`Handler::notified`] with every queue once it runs.
    fn register(&mut self, registry: &Registry) -> io::Result<()>;
    /// Hands the handler a [`Wake`] for backends that are not file descriptors the loop
    /// can watch (a thread that makes room in a buffer): it makes the loop call
    /// [`Handler::notified`] with [`BACKEND`] set. Called before [`Handler::register`].
    fn set_wake(&mut self, wake: Wake) {
        let _ = wake;
    }
    /// The driver notified the queues whose bits are set in `queues`.
    fn notified(&mut self, registry: &Registry, queues: u32);
    /// A registered source is ready.
    fn ready(&mut self, registry: &Registry, event: &Event);
    /// Removes the backend's sources from the loop before the handler is handed back.
    fn deregister(&mut self, registry: &Registry);
    /// Drops what belonged to the driver (queues, memory, frames in flight) and keeps the
    /// backend, for the next start.
    fn detach(&mut self);
    /// How long the loop may sleep before [`Handler::timeout`] is due (`None`: forever).
    fn next_timeout(&self) -> Option<Duration> {
        None
    }
    /// A deadline asked for by [`Handler::next_timeout`] passed.
    fn timeout(&mut self, registry: &Registry) {
        let _ = registry;
    }
}

struct Shared {
    waker: Waker,
    notified: AtomicU32,
    stop: AtomicBool,
}

/// Wakes a worker's loop from any thread, as if its backend were ready (see
/// [`Handler::set_wake`]).
#[derive(Clone)]
pub struct Wake {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake").finish_non_exhaustive()
    }
}

impl Wake {
    /// Makes the loop call [`Handler::notified`] with [`BACKEND`] soon.
    pub fn wake(&self) {
        self.shared.notified.fetch_or(BACKEND, Ordering::SeqCst);
        // A loop that has ended cannot be woken and needs not be.
        let _ = self.shared.waker.wake();
    }
}

/// A handler running on its own thread.
pub struct Worker<H: Handler> {
    shared: Arc<Shared>,
    thread: JoinHandle<Option<H>>,
}

impl<H: Handler> std::fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl<H: Handler> Worker<H> {
    /// Starts `handler` on a thread called `name`. On failure the handler is returned
    /// with the error, so its backend is not lost.
    pub fn spawn(name: &str, mut handler: H) -> Result<Self, (H, io::Error)> {
        let setup = Poll::new().and_then(|poll| {
            let waker = Waker::new(poll.registry(), WAKE)?;
            Ok((poll, waker))
        });
        let (poll, waker) = match setup {
            Ok(pair) => pair,
            Err(e) => return Err((handler, e)),
        };
        let shared = Arc::new(Shared { waker, notified: AtomicU32::new(0), stop: AtomicBool::new(false) });
        handler.set_wake(Wake { shared: Arc::clone(&shared) });
        if let Err(e) = handler.register(poll.registry()) {
            handler.deregister(poll.registry());
            return Err((handler, e));
        }
        let inner = Arc::clone(&shared);
        // The handler goes to the thread once it exists, so a failed spawn hands it back.
        let (give, take) = std::sync::mpsc::sync_channel::<(H, Poll)>(1);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            let (mut handler, mut poll) = take.recv().ok()?;
            run(&mut handler, &mut poll, &inner);
            handler.deregister(poll.registry());
            Some(handler)
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                handler.deregister(poll.registry());
                return Err((handler, e));
            }
        };
        if let Err(std::sync::mpsc::SendError((mut handler, poll))) = give.send((handler, poll)) {
            handler.deregister(poll.registry());
            return Err((handler, io::Error::other("the device thread ended at once")));
        }
        let worker = Worker { shared, thread };
        // Whatever the driver queued before DRIVER_OK, and input already waiting, is
        // served on the device's thread.
        worker.shared.notified.store(u32::MAX, Ordering::SeqCst);
        worker.wake();
        Ok(worker)
    }

    /// Tells the loop the driver notified queue `index` (0..32).
    pub fn notify(&self, index: u16) {
        if let Some(bit) = 1u32.checked_shl(u32::from(index)) {
            self.shared.notified.fetch_or(bit, Ordering::SeqCst);
            self.wake();
        }
    }

    fn wake(&self) {
        if let Err(e) = self.shared.waker.wake() {
            crate::warn_ratelimited!("device event loop: cannot wake it: {e}");
        }
    }

    /// Stops the loop and hands the handler back (`None` if the thread panicked).
    pub fn stop(self) -> Option<H> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
        self.thread.join().ok().flatten()
    }
}

/// A device's handler: idle between driver sessions, keeping its backend, or running on
/// a [`Worker`] while the driver has the device started.
pub struct Slot<H: Handler> {
    name: &'static str,
    idle: Option<H>,
    running: Option<Worker<H>>,
}

impl<H: Handler> std::fmt::Debug for Slot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("name", &self.name).field("running", &self.running.is_some()).finish()
    }
}

impl<H: Handler> Slot<H> {
    /// An idle slot; `name` names the device and its thread.
    pub fn new(name: &'static str, handler: H) -> Self {
        Slot { name, idle: Some(handler), running: None }
    }

    /// Runs the idle handler on a new worker, once `attach` has handed it the driver's
    /// queues; on any failure the handler stays idle with its backend.
    pub fn start(&mut self, attach: impl FnOnce(&mut H) -> io::Result<()>) -> Result<(), ActivateError> {
        let name = self.name;
        let mut handler =
            self.idle.take().ok_or_else(|| ActivateError::Backend(format!("{name}: the backend is gone")))?;
        if let Err(e) = attach(&mut handler) {
            handler.detach();
            self.idle = Some(handler);
            return Err(ActivateError::Backend(format!("{name}: {e}")));
        }
        match Worker::spawn(name, handler) {
            Ok(worker) => {
                self.running = Some(worker);
                Ok(())
            }
            Err((mut handler, e)) => {
                handler.detach();
                self.idle = Some(handler);
                Err(ActivateError::Backend(format!("{name}: cannot start the device thread: {e}")))
            }
        }
    }

    /// Passes a queue notification to the running worker.
    pub fn notify(&self, index: u16) {
        if let Some(worker) = &self.running {
            worker.notify(index);
        }
    }

    /// Stops the worker, if any, and keeps the handler idle.
    pub fn stop(&mut self) {
        if let Some(worker) = self.running.take() {
            match worker.stop() {
                Some(mut handler) => {
                    handler.detach();
                    self.idle = Some(handler);
                }
                None => crate::warn_ratelimited!("{}: the device thread panicked; the backend is gone", self.name),
            }
        }
    }
}

impl<H: Handler> Drop for Slot<H> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<H: Handler>(handler: &mut H, poll: &mut Poll, shared: &Shared) {
    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, handler.next_timeout()) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("device event loop failed, the device stops: {e}");
                return;
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if events.is_empty() {
            handler.timeout(poll.registry());
        }
        for event in events.iter() {
            if event.token() != WAKE {
                handler.ready(poll.registry(), event);
            }
        }
        let queues = shared.notified.swap(0, Ordering::SeqCst);
        if queues != 0 {
            handler.notified(poll.registry(), queues);
        }
    }
}
