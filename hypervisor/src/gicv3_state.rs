//! KVM's in-kernel vGICv3 as plain data, for snapshots: which device attributes hold its
//! state, in which order they are read and written back, and the check a saved state
//! passes before any of it reaches the kernel.
//!
//! KVM exposes the vGICv3's state through `KVM_{GET,SET}_DEVICE_ATTR` on its device (the
//! kernel's Documentation/virt/kvm/devices/arm-vgic-v3.rst): the distributor's and each
//! redistributor's registers by offset, as 32-bit values (a 64-bit register is its two
//! halves); each CPU interface's `ICC_*_EL1` registers by their system-register encoding,
//! as 64-bit values; and the SPIs' input levels, 32 lines a value. Everything here is
//! portable and tested on any host: the KVM backend (`kvm/gic.rs`) only does the ioctls,
//! through [`save`] and [`SavedGicV3::restore`].
//!
//! A saved state is the host's input (a file). [`SavedGicV3::check`] walks the attribute
//! list this machine's vGIC has and requires the saved one to be exactly that, so a
//! restore writes only attributes hvrun computed itself, and a damaged state is refused
//! after a bounded amount of work.

use std::fmt;

use arch_aarch64::sysreg::SysReg;
use serde::{Deserialize, Serialize};

/// `KVM_DEV_ARM_VGIC_GRP_DIST_REGS`: distributor registers, 32-bit, by offset.
pub const GRP_DIST_REGS: u32 = 1;
/// `KVM_DEV_ARM_VGIC_GRP_REDIST_REGS`: a redistributor's registers, 32-bit, by MPIDR and offset.
pub const GRP_REDIST_REGS: u32 = 5;
/// `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS`: a CPU interface's registers, 64-bit, by MPIDR and encoding.
pub const GRP_CPU_SYSREGS: u32 = 6;
/// `KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO`: input levels of 32 interrupts, 32-bit.
pub const GRP_LEVEL_INFO: u32 = 7;
/// `KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT`: where the info field sits in a level attribute.
pub const LINE_LEVEL_INFO_SHIFT: u32 = 10;
/// `VGIC_LEVEL_INFO_LINE_LEVEL`: the info value that asks for line levels.
pub const LEVEL_INFO_LINE_LEVEL: u32 = 0;

/// The most vCPUs a vGICv3 serves (KVM's `VGIC_V3_MAX_CPUS`).
pub const MAX_VCPUS: usize = 512;
/// The most interrupts a vGIC has (KVM_DEV_ARM_VGIC_GRP_NR_IRQS: 64 to 1024 by 32).
pub const MAX_IRQS: u32 = 1024;
/// The most entries a saved state may hold: more than the largest vGICv3 has (1024
/// interrupts, 512 vCPUs: about 20,000).
pub const MAX_ENTRIES: usize = 32_768;

// Distributor register offsets (GICv3 architecture specification, GICD_*).
const GICD_CTLR: u32 = 0x0000;
const GICD_IIDR: u32 = 0x0008;
const GICD_IGROUPR: u32 = 0x0080;
const GICD_ISENABLER: u32 = 0x0100;
const GICD_ISPENDR: u32 = 0x0200;
const GICD_ISACTIVER: u32 = 0x0300;
const GICD_IPRIORITYR: u32 = 0x0400;
const GICD_ICFGR: u32 = 0x0c00;
const GICD_IROUTER: u32 = 0x6000;
/// Each clear register (`IC*`) lies this far after its set register (`IS*`).
const CLEAR_AFTER_SET: u32 = 0x80;

// Redistributor offsets: RD_base, then the SGI_base frame 64 KiB on, whose per-interrupt
// registers sit where the distributor's do.
const GICR_CTLR: u32 = 0x0000;
const GICR_PROPBASER: u32 = 0x0070;
const GICR_PENDBASER: u32 = 0x0078;
const SGI_BASE: u32 = 0x1_0000;

// CPU interface registers.
const ICC_PMR_EL1: SysReg = SysReg::new(3, 0, 4, 6, 0);
const ICC_BPR0_EL1: SysReg = SysReg::new(3, 0, 12, 8, 3);
const ICC_BPR1_EL1: SysReg = SysReg::new(3, 0, 12, 12, 3);
const ICC_CTLR_EL1: SysReg = SysReg::new(3, 0, 12, 12, 4);
const ICC_SRE_EL1: SysReg = SysReg::new(3, 0, 12, 12, 5);
const ICC_IGRPEN0_EL1: SysReg = SysReg::new(3, 0, 12, 12, 6);
const ICC_IGRPEN1_EL1: SysReg = SysReg::new(3, 0, 12, 12, 7);

/// `ICC_AP0R<n>_EL1`, n in 0..4.
const fn icc_ap0r(n: u8) -> SysReg {
    SysReg::new(3, 0, 12, 8, 4 + n)
}

/// `ICC_AP1R<n>_EL1`, n in 0..4.
const fn icc_ap1r(n: u8) -> SysReg {
    SysReg::new(3, 0, 12, 9, n)
}

/// The mpidr field of an attribute (bits 63:32): MPIDR_EL1's Aff3, Aff2, Aff1, Aff0,
/// one byte each from the top, as the kernel's documentation packs them.
pub const fn mpidr_field(mpidr: u64) -> u64 {
    let aff3 = (mpidr >> 32) & 0xff;
    let aff2_0 = mpidr & 0xff_ffff;
    ((aff3 << 24) | aff2_0) << 32
}

/// How many `ICC_AP0R<n>_EL1` (and as many `ICC_AP1R<n>_EL1`) a CPU interface whose
/// `ICC_CTLR_EL1` is `ctlr` has: one for 5 priority bits, two for 6, four for 7 (KVM's
/// `vgic_v3_max_apr_idx`). `None` for a count no vGICv3 has.
pub const fn apr_count(ctlr: u64) -> Option<u8> {
    // PRIbits, bits 10:8: the number of priority bits less one.
    match ((ctlr >> 8) & 7) + 1 {
        5 => Some(1),
        6 => Some(2),
        7 => Some(4),
        _ => None,
    }
}

/// One device attribute of the vGICv3: a `kvm_device_attr`'s group and attr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attr {
    /// The attribute group (`GRP_*`).
    pub group: u32,
    /// The attribute within it.
    pub attr: u64,
}

impl Attr {
    /// Distributor register at `offset`.
    pub const fn dist(offset: u32) -> Self {
        Attr { group: GRP_DIST_REGS, attr: offset as u64 }
    }

    /// Register at `offset` of the redistributor of the vCPU whose MPIDR_EL1 is `mpidr`.
    pub const fn redist(mpidr: u64, offset: u32) -> Self {
        Attr { group: GRP_REDIST_REGS, attr: mpidr_field(mpidr) | offset as u64 }
    }

    /// CPU interface register `reg` of the vCPU whose MPIDR_EL1 is `mpidr`.
    pub const fn sysreg(mpidr: u64, reg: SysReg) -> Self {
        Attr { group: GRP_CPU_SYSREGS, attr: mpidr_field(mpidr) | reg.encoding() as u64 }
    }

    /// Input levels of interrupts `intid..intid + 32` (`intid` a multiple of 32), asked
    /// through the vCPU whose MPIDR_EL1 is `mpidr` (for SPIs any vCPU: KVM needs one).
    pub const fn line_level(mpidr: u64, intid: u32) -> Self {
        let info = (LEVEL_INFO_LINE_LEVEL << LINE_LEVEL_INFO_SHIFT) as u64;
        Attr { group: GRP_LEVEL_INFO, attr: mpidr_field(mpidr) | info | intid as u64 }
    }

    /// Whether KVM reads and writes this attribute as 64 bits (the CPU interface's
    /// registers) rather than 32.
    pub const fn is_64bit(self) -> bool {
        self.group == GRP_CPU_SYSREGS
    }

    /// The clear register (`IC*`) whose all-ones write goes before this set register
    /// (`ISENABLER`, `ISPENDR`, `ISACTIVER`) on a restore, or `None` for any other.
    fn clear_register(self) -> Option<Attr> {
        let offset = self.attr & 0xffff_ffff;
        let sets = [GICD_ISENABLER, GICD_ISPENDR, GICD_ISACTIVER].map(u64::from);
        let set = match self.group {
            // The SPIs' words, past each register's first (the private interrupts').
            GRP_DIST_REGS => sets.iter().any(|&set| (set + 4..set + u64::from(CLEAR_AFTER_SET)).contains(&offset)),
            // The SGI frame's ISENABLER0, ISPENDR0, ISACTIVER0.
            GRP_REDIST_REGS => sets.iter().any(|&set| offset == u64::from(SGI_BASE) + set),
            _ => false,
        };
        set.then_some(Attr { group: self.group, attr: self.attr + u64::from(CLEAR_AFTER_SET) })
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let affinity = self.attr >> 32;
        let low = self.attr & 0xffff_ffff;
        match self.group {
            GRP_DIST_REGS => write!(f, "distributor register {low:#x}"),
            GRP_REDIST_REGS => write!(f, "redistributor register {low:#x} of affinity {affinity:#x}"),
            GRP_CPU_SYSREGS => write!(f, "CPU interface register {low:#06x} of affinity {affinity:#x}"),
            GRP_LEVEL_INFO => write!(f, "line levels from INTID {} (affinity {affinity:#x})", low & 0x3ff),
            group => write!(f, "attribute {:#x} of group {group}", self.attr),
        }
    }
}

/// The vGICv3 of a machine: what a saved state must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GicV3Shape {
    /// Interrupts the vGIC was created with (SGIs and PPIs included), a multiple of 32.
    pub nr_irqs: u32,
    /// Each vCPU's MPIDR_EL1, by index.
    pub mpidrs: Vec<u64>,
}

impl GicV3Shape {
    /// A vGIC of `nr_irqs` interrupts serving `vcpus` vCPUs whose MPIDRs are hvrun's
    /// ([`arch_aarch64::boot::mpidr`]).
    pub fn new(nr_irqs: u32, vcpus: u32) -> Self {
        GicV3Shape { nr_irqs, mpidrs: (0..vcpus).map(arch_aarch64::boot::mpidr).collect() }
    }

    /// Within what KVM's vGICv3 can be: bounds every walk over it.
    fn check(&self) -> Result<(), GicV3StateError> {
        let irqs_ok = (64..=MAX_IRQS).contains(&self.nr_irqs) && self.nr_irqs % 32 == 0;
        if !irqs_ok || self.mpidrs.is_empty() || self.mpidrs.len() > MAX_VCPUS {
            return Err(GicV3StateError::Shape { nr_irqs: self.nr_irqs, vcpus: self.mpidrs.len() });
        }
        Ok(())
    }
}

/// One saved attribute and its value (32-bit attributes hold it in the low half).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReg {
    /// The attribute.
    pub attr: Attr,
    /// Its value.
    pub value: u64,
}

/// The vGICv3's saved state: every attribute of [`for_each_attr`]'s walk with its value,
/// in the walk's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGicV3 {
    /// Interrupts of the vGIC it was saved from.
    pub nr_irqs: u32,
    /// The MPIDR_EL1 of each of its vCPUs.
    pub mpidrs: Vec<u64>,
    /// The attributes, in order.
    pub regs: Vec<SavedReg>,
}

/// A hypervisor's own GICv3 state, as that hypervisor gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypervisorGicState {
    /// KVM's vGICv3, attribute by attribute.
    Kvm(SavedGicV3),
    /// macOS 15's in-kernel GIC: the framework's own serialized state
    /// (`hv_gic_state_get_data`: versioned, checked by `hv_gic_set_state`), which leaves
    /// out the CPU interfaces; those are each vCPU's registers
    /// ([`crate::hvf_regs::StateReg::GicCpu`]).
    Hvf(Vec<u8>),
}

/// The largest macOS GIC state accepted from a snapshot (the framework's is a few KiB).
pub const MAX_HVF_BLOB: usize = 1 << 20;

/// Why a saved vGICv3 state does not fit this machine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GicV3StateError {
    /// A vGIC no KVM has (the machine's or the saved one's).
    #[error("a vGICv3 of {nr_irqs} interrupts and {vcpus} vCPUs is not one KVM has")]
    Shape {
        /// Its interrupts.
        nr_irqs: u32,
        /// Its vCPUs.
        vcpus: usize,
    },
    /// Saved for another number of interrupts.
    #[error("the vGICv3 state has {saved} interrupts where this machine's vGIC has {machine}")]
    Interrupts {
        /// In the state.
        saved: u32,
        /// In this machine.
        machine: u32,
    },
    /// Saved for another number of vCPUs.
    #[error("the vGICv3 state is for {saved} vCPUs where this machine has {machine}")]
    Vcpus {
        /// In the state.
        saved: usize,
        /// In this machine.
        machine: usize,
    },
    /// A vCPU with another MPIDR.
    #[error("the vGICv3 state's vCPU {index} has MPIDR {saved:#x} where this machine's has {machine:#x}")]
    Mpidr {
        /// The vCPU.
        index: usize,
        /// In the state.
        saved: u64,
        /// In this machine.
        machine: u64,
    },
    /// More entries than any vGICv3 has.
    #[error("the vGICv3 state holds {0} registers, more than the {MAX_ENTRIES} any vGICv3 has")]
    TooMany(usize),
    /// Fewer or more entries than this machine's vGIC has.
    #[error("the vGICv3 state holds {saved} registers where this machine's vGIC has {machine}")]
    Count {
        /// In the state.
        saved: usize,
        /// In this machine (as far as the state let the walk go).
        machine: usize,
    },
    /// An entry that is not the attribute due at its place.
    #[error("the vGICv3 state's entry {index} is {saved} where {machine} belongs")]
    Foreign {
        /// Its place.
        index: usize,
        /// What the state has.
        saved: Attr,
        /// What belongs there.
        machine: Attr,
    },
    /// A 32-bit attribute with a value past 32 bits.
    #[error("the vGICv3 state's {attr} holds {value:#x}, more than its 32 bits")]
    Wide {
        /// The attribute.
        attr: Attr,
        /// Its value.
        value: u64,
    },
    /// An `ICC_CTLR_EL1` whose priority bits no vGICv3 has.
    #[error("ICC_CTLR_EL1 {ctlr:#x} of the vCPU with MPIDR {mpidr:#x} gives a number of priority bits no vGICv3 has")]
    PriorityBits {
        /// The vCPU.
        mpidr: u64,
        /// Its ICC_CTLR_EL1.
        ctlr: u64,
    },
}

impl From<GicV3StateError> for crate::Error {
    fn from(e: GicV3StateError) -> Self {
        crate::Error::Unsupported(e.to_string())
    }
}

/// Walks the attributes that hold the state of a vGIC of `shape`, in the order a
/// restore writes them back, asking `visit` for each one's value. The order:
/// - the distributor: `GICD_IIDR` first (the kernel's documentation asks it back before
///   anything else), `GICD_CTLR`, then for the SPIs the registers that say what an
///   interrupt is (`IGROUPR`, `ICFGR`, `IPRIORITYR`, `IROUTER` as two halves) and their
///   input levels before the state that makes one deliverable (`ISENABLER`, `ISPENDR`,
///   `ISACTIVER`);
/// - each redistributor: `PROPBASER` and `PENDBASER` (as halves), then the SGI frame the
///   same way (`IGROUPR0`, `ICFGR0/1`, `IPRIORITYR0..7`, then `ISENABLER0`, `ISPENDR0`,
///   `ISACTIVER0`), `GICR_CTLR` last (KVM ignores the base registers once LPIs are on);
/// - each CPU interface: `ICC_SRE_EL1` first, `ICC_CTLR_EL1` (whose PRIbits set how many
///   active-priority registers there are, so the walk reads it from `visit` before it
///   goes on), the group enables, `ICC_PMR_EL1`, the binary points, then
///   `ICC_AP0R<n>_EL1` and `ICC_AP1R<n>_EL1`.
///
/// The walk is bounded by `shape`, checked first.
pub fn for_each_attr<E: From<GicV3StateError>>(
    shape: &GicV3Shape,
    mut visit: impl FnMut(Attr) -> Result<u64, E>,
) -> Result<(), E> {
    shape.check()?;
    // The distributor's registers for the SPIs, `bits` bits an interrupt, as 32-bit words
    // from `base`: the words of INTIDs 32 up to `nr_irqs`.
    let spi_words = |base: u32, bits: u32| (bits..shape.nr_irqs * bits / 32).map(move |n| Attr::dist(base + 4 * n));
    let vcpu0 = shape.mpidrs[0];

    // The distributor.
    each(&mut visit, [Attr::dist(GICD_IIDR), Attr::dist(GICD_CTLR)])?;
    each(&mut visit, spi_words(GICD_IGROUPR, 1))?;
    each(&mut visit, spi_words(GICD_ICFGR, 2))?;
    each(&mut visit, spi_words(GICD_IPRIORITYR, 8))?;
    // IROUTER is 64 bits, taken as its two halves (KVM keeps the upper one RAZ/WI).
    each(&mut visit, spi_words(GICD_IROUTER, 64))?;
    each(&mut visit, (32..shape.nr_irqs).step_by(32).map(|intid| Attr::line_level(vcpu0, intid)))?;
    for set in [GICD_ISENABLER, GICD_ISPENDR, GICD_ISACTIVER] {
        each(&mut visit, spi_words(set, 1))?;
    }

    // The redistributors.
    for &mpidr in &shape.mpidrs {
        let at = |offset: u32| Attr::redist(mpidr, offset);
        let sgi = |offset: u32| at(SGI_BASE + offset);
        each(&mut visit, [GICR_PROPBASER, GICR_PROPBASER + 4, GICR_PENDBASER, GICR_PENDBASER + 4].map(at))?;
        each(&mut visit, [GICD_IGROUPR, GICD_ICFGR, GICD_ICFGR + 4].map(sgi))?;
        each(&mut visit, (0..8).map(|n| sgi(GICD_IPRIORITYR + 4 * n)))?;
        each(&mut visit, [GICD_ISENABLER, GICD_ISPENDR, GICD_ISACTIVER].map(sgi))?;
        each(&mut visit, [at(GICR_CTLR)])?;
    }

    // The CPU interfaces.
    for &mpidr in &shape.mpidrs {
        let at = |reg: SysReg| Attr::sysreg(mpidr, reg);
        each(&mut visit, [at(ICC_SRE_EL1)])?;
        let ctlr = visit(at(ICC_CTLR_EL1))?;
        let aprs = apr_count(ctlr).ok_or(GicV3StateError::PriorityBits { mpidr, ctlr })?;
        each(&mut visit, [ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1, ICC_PMR_EL1, ICC_BPR0_EL1, ICC_BPR1_EL1].map(at))?;
        each(&mut visit, (0..aprs).map(|n| at(icc_ap0r(n))))?;
        each(&mut visit, (0..aprs).map(|n| at(icc_ap1r(n))))?;
    }
    Ok(())
}

/// Visits each of `attrs` in turn.
fn each<E>(visit: &mut impl FnMut(Attr) -> Result<u64, E>, attrs: impl IntoIterator<Item = Attr>) -> Result<(), E> {
    attrs.into_iter().try_for_each(|attr| visit(attr).map(drop))
}

/// Saves the state of a vGIC of `shape`, reading each attribute with `read` (KVM:
/// `KVM_GET_DEVICE_ATTR`, every vCPU out of `KVM_RUN`). What it returns passes
/// [`SavedGicV3::check`] against `shape`.
pub fn save(shape: &GicV3Shape, mut read: impl FnMut(Attr) -> crate::Result<u64>) -> crate::Result<SavedGicV3> {
    let mut regs = Vec::new();
    for_each_attr(shape, |attr| {
        let value = read(attr)?;
        regs.push(SavedReg { attr, value });
        Ok::<_, crate::Error>(value)
    })?;
    let saved = SavedGicV3 { nr_irqs: shape.nr_irqs, mpidrs: shape.mpidrs.clone(), regs };
    saved.check(shape)?;
    Ok(saved)
}

impl SavedGicV3 {
    /// Checks this state against the vGIC of `shape` it is to be restored into: the same
    /// interrupts and vCPUs, and exactly the attributes [`for_each_attr`] walks, in its
    /// order, each 32-bit one's value within 32 bits. Bounded work whatever the state holds.
    pub fn check(&self, shape: &GicV3Shape) -> Result<(), GicV3StateError> {
        shape.check()?;
        if self.nr_irqs != shape.nr_irqs {
            return Err(GicV3StateError::Interrupts { saved: self.nr_irqs, machine: shape.nr_irqs });
        }
        if self.mpidrs.len() != shape.mpidrs.len() {
            return Err(GicV3StateError::Vcpus { saved: self.mpidrs.len(), machine: shape.mpidrs.len() });
        }
        if let Some((index, (&saved, &machine))) =
            self.mpidrs.iter().zip(&shape.mpidrs).enumerate().find(|(_, (s, m))| s != m)
        {
            return Err(GicV3StateError::Mpidr { index, saved, machine });
        }
        if self.regs.len() > MAX_ENTRIES {
            return Err(GicV3StateError::TooMany(self.regs.len()));
        }
        let mut next = 0;
        for_each_attr(shape, |machine| {
            let index = next;
            let saved =
                self.regs.get(index).ok_or(GicV3StateError::Count { saved: self.regs.len(), machine: index + 1 })?;
            if saved.attr != machine {
                return Err(GicV3StateError::Foreign { index, saved: saved.attr, machine });
            }
            if !machine.is_64bit() && saved.value > u64::from(u32::MAX) {
                return Err(GicV3StateError::Wide { attr: machine, value: saved.value });
            }
            next += 1;
            Ok(saved.value)
        })?;
        if next != self.regs.len() {
            return Err(GicV3StateError::Count { saved: self.regs.len(), machine: next });
        }
        Ok(())
    }

    /// Puts this state back into the vGIC of `shape` through `write` (KVM:
    /// `KVM_SET_DEVICE_ATTR`), once every vCPU exists with its registers (MPIDR_EL1
    /// included) restored, the vGIC is initialised and no vCPU runs. Checked first:
    /// nothing is written when it does not fit. Writes in [`for_each_attr`]'s order, each
    /// set register (`ISENABLER`, `ISPENDR`, `ISACTIVER`, the distributor's and the
    /// redistributors') just after its clear register written all-ones, so the bits the
    /// state leaves clear are cleared.
    pub fn restore(
        &self,
        shape: &GicV3Shape,
        mut write: impl FnMut(Attr, u64) -> crate::Result<()>,
    ) -> crate::Result<()> {
        self.check(shape)?;
        for reg in &self.regs {
            if let Some(clear) = reg.attr.clear_register() {
                write(clear, u64::from(u32::MAX))?;
            }
            write(reg.attr, reg.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arch_aarch64::boot::mpidr;

    use super::*;

    /// ICC_CTLR_EL1 with PRIbits for `bits` priority bits (and IDbits, SEIS, A3V as a
    /// host could report them).
    fn ctlr(bits: u64) -> u64 {
        ((bits - 1) << 8) | (1 << 14) | (1 << 15)
    }

    /// A vGIC that answers each attribute with a value of its own (ICC_CTLR_EL1 with
    /// `pri_bits[vcpu]` priority bits) and records the writes it gets.
    struct FakeGic {
        pri_bits: Vec<u64>,
        writes: Vec<(Attr, u64)>,
    }

    impl FakeGic {
        fn new(pri_bits: &[u64]) -> Self {
            FakeGic { pri_bits: pri_bits.to_vec(), writes: Vec::new() }
        }

        fn read(&self, attr: Attr) -> crate::Result<u64> {
            for (vcpu, &bits) in self.pri_bits.iter().enumerate() {
                if attr == Attr::sysreg(mpidr(vcpu as u32), ICC_CTLR_EL1) {
                    return Ok(ctlr(bits));
                }
            }
            let value = attr.attr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(attr.group);
            Ok(if attr.is_64bit() { value } else { value & 0xffff_ffff })
        }
    }

    fn shape(nr_irqs: u32, vcpus: u32) -> GicV3Shape {
        GicV3Shape::new(nr_irqs, vcpus)
    }

    fn saved(pri_bits: &[u64]) -> (GicV3Shape, SavedGicV3) {
        let shape = shape(128, pri_bits.len() as u32);
        let gic = FakeGic::new(pri_bits);
        let saved = save(&shape, |attr| gic.read(attr)).unwrap();
        (shape, saved)
    }

    fn restored(shape: &GicV3Shape, saved: &SavedGicV3) -> Vec<(Attr, u64)> {
        let mut gic = FakeGic::new(&[]);
        saved
            .restore(shape, |attr, value| {
                gic.writes.push((attr, value));
                Ok(())
            })
            .unwrap();
        gic.writes
    }

    #[test]
    fn attributes_are_encoded_as_the_kernel_documents() {
        // The mpidr field: Aff3, Aff2, Aff1, Aff0 from bit 63 down; MPIDR's RES1 bit 31 dropped.
        assert_eq!(mpidr_field(mpidr(0)), 0);
        assert_eq!(mpidr_field(mpidr(1)), 1 << 32);
        assert_eq!(mpidr_field(mpidr(17)), 0x0101 << 32);
        assert_eq!(mpidr_field(0x12_8034_5601), 0x1234_5601 << 32);
        // CPU interface registers: op0:op1:CRn:CRm:op2 in bits 15:0 (QEMU's and the
        // kernel's ICC_* encodings).
        let sys = |reg| Attr::sysreg(mpidr(0), reg).attr;
        assert_eq!(sys(ICC_SRE_EL1), 0xc665);
        assert_eq!(sys(ICC_CTLR_EL1), 0xc664);
        assert_eq!(sys(ICC_IGRPEN0_EL1), 0xc666);
        assert_eq!(sys(ICC_IGRPEN1_EL1), 0xc667);
        assert_eq!(sys(ICC_PMR_EL1), 0xc230);
        assert_eq!(sys(ICC_BPR0_EL1), 0xc643);
        assert_eq!(sys(ICC_BPR1_EL1), 0xc663);
        assert_eq!((sys(icc_ap0r(0)), sys(icc_ap0r(3))), (0xc644, 0xc647));
        assert_eq!((sys(icc_ap1r(0)), sys(icc_ap1r(3))), (0xc648, 0xc64b));
        assert_eq!(Attr::sysreg(mpidr(2), ICC_PMR_EL1), Attr { group: 6, attr: (2 << 32) | 0xc230 });
        // Redistributors: mpidr field | offset; the SGI frame 64 KiB on.
        assert_eq!(Attr::redist(mpidr(1), SGI_BASE + GICD_ISENABLER), Attr { group: 5, attr: 0x1_0001_0100 });
        // Distributor: the offset alone.
        assert_eq!(Attr::dist(GICD_IROUTER + 8 * 32), Attr { group: 1, attr: 0x6100 });
        // Line levels: mpidr field | VGIC_LEVEL_INFO_LINE_LEVEL << 10 | INTID.
        assert_eq!(Attr::line_level(mpidr(0), 64), Attr { group: 7, attr: 64 });
        assert_eq!(Attr::line_level(mpidr(2), 32), Attr { group: 7, attr: (2 << 32) | 32 });
        assert!(Attr::sysreg(0, ICC_SRE_EL1).is_64bit() && !Attr::dist(0).is_64bit());
        assert_eq!(Attr::sysreg(mpidr(1), ICC_PMR_EL1).to_string(), "CPU interface register 0xc230 of affinity 0x1");
    }

    #[test]
    fn the_active_priority_registers_follow_the_priority_bits() {
        assert_eq!(apr_count(ctlr(5)), Some(1));
        assert_eq!(apr_count(ctlr(6)), Some(2));
        assert_eq!(apr_count(ctlr(7)), Some(4));
        assert_eq!(apr_count(ctlr(4)), None);
        assert_eq!(apr_count(ctlr(8)), None);
        // The walk reads each vCPU's ICC_CTLR_EL1 and takes that many of each.
        let (_, saved) = saved(&[7, 5]);
        let aprs = |vcpu: u32, reg: fn(u8) -> SysReg| {
            (0..4).filter(|&n| saved.regs.iter().any(|r| r.attr == Attr::sysreg(mpidr(vcpu), reg(n)))).count()
        };
        assert_eq!((aprs(0, icc_ap0r), aprs(0, icc_ap1r)), (4, 4));
        assert_eq!((aprs(1, icc_ap0r), aprs(1, icc_ap1r)), (1, 1));
    }

    #[test]
    fn a_saved_state_holds_every_register_of_the_walk() {
        let (shape, saved) = saved(&[5, 5]);
        // Distributor: IIDR, CTLR; for 96 SPIs 3 IGROUPR, 6 ICFGR, 24 IPRIORITYR, 96 × 2
        // IROUTER halves, 3 levels, 3 each of ISENABLER, ISPENDR, ISACTIVER.
        let dist = 2 + 3 + 6 + 24 + 192 + 3 + 9;
        // Each redistributor: 4 base halves, IGROUPR0, 2 ICFGR, 8 IPRIORITYR, 3 set registers, CTLR.
        // Each CPU interface: 7 registers and one of each APR.
        assert_eq!(saved.regs.len(), dist + 2 * 19 + 2 * 9);
        assert_eq!((saved.nr_irqs, saved.mpidrs.as_slice()), (128, &[mpidr(0), mpidr(1)][..]));
        assert_eq!(saved.check(&shape), Ok(()));
        let first_spi = |base: u32| saved.regs.iter().position(|r| r.attr == Attr::dist(base + 4));
        assert!(first_spi(GICD_IGROUPR).is_some() && first_spi(GICD_ISACTIVER).is_some());
        // No private interrupt's word of the distributor, which KVM keeps RAZ/WI.
        assert!(!saved.regs.iter().any(|r| r.attr == Attr::dist(GICD_ISENABLER)));
        // The largest vGICv3 fits the bound.
        let mut count = 0;
        let big = GicV3Shape::new(MAX_IRQS, MAX_VCPUS as u32);
        for_each_attr(&big, |attr| {
            count += 1;
            Ok::<_, GicV3StateError>(if attr.attr & 0xffff == 0xc664 { ctlr(7) } else { 0 })
        })
        .unwrap();
        assert!(count <= MAX_ENTRIES, "{count}");
    }

    #[test]
    fn a_restore_writes_in_the_order_the_kernel_needs() {
        let (shape, saved) = saved(&[7, 5]);
        let writes = restored(&shape, &saved);
        let at = |attr: Attr| writes.iter().position(|&(a, _)| a == attr).unwrap();
        let all_at = |pred: &dyn Fn(Attr) -> bool| -> Vec<usize> {
            writes.iter().enumerate().filter(|(_, (a, _))| pred(*a)).map(|(i, _)| i).collect()
        };
        // Every saved value written, plus one all-ones clear for each set register.
        let clears = 3 * (128 / 32 - 1) + 3 * 2;
        assert_eq!(writes.len(), saved.regs.len() + clears);
        for reg in &saved.regs {
            assert!(writes.contains(&(reg.attr, reg.value)));
        }
        // The distributor: IIDR, then CTLR, then what an interrupt is before what makes it
        // deliverable.
        assert_eq!(
            &writes[..2],
            &[(Attr::dist(GICD_IIDR), saved.regs[0].value), (Attr::dist(GICD_CTLR), saved.regs[1].value)]
        );
        let in_dist = |base: u32, words: u32| {
            move |a: Attr| a.group == GRP_DIST_REGS && (base..base + 4 * words).contains(&(a.attr as u32))
        };
        let config = [
            in_dist(GICD_IGROUPR, 32),
            in_dist(GICD_ICFGR, 64),
            in_dist(GICD_IPRIORITYR, 256),
            in_dist(GICD_IROUTER, 2048),
        ];
        let mut config_at: Vec<usize> = config.iter().flat_map(|f| all_at(f)).collect();
        config_at.extend(all_at(&|a: Attr| a.group == GRP_LEVEL_INFO));
        let state_at =
            all_at(&|a: Attr| a.group == GRP_DIST_REGS && (GICD_ISENABLER..GICD_IPRIORITYR).contains(&(a.attr as u32)));
        assert_eq!((config_at.len(), state_at.len()), (6 + 24 + 192 + 3 + 3, 18));
        assert!(config_at.iter().max() < state_at.iter().min());
        // Each set register right after its clear register, written all-ones.
        for (i, &(attr, _)) in writes.iter().enumerate() {
            if let Some(clear) = attr.clear_register() {
                assert_eq!(writes[i - 1], (clear, 0xffff_ffff), "before {attr}");
            }
        }
        assert_eq!(writes.iter().filter(|(_, v)| *v == 0xffff_ffff).count(), clears);
        // The distributor, then the redistributors, then the CPU interfaces.
        let groups: Vec<u32> = writes.iter().map(|(a, _)| a.group).collect();
        let last = |g: u32| groups.iter().rposition(|&x| x == g).unwrap();
        let first = |g: u32| groups.iter().position(|&x| x == g).unwrap();
        assert!(last(GRP_DIST_REGS).max(last(GRP_LEVEL_INFO)) < first(GRP_REDIST_REGS));
        assert!(last(GRP_REDIST_REGS) < first(GRP_CPU_SYSREGS));
        for vcpu in 0..2 {
            let m = mpidr(vcpu);
            let of_redist = all_at(&|a: Attr| a.group == GRP_REDIST_REGS && a.attr >> 32 == mpidr_field(m) >> 32);
            assert_eq!(of_redist.last(), Some(&at(Attr::redist(m, GICR_CTLR))));
            assert!(at(Attr::redist(m, SGI_BASE + GICD_ICFGR + 4)) < at(Attr::redist(m, SGI_BASE + GICD_ISPENDR)));
            let of_cpu = all_at(&|a: Attr| a.group == GRP_CPU_SYSREGS && a.attr >> 32 == mpidr_field(m) >> 32);
            assert_eq!(of_cpu.first(), Some(&at(Attr::sysreg(m, ICC_SRE_EL1))));
            let ctlr_at = at(Attr::sysreg(m, ICC_CTLR_EL1));
            assert!(at(Attr::sysreg(m, icc_ap0r(0))) > ctlr_at && at(Attr::sysreg(m, icc_ap1r(0))) > ctlr_at);
        }
    }

    #[test]
    fn a_damaged_state_is_refused_before_anything_is_written() {
        let (shape, good) = saved(&[5, 6]);
        let refused = |damage: &dyn Fn(&mut SavedGicV3), on: &GicV3Shape| {
            let mut bad = good.clone();
            damage(&mut bad);
            let err = bad.check(on).unwrap_err();
            let mut writes = 0;
            let failed = bad.restore(on, |_, _| {
                writes += 1;
                Ok(())
            });
            assert!(failed.is_err());
            assert_eq!(writes, 0);
            err
        };
        // Another machine: vCPUs, interrupts, MPIDRs.
        assert_eq!(refused(&|_| (), &GicV3Shape::new(128, 3)), GicV3StateError::Vcpus { saved: 2, machine: 3 });
        assert_eq!(refused(&|_| (), &GicV3Shape::new(96, 2)), GicV3StateError::Interrupts { saved: 128, machine: 96 });
        let moved = GicV3Shape { nr_irqs: 128, mpidrs: vec![mpidr(0), mpidr(16)] };
        assert_eq!(refused(&|_| (), &moved), GicV3StateError::Mpidr { index: 1, saved: mpidr(1), machine: mpidr(16) });
        // A vGIC no KVM has is refused before any walk.
        assert!(matches!(refused(&|_| (), &GicV3Shape::new(2048, 2)), GicV3StateError::Shape { .. }));
        assert!(matches!(refused(&|s| s.mpidrs.clear(), &GicV3Shape::new(128, 0)), GicV3StateError::Shape { .. }));
        // Absurd sizes.
        let many = |s: &mut SavedGicV3| s.regs = vec![s.regs[0]; MAX_ENTRIES + 1];
        assert_eq!(refused(&many, &shape), GicV3StateError::TooMany(MAX_ENTRIES + 1));
        let n = good.regs.len();
        assert_eq!(refused(&|s| s.regs.truncate(n - 1), &shape), GicV3StateError::Count { saved: n - 1, machine: n });
        assert_eq!(refused(&|s| s.regs.push(s.regs[0]), &shape), GicV3StateError::Count { saved: n + 1, machine: n });
        // An attribute the walk does not have there: the vGIC's CTRL_INIT, a register out
        // of place, another vCPU's.
        let init = Attr { group: 4, attr: 0 };
        let foreign = refused(&|s| s.regs[5].attr = init, &shape);
        assert!(matches!(foreign, GicV3StateError::Foreign { index: 5, saved, .. } if saved == init));
        assert!(matches!(refused(&|s| s.regs.swap(3, 4), &shape), GicV3StateError::Foreign { index: 3, .. }));
        let last = n - 1;
        let other = |s: &mut SavedGicV3| s.regs[last].attr.attr ^= 1 << 40;
        assert!(matches!(refused(&other, &shape), GicV3StateError::Foreign { .. }));
        // A 32-bit register holding more.
        let wide = |s: &mut SavedGicV3| s.regs[1].value = 1 << 32;
        assert_eq!(refused(&wide, &shape), GicV3StateError::Wide { attr: Attr::dist(GICD_CTLR), value: 1 << 32 });
        // An ICC_CTLR_EL1 no vGICv3 has, or one whose active-priority registers the state lacks.
        let ctlr_index = good.regs.iter().position(|r| r.attr == Attr::sysreg(mpidr(1), ICC_CTLR_EL1)).unwrap();
        let bad_bits = |s: &mut SavedGicV3| s.regs[ctlr_index].value = ctlr(8);
        assert_eq!(refused(&bad_bits, &shape), GicV3StateError::PriorityBits { mpidr: mpidr(1), ctlr: ctlr(8) });
        let more_bits = |s: &mut SavedGicV3| s.regs[ctlr_index].value = ctlr(7);
        assert!(matches!(refused(&more_bits, &shape), GicV3StateError::Foreign { .. }));
        // Into the hypervisor's error, in one line.
        let e: crate::Error = GicV3StateError::Vcpus { saved: 2, machine: 3 }.into();
        assert_eq!(e.to_string(), "the vGICv3 state is for 2 vCPUs where this machine has 3");
    }

    #[test]
    fn a_save_and_a_restore_stop_at_the_first_failure() {
        let shape = shape(128, 1);
        let gic = FakeGic::new(&[5]);
        let mut reads = 0;
        let failed = save(&shape, |attr| {
            reads += 1;
            if attr == Attr::dist(GICD_ICFGR + 8) {
                return Err(crate::Error::Unsupported("no".into()));
            }
            gic.read(attr)
        });
        assert!(failed.is_err());
        assert_eq!(reads, 2 + 3 + 1);
        let (shape, saved) = saved(&[5]);
        let mut writes = 0;
        let failed = saved.restore(&shape, |_, _| {
            writes += 1;
            if writes == 3 {
                return Err(crate::Error::Unsupported("no".into()));
            }
            Ok(())
        });
        assert!(failed.is_err());
        assert_eq!(writes, 3);
        // A state saved with one vCPU's worth of values restores into the same shape
        // value for value.
        let values: HashMap<Attr, u64> = restored(&shape, &saved).into_iter().collect();
        assert!(saved.regs.iter().all(|r| values[&r.attr] == r.value));
    }
}
