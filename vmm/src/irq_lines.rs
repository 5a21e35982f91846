//! Each vCPU's IRQ input as the GIC drives it, applied by the vCPU's own thread.
//!
//! The GIC may change a vCPU's line from any thread: another vCPU sending an IPI, the
//! console thread raising the UART's SPI. Setting the line directly from there is racy on
//! KVM and impossible on HVF (see [`hypervisor::Vcpu::set_irq_line`]), so [`IrqLines`]
//! records the level, marks it dirty and kicks the vCPU; the vCPU loop calls
//! [`IrqLines::sync`] before every run. A change made by the vCPU's own thread (its timer,
//! its own EOI) needs no kick: the loop syncs before it re-enters the guest.
//!
//! A workaround for lost interrupts on KVM (Linux 6.1, userspace irqchip): in the rig,
//! about one 2-vCPU boot in six hung with a vCPU asleep in WFI (`kvm_vcpu_block`) although
//! its line was high and had been set by its own thread: KVM had dropped the pending
//! bit. Clears get lost too: a boot saw 65,000 spurious IAR reads, the guest taking IRQ
//! exceptions on a line we had lowered. So a line that is high is set again before every
//! run (KVM ignores a set that changes nothing); [`IrqLines::watchdog`] kicks a vCPU
//! whose line is high but which has not left the guest for [`WATCHDOG_PERIOD`], so that
//! it sets its line again; and the GIC re-reports a CPU's level when it reads a
//! spurious IAR, which makes the next run clear a stale line. None of it costs anything
//! while no interrupt is pending.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use devices::gic::CpuIrqSink;
use hypervisor::{Kicker, Vcpu};

thread_local! {
    /// The index of the vCPU living on this thread (`usize::MAX` on other threads).
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[derive(Default)]
struct Line {
    level: AtomicBool,
    dirty: AtomicBool,
    kicker: OnceLock<Arc<dyn Kicker>>,
    /// Counts the vCPU's entries into the guest, for the watchdog.
    entries: AtomicU64,
}

/// How long a vCPU with a pending interrupt may stay in the guest before the watchdog
/// kicks it.
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(10);

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

    /// Applies the level to `vcpu` (index `index`) when it changed, or whenever it is high
    /// (see the module docs); call on its thread before it runs.
    pub fn sync<V: Vcpu>(&self, index: usize, vcpu: &mut V) -> hypervisor::Result<()> {
        let Some(line) = self.lines.get(index) else { return Ok(()) };
        line.entries.fetch_add(1, Ordering::Relaxed);
        let changed = line.dirty.swap(false, Ordering::SeqCst);
        let level = line.level.load(Ordering::SeqCst);
        if changed || level {
            vcpu.set_irq_line(level)?;
        }
        Ok(())
    }

    /// Kicks every vCPU whose line is high and that has not entered the guest since the
    /// last call with the same `seen` (one slot per vCPU). Called every
    /// [`WATCHDOG_PERIOD`] by [`IrqLines::spawn_watchdog`].
    pub fn watchdog(&self, seen: &mut [u64]) {
        for (line, seen) in self.lines.iter().zip(seen.iter_mut()) {
            let entries = line.entries.load(Ordering::Relaxed);
            if line.level.load(Ordering::SeqCst) && entries == *seen {
                if let Some(kicker) = line.kicker.get() {
                    kicker.kick();
                }
            }
            *seen = entries;
        }
    }

    /// Runs [`IrqLines::watchdog`] on its own thread until `stop` returns true.
    pub fn spawn_watchdog(self: &Arc<Self>, stop: impl Fn() -> bool + Send + 'static) -> std::io::Result<()> {
        let lines = Arc::clone(self);
        std::thread::Builder::new().name("irq-watchdog".into()).spawn(move || {
            let mut seen = vec![u64::MAX; lines.lines.len()];
            while !stop() {
                std::thread::sleep(WATCHDOG_PERIOD);
                lines.watchdog(&mut seen);
            }
        })?;
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

    #[test]
    fn watchdog_kicks_only_stuck_vcpus_with_a_pending_interrupt() {
        let lines = IrqLines::new(2);
        let kicks = [Arc::new(CountingKicker::default()), Arc::new(CountingKicker::default())];
        for (i, k) in kicks.iter().enumerate() {
            let (l, k) = (lines.clone(), k.clone());
            std::thread::spawn(move || l.attach(i, k)).join().unwrap();
        }
        let mut seen = vec![u64::MAX; 2];
        lines.watchdog(&mut seen); // first look: nothing to compare with
        lines.watchdog(&mut seen); // lines low: no kicks
        assert_eq!((kicks[0].count(), kicks[1].count()), (0, 0));
        lines.set_cpu_irq(1, true); // a remote change: one kick
        assert_eq!(kicks[1].count(), 1);
        lines.watchdog(&mut seen); // vCPU 1 has not entered since: kicked again
        assert_eq!((kicks[0].count(), kicks[1].count()), (0, 2));
        lines.lines[1].entries.fetch_add(1, Ordering::Relaxed); // it entered the guest
        lines.watchdog(&mut seen);
        assert_eq!(kicks[1].count(), 2);
    }
}
