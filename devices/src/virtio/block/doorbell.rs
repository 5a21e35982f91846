//! How a vCPU wakes the block worker: a flag, not a message queue. Any number of queue
//! notifications before the worker looks collapse into one, so a guest that notifies in
//! a loop costs no memory; a notification while the worker is busy or polling costs one
//! atomic store, and a futex wake only when it sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the worker learns when it looks at the doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Someone rang since the last look.
    Rung,
    /// Nobody rang.
    Quiet,
    /// The worker must stop.
    Stop,
}

/// A doorbell for one worker thread.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: AtomicBool,
    stop: AtomicBool,
    /// Whether the worker is (about to be) asleep on `bell`; set and cleared under `lock`.
    sleeping: AtomicBool,
    lock: Mutex<()>,
    bell: Condvar,
}

impl Doorbell {
    /// Rings: the worker looks at its queue again soon.
    pub fn ring(&self) {
        self.rung.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Asks the worker to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        // Paired with `wait`: it sets `sleeping` before it looks at the flags, and we set
        // a flag before we look at `sleeping`, so one of us sees the other.
        if self.sleeping.load(Ordering::SeqCst) {
            let _guard = crate::bus::lock(&self.lock);
            self.bell.notify_one();
        }
    }

    /// Whether the worker is asked to stop (leaves a ring where it is).
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Takes a ring without waiting.
    pub fn take(&self) -> Ring {
        if self.stop.load(Ordering::SeqCst) {
            Ring::Stop
        } else if self.rung.swap(false, Ordering::SeqCst) {
            Ring::Rung
        } else {
            Ring::Quiet
        }
    }

    /// Waits until someone rings (or asks to stop), at most until `deadline`.
    pub fn wait(&self, deadline: Option<Instant>) -> Ring {
        let mut guard = crate::bus::lock(&self.lock);
        self.sleeping.store(true, Ordering::SeqCst);
        let ring = loop {
            let ring = self.take();
            if ring != Ring::Quiet {
                break ring;
            }
            let now = Instant::now();
            match deadline {
                Some(at) if at <= now => break Ring::Quiet,
                Some(at) => {
                    guard = self.bell.wait_timeout(guard, at - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => guard = self.bell.wait(guard).unwrap_or_else(|e| e.into_inner()),
            }
        };
        self.sleeping.store(false, Ordering::SeqCst);
        ring
    }
}

/// How long the worker keeps watching the ring after it runs dry before it sleeps, adapted
/// to what watching earns (QEMU's adaptive polling, in spirit): a guest whose next request
/// comes within the window is served without a thread wake-up (about 7 µs a request on the
/// development machine, docs/BENCHMARKS.md), while an idle or slow disk stops polling
/// after a few misses and costs no CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    window: Duration,
}

impl Poll {
    /// The longest window (QEMU's iothreads poll up to 32 µs by default).
    pub const MAX: Duration = Duration::from_micros(50);
    /// The window a hit grows from when it was 0.
    const START: Duration = Duration::from_micros(4);
    /// Below this a window shrinks to nothing.
    const MIN: Duration = Duration::from_micros(2);

    /// Polling off until requests show they come close together.
    pub const fn new() -> Self {
        Poll { window: Duration::ZERO }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn grow(&mut self) {
        self.window = (self.window * 2).max(Self::START).min(Self::MAX);
    }

    /// A request came while polling: keep polling, a little longer.
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

    /// The worker slept for `slept` before the next request: had it polled that long, it
    /// would have caught it, so a short sleep grows the window.
    pub fn slept(&mut self, slept: Duration) {
        if slept <= Self::MAX {
            self.grow();
        }
    }
}

impl Default for Poll {
    fn default() -> Self {
        Poll::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rings_collapse_and_stop_wins() {
        let bell = Doorbell::default();
        assert_eq!(bell.take(), Ring::Quiet);
        for _ in 0..1000 {
            bell.ring();
        }
        assert_eq!(bell.take(), Ring::Rung);
        assert_eq!(bell.take(), Ring::Quiet);
        bell.ring();
        bell.stop();
        assert_eq!(bell.take(), Ring::Stop);
        assert_eq!(bell.wait(None), Ring::Stop);
    }

    #[test]
    fn a_sleeping_worker_wakes_on_a_ring_from_another_thread() {
        let bell = Arc::new(Doorbell::default());
        for _ in 0..200 {
            let ringer = Arc::clone(&bell);
            let t = std::thread::spawn(move || ringer.ring());
            assert_eq!(bell.wait(Some(Instant::now() + Duration::from_secs(10))), Ring::Rung);
            t.join().unwrap();
        }
        let start = Instant::now();
        assert_eq!(bell.wait(Some(start + Duration::from_millis(20))), Ring::Quiet);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn polling_grows_on_hits_and_dies_out_on_misses() {
        let mut poll = Poll::new();
        assert_eq!(poll.window(), Duration::ZERO, "off at first");
        poll.slept(Duration::from_micros(10));
        assert_eq!(poll.window(), Poll::START, "a short sleep turns it on");
        for _ in 0..10 {
            poll.hit();
        }
        assert_eq!(poll.window(), Poll::MAX, "capped");
        let mut misses = 0;
        while poll.window() > Duration::ZERO {
            poll.miss();
            misses += 1;
        }
        assert!(misses <= 6, "an idle disk stops polling after a few misses ({misses})");
        poll.slept(Duration::from_millis(1));
        assert_eq!(poll.window(), Duration::ZERO, "a long sleep leaves it off");
    }
}
