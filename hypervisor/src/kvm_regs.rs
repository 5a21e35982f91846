//! KVM's `KVM_{GET,SET}_ONE_REG` ids for arm64 registers (Documentation/virt/kvm/api.rst,
//! "ARM64 registers"), computed in portable code so they are tested on any host.

use crate::state::Power;
use crate::Reg;

/// `KVM_REG_ARM64`: the architecture field of a register id.
const REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// `KVM_REG_SIZE_U64`.
const REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
/// `KVM_REG_ARM_CORE`: core registers, indexed by 32-bit word offset into `struct kvm_regs`.
const REG_ARM_CORE: u64 = 0x0010 << 16;
/// `KVM_REG_ARM64_SYSREG`: system registers, indexed by their op0/op1/CRn/CRm/op2 packing.
const REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// Byte offsets into `struct user_pt_regs` (the start of `struct kvm_regs`):
/// `regs[31]`, then `sp`, `pc`, `pstate`, each 64 bits.
const fn core_offset(reg: Reg) -> Option<u64> {
    match reg {
        Reg::X(n) if n <= 30 => Some(n as u64 * 8),
        Reg::Sp => Some(31 * 8),
        Reg::Pc => Some(32 * 8),
        Reg::Pstate => Some(33 * 8),
        _ => None,
    }
}

/// The `KVM_{GET,SET}_ONE_REG` id of `reg`, or `None` for an X register past X30.
pub const fn one_reg_id(reg: Reg) -> Option<u64> {
    match reg {
        Reg::Sys(sys) => Some(REG_ARM64 | REG_SIZE_U64 | REG_ARM64_SYSREG | sys.encoding() as u64),
        _ => match core_offset(reg) {
            Some(offset) => Some(REG_ARM64 | REG_SIZE_U64 | REG_ARM_CORE | (offset / 4)),
            None => None,
        },
    }
}

/// `KVM_ARM_IRQ_TYPE_SHIFT`, `KVM_ARM_IRQ_VCPU_SHIFT`, `KVM_ARM_IRQ_VCPU2_SHIFT`.
const IRQ_TYPE_SHIFT: u32 = 24;
const IRQ_VCPU_SHIFT: u32 = 16;
const IRQ_VCPU2_SHIFT: u32 = 28;
/// `KVM_ARM_IRQ_TYPE_CPU` and its line `KVM_ARM_IRQ_CPU_IRQ`.
const IRQ_TYPE_CPU: u32 = 0;
const IRQ_CPU_IRQ: u32 = 0;
/// `KVM_ARM_IRQ_TYPE_SPI`.
const IRQ_TYPE_SPI: u32 = 1;

/// The `KVM_IRQ_LINE` number of SPI `intid` (an absolute INTID) of the in-kernel vGIC:
/// type SPI, the INTID in bits 15:0. `None` outside the SPI range 32..1020.
pub const fn spi_irq_line(intid: u32) -> Option<u32> {
    if intid < 32 || intid >= 1020 {
        return None;
    }
    Some((IRQ_TYPE_SPI << IRQ_TYPE_SHIFT) | intid)
}

/// The GSI that KVM's default routing on arm64 gives SPI `intid` of a vGIC created with
/// `nr_irqs` INTIDs, for `KVM_IRQFD`: GSI `n` is the vGIC's pin `n`, which is INTID
/// `32 + n` (`kvm_vgic_setup_default_irq_routing` and `vgic_irqfd_set_irq` in
/// arch/arm64/kvm/vgic/vgic-irqfd.c). `None` outside the vGIC's SPIs.
pub const fn irqfd_gsi(intid: u32, nr_irqs: u32) -> Option<u32> {
    if intid < 32 || intid >= nr_irqs {
        return None;
    }
    Some(intid - 32)
}

/// The `KVM_IRQ_LINE` number of vCPU `vcpu`'s IRQ input (for a VM without an in-kernel
/// interrupt controller): type CPU, the vCPU index split over VCPU (bits 23:16) and VCPU2
/// (bits 31:28), line IRQ. `None` past the 4096 vCPUs the encoding reaches.
pub const fn cpu_irq_line(vcpu: u32) -> Option<u32> {
    if vcpu >= 1 << 12 {
        return None;
    }
    Some(
        ((vcpu >> 8) << IRQ_VCPU2_SHIFT)
            | (IRQ_TYPE_CPU << IRQ_TYPE_SHIFT)
            | ((vcpu & 0xff) << IRQ_VCPU_SHIFT)
            | IRQ_CPU_IRQ,
    )
}

/// `KVM_REG_ARCH_MASK`: the architecture field of a register id.
const REG_ARCH_MASK: u64 = 0xff00_0000_0000_0000;
/// `KVM_REG_SIZE_SHIFT` and `KVM_REG_SIZE_MASK`: log2 of the register's size in bytes.
const REG_SIZE_SHIFT: u32 = 52;
const REG_SIZE_MASK: u64 = 0x00f0_0000_0000_0000;

/// How many bytes register `id` holds, from the size its id carries (`KVM_REG_SIZE`), for
/// an arm64 id of at most 2048 bits (SVE's Z registers); `None` for anything else.
pub const fn reg_width(id: u64) -> Option<usize> {
    if id & REG_ARCH_MASK != REG_ARM64 {
        return None;
    }
    let log2 = (id & REG_SIZE_MASK) >> REG_SIZE_SHIFT;
    if log2 > 8 {
        return None;
    }
    Some(1 << log2)
}

/// The name of the identification register (op0 3, op1 0, CRn 0, CRm 1 to 7: the
/// feature registers a guest chooses code paths by) that `id` names, as a 64-bit KVM
/// system register; `None` for any other id. Unnamed ones are `S3_0_C0_C<m>_<op2>`.
pub fn id_register_name(id: u64) -> Option<String> {
    if id & !0xffff != REG_ARM64 | REG_SIZE_U64 | REG_ARM64_SYSREG {
        return None;
    }
    let (op0, op1, crn, crm, op2) = ((id >> 14) & 3, (id >> 11) & 7, (id >> 7) & 15, (id >> 3) & 15, id & 7);
    if (op0, op1, crn) != (3, 0, 0) || !(1..=7).contains(&crm) {
        return None;
    }
    let known = match (crm, op2) {
        (4, 0) => "ID_AA64PFR0_EL1",
        (4, 1) => "ID_AA64PFR1_EL1",
        (4, 4) => "ID_AA64ZFR0_EL1",
        (4, 5) => "ID_AA64SMFR0_EL1",
        (5, 0) => "ID_AA64DFR0_EL1",
        (5, 1) => "ID_AA64DFR1_EL1",
        (6, 0) => "ID_AA64ISAR0_EL1",
        (6, 1) => "ID_AA64ISAR1_EL1",
        (6, 2) => "ID_AA64ISAR2_EL1",
        (7, 0) => "ID_AA64MMFR0_EL1",
        (7, 1) => "ID_AA64MMFR1_EL1",
        (7, 2) => "ID_AA64MMFR2_EL1",
        _ => return Some(format!("S3_0_C0_C{crm}_{op2}")),
    };
    Some(known.into())
}

/// `KVM_MP_STATE_RUNNABLE`, `KVM_MP_STATE_STOPPED` and `KVM_MP_STATE_SUSPENDED` (the
/// uapi's 0, 5 and 10), the only power states arm64 KVM takes (`kvm_arch_vcpu_ioctl_set_mpstate`).
pub const MP_STATE_RUNNABLE: u32 = 0;
/// See [`MP_STATE_RUNNABLE`].
pub const MP_STATE_STOPPED: u32 = 5;
/// See [`MP_STATE_RUNNABLE`].
pub const MP_STATE_SUSPENDED: u32 = 10;

/// The ESR an SError may carry: its ISS (bits 24:0); KVM refuses anything above.
pub const SERROR_ESR_MASK: u64 = 0x1ff_ffff;

/// A KVM power state as a [`Power`]; `None` for one arm64 KVM does not have.
pub const fn power_of(mp_state: u32) -> Option<Power> {
    match mp_state {
        MP_STATE_RUNNABLE => Some(Power::On),
        MP_STATE_STOPPED => Some(Power::Off),
        MP_STATE_SUSPENDED => Some(Power::Suspended),
        _ => None,
    }
}

/// The KVM power state of a [`Power`].
pub const fn mp_state_of(power: Power) -> u32 {
    match power {
        Power::On => MP_STATE_RUNNABLE,
        Power::Off => MP_STATE_STOPPED,
        Power::Suspended => MP_STATE_SUSPENDED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_id_says_how_wide_it_is() {
        assert_eq!(reg_width(one_reg_id(Reg::Pc).unwrap()), Some(8));
        // V0 (`KVM_REG_ARM_CORE_REG(fp_regs.vregs[0])`, 128 bits) and FPSR (32 bits).
        assert_eq!(reg_width(0x6040_0000_0010_0054), Some(16));
        assert_eq!(reg_width(0x6020_0000_0010_00d4), Some(4));
        // SVE's Z0 slice 0 (2048 bits).
        assert_eq!(reg_width(0x6080_0000_0015_0000), Some(256));
        assert_eq!(reg_width(0x6090_0000_0015_0000), None, "past 2048 bits");
        assert_eq!(reg_width(0x4030_0000_0010_0000), None, "x86's id space");
    }

    /// Review finding: STOPPED and SUSPENDED were 3 and 4 (x86's HALTED and
    /// SIPI_RECEIVED), which arm64 KVM refuses: a powered-off vCPU could not be saved.
    #[test]
    fn power_states_are_the_uapi_values_and_round_trip() {
        assert_eq!((mp_state_of(Power::On), mp_state_of(Power::Off), mp_state_of(Power::Suspended)), (0, 5, 10));
        for power in [Power::On, Power::Off, Power::Suspended] {
            assert_eq!(power_of(mp_state_of(power)), Some(power));
        }
        assert_eq!(power_of(3), None, "KVM_MP_STATE_HALTED is x86's");
    }

    #[test]
    fn cpu_irq_lines() {
        assert_eq!(cpu_irq_line(0), Some(0));
        assert_eq!(cpu_irq_line(3), Some(0x0003_0000));
        assert_eq!(cpu_irq_line(0x1ff), Some(0x10ff_0000));
        assert_eq!(cpu_irq_line(4096), None);
    }

    #[test]
    fn spi_irq_lines() {
        assert_eq!(spi_irq_line(33), Some(0x0100_0021));
        assert_eq!(spi_irq_line(1019), Some(0x0100_03fb));
        assert_eq!(spi_irq_line(31), None);
        assert_eq!(spi_irq_line(1020), None);
    }

    #[test]
    fn irqfd_gsis_are_spi_pins() {
        assert_eq!(irqfd_gsi(32, 128), Some(0));
        assert_eq!(irqfd_gsi(48, 128), Some(16));
        assert_eq!(irqfd_gsi(127, 128), Some(95));
        assert_eq!(irqfd_gsi(128, 128), None, "past the vGIC's SPIs");
        assert_eq!(irqfd_gsi(27, 128), None, "a PPI has no GSI");
    }
    use arch_aarch64::sysreg::MPIDR_EL1;

    #[test]
    fn ids_match_the_kvm_abi() {
        // Values as QEMU, crosvm and Firecracker compute them from the kernel headers.
        assert_eq!(one_reg_id(Reg::X(0)), Some(0x6030_0000_0010_0000));
        assert_eq!(one_reg_id(Reg::X(30)), Some(0x6030_0000_0010_003c));
        assert_eq!(one_reg_id(Reg::Sp), Some(0x6030_0000_0010_003e));
        assert_eq!(one_reg_id(Reg::Pc), Some(0x6030_0000_0010_0040));
        assert_eq!(one_reg_id(Reg::Pstate), Some(0x6030_0000_0010_0042));
        assert_eq!(one_reg_id(Reg::Sys(MPIDR_EL1)), Some(0x6030_0000_0013_c005));
    }

    #[test]
    fn out_of_range_x_register_has_no_id() {
        assert_eq!(one_reg_id(Reg::X(31)), None);
        assert_eq!(one_reg_id(Reg::X(255)), None);
    }

    #[test]
    fn identification_registers_are_named_and_nothing_else_is() {
        let sysreg = |crm: u64, op2: u64| REG_ARM64 | REG_SIZE_U64 | REG_ARM64_SYSREG | (3 << 14) | (crm << 3) | op2;
        assert_eq!(id_register_name(sysreg(6, 0)).as_deref(), Some("ID_AA64ISAR0_EL1"));
        assert_eq!(id_register_name(sysreg(4, 0)).as_deref(), Some("ID_AA64PFR0_EL1"));
        assert_eq!(id_register_name(sysreg(3, 3)).as_deref(), Some("S3_0_C0_C3_3"));
        assert_eq!(id_register_name(sysreg(0, 5)), None, "MPIDR_EL1 is the vCPU's, not the CPU's");
        assert_eq!(id_register_name(sysreg(8, 0)), None);
        assert_eq!(id_register_name(one_reg_id(Reg::Pc).unwrap()), None);
    }
}
