//! Where Hypervisor.framework keeps each register: a general register id
//! (`hv_reg_t`), a system register (`hv_sys_reg_t`, the op0:op1:CRn:CRm:op2 packing), or
//! nowhere (XZR); and the feature registers a vCPU is given. Portable, so it is tested on
//! any host.

use crate::Reg;

/// `hv_reg_t` of the program counter and of CPSR (Apple's `HV_REG_PC`, `HV_REG_CPSR`).
const HV_REG_PC: u32 = 31;
const HV_REG_CPSR: u32 = 34;
/// SP_EL0 as a system register (`HV_SYS_REG_SP_EL0`, encoding 3,0,4,1,0).
const HV_SYS_REG_SP_EL0: u16 = 0xc208;

/// Where a register lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A general register id (`hv_vcpu_{get,set}_reg`).
    General(u32),
    /// A system register encoding (`hv_vcpu_{get,set}_sys_reg`).
    System(u16),
    /// The zero register: reads 0, writes go nowhere.
    Zero,
}

/// Where `reg` lives. Register number 31 in an instruction is XZR, never X30 (whose
/// `hv_reg_t` is 30; 31 is the PC's): a load into XZR must not clobber the link
/// register, so `Reg::X(31)` (and anything past it) is [`Place::Zero`].
pub const fn place(reg: Reg) -> Place {
    match reg {
        Reg::X(n) if n <= 30 => Place::General(n as u32),
        Reg::X(_) => Place::Zero,
        Reg::Pc => Place::General(HV_REG_PC),
        Reg::Pstate => Place::General(HV_REG_CPSR),
        Reg::Sp => Place::System(HV_SYS_REG_SP_EL0),
        Reg::Sys(sys) => Place::System(sys.encoding()),
    }
}

/// A 4-bit field of an ID register at bit `shift`.
const fn with_field(value: u64, shift: u32, field: u64) -> u64 {
    (value & !(0xf << shift)) | ((field & 0xf) << shift)
}

/// ID_AA64PFR0_EL1.GIC and ID_AA64PFR1_EL1.SME: bits 27:24 of each.
const GIC_SHIFT: u32 = 24;
/// ID_AA64PFR0_EL1.EL2: bits 11:8.
const EL2_SHIFT: u32 = 8;
const SME_SHIFT: u32 = 24;

/// The processor feature registers (ID_AA64PFR0_EL1, ID_AA64PFR1_EL1) a vCPU is given,
/// from the framework's: what hvrun does not handle is hidden, and the guest is told the
/// truth about the GIC.
/// - SME is cleared: macOS 15.2 shows it on M4, and hvrun neither saves SME state nor
///   handles its traps (QEMU hides it too). The ID registers that would describe SME
///   and WFxT (ID_AA64SMFR0_EL1, ID_AA64ISAR2_EL1) trap and read as zero
///   (`exits::decide`).
/// - GIC is 1 (the GICv3 system registers) exactly when the framework's GICv3 serves
///   the VM; with hvrun's GICv2 those registers do not exist for the guest.
/// - EL2 is shown only to a guest given EL2 (`el2`, `--nested`), as the framework has it.
pub const fn visible_features(pfr0: u64, pfr1: u64, kernel_gic: bool, el2: bool) -> (u64, u64) {
    let gic = if kernel_gic { 1 } else { 0 };
    let pfr0 = if el2 { pfr0 } else { with_field(pfr0, EL2_SHIFT, 0) };
    (with_field(pfr0, GIC_SHIFT, gic), with_field(pfr1, SME_SHIFT, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14, fixes 3 and 4: SME was left visible, and the GIC field was whatever the
    /// framework said, whichever GIC served the guest.
    #[test]
    fn sme_is_hidden_and_the_gic_field_says_which_gic_serves() {
        let pfr0 = 0x0000_0001_2200_1111; // EL0-EL3 AArch64, FP, AdvSIMD; GIC = 2, RAS = 2
        let pfr1 = 0x0000_0000_0200_0120; // SME = 2 (SME2), SSBS = 2, MTE = 0, BT = 0
        let (p0, p1) = visible_features(pfr0, pfr1, false, true);
        assert_eq!(p1, 0x0000_0000_0000_0120, "SME cleared, the rest kept");
        assert_eq!(p0, 0x0000_0001_2000_1111, "no GIC system registers with hvrun's GICv2");
        let (p0, _) = visible_features(pfr0, pfr1, true, true);
        assert_eq!(p0, 0x0000_0001_2100_1111, "the framework's GICv3: GIC = 1");
        assert_eq!(visible_features(0, 0, true, true), (1 << 24, 0));
    }

    /// `--nested`: EL2 is shown exactly to a guest that has it.
    #[test]
    fn el2_is_shown_only_to_a_guest_given_it() {
        let pfr0 = 0x0000_0001_2200_1111; // EL2 = 1 (AArch64)
        assert_eq!(visible_features(pfr0, 0, true, true).0 >> 8 & 0xf, 1);
        assert_eq!(visible_features(pfr0, 0, true, false).0, 0x0000_0001_2100_1011, "EL2 = 0, the rest kept");
    }

    /// Issue 14, fix 7: `Reg::X(31)` was clamped to X30, so a load into XZR clobbered the
    /// link register.
    #[test]
    fn xzr_is_nowhere_and_never_x30() {
        assert_eq!(place(Reg::X(31)), Place::Zero);
        assert_eq!(place(Reg::X(255)), Place::Zero);
        assert_eq!(place(Reg::X(30)), Place::General(30));
        assert_eq!(place(Reg::X(0)), Place::General(0));
        assert_eq!(place(Reg::Pc), Place::General(31));
        assert_eq!(place(Reg::Sys(arch_aarch64::sysreg::MPIDR_EL1)), Place::System(0xc005));
    }
}
