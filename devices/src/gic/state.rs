//! The GICv2 state machine (Arm IHI 0048B), without register decoding.
//!
//! Interrupt ids: SGIs 0..16 and PPIs 16..32 are banked per CPU; SPIs from 32 are
//! shared and routed by an 8-bit CPU target mask. Every interrupt has an enable, a
//! latched pending bit (an edge, or a software set), an input level (for
//! level-sensitive interrupts the input keeps it pending), an active bit and a priority.
//! SGIs are pending per source CPU, as GICv2 specifies.
//!
//! Each CPU interface keeps the stack of interrupts it has acknowledged and not yet
//! priority-dropped; the running priority is the top of that stack. An interrupt is
//! signalled to a CPU when both the distributor and the CPU interface are enabled and
//! the highest-priority pending interrupt beats both the priority mask and the running
//! priority's group priority (the binary point decides the group).

use super::CpuIrqSink;

mod saved;
pub use saved::{GicRestoreError, SavedCpu, SavedGic};

/// Number of SGIs.
pub const NUM_SGIS: u32 = 16;
/// First SPI id.
pub const SPI_BASE: u32 = 32;
/// Number of SPIs this GIC implements.
pub const NUM_SPIS: u32 = 64;
/// Total interrupt ids.
pub const NUM_IRQS: u32 = SPI_BASE + NUM_SPIS;
/// The most CPUs a GICv2 serves.
pub const MAX_CPUS: usize = 8;
/// The id IAR returns when nothing can be acknowledged.
pub const SPURIOUS: u32 = 1023;
/// Implemented priority bits: five, as on most Arm implementations.
pub const PRIORITY_MASK: u8 = 0xf8;
/// The smallest binary point with five priority bits.
pub const MIN_BPR: u8 = 2;
/// Running priority when nothing is active (above every real priority).
const IDLE: u16 = 0x100;

/// The bit of `cpu` in an 8-bit CPU mask (0 for an index past the mask).
pub fn cpu_bit(cpu: usize) -> u8 {
    u32::try_from(cpu).ok().and_then(|c| 1u8.checked_shl(c)).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Irq {
    enabled: bool,
    /// Pending from an edge or a software set; cleared by acknowledge or ICPENDR.
    latched: bool,
    /// The input line (meaningful for level-sensitive interrupts).
    level: bool,
    active: bool,
    priority: u8,
    edge: bool,
}

impl Irq {
    fn pending(&self) -> bool {
        self.latched || (!self.edge && self.level)
    }
}

#[derive(Debug, Clone)]
struct Cpu {
    /// SGIs and PPIs, banked.
    private: [Irq; SPI_BASE as usize],
    /// For each SGI, the CPUs it is pending from (bit n: from CPU n).
    sgi_sources: [u8; NUM_SGIS as usize],
    enabled: bool,
    /// GICC_CTLR.EOImode: EOIR only drops priority; DIR deactivates.
    eoi_mode: bool,
    pmr: u8,
    bpr: u8,
    /// Acknowledged, not yet priority-dropped: (priority, id). Bounded: an interrupt is
    /// pushed only when it goes from inactive to active.
    active_stack: Vec<(u8, u32)>,
    irq_out: bool,
}

impl Cpu {
    fn new() -> Self {
        let mut private = [Irq::default(); SPI_BASE as usize];
        for sgi in &mut private[..NUM_SGIS as usize] {
            sgi.edge = true;
        }
        Cpu {
            private,
            sgi_sources: [0; NUM_SGIS as usize],
            enabled: false,
            eoi_mode: false,
            pmr: 0,
            bpr: MIN_BPR,
            active_stack: Vec::with_capacity(8),
            irq_out: false,
        }
    }

    fn running_priority(&self) -> u16 {
        self.active_stack.last().map_or(IDLE, |&(p, _)| u16::from(p))
    }

    fn group_priority(&self, priority: u16) -> u16 {
        priority & (0x1ff << (self.bpr + 1))
    }
}

/// The whole GIC's state. Every method keeps the CPU outputs up to date through the sink.
#[derive(Debug)]
pub struct GicState {
    enabled: bool,
    spis: Vec<Irq>,
    spi_targets: Vec<u8>,
    cpus: Vec<Cpu>,
}

impl GicState {
    /// A GIC with `num_cpus` CPU interfaces (1..=8, clamped).
    pub fn new(num_cpus: usize) -> Self {
        GicState {
            enabled: false,
            spis: vec![Irq::default(); NUM_SPIS as usize],
            spi_targets: vec![0; NUM_SPIS as usize],
            cpus: (0..num_cpus.clamp(1, MAX_CPUS)).map(|_| Cpu::new()).collect(),
        }
    }

    /// Number of CPU interfaces.
    pub fn num_cpus(&self) -> usize {
        self.cpus.len()
    }

    fn irq(&self, cpu: usize, id: u32) -> Option<&Irq> {
        if id < SPI_BASE {
            self.cpus.get(cpu)?.private.get(id as usize)
        } else {
            self.spis.get((id - SPI_BASE) as usize)
        }
    }

    fn irq_mut(&mut self, cpu: usize, id: u32) -> Option<&mut Irq> {
        if id < SPI_BASE {
            self.cpus.get_mut(cpu)?.private.get_mut(id as usize)
        } else {
            self.spis.get_mut((id - SPI_BASE) as usize)
        }
    }

    fn pending_on(&self, cpu: usize, id: u32) -> bool {
        if id < NUM_SGIS {
            return self.cpus[cpu].sgi_sources[id as usize] != 0;
        }
        let Some(irq) = self.irq(cpu, id) else {
            return false;
        };
        irq.pending() && (id < SPI_BASE || self.spi_targets[(id - SPI_BASE) as usize] & cpu_bit(cpu) != 0)
    }

    /// The highest-priority pending, enabled, inactive interrupt for `cpu`, as (priority, id).
    fn highest_pending(&self, cpu: usize) -> Option<(u8, u32)> {
        (0..NUM_IRQS)
            .filter(|&id| self.irq(cpu, id).is_some_and(|irq| irq.enabled && !irq.active) && self.pending_on(cpu, id))
            .map(|id| (self.irq(cpu, id).map_or(0xff, |i| i.priority), id))
            .min()
    }

    /// The interrupt `cpu` would be signalled now, if any.
    fn signalled(&self, cpu: usize) -> Option<(u8, u32)> {
        let c = &self.cpus[cpu];
        if !self.enabled || !c.enabled {
            return None;
        }
        let (priority, id) = self.highest_pending(cpu)?;
        let p = u16::from(priority);
        (p < u16::from(c.pmr) && c.group_priority(p) < c.group_priority(c.running_priority())).then_some((priority, id))
    }

    /// Recomputes every CPU's IRQ output and tells `sink` about changes.
    pub fn update(&mut self, sink: &dyn CpuIrqSink) {
        for cpu in 0..self.cpus.len() {
            let level = self.signalled(cpu).is_some();
            let c = &mut self.cpus[cpu];
            if level != c.irq_out {
                c.irq_out = level;
                sink.set_cpu_irq(cpu, level);
            }
        }
    }

    /// Drives the input line of SPI `spi` (0-based, INTID `32 + spi`).
    pub fn set_spi_level(&mut self, spi: u32, level: bool) {
        if let Some(irq) = self.spis.get_mut(spi as usize) {
            if irq.edge && level && !irq.level {
                irq.latched = true;
            }
            irq.level = level;
        }
    }

    /// Drives the input line of PPI `id` (16..32) of `cpu`.
    pub fn set_ppi_level(&mut self, cpu: usize, id: u32, level: bool) {
        if !(NUM_SGIS..SPI_BASE).contains(&id) {
            return;
        }
        if let Some(irq) = self.irq_mut(cpu, id) {
            if irq.edge && level && !irq.level {
                irq.latched = true;
            }
            irq.level = level;
        }
    }

    /// GICD_CTLR.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// GICD_CTLR as read back.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether interrupt `id` is enabled, for the bank of `cpu`.
    pub fn is_enabled(&self, cpu: usize, id: u32) -> bool {
        self.irq(cpu, id).is_some_and(|i| i.enabled)
    }

    /// ISENABLER/ICENABLER for one interrupt.
    pub fn set_irq_enabled(&mut self, cpu: usize, id: u32, enabled: bool) {
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.enabled = enabled;
        }
    }

    /// Whether interrupt `id` is pending, for the bank of `cpu` (SPIs: regardless of target).
    pub fn is_pending(&self, cpu: usize, id: u32) -> bool {
        if id < NUM_SGIS {
            return self.cpus.get(cpu).is_some_and(|c| c.sgi_sources[id as usize] != 0);
        }
        self.irq(cpu, id).is_some_and(Irq::pending)
    }

    /// ISPENDR/ICPENDR for one interrupt. SGI bits are read-only here (GICv2 routes
    /// their pending state through SPENDSGIR/CPENDSGIR).
    pub fn set_irq_pending(&mut self, cpu: usize, id: u32, pending: bool) {
        if id < NUM_SGIS {
            return;
        }
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.latched = pending;
        }
    }

    /// Whether interrupt `id` is active, for the bank of `cpu`.
    pub fn is_active(&self, cpu: usize, id: u32) -> bool {
        self.irq(cpu, id).is_some_and(|i| i.active)
    }

    /// ISACTIVER/ICACTIVER for one interrupt.
    pub fn set_irq_active(&mut self, cpu: usize, id: u32, active: bool) {
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.active = active;
        }
    }

    /// IPRIORITYR for one interrupt.
    pub fn priority(&self, cpu: usize, id: u32) -> u8 {
        self.irq(cpu, id).map_or(0, |i| i.priority)
    }

    /// Sets IPRIORITYR for one interrupt (unimplemented low bits read as zero).
    pub fn set_priority(&mut self, cpu: usize, id: u32, priority: u8) {
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.priority = priority & PRIORITY_MASK;
        }
    }

    /// ITARGETSR for one interrupt: for SGIs and PPIs, the reading CPU's own bit.
    pub fn target(&self, cpu: usize, id: u32) -> u8 {
        if id < SPI_BASE {
            cpu_bit(cpu)
        } else {
            self.spi_targets.get((id - SPI_BASE) as usize).copied().unwrap_or(0)
        }
    }

    /// Sets ITARGETSR of SPI `id`; bits for CPUs that do not exist are dropped.
    pub fn set_target(&mut self, id: u32, mask: u8) {
        let valid = ((1u16 << self.cpus.len()) - 1) as u8;
        if let Some(t) = id.checked_sub(SPI_BASE).and_then(|i| self.spi_targets.get_mut(i as usize)) {
            *t = mask & valid;
        }
    }

    /// Whether interrupt `id` is edge-triggered (ICFGR), for the bank of `cpu`.
    pub fn is_edge(&self, cpu: usize, id: u32) -> bool {
        self.irq(cpu, id).is_some_and(|i| i.edge)
    }

    /// Sets ICFGR for one interrupt; SGIs are always edge-triggered.
    pub fn set_edge(&mut self, cpu: usize, id: u32, edge: bool) {
        if id < NUM_SGIS {
            return;
        }
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.edge = edge;
        }
    }

    /// GICD_SGIR: `from` sends SGI `id` to the CPUs in `targets`.
    pub fn send_sgi(&mut self, from: usize, id: u32, targets: u8) {
        if from >= self.cpus.len() || id >= NUM_SGIS {
            return;
        }
        for (cpu, c) in self.cpus.iter_mut().enumerate() {
            if targets & cpu_bit(cpu) != 0 {
                c.sgi_sources[id as usize] |= cpu_bit(from);
            }
        }
    }

    /// The source CPUs of SGI `id` pending on `cpu` (CPENDSGIR/SPENDSGIR byte).
    pub fn sgi_sources(&self, cpu: usize, id: u32) -> u8 {
        self.cpus.get(cpu).and_then(|c| c.sgi_sources.get(id as usize)).copied().unwrap_or(0)
    }

    /// Sets (`pending`) or clears the source bits `mask` of SGI `id` on `cpu`.
    pub fn set_sgi_sources(&mut self, cpu: usize, id: u32, mask: u8, pending: bool) {
        let valid = ((1u16 << self.cpus.len()) - 1) as u8;
        if let Some(s) = self.cpus.get_mut(cpu).and_then(|c| c.sgi_sources.get_mut(id as usize)) {
            if pending {
                *s |= mask & valid;
            } else {
                *s &= !mask;
            }
        }
    }

    /// GICC_CTLR: enable and EOImode.
    pub fn set_cpu_control(&mut self, cpu: usize, enabled: bool, eoi_mode: bool) {
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.enabled = enabled;
            c.eoi_mode = eoi_mode;
        }
    }

    /// GICC_CTLR as (enabled, EOImode).
    pub fn cpu_control(&self, cpu: usize) -> (bool, bool) {
        self.cpus.get(cpu).map_or((false, false), |c| (c.enabled, c.eoi_mode))
    }

    /// GICC_PMR.
    pub fn pmr(&self, cpu: usize) -> u8 {
        self.cpus.get(cpu).map_or(0, |c| c.pmr)
    }

    /// Sets GICC_PMR.
    pub fn set_pmr(&mut self, cpu: usize, pmr: u8) {
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.pmr = pmr & PRIORITY_MASK;
        }
    }

    /// GICC_BPR.
    pub fn bpr(&self, cpu: usize) -> u8 {
        self.cpus.get(cpu).map_or(0, |c| c.bpr)
    }

    /// Sets GICC_BPR (values below the minimum read back as the minimum).
    pub fn set_bpr(&mut self, cpu: usize, bpr: u8) {
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.bpr = (bpr & 7).max(MIN_BPR);
        }
    }

    /// GICC_RPR: the running priority (0xff when idle).
    pub fn running_priority(&self, cpu: usize) -> u8 {
        self.cpus.get(cpu).map_or(0xff, |c| c.running_priority().min(0xff) as u8)
    }

    /// GICC_HPPIR: the highest-priority pending interrupt (with the SGI source), or SPURIOUS.
    pub fn highest_pending_id(&self, cpu: usize) -> u32 {
        match self.highest_pending(cpu) {
            Some((_, id)) if id < NUM_SGIS => id | (self.sgi_sources(cpu, id).trailing_zeros() << 10),
            Some((_, id)) => id,
            None => SPURIOUS,
        }
    }

    /// GICC_IAR: acknowledges the signalled interrupt, making it active. Returns its id
    /// (with the source CPU in bits 12:10 for SGIs), or [`SPURIOUS`].
    pub fn acknowledge(&mut self, cpu: usize) -> u32 {
        let Some((priority, id)) = self.cpus.get(cpu).and_then(|_| self.signalled(cpu)) else {
            return SPURIOUS;
        };
        let mut value = id;
        if id < NUM_SGIS {
            let sources = &mut self.cpus[cpu].sgi_sources[id as usize];
            let source = sources.trailing_zeros();
            *sources &= !(1 << source);
            value |= source << 10;
        }
        if let Some(irq) = self.irq_mut(cpu, id) {
            irq.latched = false;
            irq.active = true;
        }
        self.cpus[cpu].active_stack.push((priority, id));
        value
    }

    /// GICC_EOIR: drops the priority of `value`'s interrupt and, unless EOImode is set,
    /// deactivates it. Returns false for an id that `cpu` has not acknowledged.
    pub fn end_of_interrupt(&mut self, cpu: usize, value: u32) -> bool {
        let id = value & 0x3ff;
        let Some(c) = self.cpus.get_mut(cpu) else {
            return false;
        };
        let Some(at) = c.active_stack.iter().rposition(|&(_, i)| i == id) else {
            return false;
        };
        c.active_stack.remove(at);
        if !c.eoi_mode {
            self.set_irq_active(cpu, id, false);
        }
        true
    }

    /// GICC_DIR: deactivates `value`'s interrupt (meaningful with EOImode set).
    pub fn deactivate(&mut self, cpu: usize, value: u32) {
        let id = value & 0x3ff;
        if self.cpus.get(cpu).is_some_and(|c| c.eoi_mode) {
            self.set_irq_active(cpu, id, false);
        }
    }

    /// A one-line-per-CPU summary of the interesting state, for debugging hangs.
    pub fn dump(&self) -> String {
        let mut out = format!("gic: distributor {}\n", if self.enabled { "on" } else { "off" });
        for (cpu, c) in self.cpus.iter().enumerate() {
            let list = |f: &dyn Fn(u32) -> bool| -> Vec<u32> { (0..NUM_IRQS).filter(|&id| f(id)).collect() };
            out += &format!(
                "gic: cpu{cpu} if={} pmr={:#x} bpr={} out={} rpr={:#x} stack={:?} hppi={:?} signalled={:?} \
                 pending={:?} active={:?} enabled={:?} sgi_sources={:?}\n",
                c.enabled,
                c.pmr,
                c.bpr,
                c.irq_out,
                self.running_priority(cpu),
                c.active_stack,
                self.highest_pending(cpu),
                self.signalled(cpu),
                list(&|id| self.pending_on(cpu, id)),
                list(&|id| self.is_active(cpu, id)),
                list(&|id| self.is_enabled(cpu, id)),
                c.sgi_sources,
            );
        }
        out
    }

    /// Whether `cpu`'s IRQ output is asserted.
    pub fn irq_out(&self, cpu: usize) -> bool {
        self.cpus.get(cpu).is_some_and(|c| c.irq_out)
    }
}
