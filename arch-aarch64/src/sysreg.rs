//! System-register encodings.
//!
//! A system register is named by `op0, op1, CRn, CRm, op2` (the operands of `MRS`/`MSR`).
//! [`SysReg`] packs them the way KVM's `KVM_REG_ARM64_SYSREG` ids and the ISS of an
//! ESR_EL2 MSR/MRS trap both order them, so each backend converts with a shift.

/// A system register, as its `op0, op1, CRn, CRm, op2` encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SysReg {
    /// op0 (2 bits).
    pub op0: u8,
    /// op1 (3 bits).
    pub op1: u8,
    /// CRn (4 bits).
    pub crn: u8,
    /// CRm (4 bits).
    pub crm: u8,
    /// op2 (3 bits).
    pub op2: u8,
}

impl SysReg {
    /// A register from its five encoding fields (each masked to its width).
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        SysReg { op0: op0 & 3, op1: op1 & 7, crn: crn & 0xf, crm: crm & 0xf, op2: op2 & 7 }
    }

    /// The 16-bit packing `op0:op1:CRn:CRm:op2` (bits 15:14, 13:11, 10:7, 6:3, 2:0), as
    /// KVM's `KVM_REG_ARM64_SYSREG` ids use it.
    pub const fn encoding(self) -> u16 {
        (self.op0 as u16) << 14
            | (self.op1 as u16) << 11
            | (self.crn as u16) << 7
            | (self.crm as u16) << 3
            | self.op2 as u16
    }
}

/// AArch64 Processor Feature Register 0 (GIC system-register interface in bits 27:24).
pub const ID_AA64PFR0_EL1: SysReg = SysReg::new(3, 0, 0, 4, 0);
/// AArch64 Processor Feature Register 1 (SME in bits 27:24).
pub const ID_AA64PFR1_EL1: SysReg = SysReg::new(3, 0, 0, 4, 1);
/// Multiprocessor affinity register.
pub const MPIDR_EL1: SysReg = SysReg::new(3, 0, 0, 0, 5);
/// SCTLR_EL1: the MMU, caches and alignment checks at EL1 and EL0.
pub const SCTLR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 0);
/// SCTLR_EL1 as after a reset, with the MMU and caches off: the value KVM resets it to
/// (`reset_val` for SCTLR_EL1 in arch/arm64/kvm/sys_regs.c, Linux 6.1).
pub const SCTLR_EL1_RESET: u64 = 0x00c5_0078;
/// SCTLR_EL2: the MMU and caches of EL2's translation regime.
pub const SCTLR_EL2: SysReg = SysReg::new(3, 4, 1, 0, 0);
/// SCTLR_EL2 with the MMU and caches off and its RES1 bits set (Linux's
/// `INIT_SCTLR_EL2_MMU_OFF`, little-endian): what a vCPU at EL2 starts from.
pub const SCTLR_EL2_RESET: u64 = 0x30c5_0830;
/// CPACR_EL1: access to floating point and SIMD at EL1 and EL0 (0 after a reset: trapped).
pub const CPACR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 2);
/// Virtual timer control register.
pub const CNTV_CTL_EL0: SysReg = SysReg::new(3, 3, 14, 3, 1);
/// Virtual timer compare value.
pub const CNTV_CVAL_EL0: SysReg = SysReg::new(3, 3, 14, 3, 2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_architecture() {
        // MPIDR_EL1 is S3_0_C0_C0_5.
        assert_eq!(MPIDR_EL1.encoding(), 0xc005);
        // CNTV_CTL_EL0 is S3_3_C14_C3_1; Linux's sysreg.h gives 0xdf19 for it.
        assert_eq!(CNTV_CTL_EL0.encoding(), 0xdf19);
        assert_eq!(CNTV_CVAL_EL0.encoding(), 0xdf1a);
    }

    #[test]
    fn fields_are_masked() {
        assert_eq!(SysReg::new(0xff, 0xff, 0xff, 0xff, 0xff).encoding(), 0xffff);
    }
}
