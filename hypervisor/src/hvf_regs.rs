//! Where Hypervisor.framework keeps each register: a general register id
//! (`hv_reg_t`), a system register (`hv_sys_reg_t`, the op0:op1:CRn:CRm:op2 packing), or
//! nowhere (XZR). Portable, so it is tested on any host.

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

#[cfg(test)]
mod tests {
    use super::*;

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
