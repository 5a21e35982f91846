//! Which vCPUs are on, shared by all of a VM's [`super::RawLoop`]s for PSCI; and, for
//! the framework's GIC, which are in the guest, so a vCPU that naps in WFI knows whether
//! anyone could send it an SGI the VMM would not hear of.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use arch_aarch64::psci::CpuState;

use crate::{Kicker, Result, SpiSink};

struct Cpu {
    state: CpuState,
    /// Where a CPU_ON asked it to start (entry, context), until it does.
    start: Option<(u64, u64)>,
}

/// The power state of every vCPU, and each one's wake-up signal.
pub struct Power {
    cpus: Mutex<Vec<Cpu>>,
    signals: Vec<Arc<Signal>>,
    kickers: Vec<OnceLock<Arc<dyn Kicker>>>,
    /// vCPUs on and not napping: those that may send an SGI (vCPU 0 starts so).
    in_guest: AtomicUsize,
    /// vCPUs napping without a bound, because nobody was in the guest.
    unbounded_naps: AtomicUsize,
}

impl std::fmt::Debug for Power {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Power").field("cpus", &self.states()).finish_non_exhaustive()
    }
}

impl Power {
    /// vCPUs with these MPIDRs; vCPU 0 is on, the others off.
    pub fn new(mpidrs: &[u64]) -> Arc<Self> {
        let cpus = mpidrs
            .iter()
            .enumerate()
            .map(|(i, &mpidr)| Cpu { state: CpuState { mpidr, on: i == 0 }, start: None })
            .collect();
        Arc::new(Power {
            cpus: Mutex::new(cpus),
            signals: mpidrs.iter().map(|_| Arc::new(Signal::default())).collect(),
            kickers: mpidrs.iter().map(|_| OnceLock::new()).collect(),
            in_guest: AtomicUsize::new(usize::from(!mpidrs.is_empty())),
            unbounded_naps: AtomicUsize::new(0),
        })
    }

    /// Ends every vCPU's nap, without the kick that makes its run return: they enter the
    /// guest again, where the framework's GIC delivers what is pending (an SPI the VMM
    /// just raised). Any thread.
    pub fn wake_nappers(&self) {
        for signal in &self.signals {
            signal.wake();
        }
    }

    /// A vCPU goes back into the guest (after a nap, or powered on). Those napping
    /// without a bound are told to think again: this one may now send them an SGI, so
    /// their naps must be short (they need not run the guest for it).
    pub(super) fn enter_guest(&self) {
        self.in_guest.fetch_add(1, Ordering::SeqCst);
        if self.unbounded_naps.load(Ordering::SeqCst) > 0 {
            for signal in &self.signals {
                signal.rethink();
            }
        }
    }

    /// A vCPU leaves the guest (to nap, or powered off).
    pub(super) fn leave_guest(&self) {
        let _ = self.in_guest.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Whether a vCPU about to nap may nap without a bound: no other vCPU is in the guest,
    /// so no SGI can come that the VMM would not hear of (anyone who enters the guest
    /// wakes it). `counted`: the caller still counts as in the guest (it decides before it
    /// leaves, so of two vCPUs that trap together at most one naps unbounded: the other
    /// may have sent it an SGI). When true, the caller calls [`Power::end_unbounded_nap`]
    /// after the nap. (Counted before the check, with `enter_guest` doing the reverse:
    /// one of the two always sees the other.)
    pub(super) fn try_unbounded_nap(&self, counted: bool) -> bool {
        self.unbounded_naps.fetch_add(1, Ordering::SeqCst);
        if self.in_guest.load(Ordering::SeqCst) == usize::from(counted) {
            return true;
        }
        self.end_unbounded_nap();
        false
    }

    /// The end of a nap [`Power::begin_unbounded_nap`] allowed.
    pub(super) fn end_unbounded_nap(&self) {
        let _ = self.unbounded_naps.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Cpu>> {
        self.cpus.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every vCPU's state, for [`arch_aarch64::psci::handle`].
    pub fn states(&self) -> Vec<CpuState> {
        self.lock().iter().map(|c| c.state).collect()
    }

    /// vCPU `index`'s wake-up signal.
    pub(super) fn signal(&self, index: usize) -> Option<Arc<Signal>> {
        self.signals.get(index).cloned()
    }

    /// Records how to kick vCPU `index` out of a run.
    pub(super) fn attach(&self, index: usize, kicker: Arc<dyn Kicker>) {
        if let Some(slot) = self.kickers.get(index) {
            let _ = slot.set(kicker);
        }
    }

    /// CPU_ON: marks vCPU `index` on and tells it where to start; false if it is on
    /// already (another CPU_ON won the race).
    pub(super) fn start(&self, index: usize, entry: u64, context: u64) -> bool {
        {
            let mut cpus = self.lock();
            let Some(cpu) = cpus.get_mut(index) else { return false };
            if cpu.state.on {
                return false;
            }
            cpu.state.on = true;
            cpu.start = Some((entry, context));
        }
        if let Some(kicker) = self.kickers.get(index).and_then(OnceLock::get) {
            kicker.kick();
        }
        true
    }

    /// Takes vCPU `index`'s start request, if CPU_ON made one.
    pub(super) fn take_start(&self, index: usize) -> Option<(u64, u64)> {
        self.lock().get_mut(index).and_then(|c| c.start.take())
    }

    /// Whether vCPU `index` is on, as a snapshot's restore says (no start pending).
    pub(super) fn set_on(&self, index: usize, on: bool) {
        if let Some(cpu) = self.lock().get_mut(index) {
            cpu.state.on = on;
            cpu.start = None;
        }
    }

    /// CPU_OFF: vCPU `index` stops until a CPU_ON.
    pub(super) fn stop(&self, index: usize) {
        if let Some(cpu) = self.lock().get_mut(index) {
            cpu.state.on = false;
            cpu.start = None;
        }
    }
}

/// What a [`Signal`] holds.
#[derive(Default)]
struct Flags {
    /// A kick: the vCPU's run returns `Interrupted`.
    kicked: bool,
    /// A wake-up: a sleep ends, the run goes on.
    woken: bool,
    /// Another vCPU entered the guest: a nap without a bound must be thought again.
    rethink: bool,
}

/// Why [`Signal::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// A kick (not cleared: `take` sees it).
    Kick,
    /// A wake-up ([`Signal::wake`]).
    Wake,
    /// Another vCPU entered the guest.
    Rethink,
    /// The deadline passed.
    Deadline,
}

/// A vCPU's wake-up: kicks and CPU_ON set it; a vCPU that is off or in WFI sleeps on it.
#[derive(Default)]
pub struct Signal {
    flags: Mutex<Flags>,
    wake: Condvar,
}

impl Signal {
    fn lock(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks a kick and wakes a sleeper.
    pub fn kick(&self) {
        self.lock().kicked = true;
        self.wake.notify_all();
    }

    /// Ends the current (or next) sleep without a kick.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.wake.notify_all();
    }

    /// Asks a nap without a bound to think again.
    fn rethink(&self) {
        self.lock().rethink = true;
        self.wake.notify_all();
    }

    /// Forgets a wake-up: the vCPU is about to enter the guest, which takes whatever it
    /// was for.
    pub fn clear_wake(&self) {
        let mut flags = self.lock();
        flags.woken = false;
        flags.rethink = false;
    }

    /// Clears and returns whether a kick arrived.
    pub fn take(&self) -> bool {
        std::mem::take(&mut self.lock().kicked)
    }

    /// Sleeps until a kick, a wake-up, a rethink or `deadline` (forever without one), and
    /// says which; clears the wake-up and the rethink, not the kick.
    pub fn wait(&self, deadline: Option<Instant>) -> Woke {
        let mut flags = self.lock();
        loop {
            if flags.kicked {
                return Woke::Kick;
            }
            if std::mem::take(&mut flags.woken) {
                flags.rethink = false;
                return Woke::Wake;
            }
            if std::mem::take(&mut flags.rethink) {
                return Woke::Rethink;
            }
            match deadline {
                None => flags = self.wake.wait(flags).unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(at) => {
                    let Some(left) = at.checked_duration_since(Instant::now()) else { return Woke::Deadline };
                    flags = self.wake.wait_timeout(flags, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
            }
        }
    }
}

/// The SPIs of a framework's GIC, with the wake-up the framework does not give: raising
/// one ends every vCPU's WFI nap, so the guest takes it at once (not at the end of a nap).
pub struct WakingSpis {
    spis: Arc<dyn SpiSink>,
    power: Arc<Power>,
}

impl WakingSpis {
    /// `spis`, waking the vCPUs of `power` on each rising level.
    pub fn new(spis: Arc<dyn SpiSink>, power: Arc<Power>) -> Self {
        WakingSpis { spis, power }
    }
}

impl std::fmt::Debug for WakingSpis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakingSpis").field("spis", &self.spis).finish_non_exhaustive()
    }
}

impl SpiSink for WakingSpis {
    fn set_spi(&self, intid: u32, level: bool) -> Result<()> {
        self.spis.set_spi(intid, level)?;
        if level {
            self.power.wake_nappers();
        }
        Ok(())
    }

    fn save_gic(&self) -> Result<crate::gicv3_state::HypervisorGicState> {
        self.spis.save_gic()
    }

    fn restore_gic(&self, saved: &crate::gicv3_state::HypervisorGicState) -> Result<()> {
        self.spis.restore_gic(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From the review of issue 14's fix 5: a vCPU left the guest before it decided, so
    /// two that trapped together (one having sent the other an SGI) could both nap without
    /// a bound, and the SGI waited for a timer. Deciding while still counted, at most one
    /// of them does, whatever the order.
    #[test]
    fn of_two_vcpus_trapping_together_at_most_one_naps_unbounded() {
        // Each vCPU decides, then leaves; any interleaving of the two.
        let orders: [[(usize, bool); 4]; 6] = [
            [(0, true), (0, false), (1, true), (1, false)],
            [(0, true), (1, true), (0, false), (1, false)],
            [(0, true), (1, true), (1, false), (0, false)],
            [(1, true), (1, false), (0, true), (0, false)],
            [(1, true), (0, true), (1, false), (0, false)],
            [(1, true), (0, true), (0, false), (1, false)],
        ];
        for order in orders {
            let power = Power::new(&[0, 1]);
            power.enter_guest(); // vCPU 1 runs too
            let mut alone = [false; 2];
            for (vcpu, decide) in order {
                if decide {
                    alone[vcpu] = power.try_unbounded_nap(true);
                } else {
                    power.leave_guest();
                }
            }
            assert!(!(alone[0] && alone[1]), "{order:?}: both napped without a bound");
        }
        // Alone in the guest, a vCPU may; once out, it may when nobody went in.
        let power = Power::new(&[0]);
        assert!(power.try_unbounded_nap(true));
        power.end_unbounded_nap();
        power.leave_guest();
        assert!(power.try_unbounded_nap(false));
    }
}
