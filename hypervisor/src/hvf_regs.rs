//! Where Hypervisor.framework keeps each register: a general register id
//! (`hv_reg_t`), a system register (`hv_sys_reg_t`, the op0:op1:CRn:CRm:op2 packing), or
//! nowhere (XZR); and the feature registers a vCPU is given. Portable, so it is tested on
//! any host.

use crate::{Reg, SysReg};

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

/// `hv_reg_t` of FPCR and FPSR (Apple's `HV_REG_FPCR`, `HV_REG_FPSR`).
const HV_REG_FPCR: u32 = 32;
const HV_REG_FPSR: u32 = 33;

/// A register of a vCPU's saved state on Hypervisor.framework, which has no register
/// list to ask: the explicit list is [`state_regs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateReg {
    /// A general register (`hv_reg_t`: X0..X30, PC, FPCR, FPSR, CPSR), 8 bytes.
    General(u32),
    /// A SIMD/FP register Q0..Q31 (`hv_simd_fp_reg_t`), 16 bytes.
    Simd(u8),
    /// A system register (`hv_sys_reg_t`, its encoding), 8 bytes.
    System(u16),
    /// The guest's virtual counter (CNTVCT_EL0) when it was saved, 8 bytes: a restore
    /// sets the VM's counter offset so the guest's counter goes on from it.
    VirtualCounter,
    /// A register of the CPU interface of macOS 15's in-kernel GIC (`hv_gic_icc_reg_t`,
    /// its encoding), 8 bytes: the part of the GIC's state its serialized blob leaves out.
    GicCpu(u16),
}

/// The id-space tags of [`StateReg::id`].
const TAG_SHIFT: u32 = 32;
const TAG_GENERAL: u64 = 1;
const TAG_SIMD: u64 = 2;
const TAG_SYSTEM: u64 = 3;
const TAG_COUNTER: u64 = 4;
const TAG_GIC_CPU: u64 = 5;

impl StateReg {
    /// Its id in a saved [`crate::state::VcpuState`].
    pub const fn id(self) -> u64 {
        match self {
            StateReg::General(n) => TAG_GENERAL << TAG_SHIFT | n as u64,
            StateReg::Simd(n) => TAG_SIMD << TAG_SHIFT | n as u64,
            StateReg::System(enc) => TAG_SYSTEM << TAG_SHIFT | enc as u64,
            StateReg::VirtualCounter => TAG_COUNTER << TAG_SHIFT,
            StateReg::GicCpu(enc) => TAG_GIC_CPU << TAG_SHIFT | enc as u64,
        }
    }

    /// The register an id names, if it is one of [`state_regs`] (with the in-kernel GIC).
    pub fn from_id(id: u64) -> Option<StateReg> {
        state_regs(true).find(|r| r.id() == id)
    }

    /// How many bytes it holds.
    pub const fn width(self) -> usize {
        match self {
            StateReg::Simd(_) => 16,
            _ => 8,
        }
    }
}

/// The system registers of a vCPU's saved state: every EL1 and EL0 register a guest can
/// set and the framework lets the VMM read and write (the list QEMU's
/// `target/arm/hvf/hvf.c` keeps, checked against `hv_sys_reg_t`): translation
/// (SCTLR, TCR, TTBR0/1, MAIR, AMAIR), exceptions (VBAR, ELR, SPSR, ESR, FAR, PAR, AFSR0/1),
/// stacks and thread ids (SP_EL0/1, TPIDR_EL0/EL1, TPIDRRO_EL0, CONTEXTIDR), CPACR,
/// CNTKCTL, CSSELR, the virtual timer (CNTV_CTL, CNTV_CVAL), the debug registers (MDSCR,
/// MDCCINT, the 16 breakpoint and watchpoint pairs), the pointer-authentication keys,
/// and the identity registers hvrun sets at creation (MPIDR, ID_AA64PFR0/1).
const SYSTEM_STATE: &[(u8, u8, u8, u8, u8)] = &[
    (3, 0, 0, 0, 5),  // MPIDR_EL1
    (3, 0, 0, 4, 0),  // ID_AA64PFR0_EL1
    (3, 0, 0, 4, 1),  // ID_AA64PFR1_EL1
    (3, 0, 1, 0, 0),  // SCTLR_EL1
    (3, 0, 1, 0, 2),  // CPACR_EL1
    (3, 0, 2, 0, 0),  // TTBR0_EL1
    (3, 0, 2, 0, 1),  // TTBR1_EL1
    (3, 0, 2, 0, 2),  // TCR_EL1
    (3, 0, 2, 1, 0),  // APIAKEYLO_EL1
    (3, 0, 2, 1, 1),  // APIAKEYHI_EL1
    (3, 0, 2, 1, 2),  // APIBKEYLO_EL1
    (3, 0, 2, 1, 3),  // APIBKEYHI_EL1
    (3, 0, 2, 2, 0),  // APDAKEYLO_EL1
    (3, 0, 2, 2, 1),  // APDAKEYHI_EL1
    (3, 0, 2, 2, 2),  // APDBKEYLO_EL1
    (3, 0, 2, 2, 3),  // APDBKEYHI_EL1
    (3, 0, 2, 3, 0),  // APGAKEYLO_EL1
    (3, 0, 2, 3, 1),  // APGAKEYHI_EL1
    (3, 0, 4, 0, 0),  // SPSR_EL1
    (3, 0, 4, 0, 1),  // ELR_EL1
    (3, 0, 4, 1, 0),  // SP_EL0
    (3, 4, 4, 1, 0),  // SP_EL1
    (3, 0, 5, 1, 0),  // AFSR0_EL1
    (3, 0, 5, 1, 1),  // AFSR1_EL1
    (3, 0, 5, 2, 0),  // ESR_EL1
    (3, 0, 6, 0, 0),  // FAR_EL1
    (3, 0, 7, 4, 0),  // PAR_EL1
    (3, 0, 10, 2, 0), // MAIR_EL1
    (3, 0, 10, 3, 0), // AMAIR_EL1
    (3, 0, 12, 0, 0), // VBAR_EL1
    (3, 0, 13, 0, 1), // CONTEXTIDR_EL1
    (3, 0, 13, 0, 4), // TPIDR_EL1
    (3, 0, 14, 1, 0), // CNTKCTL_EL1
    (3, 2, 0, 0, 0),  // CSSELR_EL1
    (3, 3, 13, 0, 2), // TPIDR_EL0
    (3, 3, 13, 0, 3), // TPIDRRO_EL0
    (3, 3, 14, 3, 1), // CNTV_CTL_EL0
    (3, 3, 14, 3, 2), // CNTV_CVAL_EL0
    (2, 0, 0, 2, 0),  // MDCCINT_EL1
    (2, 0, 0, 2, 2),  // MDSCR_EL1
];

/// The CPU interface registers of macOS 15's in-kernel GIC a vCPU's saved state holds
/// (`hv_gic_icc_reg_t`'s, but RPR, which is read-only, and SRE_EL2), in the order a
/// restore writes them: SRE first, CTLR before the active priorities (as KVM's order).
const GIC_CPU_STATE: &[u16] = &[
    0xc665, // ICC_SRE_EL1
    0xc664, // ICC_CTLR_EL1
    0xc230, // ICC_PMR_EL1
    0xc643, // ICC_BPR0_EL1
    0xc663, // ICC_BPR1_EL1
    0xc644, // ICC_AP0R0_EL1
    0xc648, // ICC_AP1R0_EL1
    0xc666, // ICC_IGRPEN0_EL1
    0xc667, // ICC_IGRPEN1_EL1
];

/// Every register of a vCPU's saved state on Hypervisor.framework, in the order a
/// restore writes them (the identity registers first); with the framework's GIC
/// (`kernel_gic`) its CPU interface's registers too.
pub fn state_regs(kernel_gic: bool) -> impl Iterator<Item = StateReg> + Clone {
    let general = (0..=30).chain([HV_REG_PC, HV_REG_FPCR, HV_REG_FPSR, HV_REG_CPSR]).map(StateReg::General);
    let simd = (0..32).map(StateReg::Simd);
    let system = SYSTEM_STATE
        .iter()
        .map(|&(op0, op1, crn, crm, op2)| StateReg::System(SysReg::new(op0, op1, crn, crm, op2).encoding()));
    // DBGBVRn, DBGBCRn, DBGWVRn, DBGWCRn: op0 2, op1 0, CRn 0, CRm n, op2 4..7.
    let debug =
        (0..16u8).flat_map(|n| (4..8u8).map(move |op2| StateReg::System(SysReg::new(2, 0, 0, n, op2).encoding())));
    let gic = GIC_CPU_STATE.iter().filter(move |_| kernel_gic).map(|&enc| StateReg::GicCpu(enc));
    general.chain(simd).chain(system).chain(debug).chain([StateReg::VirtualCounter]).chain(gic)
}

/// The width in bytes of a saved register id, for [`crate::state::VcpuState::check`].
pub fn state_width(id: u64) -> Option<usize> {
    StateReg::from_id(id).map(StateReg::width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_list_has_what_the_issue_names_once_each_and_ids_round_trip() {
        let all: Vec<StateReg> = state_regs(true).collect();
        let unique: std::collections::HashSet<u64> = all.iter().map(|r| r.id()).collect();
        assert_eq!(unique.len(), all.len(), "no register twice");
        assert_eq!(all.len(), 35 + 32 + SYSTEM_STATE.len() + 64 + 1 + GIC_CPU_STATE.len());
        let without: Vec<StateReg> = state_regs(false).collect();
        assert_eq!(without[..], all[..all.len() - GIC_CPU_STATE.len()], "the GIC's registers come last");
        assert_eq!(all[without.len()], StateReg::GicCpu(0xc665), "ICC_SRE_EL1 first");
        for reg in &all {
            assert_eq!(StateReg::from_id(reg.id()), Some(*reg));
            assert_eq!(state_width(reg.id()), Some(reg.width()));
        }
        assert_eq!(state_width(0x3_0000_0000 | 0xffff), None, "not on the list");
        let system = |op0, op1, crn, crm, op2| StateReg::System(SysReg::new(op0, op1, crn, crm, op2).encoding());
        let must = [
            system(3, 0, 1, 0, 0),  // SCTLR_EL1
            system(3, 0, 2, 0, 2),  // TCR_EL1
            system(3, 0, 12, 0, 0), // VBAR_EL1
            system(3, 4, 4, 1, 0),  // SP_EL1
            system(3, 0, 2, 3, 1),  // APGAKEYHI_EL1
            system(3, 3, 14, 3, 2), // CNTV_CVAL_EL0
            system(2, 0, 0, 15, 7), // DBGWCR15_EL1
            StateReg::General(HV_REG_CPSR),
            StateReg::Simd(31),
            StateReg::VirtualCounter,
        ];
        for reg in must {
            assert!(all.contains(&reg), "{reg:?} is saved");
        }
        // SP_EL0 is where `place` says it is.
        assert!(all.contains(&StateReg::System(HV_SYS_REG_SP_EL0)));
    }

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
