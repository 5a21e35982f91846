//! Where a machine's start and stop go: named phases with their own durations, logged
//! at `info` as one line each (`start timeline: ...` at the first vCPU entry, `stop
//! timeline: ...` once the machine is down), for `cargo xtask compare` and for anyone
//! asking why a boot is slow.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Phases since a starting instant, each ending where the next begins.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl Timeline {
    /// A timeline beginning at `start`.
    pub fn new(start: Instant) -> Self {
        Timeline { start, last: start, phases: Vec::new() }
    }

    /// The instant it began.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Ends phase `name` now: it took the time since the previous mark.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, Instant::now());
    }

    /// Ends phase `name` at `at` (not before the previous mark).
    pub fn mark_at(&mut self, name: &'static str, at: Instant) {
        let at = at.max(self.last);
        self.phases.push((name, at - self.last));
        self.last = at;
    }

    /// `name 1.2 ms, other 0.3 ms, ..., total 1.5 ms`.
    pub fn summary(&self) -> String {
        let mut line = String::new();
        for (name, took) in &self.phases {
            let _ = write!(line, "{name} {}, ", ms(*took));
        }
        let _ = write!(line, "total {}", ms(self.last - self.start));
        line
    }
}

/// Milliseconds with a tenth.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_each_other_and_add_up() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        t.mark_at("files", t0 + Duration::from_micros(1500));
        t.mark_at("vm", t0 + Duration::from_millis(4));
        // A mark in the past (a clock read on another thread) takes no time, never negative.
        t.mark_at("late", t0 + Duration::from_millis(3));
        assert_eq!(t.summary(), "files 1.5 ms, vm 2.5 ms, late 0.0 ms, total 4.0 ms");
        assert_eq!(t.start(), t0);
    }
}
