//! Making an AArch64 guest take a synchronous exception, as the hardware would: the
//! register values a VMM writes when it cannot emulate an access (a data abort the
//! syndrome does not describe) or an instruction (an unknown system register).
//!
//! The exception goes to EL1, or to EL2 for a guest given EL2 (`--nested`) when it runs
//! there or when its EL0 belongs to an EL2 host kernel ([`target_el`]); each level takes
//! it through its own registers ([`Bank`]).

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
/// ELR_EL2.
pub const ELR_EL2: SysReg = SysReg::new(3, 4, 4, 0, 1);
/// SPSR_EL2.
pub const SPSR_EL2: SysReg = SysReg::new(3, 4, 4, 0, 0);
/// ESR_EL2.
pub const ESR_EL2: SysReg = SysReg::new(3, 4, 5, 2, 0);
/// FAR_EL2.
pub const FAR_EL2: SysReg = SysReg::new(3, 4, 6, 0, 0);
/// VBAR_EL2.
pub const VBAR_EL2: SysReg = SysReg::new(3, 4, 12, 0, 0);
/// HCR_EL2, whose E2H and TGE bits say whether EL0 belongs to an EL2 host kernel.
pub const HCR_EL2: SysReg = SysReg::new(3, 4, 1, 1, 0);
/// HCR_EL2.TGE: exceptions from EL0 go to EL2.
const HCR_TGE: u64 = 1 << 27;
/// HCR_EL2.TSC: an SMC at EL1 traps to EL2.
pub const HCR_TSC: u64 = 1 << 19;
/// HCR_EL2.TEA: synchronous external aborts from EL0 and EL1 go to EL2.
const HCR_TEA: u64 = 1 << 37;

/// PSTATE on exception entry to EL1: EL1h, with D, A, I and F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// PSTATE on exception entry to EL2: EL2h, with D, A, I and F masked.
pub const PSTATE_EL2H_MASKED: u64 = 0x3c9;

/// The registers through which an exception level takes an exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bank {
    /// The exception level (1 or 2).
    pub el: u8,
    /// Where the return address goes.
    pub elr: SysReg,
    /// Where the interrupted PSTATE goes.
    pub spsr: SysReg,
    /// The syndrome.
    pub esr: SysReg,
    /// The faulting address.
    pub far: SysReg,
    /// The vector base.
    pub vbar: SysReg,
    /// PSTATE on entry: this level with SP_ELx, D, A, I and F masked.
    pub pstate: u64,
}

/// EL1's registers.
pub const EL1: Bank = Bank {
    el: 1,
    elr: ELR_EL1,
    spsr: SPSR_EL1,
    esr: ESR_EL1,
    far: FAR_EL1,
    vbar: VBAR_EL1,
    pstate: PSTATE_EL1H_MASKED,
};
/// EL2's registers.
pub const EL2: Bank = Bank {
    el: 2,
    elr: ELR_EL2,
    spsr: SPSR_EL2,
    esr: ESR_EL2,
    far: FAR_EL2,
    vbar: VBAR_EL2,
    pstate: PSTATE_EL2H_MASKED,
};

/// The exception level PSTATE `pstate` names (bits 3:2 of M).
pub const fn current_el(pstate: u64) -> u8 {
    ((pstate >> 2) & 3) as u8
}

/// Which level takes `fault` raised with PSTATE `pstate`, in a guest whose HCR_EL2 is
/// `hcr_el2` (0 for a guest without EL2): EL2 when the guest runs there; when it runs at
/// EL0 with HCR_EL2.TGE set (the user space of a kernel at EL2, as a VHE host's is); for
/// an external abort with HCR_EL2.TEA set (a guest hypervisor that takes its guests'
/// external aborts, as KVM does with RAS); and for an HVC or a trapped SMC, which only
/// EL2 takes. EL1 otherwise.
pub const fn target_el(fault: Fault, pstate: u64, hcr_el2: u64) -> &'static Bank {
    let external = matches!(fault, Fault::DataAbort { .. } | Fault::InstructionAbort { .. });
    match current_el(pstate) {
        _ if matches!(fault, Fault::Hvc { .. } | Fault::Smc { .. }) => &EL2,
        2 | 3 => &EL2,
        0 if hcr_el2 & HCR_TGE != 0 => &EL2,
        _ if external && hcr_el2 & HCR_TEA != 0 => &EL2,
        _ => &EL1,
    }
}
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
    /// An HVC with immediate `imm`, for the guest's own EL2 (a guest with EL2 calls the
    /// VMM through SMC). The return address is the instruction after it.
    Hvc {
        /// The HVC's immediate.
        imm: u16,
    },
    /// An SMC with immediate `imm` trapped to the guest's EL2 (HCR_EL2.TSC). The return
    /// address is the SMC itself.
    Smc {
        /// The SMC's immediate.
        imm: u16,
    },
}

/// Register values that deliver an exception, to be written to the target level's
/// [`Bank`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// New PC: the right vector of the target level's VBAR.
    pub pc: u64,
    /// New PSTATE.
    pub pstate: u64,
    /// ELR: the faulting instruction, where the guest's handler may return.
    pub elr: u64,
    /// SPSR: the PSTATE the guest had.
    pub spsr: u64,
    /// ESR.
    pub esr: u64,
    /// FAR, for an abort.
    pub far: Option<u64>,
}

/// How the guest takes `fault` raised by the instruction at `pc` with PSTATE `pstate`,
/// at the level `to` (see [`target_el`]) whose vector base is `vbar`.
pub fn take(fault: Fault, pc: u64, pstate: u64, to: &Bank, vbar: u64) -> Entry {
    let from_same_el = current_el(pstate) == to.el;
    // Vector offsets: current EL with SP_EL0 0x000, current EL with SP_ELx 0x200, lower
    // EL in AArch64 0x400 (the synchronous entry of each group).
    let offset = match (from_same_el, pstate & 1 == 1) {
        (true, false) => 0x000,
        (true, true) => 0x200,
        (false, _) => 0x400,
    };
    let (esr, far) = match fault {
        Fault::DataAbort { far, write } => {
            let ec: u64 = if from_same_el { 0x25 } else { 0x24 };
            ((ec << 26) | IL | (u64::from(write) << 6) | FSC_EXTERNAL, Some(far))
        }
        Fault::InstructionAbort { far } => {
            let ec: u64 = if from_same_el { 0x21 } else { 0x20 };
            ((ec << 26) | IL | FSC_EXTERNAL, Some(far))
        }
        Fault::Undefined => (IL, None),
        Fault::Hvc { imm } => ((0x16 << 26) | IL | u64::from(imm), None),
        Fault::Smc { imm } => ((0x17 << 26) | IL | u64::from(imm), None),
    };
    Entry { pc: vbar.wrapping_add(offset), pstate: to.pstate, elr: pc, spsr: pstate, esr, far }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_in_the_kernel_goes_to_the_current_el_spx_vector() {
        let e =
            take(Fault::DataAbort { far: 0xffff_0000_0a00_0000, write: true }, 0xffff_8000_1000, 0x3c5, &EL1, 0x8000);
        assert_eq!(e.pc, 0x8200);
        assert_eq!((e.elr, e.spsr, e.pstate), (0xffff_8000_1000, 0x3c5, PSTATE_EL1H_MASKED));
        assert_eq!(e.esr >> 26, 0x25, "data abort, same EL");
        assert_eq!(e.esr & 0x3f, 0x10, "synchronous external abort");
        assert_ne!(e.esr & (1 << 6), 0, "WnR");
        assert_eq!(e.far, Some(0xffff_0000_0a00_0000));
    }

    #[test]
    fn a_prefetch_abort_names_the_fetch_address() {
        let kernel = take(Fault::InstructionAbort { far: 0x0a00_0000 }, 0x0a00_0000, 0x3c5, &EL1, 0x8000);
        assert_eq!((kernel.pc, kernel.esr >> 26, kernel.esr & 0x3f), (0x8200, 0x21, 0x10), "same EL");
        assert_eq!((kernel.elr, kernel.far), (0x0a00_0000, Some(0x0a00_0000)));
        let user = take(Fault::InstructionAbort { far: 0x1000 }, 0x1000, 0x0, &EL1, 0x8000);
        assert_eq!((user.pc, user.esr >> 26), (0x8400, 0x20), "from EL0");
    }

    #[test]
    fn from_user_space_and_with_sp_el0() {
        let user = take(Fault::DataAbort { far: 0x1000, write: false }, 0x400000, 0x0, &EL1, 0x8000);
        assert_eq!((user.pc, user.esr >> 26), (0x8400, 0x24));
        let el1t = take(Fault::Undefined, 0x10, 0x4, &EL1, 0x8000);
        assert_eq!((el1t.pc, el1t.esr, el1t.far), (0x8000, IL, None), "EC 0 is 'unknown reason': UNDEF");
    }

    #[test]
    fn a_guest_at_el2_takes_its_exceptions_at_el2() {
        // EL2h: the guest hypervisor's own fault goes to its VBAR_EL2, current EL with SPx.
        let el2h = 0x3c9;
        let to = target_el(Fault::Undefined, el2h, 0);
        assert_eq!(to.el, 2);
        let e = take(Fault::DataAbort { far: 0x0a00_0000, write: false }, 0x4000_0000, el2h, to, 0x9000);
        assert_eq!((e.pc, e.esr >> 26, e.pstate, e.spsr), (0x9200, 0x25, PSTATE_EL2H_MASKED, el2h));
        assert_eq!((to.elr, to.esr, to.vbar), (ELR_EL2, ESR_EL2, VBAR_EL2));
        // EL2t (SP_EL0) takes the first vector.
        assert_eq!(take(Fault::Undefined, 0x10, 0x8, target_el(Fault::Undefined, 0x8, 0), 0x9000).pc, 0x9000);
    }

    #[test]
    fn user_space_goes_to_el2_only_under_a_host_kernel_at_el2() {
        // HCR_EL2.TGE set (a VHE host's user space): EL0 faults go to EL2, from a lower EL.
        let fetch = Fault::InstructionAbort { far: 0x1000 };
        let to = target_el(fetch, 0x0, (1 << 34) | (1 << 27));
        assert_eq!(to.el, 2);
        let e = take(fetch, 0x1000, 0x0, to, 0x9000);
        assert_eq!((e.pc, e.esr >> 26, e.pstate), (0x9400, 0x20, PSTATE_EL2H_MASKED));
        // Without TGE (a nested guest's user space, or no EL2 at all) EL1 takes them.
        assert_eq!(target_el(fetch, 0x0, 1 << 34).el, 1);
        assert_eq!(target_el(fetch, 0x0, 0).el, 1);
        assert_eq!(target_el(fetch, 0x3c5, (1 << 34) | (1 << 27)).el, 1, "EL1 is never routed by TGE here");
    }

    #[test]
    fn with_tea_a_guest_hypervisor_takes_its_guests_external_aborts() {
        let tea = 1 << 37;
        let abort = Fault::DataAbort { far: 0x1000, write: true };
        for el1_or_el0 in [0x3c5, 0x0] {
            let to = target_el(abort, el1_or_el0, tea);
            assert_eq!(to.el, 2);
            assert_eq!(take(abort, 0x40_0000, el1_or_el0, to, 0x9000).esr >> 26, 0x24, "from a lower EL");
        }
        assert_eq!(target_el(Fault::InstructionAbort { far: 0 }, 0x3c5, tea).el, 2);
        assert_eq!(target_el(Fault::Undefined, 0x3c5, tea).el, 1, "TEA routes only external aborts");
        assert_eq!(target_el(abort, 0x3c5, 0).el, 1);
    }

    #[test]
    fn hvc_and_trapped_smc_go_to_el2_with_their_immediates() {
        let hvc = Fault::Hvc { imm: 0x12 };
        let to = target_el(hvc, 0x3c5, 0);
        assert_eq!(to.el, 2, "from EL1");
        let e = take(hvc, 0x4000_0004, 0x3c5, to, 0x9000);
        assert_eq!((e.pc, e.esr, e.elr), (0x9400, (0x16 << 26) | IL | 0x12, 0x4000_0004));
        let at_el2 = take(hvc, 0x4000_0004, 0x3c9, target_el(hvc, 0x3c9, 0), 0x9000);
        assert_eq!(at_el2.pc, 0x9200, "an HVC at EL2 is taken at EL2, current EL");
        let smc = Fault::Smc { imm: 0 };
        let e = take(smc, 0x4000_0000, 0x3c5, target_el(smc, 0x3c5, HCR_TSC), 0x9000);
        assert_eq!((e.pc, e.esr >> 26, e.elr), (0x9400, 0x17, 0x4000_0000));
    }

    #[test]
    fn the_registers_are_the_architected_ones() {
        // S3_4_C4_C0_1 is ELR_EL2, S3_4_C5_C2_0 ESR_EL2, S3_4_C12_C0_0 VBAR_EL2,
        // S3_4_C1_C1_0 HCR_EL2 (Linux's sysreg.h: 0xe201, 0xe290, 0xe600, 0xe088).
        let encodings = [ELR_EL2, ESR_EL2, VBAR_EL2, HCR_EL2].map(SysReg::encoding);
        assert_eq!(encodings, [0xe201, 0xe290, 0xe600, 0xe088]);
        assert_eq!((ELR_EL1.encoding(), VBAR_EL1.encoding()), (0xc201, 0xc600));
    }
}
