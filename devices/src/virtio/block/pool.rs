//! The I/O threads of one queue: requests the queue's worker hands out run here in
//! parallel, against a disk that serves many at once ([`SharedDisk`]), and come back to
//! the worker to be answered (only the worker touches the queue).
//!
//! Threads start when there is more work than idle threads, up to the pool's limit, and
//! sleep on a condition variable when there is none (no CPU while idle). Jobs travel as
//! boxes the worker recycles, through a deque and a vector sized for the queue once, so a
//! request costs no allocation. [`Pool::stop`] waits for the jobs in hand, never starts
//! the queued ones, and hands every job back unanswered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::disk::SharedDisk;
use super::request::{Op, Request, Target, S_IOERR};
use crate::virtio::worker::Wake;
use crate::virtio::GuestMemory;
use crate::warn_ratelimited;

/// Stack for an I/O thread: a job's request lives in its box, and the thread only calls
/// into the disk.
const STACK: usize = 256 << 10;

/// A request on its way through the pool.
#[derive(Debug)]
pub(super) struct Job {
    /// The request.
    pub(super) request: Request,
    /// Its disk work.
    pub(super) op: Op,
    /// The status the work earned.
    pub(super) status: u8,
}

impl Job {
    /// An empty job.
    pub(super) fn boxed() -> Box<Job> {
        Box::new(Job { request: Request::new(), op: Op::Flush, status: S_IOERR })
    }
}

struct State {
    /// Jobs no thread has taken yet.
    queued: VecDeque<Box<Job>>,
    /// Jobs done, for the worker.
    finished: Vec<Box<Job>>,
    /// Threads waiting for work.
    idle: usize,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    /// How many jobs `finished` holds, for a look without the lock.
    finished: AtomicUsize,
    /// How many jobs `queued` holds, likewise.
    queued: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::bus::lock(&self.state)
    }
}

/// The I/O threads of one queue (see the module).
pub(super) struct Pool {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    max: usize,
    name: String,
    disk: Arc<dyn SharedDisk>,
    memory: GuestMemory,
    wake: Wake,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).field("threads", &self.threads.len()).finish()
    }
}

impl Pool {
    /// A pool of at most `max` threads called `name`, for a queue of `capacity` entries
    /// (no more jobs are ever in it). Its threads keep `memory` mapped; `wake` tells the
    /// queue's worker that jobs are done.
    pub(super) fn new(
        name: String,
        max: usize,
        capacity: usize,
        disk: Arc<dyn SharedDisk>,
        memory: GuestMemory,
        wake: Wake,
    ) -> Self {
        let state = State {
            queued: VecDeque::with_capacity(capacity),
            finished: Vec::with_capacity(capacity),
            idle: 0,
            stop: false,
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            work: Condvar::new(),
            finished: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        });
        Pool { inner, threads: Vec::with_capacity(max), max, name, disk, memory, wake }
    }

    /// Hands `job` to a thread, starting one if every thread is busy and the pool may
    /// grow. Gives the job back when there is no thread to run it (none could be
    /// started): the caller runs it itself.
    pub(super) fn submit(&mut self, job: Box<Job>) -> Result<(), Box<Job>> {
        let mut state = self.inner.lock();
        state.queued.push_back(job);
        self.inner.queued.store(state.queued.len(), Ordering::Release);
        let (idle, short) = (state.idle > 0, state.queued.len() > state.idle);
        drop(state);
        if idle {
            // Only a waiting thread needs the wake-up (and its system call).
            self.inner.work.notify_one();
        }
        if short && self.threads.len() < self.max {
            if let Err(e) = self.spawn() {
                warn_ratelimited!("virtio-blk: cannot start an I/O thread: {e}");
                if self.threads.is_empty() {
                    if let Some(job) = self.steal() {
                        return Err(job);
                    }
                }
            }
        }
        Ok(())
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let (inner, disk, memory, wake) =
            (Arc::clone(&self.inner), Arc::clone(&self.disk), self.memory.clone(), self.wake.clone());
        let thread = std::thread::Builder::new().name(self.name.clone()).stack_size(STACK).spawn(move || {
            // The jobs' buffers are in this memory: keep it mapped while any runs here.
            let _memory = memory;
            serve(&inner, disk.as_ref(), &wake);
        })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Takes back a job no thread has started while every thread is busy, for the worker
    /// to run itself rather than wait idle.
    pub(super) fn steal(&self) -> Option<Box<Job>> {
        if self.inner.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut state = self.inner.lock();
        if state.idle > 0 {
            return None; // a thread is on its way to it
        }
        let job = state.queued.pop_back();
        self.inner.queued.store(state.queued.len(), Ordering::Release);
        job
    }

    /// Whether jobs are waiting for a thread.
    pub(super) fn has_queued(&self) -> bool {
        self.inner.queued.load(Ordering::Acquire) > 0
    }

    /// Whether jobs are done and waiting for [`Pool::take_finished`].
    pub(super) fn has_finished(&self) -> bool {
        self.inner.finished.load(Ordering::Acquire) > 0
    }

    /// Moves the jobs done into `into` (which should be empty, and is swapped with the
    /// pool's own list, so neither allocates).
    pub(super) fn take_finished(&self, into: &mut Vec<Box<Job>>) {
        if !self.has_finished() {
            return;
        }
        let mut state = self.inner.lock();
        if into.is_empty() {
            std::mem::swap(&mut state.finished, into);
        } else {
            into.append(&mut state.finished);
        }
        self.inner.finished.store(0, Ordering::Release);
    }

    /// Stops the threads once their jobs in hand are done, and hands back every job,
    /// done or never started, unanswered.
    pub(super) fn stop(&mut self) -> Vec<Box<Job>> {
        let mut state = self.inner.lock();
        state.stop = true;
        let mut back: Vec<Box<Job>> = state.queued.drain(..).collect();
        self.inner.queued.store(0, Ordering::Release);
        drop(state);
        self.inner.work.notify_all();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn_ratelimited!("virtio-blk: an I/O thread panicked");
            }
        }
        back.append(&mut self.inner.lock().finished);
        self.inner.finished.store(0, Ordering::Release);
        back
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An I/O thread: runs queued jobs until the pool stops.
fn serve(inner: &Inner, disk: &dyn SharedDisk, wake: &Wake) {
    let mut state = inner.lock();
    loop {
        if state.stop {
            return;
        }
        // Once the queue's worker is asked to stop, no job is started: a reset waits for
        // the jobs in hand only (`Pool::stop` wakes this thread to end it).
        let next = if wake.stopping() { None } else { state.queued.pop_front() };
        inner.queued.store(state.queued.len(), Ordering::Release);
        let Some(mut job) = next else {
            state.idle += 1;
            state = inner.work.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle -= 1;
            continue;
        };
        drop(state);
        job.status = job.request.run(job.op, &mut Target::Shared(disk));
        state = inner.lock();
        state.finished.push(job);
        inner.finished.fetch_add(1, Ordering::Release);
        drop(state);
        wake.wake();
        state = inner.lock();
    }
}
