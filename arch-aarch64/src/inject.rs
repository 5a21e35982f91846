//! Making an AArch64 guest take a synchronous exception at EL1, as the hardware would:
//! the register values a VMM writes when it cannot emulate an access (a data abort the
//! syndrome does not describe) or an instruction (an unknown system register).

use crate::sysreg::SysReg;

/// ELR_EL1.
pub const ELR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 1);
/// SPSR_EL1.
pub const SPSR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 0);
/// ESR_EL1.
pub const ESR_EL1: SysReg = SysReg::new(3, 0, 5, 2, 0);
/// FAR_EL1.
pub const FAR_EL1: SysReg = SysReg::new(3, 0, 6, 0, 0);
/// VBAR_EL1.
pub const VBAR_EL1: SysReg = SysReg::new(3, 0, 12, 0, 0);

/// PSTATE on exception entry to EL1: EL1h, with D, A, I and F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// ESR IL bit: the trapped instruction was 32 bits long.
const IL: u64 = 1 << 25;
/// Data and instruction fault status code: synchronous external abort, not on a table walk.
const FSC_EXTERNAL: u64 = 0x10;

/// The exception to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A synchronous external abort on a data access to virtual address `far`.
    DataAbort {
        /// The faulting virtual address (FAR_EL1).
        far: u64,
        /// Whether the access was a write.
        write: bool,
    },
    /// A synchronous external abort on an instruction fetch from virtual address `far`
    /// (a prefetch abort).
    InstructionAbort {
        /// The faulting virtual address (FAR_EL1).
        far: u64,
    },
    /// An undefined instruction.
    Undefined,
}

/// Register values that deliver an exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// New PC: the right vector of VBAR_EL1.
    pub pc: u64,
    /// New PSTATE.
    pub pstate: u64,
    /// ELR_EL1: the faulting instruction, where the guest's handler may return.
    pub elr: u64,
    /// SPSR_EL1: the PSTATE the guest had.
    pub spsr: u64,
    /// ESR_EL1.
    pub esr: u64,
    /// FAR_EL1, for a data abort.
    pub far: Option<u64>,
}

/// How the guest takes `fault` raised by the instruction at `pc` with PSTATE `pstate`
/// and vector base `vbar`.
pub fn take(fault: Fault, pc: u64, pstate: u64, vbar: u64) -> Entry {
    let mode = pstate & 0xf;
    let from_el1 = mode >> 2 == 1;
    // Vector offsets: current EL with SP_EL0 0x000, current EL with SP_ELx 0x200, lower
    // EL in AArch64 0x400 (the synchronous entry of each group).
    let offset = match (from_el1, mode & 1 == 1) {
        (true, false) => 0x000,
        (true, true) => 0x200,
        (false, _) => 0x400,
    };
    let (esr, far) = match fault {
        Fault::DataAbort { far, write } => {
            let ec: u64 = if from_el1 { 0x25 } else { 0x24 };
            ((ec << 26) | IL | (u64::from(write) << 6) | FSC_EXTERNAL, Some(far))
        }
        Fault::InstructionAbort { far } => {
            let ec: u64 = if from_el1 { 0x21 } else { 0x20 };
            ((ec << 26) | IL | FSC_EXTERNAL, Some(far))
        }
        Fault::Undefined => (IL, None),
    };
    Entry { pc: vbar + offset, pstate: PSTATE_EL1H_MASKED, elr: pc, spsr: pstate, esr, far }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_in_the_kernel_goes_to_the_current_el_spx_vector() {
        let e = take(Fault::DataAbort { far: 0xffff_0000_0a00_0000, write: true }, 0xffff_8000_1000, 0x3c5, 0x8000);
        assert_eq!(e.pc, 0x8200);
        assert_eq!((e.elr, e.spsr, e.pstate), (0xffff_8000_1000, 0x3c5, PSTATE_EL1H_MASKED));
        assert_eq!(e.esr >> 26, 0x25, "data abort, same EL");
        assert_eq!(e.esr & 0x3f, 0x10, "synchronous external abort");
        assert_ne!(e.esr & (1 << 6), 0, "WnR");
        assert_eq!(e.far, Some(0xffff_0000_0a00_0000));
    }

    #[test]
    fn a_prefetch_abort_names_the_fetch_address() {
        let kernel = take(Fault::InstructionAbort { far: 0x0a00_0000 }, 0x0a00_0000, 0x3c5, 0x8000);
        assert_eq!((kernel.pc, kernel.esr >> 26, kernel.esr & 0x3f), (0x8200, 0x21, 0x10), "same EL");
        assert_eq!((kernel.elr, kernel.far), (0x0a00_0000, Some(0x0a00_0000)));
        let user = take(Fault::InstructionAbort { far: 0x1000 }, 0x1000, 0x0, 0x8000);
        assert_eq!((user.pc, user.esr >> 26), (0x8400, 0x20), "from EL0");
    }

    #[test]
    fn from_user_space_and_with_sp_el0() {
        let user = take(Fault::DataAbort { far: 0x1000, write: false }, 0x400000, 0x0, 0x8000);
        assert_eq!((user.pc, user.esr >> 26), (0x8400, 0x24));
        let el1t = take(Fault::Undefined, 0x10, 0x4, 0x8000);
        assert_eq!((el1t.pc, el1t.esr, el1t.far), (0x8000, IL, None), "EC 0 is 'unknown reason': UNDEF");
    }
}
