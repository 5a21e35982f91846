//! The threads that serve one queue: its worker and, for a disk that serves many requests
//! at once ([`SharedDisk`](super::disk::SharedDisk)), up to [`super::IO_THREADS`]` - 1` helpers. Each of them takes a
//! request from the ring, serves it and answers it itself, so a request passes from one
//! thread to another only when the driver makes it available; and each thread that takes
//! a request while more are waiting calls a helper for the next (a sleeping one, or a new
//! one while there are fewer than the limit). Helpers sleep when the ring is empty (no CPU
//! while idle) and are stopped with the session.
//!
//! The queue is behind a lock because these threads share it: each holds it to take a
//! chain or to give one back (a few hundred nanoseconds, never across disk I/O). Handing
//! every answer back to one thread instead would cost a thread wake-up per request.
//!
//! At most [`super::IO_THREADS`] requests of a queue are in flight, one per thread, and a
//! request lives in its thread's [`Request`] (inline, reused): nothing is allocated per
//! request, whatever the driver offers.
//!
//! Flushes: a thread that takes a flush shuts the ring (nobody takes another request),
//! waits until every request taken before it (or alongside it) has been answered, but
//! for other flushes, which wait alike; then it opens the ring and runs the flush (later
//! requests may run beside it). So a flush covers every write the driver saw completed
//! before it submitted the flush, on this queue or another (a write is answered only
//! after its disk call returned, and the flush calls the disk after that), and, beyond
//! what the spec asks, every write submitted before it on its queue.
//!
//! Once the worker is asked to stop (a reset), nobody takes or answers anything more: a
//! reset waits for the requests in hand and the driver gets no answer after it.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::drive::Drive;
use super::request::{Op, Plan, Request, ID_LEN};
use crate::virtio::worker::{PollWindow, Wake};
use crate::virtio::{give_back, has_pending, next_chain, notify_driver, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-blk";
/// Stack for a helper: its request (a few KiB) and calls into the disk.
const STACK: usize = 256 << 10;

/// Where the driver's available index is in this process: guest memory.
struct AvailIdx(std::ptr::NonNull<AtomicU16>);

// SAFETY: the pointer is into guest memory, which the crew holding it keeps mapped, and
// it is only ever read atomically: any thread may do that.
unsafe impl Send for AvailIdx {}
// SAFETY: as above.
unsafe impl Sync for AvailIdx {}

/// The ring and what the threads serving it keep track of together.
struct Ring {
    queue: Queue,
    /// Requests taken and not yet answered (or dropped).
    busy: u16,
    /// Flushes waiting for the requests taken before them.
    flushes: u16,
    /// A flush waits: nobody takes another request.
    shut: bool,
    /// Helpers waiting for work.
    idle: usize,
    helpers: Vec<JoinHandle<()>>,
    /// Helpers being started.
    starting: usize,
    /// The session is over: helpers end.
    over: bool,
}

/// The threads serving one queue, while the driver has it started (see the module).
pub(super) struct Crew {
    ring: Mutex<Ring>,
    /// Helpers wait here for requests.
    work: Condvar,
    /// A flush waits here for the requests before it.
    drained: Condvar,
    memory: GuestMemory,
    interrupt: Interrupt,
    /// The driver's available index in guest memory (checked to lie there and aligned,
    /// when the crew was made), and the device's position in the ring (a copy of the
    /// queue's, kept under the lock): to look for work without the lock.
    avail_idx: Option<AvailIdx>,
    next_avail: AtomicU16,
    /// The disk: each request holds it while it is checked and served.
    drive: Arc<Drive>,
    /// How many helpers at most (none for a disk only the worker may use).
    helpers: usize,
    helper_name: String,
    id: [u8; ID_LEN],
    /// The worker's: whether it is asked to stop.
    wake: Wake,
}

impl std::fmt::Debug for Crew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crew").field("helpers", &self.helpers).finish_non_exhaustive()
    }
}

/// How a crew is made up.
pub(super) struct Members {
    /// The disk.
    pub(super) drive: Arc<Drive>,
    /// How many helpers at most (none unless the disk serves requests in parallel).
    pub(super) helpers: usize,
    /// Their thread name.
    pub(super) name: String,
    /// The device's ID string.
    pub(super) id: [u8; ID_LEN],
}

impl Crew {
    /// A crew for `queue` (no helper runs yet); `wake` is its worker's.
    pub(super) fn new(memory: GuestMemory, queue: Queue, interrupt: Interrupt, wake: Wake, members: Members) -> Self {
        let Members { drive, helpers, name, id } = members;
        // The ring is in guest memory (the transport checked it) and 2-byte aligned
        // (virtio-queue checked it), so its index is an aligned u16 there.
        let avail_idx = memory
            .memory()
            .get_slice(GuestAddress(queue.avail_ring().wrapping_add(2)), 2)
            .ok()
            .and_then(|slice| std::ptr::NonNull::new(slice.ptr_guard_mut().as_ptr()))
            .filter(|ptr| ptr.as_ptr().align_offset(2) == 0)
            .map(|ptr| AvailIdx(ptr.cast()));
        let next_avail = AtomicU16::new(queue.next_avail());
        let helpers = if drive.parallel() { helpers } else { 0 };
        let ring = Ring {
            queue,
            busy: 0,
            flushes: 0,
            shut: false,
            idle: 0,
            helpers: Vec::with_capacity(helpers),
            starting: 0,
            over: false,
        };
        Crew {
            ring: Mutex::new(ring),
            work: Condvar::new(),
            drained: Condvar::new(),
            memory,
            interrupt,
            avail_idx,
            next_avail,
            drive,
            helpers,
            helper_name: name,
            id,
            wake,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        crate::bus::lock(&self.ring)
    }

    fn stopping(&self) -> bool {
        self.wake.stopping()
    }

    /// Whether the driver may have made requests available that nobody took: a look at
    /// the available index without the lock (a hint; [`Crew::serve`] checks it all).
    pub(super) fn may_have_work(&self) -> bool {
        let Some(AvailIdx(avail_idx)) = &self.avail_idx else { return false };
        // SAFETY: the index lies in guest memory, which `self.memory` keeps mapped, and is
        // aligned for a u16 (see `new`); the guest writes it concurrently, so it is read
        // atomically.
        let idx = unsafe { avail_idx.as_ref() }.load(Ordering::Acquire);
        u16::from_le(idx) != self.next_avail.load(Ordering::Acquire)
    }

    /// Runs `with` on the queue and the guest's memory, under the lock.
    pub(super) fn with_queue<T>(&self, with: impl FnOnce(&mut Queue, &guest_memory::GuestMemoryMmap) -> T) -> T {
        with(&mut self.lock().queue, self.memory.memory())
    }

    /// Takes, serves and answers requests with `request` and `bounce` (this thread's)
    /// until none is waiting, the ring is shut or the worker stops; true if it took any.
    /// A helper (`arm`) turns the driver's notifications back on when it finds the ring
    /// empty, as it is going to sleep; the worker does that itself before it sleeps.
    pub(super) fn serve(self: &Arc<Self>, request: &mut Request, bounce: &mut [u8], arm: bool) -> bool {
        let mem = self.memory.memory();
        let mut took = false;
        let mut ring = self.lock();
        loop {
            if self.stopping() || ring.over || ring.shut || ring.busy >= ring.queue.size() {
                return took;
            }
            let pending = has_pending(NAME, &ring.queue, mem, &self.interrupt);
            let chain = if pending || arm { next_chain(NAME, &mut ring.queue, mem, &self.interrupt) } else { None };
            let Some(chain) = chain else { return took };
            self.next_avail.store(ring.queue.next_avail(), Ordering::Release);
            took = true;
            ring.busy += 1;
            let spawn = has_pending(NAME, &ring.queue, mem, &self.interrupt) && self.call_helper(&mut ring);
            drop(ring);
            if spawn {
                self.spawn_helper();
            }
            request.parse(mem, chain);
            let (status, op) = self.handle(request, bounce);
            request.count(self.drive.counters(), op, status);
            ring = self.lock();
            ring.busy -= 1;
            if !self.stopping() {
                let used_from = ring.queue.next_used();
                let len = status.map_or(0, |status| request.finish(mem, op, status));
                if give_back(NAME, &mut ring.queue, mem, request.head(), len) {
                    notify_driver(NAME, &mut ring.queue, mem, &self.interrupt, used_from);
                }
            }
            if ring.shut && ring.busy <= ring.flushes {
                self.drained.notify_all();
            }
        }
    }

    /// Checks and serves the request `request` holds, holding the disk meanwhile (a swap
    /// waits); a flush lets it go while it waits for the requests before it (which need
    /// it), and may then run on a disk swapped in meanwhile: the swap flushed the old one.
    /// Returns the status to answer with (`None`: no answer) and the work that ran.
    fn handle(&self, request: &mut Request, bounce: &mut [u8]) -> (Option<u8>, Option<Op>) {
        let mut disk = self.drive.hold();
        match request.prepare(&disk.info(), &self.id) {
            Plan::Drop => (None, None),
            Plan::Done(status) => (Some(status), None),
            Plan::Io(Op::Flush) => {
                drop(disk);
                if !self.wait_for_earlier() {
                    return (None, None);
                }
                let status = request.run(Op::Flush, &mut self.drive.hold().target(bounce));
                (Some(status), Some(Op::Flush))
            }
            Plan::Io(op) => (Some(request.run(op, &mut disk.target(bounce))), Some(op)),
        }
    }

    /// Shuts the ring until the requests taken before this thread's flush are answered
    /// (all but other flushes, which wait alike and need not wait for each other); false
    /// if the worker was asked to stop meanwhile (the flush is then not run).
    fn wait_for_earlier(&self) -> bool {
        let mut ring = self.lock();
        ring.flushes += 1;
        if ring.busy > ring.flushes {
            ring.shut = true;
            ring = self
                .drained
                .wait_while(ring, |r| r.busy > r.flushes && !r.over && !self.stopping())
                .unwrap_or_else(|e| e.into_inner());
        } else {
            // Flushes that waited for this one's company go too.
            self.drained.notify_all();
        }
        ring.flushes -= 1;
        if ring.flushes == 0 && ring.shut {
            ring.shut = false;
            if ring.idle > 0 {
                self.work.notify_all();
            }
        }
        !self.stopping() && !ring.over
    }

    /// Calls a helper for a request that is waiting: wakes a sleeping one, or says to
    /// start a new one (counted as starting).
    fn call_helper(&self, ring: &mut Ring) -> bool {
        if ring.idle > 0 {
            self.work.notify_one();
            false
        } else if ring.helpers.len() + ring.starting < self.helpers {
            ring.starting += 1;
            true
        } else {
            false
        }
    }

    fn spawn_helper(self: &Arc<Self>) {
        let crew = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(self.helper_name.clone()).stack_size(STACK).spawn(move || {
            let mut request = Box::new(Request::new());
            crew.help(&mut request);
        });
        let mut ring = self.lock();
        ring.starting -= 1;
        match spawned {
            Ok(thread) => {
                if ring.over {
                    // `stop` has taken the list: the helper sees `over` at once and ends.
                    drop(ring);
                    let _ = thread.join();
                } else {
                    ring.helpers.push(thread);
                }
            }
            Err(e) => {
                drop(ring);
                warn_ratelimited!("{NAME}: cannot start an I/O thread: {e}");
            }
        }
    }

    /// A helper's life until the session is over: serve; watch the ring for a while
    /// (adaptive, as the worker does, yielding the CPU to whoever needs it) while requests
    /// keep coming; sleep until called.
    fn help(self: &Arc<Self>, request: &mut Request) {
        // Helpers serve only a disk that reaches guest memory itself: no bounce buffer.
        let bounce: &mut [u8] = &mut [];
        let mut window = PollWindow::new();
        loop {
            let mut asleep = None;
            if self.serve(request, bounce, false) {
                window.hit();
            } else {
                if self.poll(&mut window) {
                    continue;
                }
                // Going to sleep: take what is left, turning notifications back on when
                // the ring is empty (the worker may be asleep already).
                if self.serve(request, bounce, true) {
                    continue;
                }
                asleep = Some(Instant::now());
            }
            let mem = self.memory.memory();
            let mut ring = self.lock();
            loop {
                if ring.over || self.stopping() {
                    return;
                }
                if !ring.shut && ring.busy < ring.queue.size() && has_pending(NAME, &ring.queue, mem, &self.interrupt) {
                    break;
                }
                ring.idle += 1;
                ring = self.work.wait(ring).unwrap_or_else(|e| e.into_inner());
                ring.idle -= 1;
            }
            if let Some(at) = asleep {
                window.slept(at.elapsed());
            }
        }
    }

    /// Watches the ring for `window`'s time; true when a request came (a hit).
    fn poll(&self, window: &mut PollWindow) -> bool {
        let until = Instant::now() + window.window();
        while Instant::now() < until {
            std::thread::yield_now();
            if self.wake.stopping() {
                return false;
            }
            if self.may_have_work() {
                window.hit();
                return true;
            }
        }
        window.miss();
        false
    }

    /// Ends the session: helpers finish the requests in hand (unanswered) and end.
    pub(super) fn stop(&self) {
        let helpers = {
            let mut ring = self.lock();
            ring.over = true;
            std::mem::take(&mut ring.helpers)
        };
        self.work.notify_all();
        self.drained.notify_all();
        for helper in helpers {
            if helper.join().is_err() {
                warn_ratelimited!("{NAME}: an I/O thread panicked");
            }
        }
    }
}
