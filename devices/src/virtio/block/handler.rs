//! One virtio-blk queue on its [`Worker`](crate::virtio::worker::Worker): it takes the
//! driver's requests, serves them, and answers them.
//!
//! A request that arrives alone (nothing else in flight or waiting: queue depth 1) is
//! served right on the worker, with no hand-off. When more are waiting, the worker hands
//! them to the queue's I/O threads ([`Pool`]) and keeps taking and answering, and runs
//! one of those no thread has started yet rather than wait idle; so a disk that serves
//! many requests at once ([`SharedDisk`]) has up to [`super::IO_THREADS`] in flight per
//! queue, and answers go into the used ring in the order the requests finish. At most a
//! queue's size of requests are in flight (a driver that offers the same descriptors
//! again meanwhile waits). A disk that serves one at a time is served on the worker only.
//!
//! A reset (the worker asked to stop) starts nothing more and answers nothing more: it
//! waits for the requests in hand and drops the rest.
//!
//! Flushes: a flush is started only once every request taken before it from this queue
//! has finished, and no request after it is taken meanwhile; then the flush runs (later
//! requests may run beside it). So a flush covers every write the driver saw completed
//! before it submitted the flush, on this queue or any other (a write is answered only
//! after the disk call returned, and the flush calls the disk after that), and, beyond
//! what the spec asks, every write submitted before it on its own queue.
//!
//! While busy, the worker keeps watching the ring for a short adaptive window
//! ([`PollWindow`]) with notifications left off (EVENT_IDX: the avail event is not moved
//! on; otherwise NO_NOTIFY), so a driver with a stream of requests need not notify; it
//! turns notifications back on and looks once more before it sleeps.

use std::sync::Arc;
use std::time::Instant;

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::Registry;
use virtio_queue::{Queue, QueueT};

use super::disk::{Disk, SharedDisk};
use super::pool::{Job, Pool};
use super::request::{DiskInfo, Op, Plan, Request, Target, ID_LEN};
use crate::virtio::worker::{Handler, PollWindow, Wake};
use crate::virtio::{give_back, has_pending, next_chain, notify_driver, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-blk";
/// Bytes of data moved per call for a disk that cannot reach guest memory itself.
const BOUNCE_SIZE: usize = 256 * 1024;

/// The disk as a queue sees it.
pub(super) enum Backend {
    /// One request at a time, on the worker of the device's only queue; the bounce buffer
    /// is allocated when the queue first starts.
    Serial {
        /// The disk.
        disk: Box<dyn Disk>,
        /// The bounce buffer.
        bounce: Vec<u8>,
    },
    /// Any number at once, from any thread.
    Shared(Arc<dyn SharedDisk>),
}

/// A queue's handler: the disk and what it knows of it, kept across driver sessions, and
/// the session while the driver has the device started.
pub(super) struct QueueHandler {
    backend: Backend,
    info: DiskInfo,
    id: [u8; ID_LEN],
    /// Name and size of the I/O threads' pool.
    pool_name: String,
    io_threads: usize,
    window: PollWindow,
    /// When the worker last went to sleep (to grow the polling window after short sleeps).
    asleep_since: Option<Instant>,
    wake: Option<Wake>,
    session: Option<Session>,
}

/// What belongs to the driver while it has the queue started.
struct Session {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
    event_idx: bool,
    pool: Option<Pool>,
    /// Jobs to reuse; jobs come into being only while the number in flight grows.
    spare: Vec<Box<Job>>,
    /// Jobs the pool finished, being answered.
    finished: Vec<Box<Job>>,
    /// Jobs in the pool.
    in_flight: u16,
    /// A flush waiting for the requests taken before it.
    held_flush: Option<Box<Job>>,
    /// The worker's, once it runs: whether it is asked to stop.
    wake: Option<Wake>,
}

impl QueueHandler {
    /// A handler for a queue of the disk `backend`; `pool_name` and `io_threads` name and
    /// size its I/O threads (used with a shared disk).
    pub(super) fn new(
        backend: Backend,
        info: DiskInfo,
        id: [u8; ID_LEN],
        pool_name: String,
        io_threads: usize,
    ) -> Self {
        QueueHandler {
            backend,
            info,
            id,
            pool_name,
            io_threads,
            window: PollWindow::new(),
            asleep_since: None,
            wake: None,
            session: None,
        }
    }

    /// Takes the driver's queue for a session (before the worker starts).
    pub(super) fn attach(&mut self, memory: GuestMemory, queue: Queue, interrupt: Interrupt, event_idx: bool) {
        if let Backend::Serial { bounce, .. } = &mut self.backend {
            bounce.resize(BOUNCE_SIZE, 0);
        }
        let size = usize::from(queue.size());
        self.session = Some(Session {
            memory,
            queue,
            interrupt,
            event_idx,
            pool: None,
            spare: Vec::new(),
            finished: Vec::with_capacity(size),
            in_flight: 0,
            held_flush: None,
            wake: None,
        });
    }

    fn stopping(&self) -> bool {
        self.wake.as_ref().is_some_and(Wake::stopping)
    }

    /// Serves what there is to serve; true if there was anything.
    fn work(&mut self) -> bool {
        let Some(session) = self.session.as_mut() else { return false };
        let (info, id) = (&self.info, &self.id);
        match &mut self.backend {
            Backend::Serial { disk, bounce } => session.work(&mut Target::Serial(disk.as_mut(), bounce), info, id),
            Backend::Shared(disk) => session.work(&mut Target::Shared(disk.as_ref()), info, id),
        }
    }

    /// Before the worker sleeps: notifications back on, and one more look at the ring
    /// (a request made before they were on would otherwise wait for the next one).
    fn arm(&mut self) {
        self.asleep_since = Some(Instant::now());
        loop {
            let Some(session) = self.session.as_mut() else { return };
            let mem = session.memory.memory();
            if session.interrupt.needs_reset() || !session.can_take() {
                return;
            }
            match session.queue.enable_notification(mem) {
                Ok(true) => {
                    if !self.work() {
                        return;
                    }
                }
                Ok(false) => return,
                Err(e) => {
                    warn_ratelimited!("{NAME}: queue error: {e}");
                    return;
                }
            }
        }
    }

    /// Whether [`QueueHandler::work`] has something to do.
    fn has_work(&self) -> bool {
        self.session.as_ref().is_some_and(Session::has_work)
    }
}

impl Session {
    /// Whether another request may be taken now.
    fn can_take(&self) -> bool {
        self.held_flush.is_none() && self.in_flight < self.queue.size()
    }

    fn has_work(&self) -> bool {
        let memory = self.memory.memory();
        self.pool.as_ref().is_some_and(|pool| pool.has_finished() || pool.has_queued())
            || (self.held_flush.is_some() && self.in_flight == 0)
            || (self.can_take() && has_pending(NAME, &self.queue, memory, &self.interrupt))
    }

    /// Whether the worker is asked to stop: from then on nothing is started or answered
    /// (a reset waits for the work in hand, and the driver gets no answer after it).
    fn stopping(&self) -> bool {
        self.wake.as_ref().is_some_and(Wake::stopping)
    }

    /// Answers what the pool finished, starts a held flush whose turn came, and takes and
    /// serves what the driver made available; then interrupts the driver if it asked.
    /// True if it did anything.
    fn work(&mut self, target: &mut Target<'_>, info: &DiskInfo, id: &[u8; ID_LEN]) -> bool {
        let memory = self.memory.clone();
        let mem = memory.memory();
        let used_from = self.queue.next_used();
        let mut did = false;
        if let Some(pool) = &self.pool {
            pool.take_finished(&mut self.finished);
            let stopping = self.stopping();
            for job in self.finished.drain(..) {
                if !stopping {
                    answer(mem, &mut self.queue, &job.request, Some(job.op), job.status);
                }
                self.in_flight -= 1;
                self.spare.push(job);
                did = true;
            }
        }
        if self.in_flight == 0 {
            if let Some(flush) = self.held_flush.take() {
                self.dispatch(flush, target, mem);
                did = true;
            }
        }
        while self.can_take() && !self.stopping() && has_pending(NAME, &self.queue, mem, &self.interrupt) {
            let Some(chain) = next_chain(NAME, &mut self.queue, mem, &self.interrupt) else { break };
            let mut job = self.spare.pop().unwrap_or_else(Job::boxed);
            job.request.parse(mem, chain);
            did = true;
            match job.request.prepare(info, id) {
                Plan::Drop => {
                    give_back(NAME, &mut self.queue, mem, job.request.head(), 0);
                    self.spare.push(job);
                }
                Plan::Done(status) => {
                    answer(mem, &mut self.queue, &job.request, None, status);
                    self.spare.push(job);
                }
                Plan::Io(op) => {
                    job.op = op;
                    if op == Op::Flush && self.in_flight > 0 {
                        self.held_flush = Some(job);
                        break;
                    }
                    self.dispatch(job, target, mem);
                }
            }
        }
        // Rather than wait idle for the I/O threads, run one of the jobs none has started.
        if let Some(job) = self.pool.as_ref().filter(|_| !self.stopping()).and_then(Pool::steal) {
            self.in_flight -= 1;
            self.run_here(job, target, mem);
            did = true;
        }
        notify_driver(NAME, &mut self.queue, mem, &self.interrupt, used_from);
        did
    }

    /// Runs a job: on the pool when other requests are in flight or waiting, right here
    /// (and answered) when it is alone or there is no pool.
    fn dispatch(&mut self, mut job: Box<Job>, target: &mut Target<'_>, mem: &GuestMemoryMmap) {
        let alone = self.in_flight == 0 && !has_pending(NAME, &self.queue, mem, &self.interrupt);
        if let (Some(pool), false) = (self.pool.as_mut(), alone) {
            match pool.submit(job) {
                Ok(()) => {
                    self.in_flight += 1;
                    return;
                }
                Err(back) => job = back,
            }
        }
        self.run_here(job, target, mem);
    }

    /// Runs a job on the worker and answers it.
    fn run_here(&mut self, mut job: Box<Job>, target: &mut Target<'_>, mem: &GuestMemoryMmap) {
        job.status = job.request.run(job.op, target);
        if !self.stopping() {
            answer(mem, &mut self.queue, &job.request, Some(job.op), job.status);
        }
        self.spare.push(job);
    }
}

/// Writes a request's status and returns its chain to the driver.
fn answer(mem: &GuestMemoryMmap, queue: &mut Queue, request: &Request, op: Option<Op>, status: u8) {
    let len = request.finish(mem, op, status);
    give_back(NAME, queue, mem, request.head(), len);
}

impl Handler for QueueHandler {
    fn register(&mut self, _registry: &Registry) -> std::io::Result<()> {
        Ok(())
    }

    fn set_wake(&mut self, wake: Wake) {
        if let (Some(session), Backend::Shared(disk)) = (self.session.as_mut(), &self.backend) {
            let size = usize::from(session.queue.size());
            let (name, memory) = (self.pool_name.clone(), session.memory.clone());
            // The worker runs jobs too (those no I/O thread has started), so it counts.
            let threads = self.io_threads.saturating_sub(1).max(1);
            session.pool = Some(Pool::new(name, threads, size, Arc::clone(disk), memory, wake.clone()));
        }
        if let Some(session) = self.session.as_mut() {
            session.wake = Some(wake.clone());
        }
        self.wake = Some(wake);
    }

    fn notified(&mut self, _registry: &Registry, _queues: u32) {
        if let Some(slept) = self.asleep_since.take().map(|at| at.elapsed()) {
            self.window.slept(slept);
            if let Some(session) = self.session.as_mut().filter(|s| !s.event_idx) {
                // Without EVENT_IDX, NO_NOTIFY keeps the driver from notifying while we
                // are awake; `arm` clears it.
                if let Err(e) = session.queue.disable_notification(session.memory.memory()) {
                    warn_ratelimited!("{NAME}: queue error: {e}");
                }
            }
        }
        self.work();
    }

    fn ready(&mut self, _registry: &Registry, _event: &Event) {}

    fn deregister(&mut self, _registry: &Registry) {}

    fn detach(&mut self) {
        // Stops the I/O threads once their jobs in hand are done; nothing is answered.
        self.session = None;
        self.wake = None;
        self.asleep_since = None;
        if let Backend::Serial { bounce, .. } = &mut self.backend {
            *bounce = Vec::new();
        }
    }

    fn poll_window(&mut self) -> std::time::Duration {
        let window = self.window.window();
        if window.is_zero() {
            self.arm();
        }
        window
    }

    fn poll(&mut self, _registry: &Registry) -> bool {
        if self.stopping() {
            return false;
        }
        if !self.has_work() {
            if self.session.as_ref().is_some_and(|s| s.in_flight > 0) {
                // The I/O threads have work: let them have this CPU if they need it.
                std::thread::yield_now();
            }
            return false;
        }
        self.window.hit();
        self.work();
        true
    }

    fn poll_expired(&mut self) {
        self.window.miss();
        self.arm();
    }
}
