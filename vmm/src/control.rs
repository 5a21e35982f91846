//! Stopping a running machine: the first outcome wins, every vCPU is kicked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hypervisor::Kicker;

use crate::{Error, ExitReason};

/// Shared by the vCPU threads and whoever else may stop the machine (the console's
/// escape key, an embedder).
#[derive(Default)]
pub struct Control {
    stopping: AtomicBool,
    outcome: Mutex<Option<Result<ExitReason, Error>>>,
    kickers: Mutex<Vec<Arc<dyn Kicker>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("stopping", &self.stopping()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    /// A machine that is running.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether the machine is stopping; vCPU loops check this before every run.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Registers a vCPU's kicker, so a stop reaches it.
    pub fn add_kicker(&self, kicker: Arc<dyn Kicker>) {
        lock(&self.kickers).push(kicker);
        // A stop requested before this vCPU registered has not kicked it; the vCPU
        // loop checks `stopping` before it first runs, so nothing is lost.
    }

    /// Stops the machine with `outcome`, unless another outcome came first, and kicks
    /// every vCPU out of the guest.
    pub fn stop(&self, outcome: Result<ExitReason, Error>) {
        {
            let mut slot = lock(&self.outcome);
            if slot.is_none() {
                *slot = Some(outcome);
            } else if let Err(e) = outcome {
                log::debug!("also while stopping: {e}");
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        for kicker in lock(&self.kickers).iter() {
            kicker.kick();
        }
    }

    /// The outcome the machine stopped with (once).
    pub fn take_outcome(&self) -> Option<Result<ExitReason, Error>> {
        lock(&self.outcome).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingKicker;

    #[test]
    fn first_outcome_wins_and_everyone_is_kicked() {
        let control = Control::new();
        let kicks = Arc::new(CountingKicker::default());
        control.add_kicker(kicks.clone());
        control.add_kicker(kicks.clone());
        assert!(!control.stopping());
        control.stop(Ok(ExitReason::PowerOff));
        control.stop(Ok(ExitReason::Reset));
        assert!(control.stopping());
        assert_eq!(kicks.count(), 4);
        assert!(matches!(control.take_outcome(), Some(Ok(ExitReason::PowerOff))));
        assert!(control.take_outcome().is_none());
    }
}
