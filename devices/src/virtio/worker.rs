//! An event-loop thread per running device (console, net) or queue (block).
//!
//! The loop is `mio` (epoll on Linux, kqueue on macOS). A [`Worker`] owns a
//! [`Handler`]: the running device with its queues and backend. Queue notifications
//! from vCPU threads set a bit and wake the loop through a `mio::Waker`, so a vCPU never
//! does backend I/O; the waker is written only while the loop sleeps, so a notification
//! while it works or polls costs an atomic or and a load. Stopping the worker hands the
//! handler back, so the device can keep its backend (an open tap, a connected socket, a
//! disk) across a driver reset.
//!
//! A handler may ask the loop to poll before it sleeps ([`Handler::poll_window`]): the
//! loop then spins on [`Handler::poll`] for that long, watching for a stop, so a busy
//! device catches the driver's next request without a thread wake-up (and, with
//! EVENT_IDX, without the driver notifying at all). [`PollWindow`] is the adaptive policy
//! that keeps an idle device from spinning. The spin yields the CPU every few polls, and
//! a handler with host sockets ([`Handler::polls_sources`]) has them looked at in it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use super::notifier::QueueNotifier;
use super::ActivateError;

/// The token of the waker.
pub const WAKE: Token = Token(usize::MAX);
/// Tokens from here up to [`WAKE`] are the queue notifiers' ([`Slot::watch`]); handlers
/// use tokens below.
pub const NOTIFIERS: usize = usize::MAX - 64;
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
    /// How long the loop should keep calling [`Handler::poll`] before it sleeps, asked
    /// after every round of work and after every poll that found some. Zero (the
    /// default) sleeps at once.
    fn poll_window(&mut self) -> Duration {
        Duration::ZERO
    }
    /// Looks for work without waiting and does it; true when there was some. The loop
    /// calls it in a spin during [`Handler::poll_window`], and stops spinning when the
    /// worker is asked to stop.
    fn poll(&mut self, registry: &Registry) -> bool {
        let _ = registry;
        false
    }
    /// A window from [`Handler::poll_window`] passed with nothing found: the loop sleeps.
    fn poll_expired(&mut self) {}
    /// True when the backend's own sources (host sockets) may become ready while the
    /// loop spins and the spin should look at them too, without sleeping, every few
    /// polls; otherwise a socket that turns readable or writable waits for the window
    /// to end.
    fn polls_sources(&self) -> bool {
        false
    }
}

struct Shared {
    waker: Waker,
    /// The queue (and [`BACKEND`]) bits notified since the loop last looked, and
    /// [`SLEEPING`]. One word, so a notifier's `fetch_or` and the loop's own `fetch_or` of
    /// [`SLEEPING`] are ordered by the word's coherence alone: either the loop sees the
    /// notifier's bit before it sleeps, or the notifier sees that the loop sleeps and
    /// writes the waker. (Two separate flags in the Dekker pattern also work on real
    /// arm64, where a `SeqCst` store and load are STLR and LDAR, but not under QEMU's
    /// user-mode emulation on an x86 host, which lets the store pass the load: a
    /// notification was lost there once in 17,000 rounds.)
    state: AtomicU64,
    stop: AtomicBool,
}

/// [`Shared::state`]'s bit for a loop that is (about to be) asleep in `mio::Poll::poll`:
/// only then does a notification need the waker.
const SLEEPING: u64 = 1 << 32;

impl Shared {
    /// Sets `bits` and wakes the loop if it sleeps (or is about to).
    fn notify(&self, bits: u32) {
        if self.state.fetch_or(u64::from(bits), Ordering::SeqCst) & SLEEPING != 0 {
            self.wake_now();
        }
    }

    fn wake_now(&self) {
        if let Err(e) = self.waker.wake() {
            crate::warn_ratelimited!("device event loop: cannot wake it: {e}");
        }
    }
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
        self.shared.notify(BACKEND);
    }

    /// Whether the worker is asked to stop: a handler in the middle of a long batch
    /// stops taking work (a reset waits for the work in hand, not for all that is queued).
    pub fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }
}

/// Queue notifiers a worker watches, each with the bit of [`Handler::notified`]'s mask
/// its notifications set.
pub type Notifiers = Arc<Vec<(u32, QueueNotifier)>>;

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
    /// Starts `handler` on a thread called `name`, watching `notifiers` besides the
    /// handler's own sources. On failure the handler is returned with the error, so its
    /// backend is not lost.
    pub fn spawn(name: &str, mut handler: H, notifiers: Notifiers) -> Result<Self, (H, io::Error)> {
        let setup = Poll::new().and_then(|poll| {
            let waker = Waker::new(poll.registry(), WAKE)?;
            Ok((poll, waker))
        });
        let (poll, waker) = match setup {
            Ok(pair) => pair,
            Err(e) => return Err((handler, e)),
        };
        let shared = Arc::new(Shared { waker, state: AtomicU64::new(0), stop: AtomicBool::new(false) });
        handler.set_wake(Wake { shared: Arc::clone(&shared) });
        if let Err(e) = watch(poll.registry(), &notifiers).and_then(|()| handler.register(poll.registry())) {
            handler.deregister(poll.registry());
            return Err((handler, e));
        }
        let inner = Arc::clone(&shared);
        // The handler goes to the thread once it exists, so a failed spawn hands it back.
        let (give, take) = std::sync::mpsc::sync_channel::<(H, Poll)>(1);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            let (mut handler, mut poll) = take.recv().ok()?;
            run(&mut handler, &mut poll, &inner, &notifiers);
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
        worker.shared.notify(u32::MAX);
        Ok(worker)
    }

    /// Tells the loop the driver notified queue `index` (0..32).
    pub fn notify(&self, index: u16) {
        if let Some(bit) = 1u32.checked_shl(u32::from(index)) {
            self.shared.notify(bit);
        }
    }

    /// Stops the loop and hands the handler back (`None` if the thread panicked).
    pub fn stop(self) -> Option<H> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_now();
        self.thread.join().ok().flatten()
    }
}

/// A device's handler: idle between driver sessions, keeping its backend, or running on
/// a [`Worker`] while the driver has the device started.
pub struct Slot<H: Handler> {
    name: String,
    idle: Option<H>,
    running: Option<Worker<H>>,
    notifiers: Notifiers,
}

impl<H: Handler> std::fmt::Debug for Slot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("name", &self.name).field("running", &self.running.is_some()).finish()
    }
}

impl<H: Handler> Slot<H> {
    /// An idle slot; `name` names the device and its thread (at most 15 bytes show in
    /// a Linux thread name).
    pub fn new(name: impl Into<String>, handler: H) -> Self {
        Slot { name: name.into(), idle: Some(handler), running: None, notifiers: Arc::default() }
    }

    /// Has every worker of this slot watch `notifier`, whose notifications reach the
    /// handler as bit `bit` of [`Handler::notified`] (as [`Slot::notify`] with `bit`
    /// does). For notifiers the machine makes before the device starts: false, and the
    /// notifier dropped, while a worker runs, for a bit past 31, or past 64 notifiers.
    pub fn watch(&mut self, bit: u16, notifier: QueueNotifier) -> bool {
        let Some(notifiers) = Arc::get_mut(&mut self.notifiers) else { return false };
        if u32::from(bit) >= u32::BITS || notifiers.len() >= WAKE.0 - NOTIFIERS {
            return false;
        }
        notifiers.push((1 << bit, notifier));
        true
    }

    /// Runs the idle handler on a new worker, once `attach` has handed it the driver's
    /// queues; on any failure the handler stays idle with its backend.
    pub fn start(&mut self, attach: impl FnOnce(&mut H) -> io::Result<()>) -> Result<(), ActivateError> {
        let name = self.name.as_str();
        let mut handler =
            self.idle.take().ok_or_else(|| ActivateError::Backend(format!("{name}: the backend is gone")))?;
        if let Err(e) = attach(&mut handler) {
            handler.detach();
            self.idle = Some(handler);
            return Err(ActivateError::Backend(format!("{name}: {e}")));
        }
        match Worker::spawn(name, handler, Arc::clone(&self.notifiers)) {
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

    /// [`Slot::watch`]es each notifier with its own queue's bit (a device whose worker
    /// serves all its queues).
    pub fn watch_all(&mut self, notifiers: Vec<QueueNotifier>) {
        for notifier in notifiers {
            let queue = notifier.queue();
            if !self.watch(queue, notifier) {
                crate::warn_ratelimited!("{}: queue {queue}'s notifier cannot be watched", self.name);
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

/// Registers the notifiers with the loop.
fn watch(registry: &Registry, notifiers: &[(u32, QueueNotifier)]) -> io::Result<()> {
    for (i, (_, notifier)) in notifiers.iter().enumerate() {
        let fd = notifier.as_fd().as_raw_fd();
        registry.register(&mut SourceFd(&fd), Token(NOTIFIERS + i), Interest::READABLE)?;
    }
    Ok(())
}

/// The queue bits of the notifiers among `events` that were signalled.
fn notified_by(events: &Events, notifiers: &[(u32, QueueNotifier)]) -> u32 {
    let mut queues = 0;
    for event in events.iter() {
        let Some((bit, notifier)) = event.token().0.checked_sub(NOTIFIERS).and_then(|i| notifiers.get(i)) else {
            continue;
        };
        if notifier.take() {
            queues |= bit;
        }
    }
    queues
}

fn run<H: Handler>(handler: &mut H, poll: &mut Poll, shared: &Shared, notifiers: &[(u32, QueueNotifier)]) {
    let mut events = Events::with_capacity(64);
    // A spin ended by its budget with work still coming: the loop looks at its event
    // sources without sleeping and polls again. It must not sleep: the handler has not
    // turned its notifications back on (`poll_expired`, `poll_window` of zero), so the
    // driver may not notify for what it queues next.
    let mut busy = false;
    loop {
        // From here on a notification writes the waker; one made before is seen here.
        // (A busy loop does not sleep, so it does not say it does: notifiers then leave
        // the waker alone.)
        let pending =
            busy || shared.state.fetch_or(SLEEPING, Ordering::SeqCst) != 0 || shared.stop.load(Ordering::SeqCst);
        let timeout = if pending { Some(Duration::ZERO) } else { handler.next_timeout() };
        let polled = poll.poll(&mut events, timeout);
        shared.state.fetch_and(!SLEEPING, Ordering::SeqCst);
        if let Err(e) = polled {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("device event loop failed, the device stops: {e}");
                return;
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if events.is_empty() && !pending {
            handler.timeout(poll.registry());
        }
        dispatch(handler, poll.registry(), &events, shared, notifiers);
        busy = match spin(handler, poll, &mut events, shared, notifiers) {
            Spin::Stop => return,
            Spin::Idle => false,
            Spin::Budget => true,
        };
    }
}

/// Hands the handler the sources that are ready and the queues notified.
fn dispatch<H: Handler>(
    handler: &mut H,
    registry: &Registry,
    events: &Events,
    shared: &Shared,
    notifiers: &[(u32, QueueNotifier)],
) {
    for event in events.iter() {
        if event.token().0 < NOTIFIERS {
            handler.ready(registry, event);
        }
    }
    // Truncation keeps the queue bits: SLEEPING is clear here (only this loop sets it).
    let queues = shared.state.swap(0, Ordering::SeqCst) as u32 | notified_by(events, notifiers);
    if queues != 0 {
        handler.notified(registry, queues);
    }
}

/// How a spin ended.
enum Spin {
    /// The worker is asked to stop.
    Stop,
    /// The handler's window passed with nothing found (or it asked for none): it may sleep.
    Idle,
    /// Polls kept finding work for [`SPIN_BUDGET`]: look at the event sources, then poll on.
    Budget,
}

/// The longest one spin of [`Handler::poll`] calls lasts while it keeps finding work,
/// before the loop looks at its event sources again.
const SPIN_BUDGET: Duration = Duration::from_millis(1);

/// Calls [`Handler::poll`] in a spin for as long as the handler's
/// [`Handler::poll_window`] says.
/// Notifications that arrive while it spins stay set (the waker is not written, the loop
/// is awake): the handler's poll sees their work in its queues, and the loop passes the
/// bits on before it sleeps. A spin that keeps finding work ends after [`SPIN_BUDGET`],
/// so the loop still looks at the device's other event sources (a socket's readiness,
/// a deadline) while the driver keeps it busy. A handler that
/// [`Handler::polls_sources`] has them looked at, without sleeping, every few polls.
fn spin<H: Handler>(
    handler: &mut H,
    poll: &mut Poll,
    events: &mut Events,
    shared: &Shared,
    notifiers: &[(u32, QueueNotifier)],
) -> Spin {
    let started = Instant::now();
    let mut window = handler.poll_window();
    while !window.is_zero() {
        let now = Instant::now();
        if now.duration_since(started) >= SPIN_BUDGET {
            return Spin::Budget;
        }
        let until = now + window;
        // The clock is read every few polls: it costs more than a poll that finds nothing.
        for spins in 1u32.. {
            if shared.stop.load(Ordering::SeqCst) {
                return Spin::Stop;
            }
            if handler.poll(poll.registry()) {
                break;
            }
            if spins % 8 == 0 {
                if handler.polls_sources() && ready_now(poll, events) {
                    dispatch(handler, poll.registry(), events, shared, notifiers);
                    break;
                }
                if Instant::now() >= until {
                    handler.poll_expired();
                    return Spin::Idle;
                }
                // A thread waiting for the CPU (the driver's, or the host peer's on a
                // host with fewer cores than busy threads) gets it now and then, rather
                // than at the end of the window: the vsock rows of `cargo xtask bench`
                // went from 22-30 to 16 µs per 64 KiB guest-to-host on the 2-core
                // machine of docs/BENCHMARKS.md (no other row lost). With a core free,
                // the yield returns at once.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        window = handler.poll_window();
    }
    Spin::Idle
}

/// Looks at the loop's sources without waiting; true when some are ready (in `events`).
fn ready_now(poll: &mut Poll, events: &mut Events) -> bool {
    match poll.poll(events, Some(Duration::ZERO)) {
        Ok(()) => !events.is_empty(),
        Err(_) => false,
    }
}

/// How long a device keeps polling its queues after it runs dry before it sleeps, adapted
/// to what polling earns (QEMU's adaptive polling, in spirit): a driver whose next
/// request comes within the window is served without a thread wake-up, while an idle or
/// slow device stops polling after a few misses and costs no CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    window: Duration,
    /// When the device last went to sleep (see [`PollWindow::asleep`]).
    asleep_since: Option<Instant>,
}

impl PollWindow {
    /// The longest window (QEMU's iothreads poll up to 32 µs by default).
    pub const MAX: Duration = Duration::from_micros(50);
    /// The window a hit grows from when it was 0.
    const START: Duration = Duration::from_micros(4);
    /// Below this a window shrinks to nothing.
    const MIN: Duration = Duration::from_micros(2);

    /// Polling off until requests show they come close together.
    pub const fn new() -> Self {
        PollWindow { window: Duration::ZERO, asleep_since: None }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn grow(&mut self) {
        self.window = (self.window * 2).max(Self::START).min(Self::MAX);
    }

    /// Work came while polling: keep polling, a little longer.
    pub fn hit(&mut self) {
        self.grow();
    }

    /// The window passed with nothing: poll half as long next time.
    pub fn miss(&mut self) {
        self.window /= 2;
        if self.window < Self::MIN {
            self.window = Duration::ZERO;
        }
    }

    /// The device slept for `slept` before the next work came: had it polled that long,
    /// it would have caught it, so a short sleep grows the window.
    pub fn slept(&mut self, slept: Duration) {
        if slept <= Self::MAX {
            self.grow();
        }
    }

    /// A handler's [`Handler::poll_window`]: the window now for a device that is
    /// running (none for one that is not); a zero window means it goes to sleep.
    pub fn next(&mut self, running: bool) -> Duration {
        let window = if running { self.window } else { Duration::ZERO };
        if window.is_zero() {
            self.asleep();
        }
        window
    }

    /// A handler's [`Handler::poll_expired`]: the window passed with nothing found, so
    /// the next is half as long, and the device goes to sleep.
    pub fn expired(&mut self) {
        self.miss();
        self.asleep();
    }

    /// The device stops polling and goes to sleep now (its window is zero or passed).
    pub fn asleep(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// The device was notified: if it had gone to sleep, the time it slept counts as in
    /// [`PollWindow::slept`]. True if it had.
    pub fn woke(&mut self) -> bool {
        let Some(at) = self.asleep_since.take() else { return false };
        self.slept(at.elapsed());
        true
    }
}

impl Default for PollWindow {
    fn default() -> Self {
        PollWindow::new()
    }
}

#[cfg(test)]
mod tests;
