//! The boot timer: the guest writes a magic byte when it reaches a milestone (its init
//! starting, say), and the VMM learns how long the boot took.
//!
//! The same idea and magic value as Firecracker's boot-timer device, so guest images
//! built for one work with the other: a write of 123 to offset 0. Only the first write
//! counts: the boot happens once, and a guest writing in a loop must not make the VMM
//! report (or queue reports of) millions of boots.

use std::time::Instant;

use crate::bus::MmioDeviceMut;
use crate::warn_ratelimited;

/// The value a guest writes to say "booted".
pub const MAGIC: u8 = 123;

/// Called with the time the guest reported its boot.
pub type OnMilestone = Box<dyn FnOnce(Instant) + Send>;

/// The boot-timer device.
pub struct BootTimer {
    /// Taken by the first magic write.
    on_milestone: Option<OnMilestone>,
}

impl std::fmt::Debug for BootTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootTimer").finish_non_exhaustive()
    }
}

impl BootTimer {
    /// A boot timer that calls `on_milestone` for the first magic write.
    pub fn new(on_milestone: OnMilestone) -> Self {
        BootTimer { on_milestone: Some(on_milestone) }
    }
}

impl MmioDeviceMut for BootTimer {
    fn read(&mut self, _vcpu: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, vcpu: usize, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC) {
            if let Some(report) = self.on_milestone.take() {
                report(Instant::now());
            }
        } else {
            warn_ratelimited!("boot timer: vcpu{vcpu} wrote {data:x?} at {offset:#x}; expected {MAGIC} at 0");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Issue 12, hole 2: every magic write sent an event on a channel nobody reads, so a
    /// guest writing in a loop grew the VMM's memory without bound. Only the first counts.
    #[test]
    fn only_the_first_magic_write_counts() {
        let seen = Arc::new(Mutex::new(0));
        let counter = seen.clone();
        let mut timer = BootTimer::new(Box::new(move |_| *counter.lock().unwrap() += 1));
        timer.write(0, 4, &[MAGIC]);
        timer.write(0, 0, &[7]);
        timer.write(0, 0, &[]);
        assert_eq!(*seen.lock().unwrap(), 0, "not the magic write");
        for _ in 0..100_000 {
            timer.write(0, 0, &[MAGIC, 0, 0, 0]);
        }
        assert_eq!(*seen.lock().unwrap(), 1);
        let mut b = [0xffu8; 4];
        timer.read(0, 0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
