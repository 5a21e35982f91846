//! One virtual counter for the whole VM, which stands still while the VM is paused.
//!
//! Hypervisor.framework gives each vCPU its own offset between the host's counter and
//! the guest's virtual counter. Left to the framework's defaults, nothing says they are
//! equal, and while the VM is paused the guest's counter runs on: a long pause then looks
//! to the guest like a CPU that stopped for that long (RCU stall warnings, timers that
//! all fire at once). [`VmClock`] takes one offset when the VM is created (the guest's
//! counter starts at 0), every vCPU sets it before it runs, and a pause adds its length
//! to it (as QEMU and libkrun do).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::GuestClock;

/// The VM's offset between the host's counter and the guest's virtual counter.
pub struct VmClock {
    now: Box<dyn Fn() -> u64 + Send + Sync>,
    offset: AtomicU64,
    /// The host's counter when the VM was paused, while it is.
    stopped_at: Mutex<Option<u64>>,
}

impl std::fmt::Debug for VmClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmClock").field("offset", &self.offset()).finish_non_exhaustive()
    }
}

impl VmClock {
    /// A clock over the host counter `now`, whose guest counter reads 0 now.
    pub fn new(now: impl Fn() -> u64 + Send + Sync + 'static) -> Arc<Self> {
        let offset = AtomicU64::new(now());
        Arc::new(VmClock { now: Box::new(now), offset, stopped_at: Mutex::new(None) })
    }

    /// The offset every vCPU runs with: the guest's counter is the host's minus this.
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::SeqCst)
    }

    /// The guest's counter now, or where it stands while the VM is paused (a snapshot's
    /// value: every vCPU saves the same).
    pub fn guest_counter(&self) -> u64 {
        let stopped_at = *self.stopped_at.lock().unwrap_or_else(PoisonError::into_inner);
        stopped_at.unwrap_or_else(|| (self.now)()).wrapping_sub(self.offset())
    }

    /// Sets the offset so the guest's counter reads `counter` now, or, while the VM is
    /// paused, where it stands until the resume (a restored snapshot's guest goes on
    /// from where it was saved, also when it was restored paused).
    pub fn set_guest_counter(&self, counter: u64) {
        let stopped_at = self.stopped_at.lock().unwrap_or_else(PoisonError::into_inner);
        let at = stopped_at.unwrap_or_else(|| (self.now)());
        self.offset.store(at.wrapping_sub(counter), Ordering::SeqCst);
    }
}

impl GuestClock for VmClock {
    fn stop(&self) {
        let mut stopped_at = self.stopped_at.lock().unwrap_or_else(PoisonError::into_inner);
        if stopped_at.is_none() {
            *stopped_at = Some((self.now)());
        }
    }

    fn start(&self) {
        let mut stopped_at = self.stopped_at.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = stopped_at.take() {
            let paused = (self.now)().saturating_sub(at);
            self.offset.fetch_add(paused, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_counter_starts_at_zero_and_stands_still_while_paused() {
        let host = Arc::new(AtomicU64::new(5_000));
        let clock = {
            let host = Arc::clone(&host);
            VmClock::new(move || host.load(Ordering::SeqCst))
        };
        let guest = || host.load(Ordering::SeqCst) - clock.offset();
        assert_eq!(guest(), 0);
        host.store(6_000, Ordering::SeqCst);
        assert_eq!(guest(), 1_000);
        clock.stop();
        clock.stop(); // a second stop does not move the start of the pause
        host.store(100_000, Ordering::SeqCst);
        clock.start();
        assert_eq!(guest(), 1_000, "the pause did not count");
        clock.start(); // nor does a start without a stop
        host.store(100_500, Ordering::SeqCst);
        assert_eq!(guest(), 1_500);
    }

    #[test]
    fn a_saved_counter_is_where_the_pause_stopped_it_and_a_restore_goes_on_from_it() {
        let host = Arc::new(AtomicU64::new(10_000));
        let now = {
            let host = Arc::clone(&host);
            move || host.load(Ordering::SeqCst)
        };
        let clock = VmClock::new(now.clone());
        host.store(12_000, Ordering::SeqCst);
        clock.stop();
        host.store(50_000, Ordering::SeqCst);
        assert_eq!(clock.guest_counter(), 2_000, "paused: the counter stands");
        // A new process, later.
        host.store(900_000, Ordering::SeqCst);
        let restored = VmClock::new(now.clone());
        restored.set_guest_counter(2_000);
        assert_eq!(restored.guest_counter(), 2_000);
        host.store(900_700, Ordering::SeqCst);
        assert_eq!(restored.guest_counter(), 2_700);
        // Restored paused (the clock stopped before the vCPUs set it): the counter stands
        // at the snapshot's until the resume, then goes on from there.
        let paused = VmClock::new(now);
        paused.stop();
        host.store(905_000, Ordering::SeqCst);
        paused.set_guest_counter(2_000);
        host.store(909_000, Ordering::SeqCst);
        assert_eq!(paused.guest_counter(), 2_000);
        paused.start();
        host.store(909_300, Ordering::SeqCst);
        assert_eq!(paused.guest_counter(), 2_300);
    }
}
