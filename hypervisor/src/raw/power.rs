//! Which vCPUs are on, shared by all of a VM's [`super::RawLoop`]s for PSCI.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use arch_aarch64::psci::CpuState;

use crate::Kicker;

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
        })
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

    /// CPU_OFF: vCPU `index` stops until a CPU_ON.
    pub(super) fn stop(&self, index: usize) {
        if let Some(cpu) = self.lock().get_mut(index) {
            cpu.state.on = false;
            cpu.start = None;
        }
    }
}

/// A vCPU's wake-up: kicks and CPU_ON set it; a vCPU that is off or in WFI sleeps on it.
#[derive(Default)]
pub struct Signal {
    kicked: Mutex<bool>,
    wake: Condvar,
}

impl Signal {
    /// Marks a kick and wakes a sleeper.
    pub fn kick(&self) {
        *self.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Clears and returns whether a kick arrived.
    pub fn take(&self) -> bool {
        std::mem::take(&mut *self.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Sleeps until a kick or `deadline` (forever without one); does not clear the kick.
    pub fn wait(&self, deadline: Option<Instant>) {
        let mut kicked = self.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*kicked {
            match deadline {
                None => kicked = self.wake.wait(kicked).unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(at) => {
                    let Some(left) = at.checked_duration_since(Instant::now()) else { return };
                    kicked = self.wake.wait_timeout(kicked, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
            }
        }
    }
}
