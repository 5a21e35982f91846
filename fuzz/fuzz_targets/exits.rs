//! Exit handling for frameworks that hand the VMM raw exceptions (Hypervisor.framework):
//! `hypervisor::exits::decide` on arbitrary ESR_EL2/IPA values; MMIO load extension and
//! store bytes (`arch_aarch64::esr::MmioAccess::load_value`/`store_bytes`); the PSCI
//! handler (`arch_aarch64::psci::handle`) on arbitrary X0..X3 and vCPU states; and
//! `hypervisor::raw::RawLoop`, up to four vCPUs on one thread over a scripted fake of the
//! framework (a [`RawVcpu`] here), fed arbitrary exits: exceptions with arbitrary
//! ESR/VA/IPA, cancels, timer exits and unknown exits, between arbitrary register values.
//!
//! Oracles:
//! - `decide` agrees with a decoding of ESR_EL2 written here from the Arm ARM (D17.2.37:
//!   EC, ISV/SAS/SSE/SRT/SF/WnR, S1PTW, CM; the WFx TI, RV and RN fields; the MSR/MRS ISS), and
//!   `steps_pc` with what the decision does;
//! - a load puts in its register the bytes read, zero- or sign-extended from the access
//!   size and cut to 32 bits for a W register; a store writes the register's low bytes
//!   (zeros for XZR); both checked against a byte-wise reference here;
//! - PSCI answers only with the architected values (DEN0022: the error codes, VERSION,
//!   AFFINITY_INFO's states, MIGRATE_INFO_TYPE's types, PSCI_FEATURES' flags), CPU_ON
//!   starts only an existing vCPU that is off with the caller's entry and context,
//!   ALREADY_ON only for one that is on, INVALID_PARAMETERS only for an MPIDR that names
//!   none; PSCI_FEATURES agrees with what the handler implements and reports every
//!   mandatory function; the function id is W0 and SMC32 calls ignore upper halves;
//! - `RawLoop::run` always returns (every wait has a wake-up: the fake's counter is
//!   deterministic and reaches any deadline in a few reads, and whenever the guest would
//!   wait for an interrupt that nothing will raise, or turns its vCPU off, the fake kicks
//!   it as the VMM's interrupt controller or another vCPU would); the driver runs each
//!   vCPU until its script ends with PSCI SYSTEM_OFF (or it is off for good), and a lack
//!   of progress is a failure;
//! - the registers change only the way the decision says: the PC steps by 4, stays, or
//!   moves to VBAR_EL1 + the architected vector offset for the mode the exception came
//!   from, with ELR/SPSR/ESR/FAR_EL1 and PSTATE as the Arm ARM has them for the injected
//!   exception; loads land in their register with the reference extension; PSCI results
//!   land in X0; a vCPU started by CPU_ON begins at the entry with the context in X0 in
//!   EL1h with DAIF masked; nothing else is written (X31 never is);
//! - what the VMM sees is what the exit asks for: the MMIO address, size and store bytes,
//!   the system event, the unhandled exit; anything else is an interruption; the IRQ
//!   input the framework gets is the line the VMM set (none with the framework's GIC);
//!   the timer the loop reports asserted is the one it holds masked;
//! - no panic, no hang, and the heap stays bounded (see [`HEAP_BOUND`]).

#![no_main]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::{arbitrary, fuzz_target};

use arch_aarch64::esr::{self, MmioAccess, Syndrome};
use arch_aarch64::inject::{ELR_EL1, ESR_EL1, FAR_EL1, PSTATE_EL1H_MASKED, SPSR_EL1, VBAR_EL1};
use arch_aarch64::psci::{self, Action, CpuState};
use arch_aarch64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0, CPACR_EL1, SCTLR_EL1, SCTLR_EL1_RESET};
use hypervisor::exits::{decide, Decision};
use hypervisor::raw::{Power, RawExit, RawLoop, RawVcpu};
use hypervisor::{IrqInput, Kicker, Reg, SystemEvent, Vcpu, VcpuExit};

/// How much the heap may grow while one machine runs, once its vCPUs exist: a
/// `RawLoop`'s state is fixed-size, and so is the fake's; what an exit allocates (the
/// text of an unhandled exit, the vCPU states PSCI looks at) is freed before the next.
/// 4 KiB covers those transients; anything kept per exit crosses it within a script.
const HEAP_BOUND: usize = 4 << 10;

#[derive(Arbitrary, Debug)]
enum Input {
    /// `decide` on an arbitrary syndrome and address.
    Decide { esr: u64, ipa: u64 },
    /// A data abort with a valid syndrome (the low 24 ISS bits), a load of `raw` and a
    /// store of `reg`.
    Mmio { iss: u32, raw: u64, reg: u64 },
    /// A PSCI call.
    Psci(Call),
    /// The run loop.
    Loop(Machine),
}

#[derive(Arbitrary, Debug)]
struct Call {
    /// X0: one of the functions [`FUNCTIONS`] names (with `x[0]`'s upper half), or `x[0]`.
    function: Option<u8>,
    /// X1: the MPIDR of one of `cpus` (or of none), or `x[1]`.
    target: Option<u8>,
    x: [u64; 4],
    /// Each vCPU: its MPIDR (`None`: the one hvrun gives vCPU n) and whether it is on.
    cpus: Vec<(Option<u64>, bool)>,
}

/// PSCI and SMCCC function ids: the ones `handle` implements, and some it does not.
const FUNCTIONS: &[u32] = &[
    psci::PSCI_VERSION,
    psci::CPU_SUSPEND_32,
    psci::CPU_SUSPEND_64,
    psci::CPU_OFF,
    psci::CPU_ON_32,
    psci::CPU_ON_64,
    psci::AFFINITY_INFO_32,
    psci::AFFINITY_INFO_64,
    psci::MIGRATE_INFO_TYPE,
    psci::SYSTEM_OFF,
    psci::SYSTEM_RESET,
    psci::PSCI_FEATURES,
    0x8400_0005, // MIGRATE
    0xc400_0007, // MIGRATE_INFO_UP_CPU
    0xc400_000e, // SYSTEM_SUSPEND
    0x8400_0012, // SYSTEM_RESET2
    0x8000_0000, // SMCCC_VERSION
    0x8000_0001, // SMCCC_ARCH_FEATURES
];

/// The functions PSCI 1.0 and later make mandatory (DEN0022, "PSCI functions"), in the
/// SMC64 form where there is one: an arm64 guest calls those.
const MANDATORY: &[u32] = &[
    psci::PSCI_VERSION,
    psci::CPU_SUSPEND_64,
    psci::CPU_OFF,
    psci::CPU_ON_64,
    psci::AFFINITY_INFO_64,
    psci::SYSTEM_OFF,
    psci::SYSTEM_RESET,
    psci::PSCI_FEATURES,
];

#[derive(Arbitrary, Debug)]
struct Machine {
    /// vCPUs: 1 + vcpus % 4.
    vcpus: u8,
    /// The framework's GIC delivers interrupts (`RawLoop::with_kernel_gic`).
    kernel_gic: bool,
    /// The counter's frequency the fake reports.
    frequency: u64,
    /// vCPU 0's first PC, and every vCPU's VBAR_EL1.
    pc: u64,
    vbar: u64,
    steps: Vec<Step>,
}

/// What one vCPU's guest does until its next exit.
#[derive(Arbitrary, Debug)]
struct Step {
    /// Whose script this step joins: `vcpu % vCPUs`.
    vcpu: u8,
    /// Registers the guest sets: (`which`, value), see [`Regs::set_from_script`].
    sets: Vec<(u8, Value)>,
    exit: Exit,
    /// A kick arrives while the guest runs (another thread's `Kicker::kick`).
    kick: bool,
    /// The VMM's IRQ line for this vCPU after the exit.
    irq: bool,
    /// What the VMM answers an MMIO read with.
    data: u64,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Raw(u64),
    Small(u8),
    /// One of [`FUNCTIONS`].
    Function(u8),
    /// The MPIDR of vCPU n.
    Mpidr(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Exit {
    Exception {
        esr: Esr,
        va: u64,
        ipa: u64,
    },
    /// A PSCI call: X0 one of [`FUNCTIONS`], X1 the MPIDR of vCPU `target` (or of none),
    /// X2 `entry`, X3 `context`, then HVC or SMC.
    Call {
        function: u8,
        target: u8,
        entry: u64,
        context: u64,
        smc: bool,
    },
    Canceled,
    VtimerActivated,
    Unknown(u32),
}

/// ESR_EL2: arbitrary, or of one class with an arbitrary ISS.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Esr {
    Raw(u64),
    DataAbort(u32),
    InstructionAbort(u32),
    Hvc(u16),
    Smc(u16),
    /// TI, RV and RN (WFIT's deadline register): the low 10 bits of the ISS.
    Wfx(u16),
    SysReg(u32),
}

impl Esr {
    fn value(self) -> u64 {
        let class = |ec: u8, iss: u64| (u64::from(ec) << 26) | (1 << 25) | (iss & 0x1ff_ffff);
        match self {
            Esr::Raw(v) => v,
            Esr::DataAbort(iss) => class(esr::EC_DABT_LOW, u64::from(iss)),
            Esr::InstructionAbort(iss) => class(esr::EC_IABT_LOW, u64::from(iss)),
            Esr::Hvc(imm) => class(esr::EC_HVC64, u64::from(imm)),
            Esr::Smc(imm) => class(esr::EC_SMC64, u64::from(imm)),
            Esr::Wfx(ti) => class(esr::EC_WFX, u64::from(ti)),
            Esr::SysReg(iss) => class(esr::EC_SYSREG, u64::from(iss)),
        }
    }
}

fuzz_target!(|input: Input| {
    let start = hvrun_fuzz::live_bytes();
    match input {
        Input::Decide { esr, ipa } => check_decision(esr, ipa),
        Input::Mmio { iss, raw, reg } => check_mmio(iss, raw, reg),
        Input::Psci(call) => check_psci(&call),
        Input::Loop(machine) => run_machine(machine),
    }
    // Everything the input created is gone: nothing leaks from one input to the next.
    hvrun_fuzz::assert_bounded(start, 0, "exits after the input");
});

// ---------------------------------------------------------------------------------------
// The decision, MMIO values and PSCI, against references written from the architecture.

/// What to do with an exception, from the Arm ARM's ESR_EL2 layout.
fn reference_decision(esr: u64, ipa: u64) -> Decision {
    let ec = ((esr >> 26) & 0x3f) as u8;
    let iss = esr & 0x1ff_ffff;
    let bit = |n: u32| (iss >> n) & 1 == 1;
    let field = |shift: u32, bits: u32| ((iss >> shift) & ((1 << bits) - 1)) as u8;
    match ec {
        // Data abort from a lower EL: S1PTW (7) is a translation-table walk, CM (8) a cache
        // maintenance instruction; with ISV (24): SAS 23:22, SSE 21, SRT 20:16, SF 15, WnR 6.
        0x24 if bit(7) => Decision::InjectDataAbort { addr: ipa },
        0x24 if bit(8) => Decision::Skip,
        0x24 if bit(24) => Decision::Mmio {
            addr: ipa,
            access: MmioAccess {
                size: 1 << field(22, 2),
                sign_extend: bit(21),
                reg: field(16, 5),
                sixty_four: bit(15),
                write: bit(6),
            },
        },
        0x24 => Decision::InjectDataAbort { addr: ipa },
        0x20 => Decision::InjectInstructionAbort { addr: ipa },
        0x16 => Decision::Psci { smc: false },
        0x17 => Decision::Psci { smc: true },
        // TI (1:0): 0b00 WFI, 0b01 WFE, 0b10 WFIT, 0b11 WFET. WFIT names its deadline's
        // register in RN (9:5) when RV (2) is set; without it, it may end at once, as any
        // WFI may (decide's documented choice).
        0x01 if bit(0) => Decision::Skip,
        0x01 if bit(1) && bit(2) => Decision::WaitUntil { reg: field(5, 5) },
        0x01 if bit(1) => Decision::Skip,
        0x01 => Decision::WaitForInterrupt,
        // MSR/MRS: Op0 21:20, Op2 19:17, Op1 16:14, CRn 13:10, Rt 9:5, CRm 4:1, direction 0
        // (1: read). The debug and OS-lock registers (Op0 2, Op1 0, CRn 0 or 1) and the ID
        // register space (Op0 3, Op1 0, CRn 0, CRm 1..7; Arm ARM D19.2: reserved ID
        // registers read as zero) read as zero and ignore writes (decide's documented
        // choice); everything else is UNDEF.
        0x18 if (field(20, 2) == 2 && field(14, 3) == 0 && field(10, 4) <= 1)
            || (field(20, 2) == 3 && field(14, 3) == 0 && field(10, 4) == 0 && (1..=7).contains(&field(1, 4))) =>
        {
            if bit(0) {
                Decision::ReadZero { rt: field(5, 5) }
            } else {
                Decision::Skip
            }
        }
        0x18 => Decision::InjectUndef,
        ec => Decision::Unhandled(ec),
    }
}

fn check_decision(esr: u64, ipa: u64) {
    let decision = decide(esr, ipa);
    assert_eq!(decision, reference_decision(esr, ipa), "ESR {esr:#x} IPA {ipa:#x}");
    let steps = match decision {
        Decision::Mmio { .. }
        | Decision::WaitForInterrupt
        | Decision::WaitUntil { .. }
        | Decision::Skip
        | Decision::ReadZero { .. } => true,
        // HVC's preferred return address is already the next instruction; SMC's is itself.
        Decision::Psci { smc } => smc,
        _ => false,
    };
    assert_eq!(decision.steps_pc(), steps, "{decision:?}");
}

/// The register value of a load: the `size` bytes read, little-endian, zero- or
/// sign-extended to 64 bits, then the W register's 32 bits (its upper half reads zero).
fn reference_load(access: &MmioAccess, raw: u64) -> u64 {
    let bytes = raw.to_le_bytes();
    let mut value = [0u8; 8];
    value[..access.size].copy_from_slice(&bytes[..access.size]);
    if access.sign_extend && bytes[access.size - 1] & 0x80 != 0 {
        value[access.size..].fill(0xff);
    }
    let value = u64::from_le_bytes(value);
    if access.sixty_four {
        value
    } else {
        value & 0xffff_ffff
    }
}

/// The bytes a store writes: the register's low `size` bytes, or zeros from XZR.
fn reference_store(access: &MmioAccess, reg: u64) -> Vec<u8> {
    let value = if access.reg == 31 { 0 } else { reg };
    value.to_le_bytes()[..access.size].to_vec()
}

fn check_mmio(iss: u32, raw: u64, reg: u64) {
    let esr = (u64::from(esr::EC_DABT_LOW) << 26) | (1 << 25) | (1 << 24) | u64::from(iss & 0x00ff_fe7f);
    let Syndrome::DataAbort(abort) = esr::decode(esr) else { panic!("{esr:#x} is a data abort") };
    let access = abort.access.expect("ISV is set");
    assert!(matches!(access.size, 1 | 2 | 4 | 8) && access.reg <= 31, "{access:?}");
    assert_eq!(decide(esr, 0x0900_0000), Decision::Mmio { addr: 0x0900_0000, access });
    assert_eq!(access.load_value(raw), reference_load(&access, raw), "{access:?} loading {raw:#x}");
    let stored = access.store_bytes(reg);
    assert_eq!(stored[..access.size], reference_store(&access, reg)[..], "{access:?} storing {reg:#x}");
}

/// A value PSCI may return: an error code (DEN0022: NOT_SUPPORTED -1 .. INVALID_ADDRESS
/// -9) or a non-negative 32-bit result.
fn architected(value: i64) -> bool {
    (-9..=-1).contains(&value) || (0..=i64::from(i32::MAX)).contains(&value)
}

fn check_psci(call: &Call) {
    let cpus: Vec<CpuState> = call
        .cpus
        .iter()
        .take(16)
        .enumerate()
        .map(|(i, &(mpidr, on))| CpuState { mpidr: mpidr.unwrap_or(arch_aarch64::boot::mpidr(i as u32)), on })
        .collect();
    let mut x = call.x;
    if let Some(f) = call.function {
        x[0] = (x[0] & !0xffff_ffff) | u64::from(FUNCTIONS[usize::from(f) % FUNCTIONS.len()]);
    }
    if let Some(t) = call.target {
        // One past the last names no vCPU (unless another has the same affinity).
        x[1] = cpus.get(usize::from(t) % (cpus.len() + 1)).map_or(0xff_ffff_ffff, |c| c.mpidr);
    }
    let action = psci::handle(x, &cpus);
    check_psci_action(x, &cpus, action);

    // The function id is W0 (SMCCC); a 32-bit call's arguments are their low halves.
    let function = x[0] as u32;
    let mut narrow = x;
    narrow[0] = u64::from(function);
    if function & 0x4000_0000 == 0 {
        for v in &mut narrow[1..] {
            *v &= 0xffff_ffff;
        }
    }
    assert_eq!(psci::handle(narrow, &cpus), action, "the ignored upper halves of {x:x?} changed the answer");

    for &f in MANDATORY {
        let answer = psci::handle([u64::from(psci::PSCI_FEATURES), u64::from(f), 0, 0], &cpus);
        assert!(matches!(answer, Action::Return(v) if v >= 0), "PSCI_FEATURES({f:#x}) = {answer:?}: mandatory");
    }
}

fn check_psci_action(x: [u64; 4], cpus: &[CpuState], action: Action) {
    let function = x[0] as u32;
    let arg = |i: usize| if function & 0x4000_0000 == 0 { x[i] & 0xffff_ffff } else { x[i] };
    let names = |c: &CpuState| c.mpidr & psci::MPIDR_AFFINITY == arg(1) & psci::MPIDR_AFFINITY;
    let what = format!("{function:#x}({:#x}, {:#x}, {:#x}) on {cpus:?}: {action:?}", arg(1), arg(2), arg(3));
    if let Action::Return(v) = action {
        assert!(architected(v), "{what}: not an architected PSCI value");
    }
    match function {
        psci::PSCI_VERSION => {
            assert!(matches!(action, Action::Return(v) if v >> 16 >= 1 && v >> 31 == 0), "{what}")
        }
        psci::CPU_SUSPEND_32 | psci::CPU_SUSPEND_64 => assert!(
            matches!(
                action,
                Action::Suspend
                    | Action::Return(psci::RET_INVALID_PARAMETERS | psci::RET_DENIED | psci::RET_SUCCESS | -9)
            ),
            "{what}"
        ),
        psci::CPU_OFF => assert!(matches!(action, Action::CpuOff | Action::Return(psci::RET_DENIED)), "{what}"),
        psci::CPU_ON_32 | psci::CPU_ON_64 => match action {
            Action::CpuOn { index, entry, context } => {
                let cpu = cpus.get(index).unwrap_or_else(|| panic!("{what}: no such vCPU"));
                assert!(!cpu.on && names(cpu), "{what}: CPU_ON of a vCPU that is on or has another MPIDR");
                assert_eq!((entry, context), (arg(2), arg(3)), "{what}: entry and context");
            }
            Action::Return(psci::RET_ALREADY_ON) => {
                assert!(cpus.iter().any(|c| c.on && names(c)), "{what}: ALREADY_ON for no vCPU that is on")
            }
            Action::Return(psci::RET_INVALID_PARAMETERS) => {
                assert!(!cpus.iter().any(names), "{what}: INVALID_PARAMETERS for an MPIDR that exists")
            }
            // ON_PENDING, INTERNAL_FAILURE, INVALID_ADDRESS.
            Action::Return(-5 | -6 | -9) => {}
            _ => panic!("{what}"),
        },
        psci::AFFINITY_INFO_32 | psci::AFFINITY_INFO_64 => match action {
            Action::Return(psci::AFFINITY_ON) => assert!(cpus.iter().any(|c| c.on && names(c)), "{what}"),
            Action::Return(psci::AFFINITY_OFF) => assert!(cpus.iter().any(|c| !c.on && names(c)), "{what}"),
            Action::Return(psci::RET_INVALID_PARAMETERS) => {
                assert!(arg(2) != 0 || !cpus.iter().any(names), "{what}: level 0 of a vCPU that exists")
            }
            // ON_PENDING; NOT_SUPPORTED for a lowest affinity level above 0.
            Action::Return(2) => {}
            Action::Return(psci::RET_NOT_SUPPORTED) if arg(2) != 0 => {}
            _ => panic!("{what}"),
        },
        psci::MIGRATE_INFO_TYPE => {
            assert!(matches!(action, Action::Return(0..=2 | psci::RET_NOT_SUPPORTED)), "{what}")
        }
        psci::SYSTEM_OFF => assert_eq!(action, Action::SystemOff, "{what}"),
        psci::SYSTEM_RESET => assert_eq!(action, Action::SystemReset, "{what}"),
        psci::PSCI_FEATURES => {
            let Action::Return(flags) = action else { panic!("{what}") };
            let queried = arg(1) as u32;
            // Whatever the features say, calling the function must agree.
            let implemented = queried == psci::PSCI_FEATURES
                || psci::handle([u64::from(queried), 0, 0, 0], cpus) != Action::Return(psci::RET_NOT_SUPPORTED);
            assert_eq!(flags >= 0, implemented, "{what}: PSCI_FEATURES and the call itself disagree");
            assert!(flags >= 0 || flags == psci::RET_NOT_SUPPORTED, "{what}");
        }
        _ => assert_eq!(action, Action::Return(psci::RET_NOT_SUPPORTED), "{what}: an unknown function"),
    }
}

// ---------------------------------------------------------------------------------------
// The run loop over a scripted framework.

/// The registers of one fake vCPU: the ones `RawLoop` may touch. Any other register it
/// reads or writes fails the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Regs {
    x: [u64; 31],
    pc: u64,
    pstate: u64,
    vbar: u64,
    cntv_ctl: u64,
    cntv_cval: u64,
    elr: u64,
    spsr: u64,
    esr: u64,
    far: u64,
    sctlr: u64,
    cpacr: u64,
}

impl Regs {
    fn slot(&mut self, reg: Reg) -> &mut u64 {
        match reg {
            Reg::X(n) if n < 31 => &mut self.x[usize::from(n)],
            Reg::Pc => &mut self.pc,
            Reg::Pstate => &mut self.pstate,
            Reg::Sys(VBAR_EL1) => &mut self.vbar,
            Reg::Sys(CNTV_CTL_EL0) => &mut self.cntv_ctl,
            Reg::Sys(CNTV_CVAL_EL0) => &mut self.cntv_cval,
            Reg::Sys(ELR_EL1) => &mut self.elr,
            Reg::Sys(SPSR_EL1) => &mut self.spsr,
            Reg::Sys(ESR_EL1) => &mut self.esr,
            Reg::Sys(FAR_EL1) => &mut self.far,
            Reg::Sys(SCTLR_EL1) => &mut self.sctlr,
            Reg::Sys(CPACR_EL1) => &mut self.cpacr,
            other => panic!("RawLoop used {other:?}, a register it has no business with (X31 is XZR)"),
        }
    }

    /// What the guest's own code can put in register `which % 36`: X0..X30, PC, PSTATE,
    /// VBAR_EL1, CNTV_CTL_EL0, CNTV_CVAL_EL0. PSTATE keeps to the modes an arm64 guest of
    /// Apple silicon can be in (EL0t, EL1t, EL1h: no AArch32, no EL2), and VBAR_EL1's bits
    /// 10:0 are RES0, as the hardware has them.
    fn set_from_script(&mut self, which: u8, value: u64) {
        match which % 36 {
            n @ 0..=30 => self.x[usize::from(n)] = value,
            31 => self.pc = value,
            32 => self.pstate = (value & !0x1f) | [0b0000, 0b0100, 0b0101][(value & 0x1f) as usize % 3],
            33 => self.vbar = value & !0x7ff,
            34 => self.cntv_ctl = value,
            _ => self.cntv_cval = value,
        }
    }

    /// The timer is enabled and unmasked.
    fn timer_armed(&self) -> bool {
        self.cntv_ctl & 1 != 0 && self.cntv_ctl & 2 == 0
    }
}

/// The exception vector offset for an exception taken to EL1 from `pstate`'s mode.
fn vector_offset(pstate: u64) -> u64 {
    match pstate & 0x1f {
        0b0100 => 0x000, // EL1t: current EL with SP_EL0
        0b0101 => 0x200, // EL1h: current EL with SP_EL1
        0b0000 => 0x400, // EL0t: lower EL, AArch64
        mode => unreachable!("mode {mode:#x} is not one the fake lets the guest have"),
    }
}

/// What the VMM must see next from a vCPU: anything else is a failure; `None` means the
/// exit was dealt with inside the loop, so the VMM can only see an interruption.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Surface {
    Read {
        addr: u64,
        size: usize,
        data: [u8; 8],
    },
    Write {
        addr: u64,
        data: Vec<u8>,
    },
    System(SystemEvent),
    Unhandled,
    /// `Interrupted`, with the virtual timer raised.
    Timer,
}

/// What the fakes and the driver share, per vCPU.
#[derive(Default)]
struct Slot {
    regs: Regs,
    /// The registers expected when the loop next enters the guest (or at the end).
    expect: Regs,
    surface: Option<Surface>,
    /// A CPU_ON for this vCPU: its entry and context.
    start: Option<(u64, u64)>,
    /// It waits for an interrupt that nothing but the VMM's IRQ line will bring.
    needs_irq: bool,
    /// Its script has ended (with SYSTEM_OFF).
    ended: bool,
    /// The IRQ line the VMM set.
    irq_line: bool,
    /// The IRQ line asked for by the step of the last exit.
    irq_wanted: bool,
    /// The framework holds the virtual timer masked.
    vtimer_masked: bool,
    kicker: Option<Arc<dyn Kicker>>,
}

type World = Rc<RefCell<Vec<Slot>>>;

struct Fake {
    index: usize,
    script: VecDeque<Step>,
    world: World,
    power: Arc<Power>,
    mpidrs: Vec<u64>,
    kernel_gic: bool,
    frequency: u64,
    counter: u64,
    /// The deadline of the WFIT the vCPU is in.
    wfit: Option<u64>,
    /// The IRQ input the loop gave the next run.
    pending_irq: bool,
    cancelled: Arc<AtomicBool>,
}

impl Fake {
    fn value(&self, value: Value) -> u64 {
        match value {
            Value::Raw(v) => v,
            Value::Small(v) => u64::from(v),
            Value::Function(f) => u64::from(FUNCTIONS[usize::from(f) % FUNCTIONS.len()]),
            Value::Mpidr(n) => {
                self.mpidrs.get(usize::from(n) % (self.mpidrs.len() + 1)).copied().unwrap_or(0x8000_00ff)
            }
        }
    }

    /// The loop has done everything for the previous exit: the registers must be what
    /// that exit's decision said.
    fn check_expected(&self) {
        let mut world = self.world.borrow_mut();
        let slot = &mut world[self.index];
        if let Some((entry, context)) = slot.start.take() {
            // As from a reset (PSCI): the MMU and caches off, FP trapped.
            slot.expect.pc = entry;
            slot.expect.x[0] = context;
            slot.expect.pstate = PSTATE_EL1H_MASKED;
            slot.expect.sctlr = SCTLR_EL1_RESET;
            slot.expect.cpacr = 0;
        }
        assert_eq!(
            slot.regs, slot.expect,
            "vcpu{}: the registers are not what the last exit's handling gives",
            self.index
        );
    }

    /// Works out what the loop must do with `exit`, and kicks the vCPU when the guest
    /// would otherwise wait for ever: it waits for an interrupt with no IRQ and no timer
    /// armed (the VMM's GIC raises one and kicks it), or turns itself off (the last
    /// vCPU to do so would sleep until a `VmHandle::stop`).
    fn expect(&mut self, exit: RawExit, step: &Step) -> bool {
        let mut world = self.world.borrow_mut();
        let states = self.power.states();
        let before = world[self.index].regs;
        let mut expect = before;
        let mut kick = step.kick;
        let mut wait = false;
        let surface = match exit {
            RawExit::Canceled => None,
            RawExit::VtimerActivated if self.kernel_gic => None,
            RawExit::VtimerActivated => Some(Surface::Timer),
            RawExit::Unknown(_) => Some(Surface::Unhandled),
            RawExit::Exception { esr, va, ipa } => {
                let step_pc = |e: &mut Regs| e.pc = before.pc.wrapping_add(4);
                let inject = |e: &mut Regs, esr_el1: u64, far: Option<u64>| {
                    e.pc = before.vbar + vector_offset(before.pstate);
                    e.pstate = PSTATE_EL1H_MASKED;
                    (e.elr, e.spsr, e.esr) = (before.pc, before.pstate, esr_el1);
                    e.far = far.unwrap_or(before.far);
                };
                let from_el1 = before.pstate & 0b1100 == 0b0100;
                let il = 1 << 25;
                match reference_decision(esr, ipa) {
                    Decision::Mmio { addr, access } if access.write => {
                        step_pc(&mut expect);
                        let reg = if access.reg == 31 { 0 } else { before.x[usize::from(access.reg)] };
                        Some(Surface::Write { addr, data: reference_store(&access, reg) })
                    }
                    Decision::Mmio { addr, access } => {
                        step_pc(&mut expect);
                        if access.reg != 31 {
                            expect.x[usize::from(access.reg)] = reference_load(&access, step.data);
                        }
                        Some(Surface::Read { addr, size: access.size, data: step.data.to_le_bytes() })
                    }
                    Decision::WaitForInterrupt => {
                        step_pc(&mut expect);
                        wait = true;
                        None
                    }
                    Decision::WaitUntil { reg } => {
                        // The wait ends by itself: the counter heads for the deadline.
                        step_pc(&mut expect);
                        self.wfit = Some(if reg == 31 { 0 } else { before.x[usize::from(reg)] });
                        None
                    }
                    Decision::Skip => {
                        step_pc(&mut expect);
                        None
                    }
                    Decision::ReadZero { rt } => {
                        step_pc(&mut expect);
                        if rt != 31 {
                            expect.x[usize::from(rt)] = 0;
                        }
                        None
                    }
                    Decision::Psci { smc } => {
                        let x = [before.x[0], before.x[1], before.x[2], before.x[3]];
                        let result = |e: &mut Regs, value: i64| {
                            e.x[0] = value as u64;
                            if smc {
                                step_pc(e);
                            }
                        };
                        match psci::handle(x, &states) {
                            Action::Return(value) => {
                                result(&mut expect, value);
                                None
                            }
                            Action::CpuOn { index, entry, context } => {
                                result(&mut expect, psci::RET_SUCCESS);
                                assert_ne!(index, self.index, "CPU_ON of the caller, which is on");
                                world[index].start = Some((entry, context));
                                None
                            }
                            Action::Suspend => {
                                result(&mut expect, psci::RET_SUCCESS);
                                wait = true;
                                None
                            }
                            Action::CpuOff => {
                                kick = true;
                                None
                            }
                            Action::SystemOff => Some(Surface::System(SystemEvent::Shutdown)),
                            Action::SystemReset => Some(Surface::System(SystemEvent::Reset)),
                        }
                    }
                    Decision::InjectDataAbort { .. } => {
                        let ec: u64 = if from_el1 { 0x25 } else { 0x24 };
                        inject(&mut expect, (ec << 26) | il | (esr & (1 << 6)) | 0x10, Some(va));
                        None
                    }
                    Decision::InjectInstructionAbort { .. } => {
                        let ec: u64 = if from_el1 { 0x21 } else { 0x20 };
                        inject(&mut expect, (ec << 26) | il | 0x10, Some(va));
                        None
                    }
                    Decision::InjectUndef => {
                        inject(&mut expect, il, None);
                        None
                    }
                    Decision::Unhandled(_) => Some(Surface::Unhandled),
                }
            }
        };
        let slot = &mut world[self.index];
        (slot.expect, slot.surface, slot.irq_wanted) = (expect, surface, step.irq);
        if wait && !before.timer_armed() {
            // With the VMM's GIC the loop waits for the IRQ line (or the timer): the line
            // stays up until the vCPU runs again, and goes up now (with a kick) if it was
            // down. With the framework's GIC it naps for up to a millisecond (or until
            // the timer): a kick spares the nap.
            kick |= self.kernel_gic || !self.pending_irq;
            slot.needs_irq = !self.kernel_gic;
        }
        kick
    }
}

impl RawVcpu for Fake {
    fn run(&mut self) -> hypervisor::Result<RawExit> {
        self.check_expected();
        self.world.borrow_mut()[self.index].needs_irq = false;
        self.wfit = None;
        if self.cancelled.swap(false, Ordering::SeqCst) {
            return Ok(RawExit::Canceled);
        }
        let step = match self.script.pop_front() {
            Some(step) => step,
            None => {
                // The end of the script: the guest powers the machine off.
                let mut world = self.world.borrow_mut();
                world[self.index].ended = true;
                world[self.index].regs.x[0] = u64::from(psci::SYSTEM_OFF);
                Step {
                    vcpu: 0,
                    sets: Vec::new(),
                    exit: Exit::Exception { esr: Esr::Hvc(0), va: 0, ipa: 0 },
                    kick: false,
                    irq: false,
                    data: 0,
                }
            }
        };
        {
            let mut world = self.world.borrow_mut();
            for &(which, value) in step.sets.iter().take(4) {
                world[self.index].regs.set_from_script(which, self.value(value));
            }
        }
        let masked = self.world.borrow()[self.index].vtimer_masked;
        let exit = match step.exit {
            Exit::Exception { esr, va, ipa } => RawExit::Exception { esr: esr.value(), va, ipa },
            Exit::Call { function, target, entry, context, smc } => {
                let x = [self.value(Value::Function(function)), self.value(Value::Mpidr(target)), entry, context];
                self.world.borrow_mut()[self.index].regs.x[..4].copy_from_slice(&x);
                let esr = if smc { Esr::Smc(0) } else { Esr::Hvc(0) };
                RawExit::Exception { esr: esr.value(), va: 0, ipa: 0 }
            }
            Exit::Canceled => RawExit::Canceled,
            // The framework does not report a timer it holds masked.
            Exit::VtimerActivated if masked => RawExit::Canceled,
            Exit::VtimerActivated => {
                self.world.borrow_mut()[self.index].vtimer_masked = true;
                RawExit::VtimerActivated
            }
            Exit::Unknown(code) => RawExit::Unknown(code),
        };
        if self.expect(exit, &step) {
            let kicker = self.world.borrow()[self.index].kicker.clone();
            kicker.expect("the driver gave every fake its kicker").kick();
        }
        Ok(exit)
    }

    fn reg(&mut self, reg: Reg) -> hypervisor::Result<u64> {
        Ok(*self.world.borrow_mut()[self.index].regs.slot(reg))
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> hypervisor::Result<()> {
        *self.world.borrow_mut()[self.index].regs.slot(reg) = value;
        Ok(())
    }

    fn set_pending_irq(&mut self, pending: bool) -> hypervisor::Result<()> {
        assert!(!self.kernel_gic, "an IRQ injected by hand with the framework's GIC");
        let line = self.world.borrow()[self.index].irq_line;
        assert_eq!(pending, line, "vcpu{}: the framework's IRQ input is not the VMM's line", self.index);
        self.pending_irq = pending;
        Ok(())
    }

    fn set_vtimer_mask(&mut self, masked: bool) -> hypervisor::Result<()> {
        self.world.borrow_mut()[self.index].vtimer_masked = masked;
        Ok(())
    }

    /// A deterministic counter that reaches any deadline in a few reads: from below the
    /// next deadline ahead (the compare value, a WFIT's) it jumps to one tick short of
    /// it, then on (time passes while the vCPU sleeps). So a wait for the timer or a WFIT
    /// ends, after a sleep of at most a tick.
    fn virtual_counter(&mut self) -> hypervisor::Result<u64> {
        let cval = self.world.borrow()[self.index].regs.cntv_cval;
        let next = [Some(cval), self.wfit].into_iter().flatten().filter(|&d| d > self.counter).min();
        self.counter = self.counter.saturating_add(1).max(next.unwrap_or(0).saturating_sub(1));
        Ok(self.counter)
    }

    fn set_vtimer_offset(&mut self, _offset: u64) -> hypervisor::Result<()> {
        Ok(())
    }

    fn counter_frequency(&self) -> u64 {
        self.frequency
    }

    fn canceller(&self) -> Arc<dyn Fn() + Send + Sync> {
        let flag = Arc::clone(&self.cancelled);
        Arc::new(move || flag.store(true, Ordering::SeqCst))
    }
}

fn run_machine(m: Machine) {
    let n = 1 + usize::from(m.vcpus % 4);
    let mpidrs: Vec<u64> = (0..n as u32).map(arch_aarch64::boot::mpidr).collect();
    let power = Power::new(&mpidrs);
    let initial = Regs { pc: m.pc, pstate: PSTATE_EL1H_MASKED, vbar: m.vbar & !0x7ff, ..Regs::default() };
    let world: World =
        Rc::new(RefCell::new((0..n).map(|_| Slot { regs: initial, expect: initial, ..Slot::default() }).collect()));
    let mut scripts: Vec<VecDeque<Step>> = (0..n).map(|_| VecDeque::new()).collect();
    let total = m.steps.len();
    for step in m.steps {
        scripts[usize::from(step.vcpu) % n].push_back(step);
    }
    let mut vcpus: Vec<RawLoop<Fake>> = scripts
        .into_iter()
        .enumerate()
        .map(|(index, script)| {
            let fake = Fake {
                index,
                script,
                world: Rc::clone(&world),
                power: Arc::clone(&power),
                mpidrs: mpidrs.clone(),
                kernel_gic: m.kernel_gic,
                // At least 1 MHz: a sleep of one tick is short.
                frequency: m.frequency.max(1_000_000),
                counter: 0,
                wfit: None,
                pending_irq: false,
                cancelled: Arc::default(),
            };
            let vcpu = RawLoop::new(fake, index, Arc::clone(&power));
            if m.kernel_gic {
                vcpu.with_kernel_gic()
            } else {
                vcpu
            }
        })
        .collect();
    for (slot, vcpu) in world.borrow_mut().iter_mut().zip(&vcpus) {
        slot.kicker = Some(vcpu.kicker());
    }

    let base = hvrun_fuzz::live_bytes();
    // Each step is one exit; each may add an interruption (a kick, a timer, a CPU_ON) and
    // each vCPU ends with one more: more runs than that is a loop that makes no progress.
    let limit = 4 * (total + n) + 16;
    let mut runs = 0;
    let mut next = 0;
    loop {
        let on = power.states();
        let Some(i) = (0..n).map(|k| (next + k) % n).find(|&i| on[i].on && !world.borrow()[i].ended) else { break };
        next = i + 1;
        runs += 1;
        assert!(runs <= limit, "{runs} runs for {total} steps: no progress");
        let exit = vcpus[i].run().expect("the fake never fails");
        let surface = world.borrow_mut()[i].surface.take();
        match exit {
            VcpuExit::MmioRead { addr, data } => {
                let Some(Surface::Read { addr: a, size, data: answer }) = surface else {
                    panic!("vcpu{i}: an MMIO read of {addr:#x} where {surface:?} was due")
                };
                assert_eq!((addr, data.len()), (a, size), "vcpu{i}: the MMIO read");
                data.copy_from_slice(&answer[..size]);
            }
            VcpuExit::MmioWrite { addr, data } => {
                assert_eq!(Some(Surface::Write { addr, data: data.to_vec() }), surface, "vcpu{i}: the MMIO write")
            }
            VcpuExit::System(event) => assert_eq!(Some(Surface::System(event)), surface, "vcpu{i}"),
            VcpuExit::Unhandled(why) => assert_eq!(Some(Surface::Unhandled), surface, "vcpu{i}: {why}"),
            VcpuExit::Interrupted => {
                assert!(
                    matches!(surface, None | Some(Surface::Timer)),
                    "vcpu{i}: interrupted where {surface:?} was due"
                )
            }
        }
        let vcpu = &mut vcpus[i];
        let asserted = vcpu.vtimer_asserted();
        let line = {
            let mut world = world.borrow_mut();
            let slot = &mut world[i];
            assert_eq!(asserted, slot.vtimer_masked, "vcpu{i}: the timer the loop holds asserted is the one masked");
            assert!(!(m.kernel_gic && asserted), "vcpu{i}: a timer raised by hand with the framework's GIC");
            // The VMM's GIC: the timer's PPI or a device's SPI, and always the interrupt a
            // waiting vCPU was kicked for.
            slot.irq_line = slot.needs_irq || asserted || slot.irq_wanted;
            slot.irq_line
        };
        if !m.kernel_gic {
            vcpu.set_irq_line(line).expect("the line is recorded");
        }
        hvrun_fuzz::assert_bounded(base, HEAP_BOUND, "exits: a machine");
    }
    // Whatever each vCPU did last is done: its registers must show it.
    for (i, slot) in world.borrow().iter().enumerate() {
        assert!(slot.start.is_none(), "vcpu{i} was started and never ran");
        assert_eq!(slot.regs, slot.expect, "vcpu{i}: the registers at the end");
    }
    drop(vcpus);
}
