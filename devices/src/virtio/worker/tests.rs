use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::Registry;

use super::*;
use crate::virtio::notifier::tests::pipe_notifier;
use crate::virtio::testing::wait_for;

/// A handler that counts what the loop asks of it; `work` is work waiting for `poll`.
#[derive(Default)]
struct Counter {
    notified: Arc<AtomicU64>,
    /// Every queue bit the loop passed on.
    queues: Arc<AtomicU32>,
    polls: Arc<AtomicU64>,
    work: Arc<AtomicBool>,
    /// Every poll finds work (until then, if set).
    busy: bool,
    busy_until: Option<Instant>,
    done: Arc<AtomicU64>,
    window: Duration,
    /// The loop told the handler its window passed ([`Handler::poll_expired`]).
    expired: Arc<AtomicBool>,
    wake: Option<Wake>,
}

impl Handler for Counter {
    fn register(&mut self, _registry: &Registry) -> io::Result<()> {
        Ok(())
    }
    fn set_wake(&mut self, wake: Wake) {
        self.wake = Some(wake);
    }
    fn notified(&mut self, _registry: &Registry, queues: u32) {
        self.queues.fetch_or(queues, Ordering::SeqCst);
        self.notified.fetch_add(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
    }
    fn ready(&mut self, _registry: &Registry, _event: &Event) {}
    fn deregister(&mut self, _registry: &Registry) {}
    fn detach(&mut self) {}
    fn poll_window(&mut self) -> Duration {
        self.window
    }
    fn poll(&mut self, _registry: &Registry) -> bool {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let busy = self.busy || self.busy_until.is_some_and(|until| Instant::now() < until);
        if busy || self.work.swap(false, Ordering::SeqCst) {
            self.done.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        false
    }
    fn poll_expired(&mut self) {
        // One window per round of work, so an idle loop sleeps.
        self.window = Duration::ZERO;
        self.expired.store(true, Ordering::SeqCst);
    }
}

/// `counter` on a worker, once it has done the round every worker starts with.
fn running(counter: Counter) -> Worker<Counter> {
    let done = counter.done.clone();
    let worker = Worker::spawn("worker-test", counter, Arc::default()).map_err(|(_, e)| e).unwrap();
    wait_for("the first round", || done.load(Ordering::SeqCst) >= 1);
    worker
}

#[test]
fn no_notification_is_lost_between_a_look_and_a_sleep() {
    let counter = Counter::default();
    let done = counter.done.clone();
    let worker = running(counter);
    for round in 0..20_000u64 {
        let before = done.load(Ordering::SeqCst);
        worker.notify(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "notification {round} was lost");
            std::hint::spin_loop();
        }
    }
    assert!(worker.stop().is_some());
}

#[test]
fn the_loop_spins_on_poll_for_the_window_and_stops_when_asked() {
    let counter = Counter { window: Duration::from_secs(3600), ..Counter::default() };
    let (polls, work, done) = (counter.polls.clone(), counter.work.clone(), counter.done.clone());
    let worker = Worker::spawn("worker-test", counter, Arc::default()).map_err(|(_, e)| e).unwrap();
    wait_for("polling", || polls.load(Ordering::SeqCst) > 100);
    // Work found by polling is done without a notification.
    let notified = done.load(Ordering::SeqCst);
    work.store(true, Ordering::SeqCst);
    wait_for("the polled work", || done.load(Ordering::SeqCst) == notified + 1);
    // A stop ends an hour's window at once.
    let stopping = Instant::now();
    let handler = worker.stop().expect("the handler comes back");
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(handler.notified.load(Ordering::SeqCst), 1, "only the start's round");
}

/// A driver that keeps the device busy (every poll finds work) must not keep the loop
/// from its other event sources: the spin ends after its budget, and the notification
/// (here, as a socket's readiness would be) is heard.
#[test]
fn a_loop_kept_busy_by_polling_still_hears_its_event_sources() {
    let counter = Counter { window: Duration::from_secs(3600), busy: true, ..Counter::default() };
    let (polls, notified) = (counter.polls.clone(), counter.notified.clone());
    let worker = Worker::spawn("worker-test", counter, Arc::default()).map_err(|(_, e)| e).unwrap();
    wait_for("polling", || polls.load(Ordering::SeqCst) > 100);
    let before = notified.load(Ordering::SeqCst);
    worker.notify(3);
    wait_for("the notification, while polls keep finding work", || notified.load(Ordering::SeqCst) > before);
    assert!(worker.stop().is_some());
}

/// Review finding: a spin ended by its budget let the loop sleep though the handler had
/// not turned its notifications back on (virtio-blk turns them off while it polls), so
/// work the driver queued next, without notifying, waited forever. The loop now polls
/// on after a look at its event sources.
#[test]
fn a_spin_ended_by_its_budget_polls_on_rather_than_sleeping() {
    let busy_until = Some(Instant::now() + Duration::from_millis(20));
    let counter = Counter { window: Duration::from_secs(3600), busy_until, ..Counter::default() };
    let (work, done) = (counter.work.clone(), counter.done.clone());
    let worker = Worker::spawn("worker-test", counter, Arc::default()).map_err(|(_, e)| e).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    let before = done.load(Ordering::SeqCst);
    work.store(true, Ordering::SeqCst); // queued with notifications off: no notify
    wait_for("the work, found by polling", || done.load(Ordering::SeqCst) > before);
    assert!(worker.stop().is_some());
}

#[test]
fn a_window_that_passes_puts_the_loop_to_sleep() {
    let counter = Counter { window: Duration::from_millis(5), ..Counter::default() };
    let (polls, expired) = (counter.polls.clone(), counter.expired.clone());
    let worker = Worker::spawn("worker-test", counter, Arc::default()).map_err(|(_, e)| e).unwrap();
    // Waited for, not slept on: a loop kept off the CPU (a loaded host) may still be in
    // its 5 ms window 50 ms later, and poll on after the count below was taken.
    wait_for("the window to pass", || expired.load(Ordering::SeqCst));
    let after = polls.load(Ordering::SeqCst);
    assert!(after > 0, "the loop polled in its window");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(polls.load(Ordering::SeqCst), after, "no polling once asleep");
    assert!(worker.stop().is_some());
}

#[test]
fn a_wake_reaches_the_loop_and_says_when_it_stops() {
    let handler = running(Counter::default()).stop().unwrap();
    let wake = handler.wake.clone().unwrap();
    assert!(wake.stopping());
    wake.wake(); // a loop that ended is not woken, and that is no error

    let counter = Counter::default();
    let done = counter.done.clone();
    let worker = running(counter);
    let wake = Wake { shared: Arc::clone(&worker.shared) };
    assert!(!wake.stopping());
    wake.wake();
    wait_for("the wake", || done.load(Ordering::SeqCst) >= 2);
    assert!(worker.stop().is_some());
}

#[test]
fn polling_grows_on_hits_and_dies_out_on_misses() {
    let mut poll = PollWindow::new();
    assert_eq!(poll.window(), Duration::ZERO, "off at first");
    poll.slept(Duration::from_micros(10));
    assert_eq!(poll.window(), PollWindow::START, "a short sleep turns it on");
    for _ in 0..10 {
        poll.hit();
    }
    assert_eq!(poll.window(), PollWindow::MAX, "capped");
    let mut misses = 0;
    while poll.window() > Duration::ZERO {
        poll.miss();
        misses += 1;
    }
    assert!(misses <= 6, "an idle device stops polling after a few misses ({misses})");
    poll.slept(Duration::from_millis(1));
    assert_eq!(poll.window(), Duration::ZERO, "a long sleep leaves it off");
}

#[test]
fn a_slot_hears_its_notifiers_as_the_bits_they_were_given_across_restarts() {
    let counter = Counter::default();
    let (queues, done) = (counter.queues.clone(), counter.done.clone());
    let mut slot = Slot::new("worker-test", counter);
    let (three, mut ring_three) = pipe_notifier(3);
    let (five, mut ring_five) = pipe_notifier(5);
    assert!(slot.watch(3, three));
    assert!(slot.watch(0, five), "a block queue's worker hears its queue as bit 0");
    for round in 0..2 {
        slot.start(|_| Ok(())).unwrap();
        // Every start begins with a round for all queues.
        wait_for("the first round", || queues.load(Ordering::SeqCst) == u32::MAX);
        queues.store(0, Ordering::SeqCst);
        ring_three.write_all(&1u64.to_ne_bytes()).unwrap();
        wait_for("queue 3's notifier", || queues.load(Ordering::SeqCst) == 1 << 3);
        ring_five.write_all(&1u64.to_ne_bytes()).unwrap();
        wait_for("queue 5's notifier", || queues.load(Ordering::SeqCst) == 1 << 3 | 1);
        let (seven, _ring) = pipe_notifier(7);
        assert!(!slot.watch(7, seven), "no new notifier while a worker runs (round {round})");
        slot.stop();
        queues.store(0, Ordering::SeqCst);
    }
    assert!(done.load(Ordering::SeqCst) >= 6);
    let (big, _ring) = pipe_notifier(40);
    assert!(!slot.watch(40, big), "no bit past 31");
}

/// A handler with a host socket of its own that asks the spin to look at it.
struct Sources {
    stream: mio::net::UnixStream,
    ready: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
}

impl Handler for Sources {
    fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.stream, mio::Token(1), mio::Interest::READABLE)
    }
    fn notified(&mut self, _registry: &Registry, _queues: u32) {}
    fn ready(&mut self, _registry: &Registry, _event: &Event) {
        let mut scratch = [0u8; 64];
        while matches!(io::Read::read(&mut self.stream, &mut scratch), Ok(n) if n > 0) {}
        self.ready.fetch_add(1, Ordering::SeqCst);
    }
    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
    fn detach(&mut self) {}
    fn poll_window(&mut self) -> Duration {
        Duration::from_secs(3600)
    }
    fn poll(&mut self, _registry: &Registry) -> bool {
        self.polls.fetch_add(1, Ordering::SeqCst);
        false
    }
    fn polls_sources(&self) -> bool {
        true
    }
}

/// A socket that turns readable while the loop spins (an hour's window, polls that find
/// nothing) is served in the spin, not when the window ends.
#[test]
fn a_source_that_turns_ready_while_the_loop_spins_is_served_at_once() {
    let (ours, mut peer) = mio::net::UnixStream::pair().unwrap();
    let sources = Sources { stream: ours, ready: Arc::default(), polls: Arc::default() };
    let (ready, polls) = (sources.ready.clone(), sources.polls.clone());
    let worker = Worker::spawn("worker-test", sources, Arc::default()).map_err(|(_, e)| e).unwrap();
    wait_for("polling", || polls.load(Ordering::SeqCst) > 100);
    for round in 1..=3 {
        peer.write_all(b"x").unwrap();
        wait_for("the socket's readiness, while the loop spins", || ready.load(Ordering::SeqCst) >= round);
    }
    assert!(worker.stop().is_some());
}
