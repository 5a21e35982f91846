//! The GICv2's state for a snapshot: what [`GicState`] holds, as plain data, and its
//! checks on the way back in. A saved state is the host's input (a file), so every
//! field is checked against the GIC it is restored into before any of it is used.

use serde::{Deserialize, Serialize};

use super::{Cpu, GicState, Irq, MAX_CPUS, MIN_BPR, NUM_SGIS, NUM_SPIS, PRIORITY_MASK, SPI_BASE};

/// One CPU interface's saved state, its banked SGIs and PPIs included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCpu {
    private: Vec<Irq>,
    sgi_sources: Vec<u8>,
    enabled: bool,
    eoi_mode: bool,
    pmr: u8,
    bpr: u8,
    active_stack: Vec<(u8, u32)>,
}

/// The whole GIC's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGic {
    enabled: bool,
    spis: Vec<Irq>,
    spi_targets: Vec<u8>,
    cpus: Vec<SavedCpu>,
}

/// Why a saved GIC state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GicRestoreError {
    /// Saved for another number of CPUs.
    #[error("the saved GIC served {saved} CPUs and this machine has {now}")]
    Cpus {
        /// CPUs in the saved state.
        saved: usize,
        /// CPUs now.
        now: usize,
    },
    /// A table of the wrong length, or a value no GICv2 of hvrun's can hold.
    #[error("the saved GIC state is damaged: {0}")]
    Damaged(&'static str),
}

/// A saved interrupt, checked.
fn irq_of(saved: &Irq) -> Result<Irq, GicRestoreError> {
    if saved.priority & !PRIORITY_MASK != 0 {
        return Err(GicRestoreError::Damaged("a priority with bits this GIC does not implement"));
    }
    Ok(*saved)
}

/// A saved CPU interface, checked, for a GIC whose CPUs are the bits of `cpus_known`.
fn cpu_of(saved: &SavedCpu, cpus_known: u16, spis: &[Irq]) -> Result<Cpu, GicRestoreError> {
    let mut cpu = Cpu::new();
    if saved.private.len() != cpu.private.len() || saved.sgi_sources.len() != cpu.sgi_sources.len() {
        return Err(GicRestoreError::Damaged("a CPU's SGI and PPI tables"));
    }
    for (irq, saved) in cpu.private.iter_mut().zip(&saved.private) {
        *irq = irq_of(saved)?;
    }
    if cpu.private[..NUM_SGIS as usize].iter().any(|sgi| !sgi.edge) {
        return Err(GicRestoreError::Damaged("a level-sensitive SGI"));
    }
    if saved.pmr & !PRIORITY_MASK != 0 || !(MIN_BPR..=7).contains(&saved.bpr) {
        return Err(GicRestoreError::Damaged("a CPU's priority mask or binary point"));
    }
    if saved.sgi_sources.iter().any(|&s| u16::from(s) & !cpus_known != 0) {
        return Err(GicRestoreError::Damaged("an SGI pending from a CPU this GIC does not have"));
    }
    // An interrupt is pushed on the stack at its acknowledge, only when its priority is
    // higher (numerically lower) than the top's, and leaves at its priority drop: so the
    // priorities fall strictly from the bottom up (at most 32 entries). An entry need not
    // be active (ICACTIVER, or DIR before EOIR, deactivates without a priority drop, as on
    // a real GIC), and an interrupt deactivated so may be taken again above itself.
    let mut below = u16::MAX;
    for &(priority, id) in &saved.active_stack {
        let known =
            if id < SPI_BASE { (id as usize) < cpu.private.len() } else { ((id - SPI_BASE) as usize) < spis.len() };
        if !known || priority & !PRIORITY_MASK != 0 || u16::from(priority) >= below {
            return Err(GicRestoreError::Damaged("a CPU's active-priority stack"));
        }
        below = u16::from(priority);
    }
    cpu.sgi_sources.copy_from_slice(&saved.sgi_sources);
    cpu.enabled = saved.enabled;
    cpu.eoi_mode = saved.eoi_mode;
    cpu.pmr = saved.pmr;
    cpu.bpr = saved.bpr;
    cpu.active_stack = saved.active_stack.clone();
    Ok(cpu)
}

impl GicState {
    /// The state as plain data.
    pub fn save(&self) -> SavedGic {
        SavedGic {
            enabled: self.enabled,
            spis: self.spis.clone(),
            spi_targets: self.spi_targets.clone(),
            cpus: self
                .cpus
                .iter()
                .map(|c| SavedCpu {
                    private: c.private.to_vec(),
                    sgi_sources: c.sgi_sources.to_vec(),
                    enabled: c.enabled,
                    eoi_mode: c.eoi_mode,
                    pmr: c.pmr,
                    bpr: c.bpr,
                    active_stack: c.active_stack.clone(),
                })
                .collect(),
        }
    }

    /// Replaces this state with `saved`, checked whole first (nothing changes when it
    /// does not fit this GIC). The CPU outputs are recomputed by the next
    /// [`GicState::update`].
    pub fn restore(&mut self, saved: &SavedGic) -> Result<(), GicRestoreError> {
        if saved.cpus.len() != self.cpus.len() {
            return Err(GicRestoreError::Cpus { saved: saved.cpus.len(), now: self.cpus.len() });
        }
        if saved.spis.len() != NUM_SPIS as usize || saved.spi_targets.len() != NUM_SPIS as usize {
            return Err(GicRestoreError::Damaged("the SPI tables"));
        }
        let cpus_known = (1u16 << self.cpus.len().min(MAX_CPUS)) - 1;
        if saved.spi_targets.iter().any(|&t| u16::from(t) & !cpus_known != 0) {
            return Err(GicRestoreError::Damaged("an SPI routed to a CPU this GIC does not have"));
        }
        let spis = saved.spis.iter().map(irq_of).collect::<Result<Vec<_>, _>>()?;
        let mut cpus = saved.cpus.iter().map(|c| cpu_of(c, cpus_known, &spis)).collect::<Result<Vec<_>, _>>()?;
        // Each output keeps the level the sink was last told, so the next update lowers
        // a line the restored state does not raise, and raises the others.
        for (new, old) in cpus.iter_mut().zip(&self.cpus) {
            new.irq_out = old.irq_out;
        }
        self.enabled = saved.enabled;
        self.spis = spis;
        self.spi_targets = saved.spi_targets.clone();
        self.cpus = cpus;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gic::CpuIrqSink;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(usize, bool)>>);

    impl CpuIrqSink for Lines {
        fn set_cpu_irq(&self, cpu: usize, level: bool) {
            self.0.lock().unwrap().push((cpu, level));
        }
    }

    /// A GIC with some of everything: enabled SPIs and PPIs, priorities, a pending SGI
    /// from another CPU, an acknowledged interrupt on a stack.
    fn busy() -> GicState {
        let sink = Lines::default();
        let mut gic = GicState::new(2);
        gic.set_enabled(true);
        for cpu in 0..2 {
            gic.set_cpu_control(cpu, true, false);
            gic.set_pmr(cpu, 0xf0);
            gic.set_irq_enabled(cpu, 27, true);
            gic.set_irq_enabled(cpu, 1, true);
        }
        gic.set_irq_enabled(0, 40, true);
        gic.set_priority(0, 40, 0x80);
        gic.set_target(40, 0b10);
        gic.set_spi_level(8, true);
        gic.send_sgi(1, 1, 0b01);
        gic.set_ppi_level(0, 27, true);
        gic.update(&sink);
        assert_eq!(gic.acknowledge(0), 1 | (1 << 10), "SGI 1 from CPU 1");
        gic.update(&sink);
        gic
    }

    #[test]
    fn a_restored_gic_is_the_saved_one_and_raises_its_lines() {
        let gic = busy();
        let saved = gic.save();
        let mut copy = GicState::new(2);
        copy.restore(&saved).unwrap();
        assert_eq!(copy.save(), saved);
        let sink = Lines::default();
        copy.update(&sink);
        assert_eq!(copy.dump(), gic.dump());
        for cpu in 0..2 {
            assert_eq!(copy.irq_out(cpu), gic.irq_out(cpu), "CPU {cpu}'s line");
        }
        assert!(sink.0.lock().unwrap().contains(&(1, true)), "SPI 40 reaches CPU 1");
        // The stack goes on: the acknowledged SGI ends as it would have.
        assert!(copy.end_of_interrupt(0, 1 | (1 << 10)));
    }

    /// Review finding: the restored CPUs started with their outputs low, so a line the
    /// old state had raised stayed up when the restored one did not signal that CPU.
    #[test]
    fn a_restore_lowers_a_line_the_saved_state_does_not_raise() {
        let sink = Lines::default();
        let mut gic = busy();
        gic.update(&sink);
        assert!(gic.irq_out(1), "SPI 40 signalled to CPU 1");
        gic.restore(&GicState::new(2).save()).unwrap();
        gic.update(&sink);
        assert!(!gic.irq_out(1));
        assert_eq!(sink.0.lock().unwrap().last(), Some(&(1, false)), "the sink is told");
    }

    /// Review finding: a guest that deactivates an acknowledged interrupt through
    /// ICACTIVER (no priority drop, as on a real GIC), then takes it again at a higher
    /// priority, left a stack the restore refused, so its snapshot could not be loaded.
    #[test]
    fn a_stack_of_deactivated_and_retaken_interrupts_is_restored() {
        let sink = Lines::default();
        let mut gic = GicState::new(1);
        gic.set_enabled(true);
        gic.set_cpu_control(0, true, false);
        gic.set_pmr(0, 0xf0);
        gic.set_irq_enabled(0, 40, true);
        gic.set_priority(0, 40, 0x80);
        gic.set_target(40, 0b1);
        gic.set_spi_level(8, true);
        gic.update(&sink);
        assert_eq!(gic.acknowledge(0), 40);
        gic.set_irq_active(0, 40, false);
        gic.set_priority(0, 40, 0x40);
        gic.set_spi_level(8, false);
        gic.set_spi_level(8, true); // an edge-triggered SPI fires again
        gic.update(&sink);
        assert_eq!(gic.acknowledge(0), 40, "taken again above itself");
        gic.set_irq_active(0, 40, false);
        let saved = gic.save();
        assert_eq!(saved.cpus[0].active_stack, vec![(0x80, 40), (0x40, 40)]);
        let mut copy = GicState::new(1);
        copy.restore(&saved).unwrap();
        assert_eq!(copy.save(), saved);
        assert!(copy.end_of_interrupt(0, 40) && copy.end_of_interrupt(0, 40), "both drop as they would have");
        assert!(!copy.end_of_interrupt(0, 40));
    }

    #[test]
    fn a_damaged_or_foreign_state_is_refused_and_changes_nothing() {
        let saved = busy().save();
        let mut other = GicState::new(1);
        assert_eq!(other.restore(&saved), Err(GicRestoreError::Cpus { saved: 2, now: 1 }));
        let fresh = GicState::new(2).save();
        let damage: [fn(&mut SavedGic); 12] = [
            |s| s.spis.pop().map(drop).unwrap_or(()),
            |s| s.spi_targets[3] = 0b100,
            |s| s.spis[0].priority = 0x81,
            |s| s.cpus[0].private.truncate(16),
            |s| s.cpus[0].sgi_sources.push(0),
            |s| s.cpus[1].private[2].edge = false,
            |s| s.cpus[0].bpr = 9,
            |s| s.cpus[0].active_stack.push((0x80, 5000)),
            |s| s.cpus[0].active_stack = vec![(0x80, 40); 200],
            |s| s.cpus[0].sgi_sources[3] = 0b100,
            |s| s.cpus[0].active_stack.push((0, 1)),
            |s| s.cpus[0].active_stack.push((0x80, 40)),
        ];
        for (i, damage) in damage.iter().enumerate() {
            let mut bad = saved.clone();
            damage(&mut bad);
            let mut gic = GicState::new(2);
            assert!(matches!(gic.restore(&bad), Err(GicRestoreError::Damaged(_))), "damage {i}");
            assert_eq!(gic.save(), fresh, "damage {i} left the GIC as it was");
        }
    }
}
