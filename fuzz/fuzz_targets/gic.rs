//! The emulated GICv2 (`devices::gic`): sequences of distributor and CPU-interface
//! accesses of any size (0 to 8 bytes) at any offset of the two windows, from up to 8
//! vCPUs (`Gic::distributor` and `Gic::cpu_interface`, banked by vCPU index, including
//! indices past the GIC's CPU count), mixed with SPI level changes (`Gic::spi_line`) and
//! PPI level changes (`Gic::set_ppi_level`). An input may start from what Linux's GICv2
//! driver does at boot, so that short inputs reach acknowledged, preempted and
//! EOImode-1 states.
//!
//! Oracles, against a shadow of the architectural state (Arm IHI 0048B) that this target
//! keeps from the accesses it makes itself (the register decoding below is written from
//! the specification's register map, not taken from the model):
//! - a GICC_IAR read returns an interrupt that is pending for that CPU (an SPI also
//!   targets it; an SGI names a source CPU it is pending from), enabled and not active,
//!   of the highest priority among those, which beats GICC_PMR and whose group priority
//!   (GICC_BPR) beats the running priority, with the distributor and the CPU interface
//!   enabled; or 1023 (spurious) exactly when no interrupt qualifies;
//! - GICC_RPR reads the highest priority among the interrupts the CPU acknowledged and
//!   has not yet EOI'd, and 0xff (idle) once it has EOI'd all of them: a priority drop
//!   is what EOIR does in either EOImode (IHI 0048B, "Priority drop and interrupt
//!   deactivation"; GICC_RPR returns the idle priority once every active interrupt has
//!   had its priority dropped). Each input ends with every CPU EOIing (and, in EOImode 1,
//!   deactivating through GICC_DIR) whatever it acknowledged, and RPR must read 0xff;
//! - after every operation, each CPU's IRQ output as last reported to the `CpuIrqSink`
//!   equals `Gic::irq_asserted` and what the shadow state implies, and the sink is told
//!   only of changes;
//! - every read of a register the architecture defines returns the shadow's value
//!   (accesses the model ignores, other than a byte-accessible register's bytes or a
//!   whole aligned word, read as zero); GICC_HPPIR names a pending, enabled, inactive
//!   interrupt of the highest priority, or 1023;
//! - no panic, no hang, and the heap stays bounded (see [`HEAP_BOUND`]).

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::arbitrary::{self, Unstructured};
use libfuzzer_sys::fuzz_target;

use devices::bus::MmioDevice;
use devices::gic::{CpuIrqSink, Gic, MAX_CPUS, SPURIOUS};
use devices::irq::IrqLine;

/// Interrupt ids the model implements: 16 SGIs, 16 PPIs, 64 SPIs.
const NUM_IRQS: u32 = 96;
const SPI_BASE: u32 = 32;
const NUM_SPIS: usize = 64;
/// The model implements five priority bits (documented in devices/src/gic/state.rs).
const PRIORITY_MASK: u8 = 0xf8;
/// ... so the smallest binary point is 7 - 5 = 2.
const MIN_BPR: u8 = 2;
/// Running priority with nothing active: below every real priority.
const IDLE: u16 = 0x100;

const DIST_WINDOW: u16 = 0x1000;
const CPU_WINDOW: u16 = 0x2000;

const GICD_CTLR: u64 = 0x000;
const GICD_ISENABLER: u64 = 0x100;
const GICD_IPRIORITYR: u64 = 0x400;
const GICD_ITARGETSR: u64 = 0x800;
const GICC_CTLR: u64 = 0x00;
const GICC_PMR: u64 = 0x04;
const GICC_BPR: u64 = 0x08;
const GICC_IAR: u64 = 0x0c;
const GICC_EOIR: u64 = 0x10;
const GICC_RPR: u64 = 0x14;
const GICC_HPPIR: u64 = 0x18;
const GICC_DIR: u64 = 0x1000;

/// How much the heap may grow during one input once the GIC exists: every piece of the
/// model's state is fixed-size except each CPU's stack of acknowledged priorities, which
/// is at most 32 entries deep (an acknowledge pushes only a priority strictly higher than
/// the current top, and there are 32 priority levels): under 2 KiB for 8 CPUs. The
/// target's own growth is the lazily created SPI lines (72 small `Arc`s, about 2.5 KiB).
/// 16 KiB leaves room for allocator rounding; anything that grows per access (a queue,
/// a log) crosses it within a few hundred operations.
const HEAP_BOUND: usize = 16 << 10;

#[derive(Arbitrary, Debug)]
struct Input {
    /// CPU interfaces: 1 + cpus % 8.
    cpus: u8,
    /// Start from Linux's driver's set-up (see [`boot`]), with this binary point and
    /// EOImode.
    boot: Option<u8>,
    ops: Vec<Op>,
}

/// One thing that happens to the GIC. Decoded by hand (below) so that the choice of
/// operation is one byte and every field as narrow as it can be: a short input holds
/// many operations, which is what deep states (preemption, EOImode 1) need.
#[derive(Debug)]
enum Op {
    /// A read of `len % 9` bytes at `offset` in the distributor window, by vCPU
    /// `vcpu % (CPUs + 1)` (the last one past the GIC's CPUs).
    DistRead {
        vcpu: u8,
        offset: u16,
        len: u8,
    },
    /// A write of the low `len % 9` bytes of `value` (zero-extended), little-endian.
    DistWrite {
        vcpu: u8,
        offset: u16,
        len: u8,
        value: u32,
    },
    CpuRead {
        vcpu: u8,
        offset: u16,
        len: u8,
    },
    CpuWrite {
        vcpu: u8,
        offset: u16,
        len: u8,
        value: u32,
    },
    /// A 32-bit write to distributor register `index` (offset `4 * index`): what drivers do.
    DistWord {
        vcpu: u8,
        index: u16,
        value: u32,
    },
    /// A byte write of interrupt `id`'s priority or target (the byte-accessible banks).
    DistByte {
        vcpu: u8,
        target: bool,
        id: u8,
        value: u8,
    },
    /// GICD_ISENABLER, GICD_ICENABLER, GICD_ISPENDR or GICD_ICPENDR (`register % 4`) with
    /// the one bit of interrupt `id`.
    Bit {
        vcpu: u8,
        register: u8,
        id: u8,
    },
    /// GICD_SGIR: SGI `id`, target filter, target list.
    Sgi {
        vcpu: u8,
        id: u8,
        filter: u8,
        targets: u8,
    },
    /// A 32-bit CPU interface write: CTLR, PMR or BPR (`register % 3`).
    CpuControl {
        vcpu: u8,
        register: u8,
        value: u16,
    },
    /// GICC_IAR.
    Ack {
        vcpu: u8,
    },
    /// GICC_EOIR with one of the values this CPU's IAR returned and it has not EOI'd
    /// (`pick` counts back from the latest), or `pick` itself when there is none.
    Eoi {
        vcpu: u8,
        pick: u8,
    },
    /// GICC_DIR with a value this CPU priority-dropped in EOImode 1, else as [`Op::Eoi`].
    Dir {
        vcpu: u8,
        pick: u8,
    },
    /// The input line of SPI `spi % 72` (a few past the 64 implemented).
    Spi {
        spi: u8,
        level: bool,
    },
    /// The input line of interrupt `id % 34` of `vcpu` (SGIs and ids past 31 included:
    /// `set_ppi_level` ignores them).
    Ppi {
        vcpu: u8,
        id: u8,
        level: bool,
    },
    /// `Gic::dump`, the debugging summary.
    Dump,
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let vcpu = u.arbitrary()?;
        Ok(match u.int_in_range(0u8..=17)? {
            0 => Op::DistRead { vcpu, offset: u.arbitrary()?, len: u.arbitrary()? },
            1 => Op::DistWrite { vcpu, offset: u.arbitrary()?, len: u.arbitrary()?, value: u.arbitrary()? },
            2 => Op::CpuRead { vcpu, offset: u.arbitrary()?, len: u.arbitrary()? },
            3 => Op::CpuWrite { vcpu, offset: u.arbitrary()?, len: u.arbitrary()?, value: u.arbitrary()? },
            4 => Op::DistWord { vcpu, index: u.arbitrary()?, value: u.arbitrary()? },
            5 => Op::DistByte { vcpu, target: u.arbitrary()?, id: u.arbitrary()?, value: u.arbitrary()? },
            6 | 7 => Op::Bit { vcpu, register: u.arbitrary()?, id: u.arbitrary()? },
            8 => Op::Sgi { vcpu, id: u.arbitrary()?, filter: u.arbitrary()?, targets: u.arbitrary()? },
            9 => Op::CpuControl { vcpu, register: u.arbitrary()?, value: u.arbitrary()? },
            10 | 11 => Op::Ack { vcpu },
            12 | 13 => Op::Eoi { vcpu, pick: u.arbitrary()? },
            14 => Op::Dir { vcpu, pick: u.arbitrary()? },
            15 => Op::Spi { spi: u.arbitrary()?, level: u.arbitrary()? },
            16 => Op::Ppi { vcpu, id: u.arbitrary()?, level: u.arbitrary()? },
            _ => Op::Dump,
        })
    }
}

/// States of the GIC that its code alone does not tell libFuzzer apart (the model runs
/// the same lines for a first and a nested acknowledge): reaching one is new coverage in
/// [`reached`], so inputs that get there are kept and built on.
#[derive(Debug, Clone, Copy)]
enum Reached {
    /// An acknowledge with this many interrupts already acknowledged on the CPU.
    AckDepth(usize),
    /// An acknowledge that preempts another, with this binary point.
    PreemptWithBpr(u8),
    AckInEoiMode,
    SgiFromAnother,
    /// A level-sensitive interrupt acknowledged with its input still high.
    ActiveAndPending,
    EoiOutOfOrder,
    DeactivateDropped,
    /// IAR spurious with an interrupt pending, held back by a disabled distributor or CPU
    /// interface, by the priority mask, or by the running priority.
    Disabled,
    MaskedByPmr,
    MaskedByRunning,
}

/// One distinct branch per [`Reached`] state (up to an acknowledge depth of 6), for
/// libFuzzer's edge coverage.
#[inline(never)]
fn reached(state: Reached) {
    use std::hint::black_box;
    match state {
        Reached::AckDepth(0) => black_box(0),
        Reached::AckDepth(1) => black_box(1),
        Reached::AckDepth(2) => black_box(2),
        Reached::AckDepth(3) => black_box(3),
        Reached::AckDepth(4) => black_box(4),
        Reached::AckDepth(5) => black_box(5),
        Reached::AckDepth(_) => black_box(6),
        Reached::PreemptWithBpr(2) => black_box(7),
        Reached::PreemptWithBpr(3) => black_box(8),
        Reached::PreemptWithBpr(4) => black_box(9),
        Reached::PreemptWithBpr(5) => black_box(10),
        Reached::PreemptWithBpr(6) => black_box(11),
        Reached::PreemptWithBpr(_) => black_box(12),
        Reached::AckInEoiMode => black_box(13),
        Reached::SgiFromAnother => black_box(14),
        Reached::ActiveAndPending => black_box(15),
        Reached::EoiOutOfOrder => black_box(16),
        Reached::DeactivateDropped => black_box(17),
        Reached::MaskedByPmr => black_box(18),
        Reached::MaskedByRunning => black_box(19),
        Reached::Disabled => black_box(20),
    };
}

/// Records each CPU's IRQ output as the GIC reports it.
struct Sink {
    cpus: usize,
    levels: Mutex<[bool; MAX_CPUS]>,
}

impl CpuIrqSink for Sink {
    fn set_cpu_irq(&self, cpu: usize, level: bool) {
        assert!(cpu < self.cpus, "the output of cpu{cpu}, which does not exist, was reported");
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        assert_ne!(levels[cpu], level, "cpu{cpu}: the sink was told of an output that did not change");
        levels[cpu] = level;
    }
}

/// One interrupt's state, as IHI 0048B describes it: the enable, the pending state (a
/// latch set by an edge or GICD_ISPENDR, plus the input level for a level-sensitive
/// interrupt), the active state, the priority and the configuration.
#[derive(Debug, Clone, Copy, Default)]
struct Line {
    enabled: bool,
    latched: bool,
    level: bool,
    active: bool,
    priority: u8,
    edge: bool,
}

impl Line {
    fn pending(&self) -> bool {
        self.latched || (self.level && !self.edge)
    }
}

/// One CPU interface and its banked interrupts.
#[derive(Debug)]
struct Iface {
    /// SGIs and PPIs.
    private: [Line; 32],
    /// For each SGI, the CPUs it is pending from.
    sgi_from: [u8; 16],
    enabled: bool,
    eoi_mode: bool,
    pmr: u8,
    bpr: u8,
    /// Acknowledged and not yet EOI'd: (priority when acknowledged, the IAR value).
    acked: Vec<(u8, u32)>,
    /// Priority-dropped in EOImode 1 and not yet deactivated (IAR values), latest last.
    dropped: Vec<u32>,
}

/// Most values kept in [`Iface::dropped`], for [`Op::Dir`] to pick from.
const DROPPED_KEPT: usize = 16;

impl Iface {
    fn new() -> Self {
        let mut private = [Line::default(); 32];
        for sgi in &mut private[..16] {
            sgi.edge = true; // SGIs are always edge-triggered (GICD_ICFGR0 is read-only).
        }
        Iface {
            private,
            sgi_from: [0; 16],
            enabled: false,
            eoi_mode: false,
            pmr: 0,
            bpr: MIN_BPR,
            acked: Vec::with_capacity(64),
            dropped: Vec::with_capacity(DROPPED_KEPT),
        }
    }

    /// The running priority: the highest priority acknowledged and not yet dropped.
    fn running(&self) -> u16 {
        self.acked.iter().map(|&(p, _)| u16::from(p)).min().unwrap_or(IDLE)
    }

    /// Group priority: the bits of `priority` above the binary point (GICC_BPR).
    fn group(&self, priority: u16) -> u16 {
        priority & !((2u16 << self.bpr) - 1)
    }

    fn drop_priority(&mut self, value: u32) {
        if self.dropped.len() == DROPPED_KEPT {
            self.dropped.remove(0);
        }
        self.dropped.push(value);
    }
}

/// The whole GIC as the architecture describes it.
struct Shadow {
    cpus: usize,
    enabled: bool,
    spis: [Line; NUM_SPIS],
    targets: [u8; NUM_SPIS],
    ifaces: Vec<Iface>,
}

fn cpu_bit(cpu: usize) -> u8 {
    if cpu < 8 {
        1 << cpu
    } else {
        0
    }
}

/// The registers that take byte accesses: GICD_IPRIORITYR, GICD_ITARGETSR,
/// GICD_CPENDSGIR and GICD_SPENDSGIR. Every other register is word-accessible only.
fn byte_accessible(word: u64) -> bool {
    matches!(word, 0x400..=0xbff | 0xf10..=0xf2f)
}

impl Shadow {
    fn new(cpus: usize) -> Self {
        Shadow {
            cpus,
            enabled: false,
            spis: [Line::default(); NUM_SPIS],
            targets: [0; NUM_SPIS],
            ifaces: (0..cpus).map(|_| Iface::new()).collect(),
        }
    }

    /// Bits of the CPUs that exist.
    fn valid(&self) -> u8 {
        ((1u16 << self.cpus) - 1) as u8
    }

    fn line(&self, cpu: usize, id: u32) -> Option<&Line> {
        match id {
            0..SPI_BASE => self.ifaces.get(cpu).map(|c| &c.private[id as usize]),
            SPI_BASE..NUM_IRQS => Some(&self.spis[(id - SPI_BASE) as usize]),
            _ => None,
        }
    }

    fn line_mut(&mut self, cpu: usize, id: u32) -> Option<&mut Line> {
        match id {
            0..SPI_BASE => self.ifaces.get_mut(cpu).map(|c| &mut c.private[id as usize]),
            SPI_BASE..NUM_IRQS => Some(&mut self.spis[(id - SPI_BASE) as usize]),
            _ => None,
        }
    }

    /// Pending as GICD_ISPENDR shows it (an SPI whatever its targets).
    fn pending(&self, cpu: usize, id: u32) -> bool {
        match id {
            0..16 => self.ifaces.get(cpu).is_some_and(|c| c.sgi_from[id as usize] != 0),
            _ => self.line(cpu, id).is_some_and(Line::pending),
        }
    }

    /// Pending, enabled and inactive for `cpu` (an SPI must target it): a candidate.
    fn ready(&self, cpu: usize, id: u32) -> bool {
        let routed = id < SPI_BASE || self.targets[(id - SPI_BASE) as usize] & cpu_bit(cpu) != 0;
        self.line(cpu, id).is_some_and(|l| l.enabled && !l.active) && routed && self.pending(cpu, id)
    }

    /// The highest priority among the candidates of `cpu`.
    fn best(&self, cpu: usize) -> Option<u8> {
        (0..NUM_IRQS).filter(|&id| self.ready(cpu, id)).filter_map(|id| self.line(cpu, id)).map(|l| l.priority).min()
    }

    /// The priority of the interrupt `cpu` is signalled now, if any.
    fn signalled(&self, cpu: usize) -> Option<u8> {
        let c = self.ifaces.get(cpu)?;
        if !self.enabled || !c.enabled {
            return None;
        }
        let p = self.best(cpu)?;
        (p < c.pmr && c.group(u16::from(p)) < c.group(c.running())).then_some(p)
    }

    /// Checks what a GICC_IAR read returned, then acknowledges it here too.
    fn acknowledge(&mut self, cpu: usize, value: u32) {
        let Some(p) = self.signalled(cpu) else {
            assert_eq!(value, SPURIOUS, "cpu{cpu}: IAR returned {value:#x} with nothing to signal");
            if let (Some(best), Some(c)) = (self.best(cpu), self.ifaces.get(cpu)) {
                reached(match () {
                    () if !self.enabled || !c.enabled => Reached::Disabled,
                    () if best >= c.pmr => Reached::MaskedByPmr,
                    () => Reached::MaskedByRunning,
                });
            }
            return;
        };
        assert_ne!(value, SPURIOUS, "cpu{cpu}: IAR spurious with an interrupt of priority {p:#x} to signal");
        let (id, source) = (value & 0x3ff, (value >> 10) & 7);
        assert_eq!(value >> 13, 0, "cpu{cpu}: IAR {value:#x} has reserved bits set");
        assert!(
            id < NUM_IRQS && self.ready(cpu, id) && self.line(cpu, id).is_some_and(|l| l.priority == p),
            "cpu{cpu}: IAR returned {id}, not a pending, enabled, inactive interrupt of the highest priority {p:#x}"
        );
        let c = &mut self.ifaces[cpu];
        if id < 16 {
            let from = &mut c.sgi_from[id as usize];
            assert!(
                *from & (1 << source) != 0,
                "cpu{cpu}: SGI {id} acknowledged from cpu{source}, which did not send it"
            );
            *from &= !(1 << source);
        } else {
            assert_eq!(source, 0, "cpu{cpu}: IAR {value:#x} names a source CPU for a non-SGI");
        }
        reached(Reached::AckDepth(c.acked.len()));
        if !c.acked.is_empty() {
            reached(Reached::PreemptWithBpr(c.bpr));
        }
        if c.eoi_mode {
            reached(Reached::AckInEoiMode);
        }
        if id < 16 && source as usize != cpu {
            reached(Reached::SgiFromAnother);
        }
        c.acked.push((p, value));
        let line = self.line_mut(cpu, id).expect("an implemented interrupt");
        line.latched = false;
        line.active = true;
        if self.pending(cpu, id) {
            reached(Reached::ActiveAndPending);
        }
    }

    fn deactivate(&mut self, cpu: usize, id: u32) {
        if let Some(line) = self.line_mut(cpu, id) {
            line.active = false;
        }
    }

    fn dist_write(&mut self, cpu: usize, offset: u64, data: &[u8]) {
        let (word, first) = (offset & !3, (offset & 3) as usize);
        if data.is_empty() || first + data.len() > 4 {
            return;
        }
        if byte_accessible(word) {
            for (i, &byte) in data.iter().enumerate() {
                self.dist_byte(cpu, word + (first + i) as u64, byte);
            }
        } else if data.len() == 4 {
            self.dist_word(cpu, word, u32::from_le_bytes(data.try_into().unwrap()));
        }
    }

    fn dist_byte(&mut self, cpu: usize, at: u64, byte: u8) {
        let valid = self.valid();
        match at {
            0x400..=0x7ff => {
                if let Some(line) = self.line_mut(cpu, (at - 0x400) as u32) {
                    line.priority = byte & PRIORITY_MASK;
                }
            }
            0x800..=0xbff => {
                let id = (at - 0x800) as u32;
                if (SPI_BASE..NUM_IRQS).contains(&id) {
                    self.targets[(id - SPI_BASE) as usize] = byte & valid;
                }
            }
            0xf10..=0xf1f => {
                if let Some(c) = self.ifaces.get_mut(cpu) {
                    c.sgi_from[(at - 0xf10) as usize] &= !byte;
                }
            }
            0xf20..=0xf2f => {
                if let Some(c) = self.ifaces.get_mut(cpu) {
                    c.sgi_from[(at - 0xf20) as usize] |= byte & valid;
                }
            }
            _ => {}
        }
    }

    fn dist_word(&mut self, cpu: usize, word: u64, value: u32) {
        let ids = |base: u64| {
            (0..32).filter(move |bit| value & (1 << bit) != 0).map(move |bit| (word - base) as u32 * 8 + bit)
        };
        match word {
            0x000 => self.enabled = value & 1 != 0,
            0x100..=0x17f => {
                ids(0x100).for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.enabled = true))
            }
            0x180..=0x1ff => {
                ids(0x180).for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.enabled = false))
            }
            // SGIs are made pending through GICD_SPENDSGIR: their ISPENDR/ICPENDR bits ignore writes.
            0x200..=0x27f => ids(0x200)
                .filter(|&id| id >= 16)
                .for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.latched = true)),
            0x280..=0x2ff => ids(0x280)
                .filter(|&id| id >= 16)
                .for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.latched = false)),
            0x300..=0x37f => ids(0x300).for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.active = true)),
            0x380..=0x3ff => {
                ids(0x380).for_each(|id| self.line_mut(cpu, id).into_iter().for_each(|l| l.active = false))
            }
            0xc00..=0xcff => {
                let first = (word - 0xc00) as u32 * 4;
                for i in 0..16 {
                    // Int_config[1] of each 2-bit field; SGIs stay edge-triggered.
                    if first + i >= 16 {
                        if let Some(line) = self.line_mut(cpu, first + i) {
                            line.edge = value & (2 << (2 * i)) != 0;
                        }
                    }
                }
            }
            0xf00 => {
                if cpu >= self.cpus {
                    return;
                }
                let id = (value & 0xf) as usize;
                let targets = match (value >> 24) & 3 {
                    0 => (value >> 16) as u8,
                    1 => !cpu_bit(cpu),
                    2 => cpu_bit(cpu),
                    _ => return,
                };
                for (t, c) in self.ifaces.iter_mut().enumerate() {
                    if targets & cpu_bit(t) != 0 {
                        c.sgi_from[id] |= cpu_bit(cpu);
                    }
                }
            }
            _ => {}
        }
    }

    /// What a 32-bit read of distributor register `word` returns, where the architecture
    /// (or the model's documentation: five priority bits, 64 SPIs, no security
    /// extensions) defines it.
    fn dist_read(&self, cpu: usize, word: u64) -> Option<u32> {
        let bits = |base: u64, f: &dyn Fn(u32) -> bool| {
            (0..32).fold(0u32, |acc, bit| {
                let id = (word - base) as u32 * 8 + bit;
                acc | (u32::from(id < NUM_IRQS && f(id)) << bit)
            })
        };
        let bytes = |base: u64, f: &dyn Fn(u32) -> u8| {
            (0..4).fold(0u32, |acc, i| {
                let id = (word - base) as u32 + i;
                acc | (u32::from(if id < NUM_IRQS { f(id) } else { 0 }) << (8 * i))
            })
        };
        let line = |id: u32| self.line(cpu, id).copied().unwrap_or_default();
        Some(match word {
            0x000 => u32::from(self.enabled),
            // ITLinesNumber 2 (96 ids), CPUNumber, no security extensions.
            0x004 => ((self.cpus as u32 - 1) << 5) | 2,
            // GICD_IGROUPR: all group 0 without the security extensions.
            0x080..=0x0ff => 0,
            0x100..=0x1ff => bits(0x100 + (word - 0x100) / 0x80 * 0x80, &|id| line(id).enabled),
            0x200..=0x2ff => bits(0x200 + (word - 0x200) / 0x80 * 0x80, &|id| self.pending(cpu, id)),
            0x300..=0x3ff => bits(0x300 + (word - 0x300) / 0x80 * 0x80, &|id| line(id).active),
            0x400..=0x7fb => bytes(0x400, &|id| line(id).priority),
            // GICD_ITARGETSR0..7 read as the reading CPU's own bit.
            0x800..=0xbfb => {
                bytes(0x800, &|id| if id < SPI_BASE { cpu_bit(cpu) } else { self.targets[(id - SPI_BASE) as usize] })
            }
            0xc00..=0xcff => {
                let first = (word - 0xc00) as u32 * 4;
                (0..16).fold(0, |acc, i| {
                    let id = first + i;
                    acc | (u32::from(id < NUM_IRQS && line(id).edge) << (2 * i + 1))
                })
            }
            0xf10..=0xf2f => {
                let base = if word < 0xf20 { 0xf10 } else { 0xf20 };
                bytes(base, &|id| self.ifaces[cpu].sgi_from[id as usize])
            }
            _ => return None,
        })
    }

    /// What a 32-bit read of CPU interface register `offset` returns (not GICC_IAR).
    fn cpu_read(&self, cpu: usize, offset: u64) -> Option<u32> {
        let c = &self.ifaces[cpu];
        Some(match offset {
            GICC_CTLR => u32::from(c.enabled) | (u32::from(c.eoi_mode) << 9),
            GICC_PMR => u32::from(c.pmr),
            GICC_BPR => u32::from(c.bpr),
            GICC_RPR => c.running().min(0xff) as u32,
            _ => return None,
        })
    }

    fn cpu_write(&mut self, cpu: usize, offset: u64, value: u32) {
        let Some(c) = self.ifaces.get_mut(cpu) else { return };
        match offset {
            GICC_CTLR => (c.enabled, c.eoi_mode) = (value & 1 != 0, value & (1 << 9) != 0),
            GICC_PMR => c.pmr = value as u8 & PRIORITY_MASK,
            GICC_BPR => c.bpr = (value as u8 & 7).max(MIN_BPR),
            GICC_EOIR => {
                let id = value & 0x3ff;
                if id == SPURIOUS {
                    return;
                }
                let Some(at) = c.acked.iter().rposition(|&(_, v)| v & 0x3ff == id) else { return };
                if at + 1 != c.acked.len() {
                    reached(Reached::EoiOutOfOrder);
                }
                let (_, acked) = c.acked.remove(at);
                if c.eoi_mode {
                    c.drop_priority(acked);
                } else {
                    self.deactivate(cpu, id);
                }
            }
            GICC_DIR => {
                if !c.eoi_mode {
                    return;
                }
                let id = value & 0x3ff;
                if c.dropped.iter().any(|&v| v & 0x3ff == id) {
                    reached(Reached::DeactivateDropped);
                }
                c.dropped.retain(|&v| v & 0x3ff != id);
                self.deactivate(cpu, id);
            }
            _ => {}
        }
    }
}

/// The GIC under test, the target's view of it, and the lines it drives.
struct Rig {
    gic: Arc<Gic>,
    sink: Arc<Sink>,
    dist: Arc<dyn MmioDevice>,
    cpu: Arc<dyn MmioDevice>,
    spis: Vec<Option<Arc<dyn IrqLine>>>,
    shadow: Shadow,
}

impl Rig {
    /// Whatever state the accesses reached, a snapshot of it loads: into a fresh GIC,
    /// which then saves the same state.
    fn check_snapshot(&self, cpus: usize) {
        let saved = self.gic.save();
        let copy = Gic::new(cpus, Arc::new(Sink { cpus, levels: Mutex::new([false; MAX_CPUS]) }));
        if let Err(e) = copy.restore(&saved) {
            panic!("a state the guest reached does not restore ({e}): {saved:?}");
        }
        assert!(copy.save() == saved, "a restored GIC saves another state");
    }

    fn new(cpus: usize) -> Self {
        let sink = Arc::new(Sink { cpus, levels: Mutex::new([false; MAX_CPUS]) });
        let gic = Gic::new(cpus, sink.clone());
        let (dist, cpu) = (gic.distributor(), gic.cpu_interface());
        Rig { gic, sink, dist, cpu, spis: vec![None; 72], shadow: Shadow::new(cpus) }
    }

    fn dist_read(&mut self, vcpu: usize, offset: u64, len: usize) {
        let mut data = [0u8; 8];
        self.dist.read(vcpu, offset, &mut data[..len]);
        let (word, first) = (offset & !3, (offset & 3) as usize);
        let whole = len > 0 && first + len <= 4 && (len == 4 || byte_accessible(word));
        if !whole {
            assert_eq!(data, [0; 8], "distributor: an ignored {len}-byte read at {offset:#x} returned data");
            return;
        }
        if vcpu >= self.shadow.cpus {
            return;
        }
        if let Some(expected) = self.shadow.dist_read(vcpu, word) {
            let expected = expected.to_le_bytes();
            assert_eq!(
                data[..len],
                expected[first..first + len],
                "distributor: cpu{vcpu} read {len} bytes at {offset:#x}"
            );
        }
    }

    fn dist_write(&mut self, vcpu: usize, offset: u64, len: usize, value: u64) {
        let data = value.to_le_bytes();
        self.dist.write(vcpu, offset, &data[..len]);
        self.shadow.dist_write(vcpu, offset, &data[..len]);
    }

    /// A CPU interface read; returns the 32-bit value of a whole, aligned word.
    fn cpu_read(&mut self, vcpu: usize, offset: u64, len: usize) -> Option<u32> {
        let mut data = [0u8; 8];
        self.cpu.read(vcpu, offset, &mut data[..len]);
        if len != 4 || offset & 3 != 0 {
            assert_eq!(data, [0; 8], "cpu interface: an ignored {len}-byte read at {offset:#x} returned data");
            return None;
        }
        let value = u32::from_le_bytes(data[..4].try_into().unwrap());
        if vcpu >= self.shadow.cpus {
            if offset == GICC_IAR {
                assert_eq!(value, SPURIOUS, "IAR of cpu{vcpu}, which does not exist");
            }
            return Some(value);
        }
        match offset {
            GICC_IAR => self.shadow.acknowledge(vcpu, value),
            GICC_HPPIR => self.check_hppir(vcpu, value),
            _ => {
                if let Some(expected) = self.shadow.cpu_read(vcpu, offset) {
                    assert_eq!(value, expected, "cpu interface: cpu{vcpu} read {offset:#x}");
                }
            }
        }
        Some(value)
    }

    fn check_hppir(&self, cpu: usize, value: u32) {
        if value == SPURIOUS {
            return;
        }
        let (id, source) = (value & 0x3ff, (value >> 10) & 7);
        let s = &self.shadow;
        assert!(
            id < NUM_IRQS
                && s.ready(cpu, id)
                && s.line(cpu, id).map(|l| l.priority) == s.best(cpu)
                && (id >= 16 || s.ifaces[cpu].sgi_from[id as usize] & (1 << source) != 0)
                && value >> 13 == 0,
            "cpu{cpu}: HPPIR {value:#x} is not a pending interrupt of the highest priority"
        );
    }

    fn cpu_write(&mut self, vcpu: usize, offset: u64, len: usize, value: u64) {
        let data = value.to_le_bytes();
        self.cpu.write(vcpu, offset, &data[..len]);
        if len == 4 && offset & 3 == 0 {
            self.shadow.cpu_write(vcpu, offset, value as u32);
        }
    }

    /// EOIR (and DIR in EOImode 1) for everything `cpu` acknowledged; then RPR is idle.
    fn drain(&mut self, cpu: usize) {
        while let Some(&(_, value)) = self.shadow.ifaces[cpu].acked.last() {
            let eoi_mode = self.shadow.ifaces[cpu].eoi_mode;
            self.cpu_write(cpu, GICC_EOIR, 4, u64::from(value));
            if eoi_mode {
                self.cpu_write(cpu, GICC_DIR, 4, u64::from(value));
            }
        }
        while let Some(&value) = self.shadow.ifaces[cpu].dropped.last() {
            self.cpu_write(cpu, GICC_DIR, 4, u64::from(value));
            self.shadow.ifaces[cpu].dropped.pop();
        }
        self.check_idle(cpu);
    }

    fn check_idle(&mut self, cpu: usize) {
        assert_eq!(self.cpu_read(cpu, GICC_RPR, 4), Some(0xff), "cpu{cpu}: every acknowledged interrupt EOI'd");
    }

    /// Each CPU's output: as reported to the sink, as the GIC says, as the state implies.
    fn check_outputs(&self) {
        let reported = *self.sink.levels.lock().unwrap_or_else(|e| e.into_inner());
        for (cpu, &reported) in reported.iter().enumerate().take(self.shadow.cpus) {
            let implied = self.shadow.signalled(cpu);
            let asserted = self.gic.irq_asserted(cpu);
            assert_eq!(reported, asserted, "cpu{cpu}: the sink was told {reported}, irq_asserted says {asserted}");
            assert_eq!(asserted, implied.is_some(), "cpu{cpu}: IRQ output {asserted}, the state implies {implied:?}");
        }
    }

    fn apply(&mut self, op: &Op) {
        // The GIC's CPUs and one index past them (a vCPU the GIC does not serve).
        let cpus = self.shadow.cpus;
        let vcpu = |v: u8| usize::from(v) % (cpus + 1);
        match *op {
            Op::DistRead { vcpu: v, offset, len } => {
                self.dist_read(vcpu(v), u64::from(offset % DIST_WINDOW), usize::from(len % 9))
            }
            Op::DistWrite { vcpu: v, offset, len, value } => {
                self.dist_write(vcpu(v), u64::from(offset % DIST_WINDOW), usize::from(len % 9), u64::from(value))
            }
            Op::CpuRead { vcpu: v, offset, len } => {
                self.cpu_read(vcpu(v), u64::from(offset % CPU_WINDOW), usize::from(len % 9));
            }
            Op::CpuWrite { vcpu: v, offset, len, value } => {
                self.cpu_write(vcpu(v), u64::from(offset % CPU_WINDOW), usize::from(len % 9), u64::from(value))
            }
            Op::DistWord { vcpu: v, index, value } => {
                self.dist_write(vcpu(v), u64::from(index % (DIST_WINDOW / 4)) * 4, 4, u64::from(value))
            }
            Op::DistByte { vcpu: v, target, id, value } => {
                let base = if target { GICD_ITARGETSR } else { GICD_IPRIORITYR };
                self.dist_write(vcpu(v), base + u64::from(u32::from(id) % NUM_IRQS), 1, u64::from(value))
            }
            Op::Bit { vcpu: v, register, id } => {
                let id = u32::from(id) % NUM_IRQS;
                let base = GICD_ISENABLER + u64::from(register % 4) * 0x80;
                self.dist_write(vcpu(v), base + u64::from(id / 32) * 4, 4, 1 << (id % 32))
            }
            Op::Sgi { vcpu: v, id, filter, targets } => {
                let value = (u32::from(filter) << 24) | (u32::from(targets) << 16) | u32::from(id);
                self.dist_write(vcpu(v), 0xf00, 4, u64::from(value))
            }
            Op::CpuControl { vcpu: v, register, value } => {
                self.cpu_write(vcpu(v), u64::from(register % 3) * 4, 4, u64::from(value))
            }
            Op::Ack { vcpu: v } => {
                self.cpu_read(vcpu(v), GICC_IAR, 4);
            }
            Op::Eoi { vcpu: v, pick } => {
                let cpu = vcpu(v);
                let value = self.pick(cpu, pick, false);
                self.cpu_write(cpu, GICC_EOIR, 4, u64::from(value));
                if self.shadow.ifaces.get(cpu).is_some_and(|c| c.acked.is_empty()) {
                    self.check_idle(cpu);
                }
            }
            Op::Dir { vcpu: v, pick } => {
                let cpu = vcpu(v);
                let value = self.pick(cpu, pick, true);
                self.cpu_write(cpu, GICC_DIR, 4, u64::from(value));
            }
            Op::Spi { spi, level } => {
                let spi = spi % 72;
                let gic = &self.gic;
                let line = self.spis[usize::from(spi)].get_or_insert_with(|| gic.spi_line(u32::from(spi)));
                line.set_level(level);
                if let Some(l) = self.shadow.spis.get_mut(usize::from(spi)) {
                    if l.edge && level && !l.level {
                        l.latched = true;
                    }
                    l.level = level;
                }
            }
            Op::Ppi { vcpu: v, id, level } => {
                let (cpu, id) = (vcpu(v), u32::from(id % 34));
                self.gic.set_ppi_level(cpu, id, level);
                if (16..32).contains(&id) {
                    if let Some(l) = self.shadow.line_mut(cpu, id) {
                        if l.edge && level && !l.level {
                            l.latched = true;
                        }
                        l.level = level;
                    }
                }
            }
            Op::Dump => drop(self.gic.dump()),
        }
    }

    /// A value for EOIR or DIR: one `cpu`'s IAR returned, counting back `pick` from the
    /// latest (for DIR, priority-dropped ones first), or `pick` itself.
    fn pick(&self, cpu: usize, pick: u8, dir: bool) -> u32 {
        let Some(c) = self.shadow.ifaces.get(cpu) else { return u32::from(pick) };
        let back = |len: usize| (len > 0).then(|| len - 1 - usize::from(pick) % len);
        let acked = back(c.acked.len()).map(|i| c.acked[i].1);
        let dropped = back(c.dropped.len()).map(|i| c.dropped[i]);
        let chosen = if dir { dropped.or(acked) } else { acked };
        chosen.unwrap_or(u32::from(pick))
    }
}

/// Roughly what Linux's GICv2 driver does at boot (drivers/irqchip/irq-gic.c): SPIs
/// targeting CPU 0, the SGIs and the virtual timer's PPI enabled on every CPU, PMR 0xf0,
/// and both the distributor and every CPU interface enabled, in EOImode 1 (as Linux when
/// it runs at EL2) if `mode` bit 3 is set. Where Linux gives every interrupt priority 0xa0
/// and leaves the binary point alone, this spreads the priorities over 0x80..=0xf8 (by
/// id) and sets GICC_BPR to `mode % 8`, so that a few more operations reach preemption,
/// the binary point's groups and the priority mask.
fn boot(rig: &mut Rig, cpus: usize, mode: u8) {
    let priorities =
        |word: u32| (0..4).fold(0u64, |acc, i| acc | (0x80 | u64::from(((word + i) * 8) & 0x78)) << (8 * i));
    rig.dist_write(0, GICD_CTLR, 4, 0);
    for word in (SPI_BASE..NUM_IRQS).step_by(4) {
        rig.dist_write(0, GICD_IPRIORITYR + u64::from(word), 4, priorities(word));
        rig.dist_write(0, GICD_ITARGETSR + u64::from(word), 4, 0x0101_0101);
    }
    for cpu in 0..cpus {
        for word in (0..SPI_BASE).step_by(4) {
            rig.dist_write(cpu, GICD_IPRIORITYR + u64::from(word), 4, priorities(word));
        }
        rig.dist_write(cpu, GICD_ISENABLER, 4, 0x0800_ffff);
        rig.cpu_write(cpu, GICC_PMR, 4, 0xf0);
        rig.cpu_write(cpu, GICC_BPR, 4, u64::from(mode % 8));
        rig.cpu_write(cpu, GICC_CTLR, 4, 1 | (u64::from(mode & 8 != 0) << 9));
    }
    rig.dist_write(0, GICD_CTLR, 4, 1);
}

fuzz_target!(|input: Input| {
    let start = hvrun_fuzz::live_bytes();
    {
        let cpus = 1 + usize::from(input.cpus % 8);
        let mut rig = Rig::new(cpus);
        if let Some(mode) = input.boot {
            boot(&mut rig, cpus, mode);
        }
        rig.check_outputs();
        let base = hvrun_fuzz::live_bytes();
        for op in &input.ops {
            rig.apply(op);
            rig.check_outputs();
            hvrun_fuzz::assert_bounded(base, HEAP_BOUND, "gic");
        }
        rig.check_snapshot(cpus);
        for cpu in 0..cpus {
            rig.drain(cpu);
        }
        rig.check_outputs();
        hvrun_fuzz::assert_bounded(base, HEAP_BOUND, "gic");
    }
    // Everything the input created is gone: nothing leaks from one input to the next.
    hvrun_fuzz::assert_bounded(start, 0, "gic after the input");
});
