//! One virtio-blk queue on its [`Worker`](crate::virtio::worker::Worker): the worker side
//! of the queue's [`Crew`].
//!
//! A request that arrives alone (queue depth 1) is served and answered right on the
//! worker, with no hand-off; while more are waiting, helpers join in (see `crew`). A disk
//! that serves one request at a time is served on the worker only.
//!
//! While busy, the worker keeps watching the ring for a short adaptive window
//! ([`PollWindow`]) with notifications left off (EVENT_IDX: the avail event is not moved
//! on; otherwise NO_NOTIFY), so a driver with a stream of requests need not notify; it
//! turns notifications back on and looks once more before it sleeps.

use std::sync::Arc;

use mio::event::Event;
use mio::Registry;
use virtio_queue::{Queue, QueueT};

use super::crew::{Crew, Members};
use super::drive::Drive;
use super::request::{Request, ID_LEN};
use crate::virtio::worker::{Handler, PollWindow, Wake};
use crate::virtio::{GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-blk";
/// Bytes of data moved per call for a disk that cannot reach guest memory itself.
const BOUNCE_SIZE: usize = 256 * 1024;

/// What the driver hands over when it starts the queue, until the worker runs.
struct Started {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// A queue's handler: the disk and what it knows of it, kept across driver sessions, and
/// the crew while the driver has the queue started.
pub(super) struct QueueHandler {
    drive: Arc<Drive>,
    /// For a disk served one request at a time that cannot reach guest memory itself;
    /// allocated while the queue runs.
    bounce: Vec<u8>,
    id: [u8; ID_LEN],
    /// Name and number of the helpers' threads.
    helper_name: String,
    helpers: usize,
    /// The worker's own request.
    request: Box<Request>,
    window: PollWindow,
    event_idx: bool,
    started: Option<Started>,
    crew: Option<Arc<Crew>>,
}

impl QueueHandler {
    /// A handler for a queue of `drive`, with at most `helpers` helper threads called
    /// `helper_name` (for a disk that serves requests in parallel).
    pub(super) fn new(drive: Arc<Drive>, id: [u8; ID_LEN], helper_name: String, helpers: usize) -> Self {
        QueueHandler {
            drive,
            bounce: Vec::new(),
            id,
            helper_name,
            helpers,
            request: Box::new(Request::new()),
            window: PollWindow::new(),
            event_idx: false,
            started: None,
            crew: None,
        }
    }

    /// Takes the driver's queue for a session (before the worker starts).
    pub(super) fn attach(&mut self, memory: GuestMemory, queue: Queue, interrupt: Interrupt, event_idx: bool) {
        if !self.drive.parallel() {
            self.bounce.resize(BOUNCE_SIZE, 0);
        }
        self.event_idx = event_idx;
        self.started = Some(Started { memory, queue, interrupt });
    }

    /// Serves what is waiting; true if there was anything.
    fn serve(&mut self) -> bool {
        let Some(crew) = &self.crew else { return false };
        crew.serve(&mut self.request, &mut self.bounce, false)
    }

    /// Before the worker sleeps: notifications back on, and one more look at the ring
    /// (a request made before they were on would otherwise wait for the next one).
    fn arm(&mut self) {
        self.window.asleep();
        while let Some(crew) = &self.crew {
            match crew.with_queue(|queue, memory| queue.enable_notification(memory)) {
                Ok(true) => {
                    if !self.serve() {
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
}

impl Handler for QueueHandler {
    fn register(&mut self, _registry: &Registry) -> std::io::Result<()> {
        Ok(())
    }

    fn set_wake(&mut self, wake: Wake) {
        let Some(Started { memory, queue, interrupt }) = self.started.take() else { return };
        let members = Members {
            drive: Arc::clone(&self.drive),
            helpers: self.helpers,
            name: self.helper_name.clone(),
            id: self.id,
        };
        self.crew = Some(Arc::new(Crew::new(memory, queue, interrupt, wake, members)));
    }

    fn notified(&mut self, _registry: &Registry, _queues: u32) {
        if self.window.woke() {
            if let Some(crew) = self.crew.as_ref().filter(|_| !self.event_idx) {
                // Without EVENT_IDX, NO_NOTIFY keeps the driver from notifying while we
                // are awake; `arm` clears it.
                if let Err(e) = crew.with_queue(|queue, memory| queue.disable_notification(memory)) {
                    warn_ratelimited!("{NAME}: queue error: {e}");
                }
            }
        }
        self.serve();
    }

    fn ready(&mut self, _registry: &Registry, _event: &Event) {}

    fn deregister(&mut self, _registry: &Registry) {}

    fn detach(&mut self) {
        // Helpers finish the requests in hand, unanswered, and end.
        if let Some(crew) = self.crew.take() {
            crew.stop();
        }
        self.started = None;
        self.window = PollWindow::new();
        self.bounce = Vec::new();
    }

    fn poll_window(&mut self) -> std::time::Duration {
        let window = self.window.window();
        if window.is_zero() {
            self.arm();
        }
        window
    }

    fn poll(&mut self, _registry: &Registry) -> bool {
        if !self.crew.as_ref().is_some_and(|crew| crew.may_have_work()) || !self.serve() {
            return false;
        }
        self.window.hit();
        true
    }

    fn poll_expired(&mut self) {
        self.window.miss();
        self.arm();
    }
}
