//! Each vCPU's IRQ input as the GIC drives it, applied by the vCPU's own thread.
//!
//! The GIC may change a vCPU's line from any thread: another vCPU sending an IPI, the
//! console thread raising the UART's SPI. Setting the line directly from there is racy on
//! KVM and impossible on HVF (see [`hypervisor::IrqInput::set_irq_line`]), so [`IrqLines`]
//! records the level, marks it dirty and kicks the vCPU; the vCPU loop calls
//! [`IrqLines::sync`] before every run. A change made by the vCPU's own thread (its timer,
//! its own EOI) needs no kick: the loop syncs before it re-enters the guest.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use devices::gic::CpuIrqSink;
use hypervisor::{IrqInput, Kicker};

thread_local! {
    /// The index of the vCPU living on this thread (`usize::MAX` on other threads).
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[derive(Default)]
struct Line {
    level: AtomicBool,
    dirty: AtomicBool,
    kicker: OnceLock<Arc<dyn Kicker>>,
}

/// The IRQ inputs of all vCPUs.
pub struct IrqLines {
    lines: Vec<Line>,
}

impl std::fmt::Debug for IrqLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line =
            |l: &Line| (l.level.load(Ordering::SeqCst), l.dirty.load(Ordering::SeqCst), l.kicker.get().is_some());
        f.debug_list().entries(self.lines.iter().map(line)).finish()
    }
}

impl IrqLines {
    /// Lines for `count` vCPUs, all low.
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(IrqLines { lines: (0..count).map(|_| Line::default()).collect() })
    }

    /// Called on vCPU `index`'s thread once the vCPU exists: remote changes kick it from now on.
    pub fn attach(&self, index: usize, kicker: Arc<dyn Kicker>) {
        CURRENT.with(|c| c.set(index));
        if let Some(line) = self.lines.get(index) {
            let _ = line.kicker.set(kicker);
        }
    }

    /// Applies the level to `vcpu` (index `index`) if it changed since the last call;
    /// call on its thread before it runs.
    pub fn sync(&self, index: usize, vcpu: &mut dyn IrqInput) -> hypervisor::Result<()> {
        let Some(line) = self.lines.get(index) else { return Ok(()) };
        if line.dirty.swap(false, Ordering::SeqCst) {
            vcpu.set_irq_line(line.level.load(Ordering::SeqCst))?;
        }
        Ok(())
    }
}

impl CpuIrqSink for IrqLines {
    fn set_cpu_irq(&self, cpu: usize, level: bool) {
        let Some(line) = self.lines.get(cpu) else { return };
        line.level.store(level, Ordering::SeqCst);
        line.dirty.store(true, Ordering::SeqCst);
        if CURRENT.with(Cell::get) != cpu {
            if let Some(kicker) = line.kicker.get() {
                kicker.kick();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingKicker;

    #[test]
    fn remote_changes_kick_own_changes_do_not() {
        let lines = IrqLines::new(2);
        let kicks = [Arc::new(CountingKicker::default()), Arc::new(CountingKicker::default())];
        // vCPU 1 lives on another thread; this thread is vCPU 0.
        let (l, k) = (lines.clone(), kicks[1].clone());
        std::thread::spawn(move || l.attach(1, k)).join().unwrap();
        lines.attach(0, kicks[0].clone());
        lines.set_cpu_irq(0, true);
        lines.set_cpu_irq(1, true);
        lines.set_cpu_irq(7, true); // no such vCPU: ignored
        assert_eq!(kicks[0].count(), 0);
        assert_eq!(kicks[1].count(), 1);
        CURRENT.with(|c| c.set(usize::MAX));
    }
}
