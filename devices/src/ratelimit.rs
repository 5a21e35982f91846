//! Rate-limited logging for events a guest can trigger at will.
//!
//! A hostile guest can hit an unmapped address millions of times a second; logging
//! each one would flood the host. [`RateLimiter`] lets through at most `burst` messages
//! per `period` and counts the rest, so the next message that passes can say how many
//! were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets a bounded number of events through per period and counts the rest.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    period: Duration,
    window: Mutex<Option<(Instant, u32)>>,
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A limiter passing at most `burst` events per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        RateLimiter { burst, period, window: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Records one event. Returns `Some(n)` if it may be logged, where `n` is the number
    /// of events suppressed since the last one that was let through; `None` if it must
    /// be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while logging; the
        // counter inside is still a valid pair, so keep using it.
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count) = match *window {
            Some((start, count)) if now.duration_since(start) < self.period => (start, count),
            _ => (now, 0),
        };
        if count < self.burst {
            *window = Some((start, count + 1));
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            *window = Some((start, count));
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs at `level` through a `static` [`RateLimiter`] of 10 messages per 5 seconds (one
/// per call site), appending how many messages were suppressed before this one.
#[macro_export]
macro_rules! log_ratelimited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter =
            $crate::ratelimit::RateLimiter::new(10, ::std::time::Duration::from_secs(5));
        if let Some(suppressed) = LIMITER.check() {
            if suppressed > 0 {
                ::log::log!($level, "{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                ::log::log!($level, $($arg)+);
            }
        }
    }};
}

/// [`log_ratelimited!`] at `warn` level: what a guest did wrong.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {
        $crate::log_ratelimited!(::log::Level::Warn, $($arg)+)
    };
}

/// The log targets of crates whose own log lines a guest can provoke: `virtio-queue`
/// logs an error for some driver mistakes before it returns one. hvrun checks for those
/// mistakes first, but a guest racing the check could still reach a line.
pub const GUEST_REACHABLE_TARGETS: &[&str] = &["virtio_queue"];

/// A logger that passes every record to `inner`, except that records from
/// [`GUEST_REACHABLE_TARGETS`] go through a [`RateLimiter`] (10 every 5 s, the next one
/// saying how many were dropped), so a guest cannot fill the host's disk through another
/// crate's logging. The `hvrun` command installs one around its logger; an embedder
/// should wrap its own the same way.
#[derive(Debug)]
pub struct GuestLogLimiter<L> {
    inner: L,
    limiter: RateLimiter,
}

impl<L: log::Log> GuestLogLimiter<L> {
    /// Wraps `inner`.
    pub const fn new(inner: L) -> Self {
        GuestLogLimiter { inner, limiter: RateLimiter::new(10, Duration::from_secs(5)) }
    }
}

impl<L: log::Log> log::Log for GuestLogLimiter<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let target = record.target();
        let reachable =
            |t: &&str| target.strip_prefix(*t).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
        if !GUEST_REACHABLE_TARGETS.iter().any(reachable) {
            return self.inner.log(record);
        }
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        match self.limiter.check() {
            None => {}
            Some(0) => self.inner.log(record),
            Some(suppressed) => self.inner.log(
                &log::Record::builder()
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(format_args!("{} ({suppressed} similar messages suppressed)", record.args()))
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_a_burst_then_counts_suppressed() {
        let limiter = RateLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.check_at(t0), Some(0));
        assert_eq!(limiter.check_at(t0), Some(0));
        assert_eq!(limiter.check_at(t0), None);
        assert_eq!(limiter.check_at(t0 + Duration::from_millis(10)), None);
        // A new period lets messages through again and reports what was dropped.
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(2)), Some(2));
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(2)), Some(0));
    }

    #[test]
    fn macro_compiles_and_runs() {
        for i in 0..100 {
            crate::warn_ratelimited!("event {i}");
        }
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Count(AtomicUsize, Mutex<Vec<String>>);
    impl log::Log for &Count {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    fn record(target: &str, f: impl FnOnce(&log::Record<'_>)) {
        f(&log::Record::builder().target(target).level(log::Level::Error).args(format_args!("line")).build());
    }

    #[test]
    fn guest_reachable_crates_are_rate_limited_and_others_pass() {
        use log::Log;
        let count = Count::default();
        let logger = GuestLogLimiter::new(&count);
        // Well within the limiter's 5 s period, however slow the host (emulated runs).
        for _ in 0..10_000 {
            record("virtio_queue::queue", |r| logger.log(r));
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 10, "a burst, then nothing");
        for _ in 0..100 {
            record("hvrun", |r| logger.log(r));
            record("virtio_queue_not_really", |r| logger.log(r));
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 210);
    }
}
