//! What to do with an exception a backend receives raw (Hypervisor.framework hands the
//! VMM ESR_EL2 and the faulting IPA; KVM decodes most exits itself). The decision is a
//! pure function of the syndrome, so it is tested here on any host; the backend only
//! carries it out with framework calls.

use arch_aarch64::esr::{self, DataAbort, MmioAccess, Syndrome, SysRegAccess, Wait};

/// What the backend does for one exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An MMIO access the syndrome describes: serve it on the bus (a store takes its data
    /// from `access.reg`; a load writes `access.load_value(..)` there), then step past
    /// the instruction.
    Mmio {
        /// The guest-physical address.
        addr: u64,
        /// The access.
        access: MmioAccess,
    },
    /// A PSCI/SMCCC call: `arch_aarch64::psci::handle` with X0..X3, result in X0. After
    /// HVC the return address is already past the instruction; after SMC it is not.
    Psci {
        /// Whether the call came through SMC (then step past it).
        smc: bool,
    },
    /// WFI: step past it, then sleep until an interrupt is pending for this vCPU, a kick,
    /// or its virtual timer's deadline.
    WaitForInterrupt,
    /// WFIT: as WFI, and the wait also ends when the virtual count reaches the value in
    /// X`reg` (XZR: at once). Never an unbounded WFI: a guest that asked for a timeout
    /// gets it even with its timer disarmed.
    WaitUntil {
        /// The register holding the deadline.
        reg: u8,
    },
    /// Step past the instruction and carry on (WFE; cache maintenance on MMIO; a write
    /// to a register that ignores writes).
    Skip,
    /// A read of a register that reads as zero: write 0 to X`rt` (unless it is XZR) and
    /// step past the instruction.
    ReadZero {
        /// The destination register.
        rt: u8,
    },
    /// Make the guest take a synchronous external abort on `addr`: an access no device
    /// can serve the way the instruction asks (no valid syndrome, a page-table walk into
    /// MMIO). The guest's kernel reports it; the VMM keeps running.
    InjectDataAbort {
        /// The faulting address.
        addr: u64,
    },
    /// Make the guest take a prefetch abort (a synchronous external abort on an
    /// instruction fetch): it jumped to an address no RAM backs. The guest's kernel
    /// reports it; the VMM keeps running.
    InjectInstructionAbort {
        /// The faulting address.
        addr: u64,
    },
    /// Make the guest take an undefined-instruction exception (an unknown system
    /// register, an SMCCC conduit the guest should not use).
    InjectUndef,
    /// An exception class no guest should cause here: end the run with an error naming it.
    Unhandled(u8),
}

impl Decision {
    /// Whether the backend steps the PC past the instruction (by 4) once it has done the
    /// rest. Injected exceptions and HVC leave the PC alone.
    pub fn steps_pc(&self) -> bool {
        match self {
            Decision::Mmio { .. }
            | Decision::WaitForInterrupt
            | Decision::WaitUntil { .. }
            | Decision::Skip
            | Decision::ReadZero { .. } => true,
            Decision::Psci { smc } => *smc,
            Decision::InjectDataAbort { .. }
            | Decision::InjectInstructionAbort { .. }
            | Decision::InjectUndef
            | Decision::Unhandled(_) => false,
        }
    }
}

/// Decides what to do with an exception with syndrome `esr` at guest-physical `ipa`.
pub fn decide(esr: u64, ipa: u64) -> Decision {
    match esr::decode(esr) {
        Syndrome::DataAbort(abort) => data_abort(abort, ipa),
        Syndrome::InstructionAbort => Decision::InjectInstructionAbort { addr: ipa },
        Syndrome::Hvc(_) => Decision::Psci { smc: false },
        Syndrome::Smc(_) => Decision::Psci { smc: true },
        Syndrome::Wait(Wait::Wfi) => Decision::WaitForInterrupt,
        Syndrome::Wait(Wait::Wfit { reg: Some(reg) }) => Decision::WaitUntil { reg },
        // A WFIT whose deadline the syndrome does not name ends at once, as a WFI may for
        // any reason: never a wait without the bound the guest asked for.
        Syndrome::Wait(Wait::Wfit { reg: None } | Wait::Wfe | Wait::Wfet) => Decision::Skip,
        Syndrome::SysReg(access) => sysreg(access),
        Syndrome::Other(ec) => Decision::Unhandled(ec),
    }
}

fn data_abort(abort: DataAbort, ipa: u64) -> Decision {
    if abort.stage1_walk {
        return Decision::InjectDataAbort { addr: ipa };
    }
    if abort.cache_maintenance {
        return Decision::Skip;
    }
    match abort.access {
        Some(access) => Decision::Mmio { addr: ipa, access },
        None => Decision::InjectDataAbort { addr: ipa },
    }
}

/// System registers trapped to the VMM that read as zero and ignore writes:
/// - the debug and OS-lock registers (op0 = 2, op1 = 0, CRn 0 or 1: MDSCR_EL1, OSLAR_EL1,
///   OSDLR_EL1, OSLSR_EL1, the breakpoint and watchpoint registers), as on a machine with
///   no self-hosted debug;
/// - the ID register space (op0 = 3, op1 = 0, CRn = 0, CRm = 1..7: ID_AA64ISAR2_EL1,
///   ID_AA64ZFR0_EL1, ID_AA64SMFR0_EL1 and the rest), which the architecture defines as
///   reading zero where nothing is implemented. Hypervisor.framework virtualizes only some
///   of them and traps the others; Linux 5.17 and later reads them on the boot CPU, so an
///   UNDEF there would panic every modern guest (QEMU and libkrun read them as zero too).
///
/// Anything else is undefined for the guest.
fn sysreg(access: SysRegAccess) -> Decision {
    let reg = access.reg;
    let debug = reg.op0 == 2 && reg.op1 == 0 && reg.crn <= 1;
    let id = reg.op0 == 3 && reg.op1 == 0 && reg.crn == 0 && (1..=7).contains(&reg.crm);
    match (debug || id, access.read) {
        (true, true) => Decision::ReadZero { rt: access.rt },
        (true, false) => Decision::Skip,
        (false, _) => Decision::InjectUndef,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch_aarch64::esr::{SysRegAccess, EC_DABT_LOW, EC_HVC64, EC_SMC64, EC_WFX};
    use arch_aarch64::sysreg::SysReg;

    const ISV: u64 = 1 << 24;

    fn ec(class: u8) -> u64 {
        u64::from(class) << 26
    }

    #[test]
    fn data_aborts() {
        // str w1, [x0] to MMIO: served, then the PC steps.
        let d = decide(ec(EC_DABT_LOW) | ISV | (2 << 22) | (1 << 16) | (1 << 6), 0x0900_0000);
        let Decision::Mmio { addr, access } = d else { panic!("{d:?}") };
        assert_eq!((addr, access.size, access.reg, access.write), (0x0900_0000, 4, 1, true));
        assert!(d.steps_pc());
        // ldp x0, x1, [x2] on MMIO (no syndrome): the guest gets an abort, the PC stays.
        let d = decide(ec(EC_DABT_LOW), 0x0a00_0000);
        assert_eq!(d, Decision::InjectDataAbort { addr: 0x0a00_0000 });
        assert!(!d.steps_pc());
        // A page-table walk into MMIO, even with a syndrome.
        assert_eq!(decide(ec(EC_DABT_LOW) | ISV | (1 << 7), 0x1000), Decision::InjectDataAbort { addr: 0x1000 });
        // dc civac on MMIO.
        assert_eq!(decide(ec(EC_DABT_LOW) | (1 << 8) | (1 << 6), 0x1000), Decision::Skip);
    }

    #[test]
    fn calls_and_waits() {
        assert_eq!(decide(ec(EC_HVC64), 0), Decision::Psci { smc: false });
        assert!(!Decision::Psci { smc: false }.steps_pc(), "HVC returns past itself");
        assert!(decide(ec(EC_SMC64), 0).steps_pc(), "SMC returns to itself");
        assert_eq!(decide(ec(EC_WFX), 0), Decision::WaitForInterrupt);
        assert_eq!(decide(ec(EC_WFX) | 1, 0), Decision::Skip, "WFE");
    }

    /// Issue 14, fix 3: WFIT was an unbounded WFI. It waits until the deadline in the
    /// register the syndrome names (RN, valid when RV is set), and a WFIT whose register
    /// the syndrome does not name ends at once.
    #[test]
    fn wfit_waits_no_longer_than_its_deadline() {
        let wfit_x9 = ec(EC_WFX) | (9 << 5) | (1 << 2) | 2;
        assert_eq!(decide(wfit_x9, 0), Decision::WaitUntil { reg: 9 });
        assert!(decide(wfit_x9, 0).steps_pc());
        assert_eq!(decide(ec(EC_WFX) | 2, 0), Decision::Skip, "no register named: no wait");
        assert_eq!(decide(ec(EC_WFX) | (1 << 2) | 3, 0), Decision::Skip, "WFET");
    }

    #[test]
    fn sysregs_debug_reads_zero_others_are_undefined() {
        let trap = |op0, op1, crn, crm, op2, rt, read| {
            SysRegAccess { reg: SysReg::new(op0, op1, crn, crm, op2), rt, read }.syndrome()
        };
        assert_eq!(decide(trap(2, 0, 1, 0, 4, 3, false), 0), Decision::Skip, "msr oslar_el1, x3");
        assert_eq!(decide(trap(2, 0, 1, 1, 4, 5, true), 0), Decision::ReadZero { rt: 5 }, "mrs x5, oslsr_el1");
        assert_eq!(decide(trap(2, 0, 0, 2, 2, 0, true), 0), Decision::ReadZero { rt: 0 }, "mrs x0, mdscr_el1");
        assert_eq!(decide(trap(3, 0, 12, 12, 0, 0, true), 0), Decision::InjectUndef, "mrs x0, icc_iar1_el1");
        assert_eq!(
            decide(trap(3, 0, 0, 0, 5, 0, true), 0),
            Decision::InjectUndef,
            "CRm 0 (MPIDR's row) is not the ID space"
        );
        assert_eq!(decide(trap(3, 3, 15, 2, 0, 0, false), 0), Decision::InjectUndef, "an IMPDEF register");
        assert!(!Decision::InjectUndef.steps_pc());
    }

    /// Issue 12, hole 4: a guest jumping to an address no RAM backs ended the run.
    #[test]
    fn an_instruction_fetch_from_mmio_is_a_prefetch_abort_for_the_guest() {
        use arch_aarch64::esr::EC_IABT_LOW;
        let d = decide(ec(EC_IABT_LOW) | (1 << 25) | 0x10, 0x0a00_0000);
        assert_eq!(d, Decision::InjectInstructionAbort { addr: 0x0a00_0000 });
        assert!(!d.steps_pc());
    }

    /// Issue 14, fix 1: ID registers the framework does not virtualize trap, and Linux
    /// 5.17+ reads them unconditionally at boot: they read as zero (an UNDEF panics the
    /// guest), writes are ignored.
    #[test]
    fn id_registers_read_as_zero() {
        let trap = |crm, op2, rt, read| SysRegAccess { reg: SysReg::new(3, 0, 0, crm, op2), rt, read }.syndrome();
        assert_eq!(decide(trap(6, 2, 7, true), 0), Decision::ReadZero { rt: 7 }, "mrs x7, id_aa64isar2_el1");
        assert_eq!(decide(trap(4, 4, 1, true), 0), Decision::ReadZero { rt: 1 }, "mrs x1, id_aa64zfr0_el1");
        assert_eq!(decide(trap(4, 5, 2, true), 0), Decision::ReadZero { rt: 2 }, "mrs x2, id_aa64smfr0_el1");
        assert_eq!(decide(trap(7, 7, 3, true), 0), Decision::ReadZero { rt: 3 }, "the last of the space");
        assert_eq!(decide(trap(1, 0, 0, false), 0), Decision::Skip, "a write is ignored");
    }

    #[test]
    fn other_classes_are_named() {
        assert_eq!(decide(ec(0x3c), 0), Decision::Unhandled(0x3c), "BRK");
        assert_eq!(decide(ec(0x00), 0), Decision::Unhandled(0), "unknown reason");
    }
}
