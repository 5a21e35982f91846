//! GICv2 register decoding: the distributor (GICD) and CPU interface (GICC) windows,
//! on top of [`GicState`]. Offsets and layouts from Arm IHI 0048B, chapter 4.

use super::state::{cpu_bit, GicState, NUM_IRQS, NUM_SGIS};
use crate::warn_ratelimited;

// Distributor.
const GICD_CTLR: u64 = 0x000;
const GICD_TYPER: u64 = 0x004;
const GICD_IIDR: u64 = 0x008;
const GICD_IGROUPR: u64 = 0x080;
const GICD_ISENABLER: u64 = 0x100;
const GICD_ICENABLER: u64 = 0x180;
const GICD_ISPENDR: u64 = 0x200;
const GICD_ICPENDR: u64 = 0x280;
const GICD_ISACTIVER: u64 = 0x300;
const GICD_ICACTIVER: u64 = 0x380;
const GICD_IPRIORITYR: u64 = 0x400;
const GICD_ITARGETSR: u64 = 0x800;
const GICD_ICFGR: u64 = 0xc00;
const GICD_SGIR: u64 = 0xf00;
const GICD_CPENDSGIR: u64 = 0xf10;
const GICD_SPENDSGIR: u64 = 0xf20;
const GICD_ID: u64 = 0xfd0;
/// PIDR4..7, PIDR0..3, CIDR0..3 of a GICv2 (ArchRev 2 in PIDR2), as QEMU reports them.
const GICD_ID_BYTES: [u8; 12] = [0x04, 0x00, 0x00, 0x00, 0x90, 0xb4, 0x2b, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
/// Arm as implementer, GICv2 (product 0x0, variant 0, revision 2... as GIC-400 reports).
const IIDR: u32 = 0x0200_043b;

// CPU interface.
const GICC_CTLR: u64 = 0x00;
const GICC_PMR: u64 = 0x04;
const GICC_BPR: u64 = 0x08;
const GICC_IAR: u64 = 0x0c;
const GICC_EOIR: u64 = 0x10;
const GICC_RPR: u64 = 0x14;
const GICC_HPPIR: u64 = 0x18;
const GICC_IIDR: u64 = 0xfc;
const GICC_DIR: u64 = 0x1000;
const GICC_CTLR_ENABLE: u32 = 1;
const GICC_CTLR_EOIMODE: u32 = 1 << 9;

/// Number of interrupts a bitmap register word covers, and its index range for a
/// register bank starting at `base`.
fn bitmap_ids(base: u64, offset: u64) -> Option<std::ops::Range<u32>> {
    let first = u32::try_from((offset - base) * 8).ok()?;
    (first < NUM_IRQS).then(|| first..first + 32)
}

/// Reads a 32-bit distributor register.
pub fn dist_read32(gic: &GicState, cpu: usize, offset: u64) -> u32 {
    let bits = |base: u64, f: &dyn Fn(u32) -> bool| {
        bitmap_ids(base, offset)
            .map_or(0, |ids| ids.enumerate().fold(0u32, |acc, (bit, id)| acc | (u32::from(f(id)) << bit)))
    };
    let bytes = |base: u64, f: &dyn Fn(u32) -> u8| {
        (0..4).fold(0u32, |acc, i| {
            let id = (offset - base + i) as u32;
            acc | (u32::from(if id < NUM_IRQS { f(id) } else { 0 }) << (8 * i))
        })
    };
    match offset {
        GICD_CTLR => u32::from(gic.enabled()),
        GICD_TYPER => ((gic.num_cpus() as u32 - 1) << 5) | (NUM_IRQS / 32 - 1),
        GICD_IIDR => IIDR,
        0x100..=0x17f => bits(GICD_ISENABLER, &|id| gic.is_enabled(cpu, id)),
        0x180..=0x1ff => bits(GICD_ICENABLER, &|id| gic.is_enabled(cpu, id)),
        0x200..=0x27f => bits(GICD_ISPENDR, &|id| gic.is_pending(cpu, id)),
        0x280..=0x2ff => bits(GICD_ICPENDR, &|id| gic.is_pending(cpu, id)),
        0x300..=0x37f => bits(GICD_ISACTIVER, &|id| gic.is_active(cpu, id)),
        0x380..=0x3ff => bits(GICD_ICACTIVER, &|id| gic.is_active(cpu, id)),
        0x400..=0x7fb => bytes(GICD_IPRIORITYR, &|id| gic.priority(cpu, id)),
        0x800..=0xbfb => bytes(GICD_ITARGETSR, &|id| gic.target(cpu, id)),
        0xc00..=0xcff => {
            let first = ((offset - GICD_ICFGR) * 4) as u32;
            (0..16).fold(0, |acc, i| acc | (u32::from(gic.is_edge(cpu, first + i)) << (2 * i + 1)))
        }
        0xf10..=0xf1f => bytes(GICD_CPENDSGIR, &|id| {
            if id < NUM_SGIS {
                gic.sgi_sources(cpu, id)
            } else {
                0
            }
        }),
        0xf20..=0xf2f => bytes(GICD_SPENDSGIR, &|id| {
            if id < NUM_SGIS {
                gic.sgi_sources(cpu, id)
            } else {
                0
            }
        }),
        0xfd0..=0xfff => GICD_ID_BYTES.get(((offset - GICD_ID) / 4) as usize).map_or(0, |&b| u32::from(b)),
        // IGROUPR (no security extensions: all group 0), SGIR (write-only), reserved.
        _ => 0,
    }
}

/// Writes a 32-bit distributor register. `byte_mask` has bit i set when byte i of
/// `value` was written (byte-accessible registers take partial writes).
pub fn dist_write32(gic: &mut GicState, cpu: usize, offset: u64, value: u32, byte_mask: u8) {
    let mut bits = |base: u64, f: &mut dyn FnMut(&mut GicState, u32)| {
        if let Some(ids) = bitmap_ids(base, offset) {
            for (bit, id) in ids.enumerate() {
                if value & (1 << bit) != 0 && id < NUM_IRQS {
                    f(gic, id);
                }
            }
        }
    };
    match offset {
        GICD_CTLR => gic.set_enabled(value & 1 != 0),
        0x100..=0x17f => bits(GICD_ISENABLER, &mut |g, id| g.set_irq_enabled(cpu, id, true)),
        0x180..=0x1ff => bits(GICD_ICENABLER, &mut |g, id| g.set_irq_enabled(cpu, id, false)),
        0x200..=0x27f => bits(GICD_ISPENDR, &mut |g, id| g.set_irq_pending(cpu, id, true)),
        0x280..=0x2ff => bits(GICD_ICPENDR, &mut |g, id| g.set_irq_pending(cpu, id, false)),
        0x300..=0x37f => bits(GICD_ISACTIVER, &mut |g, id| g.set_irq_active(cpu, id, true)),
        0x380..=0x3ff => bits(GICD_ICACTIVER, &mut |g, id| g.set_irq_active(cpu, id, false)),
        0x400..=0x7fb | 0x800..=0xbfb | 0xf10..=0xf2f => {
            for i in (0..4).filter(|i| byte_mask & (1 << i) != 0) {
                let byte = (value >> (8 * i)) as u8;
                match offset {
                    0x400..=0x7fb => gic.set_priority(cpu, (offset - GICD_IPRIORITYR) as u32 + i, byte),
                    0x800..=0xbfb => gic.set_target((offset - GICD_ITARGETSR) as u32 + i, byte),
                    0xf10..=0xf1f => gic.set_sgi_sources(cpu, (offset - GICD_CPENDSGIR) as u32 + i, byte, false),
                    _ => gic.set_sgi_sources(cpu, (offset - GICD_SPENDSGIR) as u32 + i, byte, true),
                }
            }
        }
        0xc00..=0xcff => {
            let first = ((offset - GICD_ICFGR) * 4) as u32;
            for i in 0..16 {
                gic.set_edge(cpu, first + i, value & (2 << (2 * i)) != 0);
            }
        }
        GICD_SGIR => {
            let id = value & 0xf;
            let targets = match (value >> 24) & 3 {
                0 => (value >> 16) as u8,
                1 => !cpu_bit(cpu),
                2 => cpu_bit(cpu),
                _ => {
                    warn_ratelimited!("gic: SGIR with reserved target filter from cpu{cpu} ignored");
                    return;
                }
            };
            gic.send_sgi(cpu, id, targets);
        }
        GICD_IGROUPR..=0xff => {} // RAZ/WI: every interrupt is group 0.
        _ => warn_ratelimited!("gic: distributor write of {value:#x} to {offset:#x} by cpu{cpu} ignored"),
    }
}

/// Reads a 32-bit CPU interface register of `cpu`. Reading IAR acknowledges.
pub fn cpu_read32(gic: &mut GicState, cpu: usize, offset: u64) -> u32 {
    match offset {
        GICC_CTLR => {
            let (enabled, eoi_mode) = gic.cpu_control(cpu);
            (u32::from(enabled) * GICC_CTLR_ENABLE) | (u32::from(eoi_mode) * GICC_CTLR_EOIMODE)
        }
        GICC_PMR => u32::from(gic.pmr(cpu)),
        GICC_BPR => u32::from(gic.bpr(cpu)),
        GICC_IAR => gic.acknowledge(cpu),
        GICC_RPR => u32::from(gic.running_priority(cpu)),
        GICC_HPPIR => gic.highest_pending_id(cpu),
        GICC_IIDR => IIDR,
        _ => 0,
    }
}

/// Writes a 32-bit CPU interface register of `cpu`.
pub fn cpu_write32(gic: &mut GicState, cpu: usize, offset: u64, value: u32) {
    match offset {
        GICC_CTLR => gic.set_cpu_control(cpu, value & GICC_CTLR_ENABLE != 0, value & GICC_CTLR_EOIMODE != 0),
        GICC_PMR => gic.set_pmr(cpu, value as u8),
        GICC_BPR => gic.set_bpr(cpu, value as u8),
        GICC_EOIR => {
            if value & 0x3ff != super::state::SPURIOUS && !gic.end_of_interrupt(cpu, value) {
                warn_ratelimited!("gic: cpu{cpu} EOI of {value:#x}, which it has not acknowledged, ignored");
            }
        }
        GICC_DIR => gic.deactivate(cpu, value),
        _ => warn_ratelimited!("gic: cpu interface write of {value:#x} to {offset:#x} by cpu{cpu} ignored"),
    }
}

/// Whether `offset` is one of the distributor's byte-accessible registers.
pub fn dist_byte_accessible(offset: u64) -> bool {
    matches!(offset, 0x400..=0x7ff | 0x800..=0xbff | 0xf10..=0xf2f)
}
