//! PSCI and SMCCC (Arm DEN0022 and DEN0028): function identifiers, and [`handle`], the
//! decision for each call that every backend without in-kernel PSCI (HVF) shares.
//!
//! 32-bit calling-convention ids are `0x8400_00xx`; the SMC64 variants of the calls
//! that take addresses are `0xC400_00xx`.

/// PSCI_VERSION.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// CPU_SUSPEND (SMC64).
pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
/// CPU_OFF.
pub const CPU_OFF: u32 = 0x8400_0002;
/// CPU_ON (SMC32).
pub const CPU_ON_32: u32 = 0x8400_0003;
/// CPU_ON (SMC64).
pub const CPU_ON_64: u32 = 0xc400_0003;
/// AFFINITY_INFO (SMC64).
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
/// MIGRATE_INFO_TYPE.
pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
/// SYSTEM_OFF.
pub const SYSTEM_OFF: u32 = 0x8400_0008;
/// SYSTEM_RESET.
pub const SYSTEM_RESET: u32 = 0x8400_0009;
/// PSCI_FEATURES.
pub const PSCI_FEATURES: u32 = 0x8400_000a;

/// PSCI return code: success.
pub const RET_SUCCESS: i64 = 0;
/// PSCI return code: the function is not supported.
pub const RET_NOT_SUPPORTED: i64 = -1;
/// PSCI return code: invalid parameters.
pub const RET_INVALID_PARAMETERS: i64 = -2;
/// PSCI return code: the target CPU is already on.
pub const RET_ALREADY_ON: i64 = -4;
/// PSCI return code: denied.
pub const RET_DENIED: i64 = -3;
/// CPU_SUSPEND (SMC32).
pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
/// AFFINITY_INFO (SMC32).
pub const AFFINITY_INFO_32: u32 = 0x8400_0004;

/// The PSCI version reported: 1.1.
pub const VERSION: i64 = 0x0001_0001;
/// MIGRATE_INFO_TYPE's answer: no Trusted OS, nothing to migrate.
pub const MIGRATE_NOT_REQUIRED: i64 = 2;
/// AFFINITY_INFO's answer for a CPU that is on.
pub const AFFINITY_ON: i64 = 0;
/// AFFINITY_INFO's answer for a CPU that is off.
pub const AFFINITY_OFF: i64 = 1;
/// The affinity fields of MPIDR_EL1 (Aff3, Aff2, Aff1, Aff0).
pub const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;

/// A vCPU as PSCI sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuState {
    /// Its MPIDR_EL1.
    pub mpidr: u64,
    /// Whether it is running (or about to).
    pub on: bool,
}

/// What the VMM does for a PSCI call; the same on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Put this in the caller's X0 and let it continue.
    Return(i64),
    /// Start vCPU `index` at `entry` with `context` in its X0; the caller gets SUCCESS.
    CpuOn {
        /// The vCPU to start.
        index: usize,
        /// Its first instruction's address.
        entry: u64,
        /// Its X0.
        context: u64,
    },
    /// Stop the caller until a CPU_ON names it again.
    CpuOff,
    /// CPU_SUSPEND: wait as for WFI, then return SUCCESS.
    Suspend,
    /// Power the machine off.
    SystemOff,
    /// Reset the machine.
    SystemReset,
}

/// Decides a PSCI call from the caller's X0..X3, given every vCPU's state. Unknown
/// functions and bad arguments get the error codes PSCI defines, never a panic.
pub fn handle(x: [u64; 4], cpus: &[CpuState]) -> Action {
    // SMCCC: the function id is W0; SMC32 calls take 32-bit arguments.
    let function = x[0] as u32;
    let arg = |i: usize| if function & 0x4000_0000 == 0 { x[i] & 0xffff_ffff } else { x[i] };
    let find = |mpidr: u64| cpus.iter().position(|c| c.mpidr & MPIDR_AFFINITY == mpidr & MPIDR_AFFINITY);
    match function {
        PSCI_VERSION => Action::Return(VERSION),
        CPU_SUSPEND_32 | CPU_SUSPEND_64 => Action::Suspend,
        CPU_OFF => Action::CpuOff,
        CPU_ON_32 | CPU_ON_64 => match find(arg(1)) {
            None => Action::Return(RET_INVALID_PARAMETERS),
            Some(index) if cpus[index].on => Action::Return(RET_ALREADY_ON),
            Some(index) => Action::CpuOn { index, entry: arg(2), context: arg(3) },
        },
        AFFINITY_INFO_32 | AFFINITY_INFO_64 => match (find(arg(1)), arg(2)) {
            (Some(index), 0) => Action::Return(if cpus[index].on { AFFINITY_ON } else { AFFINITY_OFF }),
            _ => Action::Return(RET_INVALID_PARAMETERS),
        },
        MIGRATE_INFO_TYPE => Action::Return(MIGRATE_NOT_REQUIRED),
        SYSTEM_OFF => Action::SystemOff,
        SYSTEM_RESET => Action::SystemReset,
        PSCI_FEATURES => Action::Return(features(arg(1) as u32)),
        _ => Action::Return(RET_NOT_SUPPORTED),
    }
}

/// PSCI_FEATURES: 0 for a function [`handle`] implements (CPU_SUSPEND: the original
/// power-state format, no OS-initiated mode), NOT_SUPPORTED otherwise.
fn features(function: u32) -> i64 {
    match function {
        PSCI_VERSION | CPU_SUSPEND_32 | CPU_SUSPEND_64 | CPU_OFF | CPU_ON_32 | CPU_ON_64 | AFFINITY_INFO_32
        | AFFINITY_INFO_64 | MIGRATE_INFO_TYPE | SYSTEM_OFF | SYSTEM_RESET | PSCI_FEATURES => RET_SUCCESS,
        _ => RET_NOT_SUPPORTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus() -> [CpuState; 2] {
        [CpuState { mpidr: 0x8000_0000, on: true }, CpuState { mpidr: 0x8000_0001, on: false }]
    }

    #[test]
    fn cpu_on_starts_an_off_cpu_and_refuses_the_rest() {
        let c = cpus();
        assert_eq!(
            handle([u64::from(CPU_ON_64), 1, 0x4008_0000, 0xabcd], &c),
            Action::CpuOn { index: 1, entry: 0x4008_0000, context: 0xabcd }
        );
        assert_eq!(handle([u64::from(CPU_ON_64), 0, 0x4008_0000, 0], &c), Action::Return(RET_ALREADY_ON));
        assert_eq!(handle([u64::from(CPU_ON_64), 7, 0x4008_0000, 0], &c), Action::Return(RET_INVALID_PARAMETERS));
        // SMC32: the upper halves of the arguments are ignored, and of the function id too.
        assert_eq!(
            handle([0xffff_ffff_0000_0000 | u64::from(CPU_ON_32), 0x1_0000_0001, 0xdead_0000_1000, 5], &c),
            Action::CpuOn { index: 1, entry: 0x1000, context: 5 }
        );
    }

    #[test]
    fn queries_and_power() {
        let c = cpus();
        assert_eq!(handle([u64::from(PSCI_VERSION), 0, 0, 0], &c), Action::Return(VERSION));
        assert_eq!(handle([u64::from(AFFINITY_INFO_64), 0, 0, 0], &c), Action::Return(AFFINITY_ON));
        assert_eq!(handle([u64::from(AFFINITY_INFO_64), 1, 0, 0], &c), Action::Return(AFFINITY_OFF));
        assert_eq!(handle([u64::from(AFFINITY_INFO_64), 1, 1, 0], &c), Action::Return(RET_INVALID_PARAMETERS));
        assert_eq!(handle([u64::from(MIGRATE_INFO_TYPE), 0, 0, 0], &c), Action::Return(MIGRATE_NOT_REQUIRED));
        assert_eq!(handle([u64::from(CPU_OFF), 0, 0, 0], &c), Action::CpuOff);
        assert_eq!(handle([u64::from(CPU_SUSPEND_64), 0, 0, 0], &c), Action::Suspend);
        assert_eq!(handle([u64::from(SYSTEM_OFF), 0, 0, 0], &c), Action::SystemOff);
        assert_eq!(handle([u64::from(SYSTEM_RESET), 0, 0, 0], &c), Action::SystemReset);
    }

    #[test]
    fn features_and_unknown_calls() {
        let c = cpus();
        assert_eq!(handle([u64::from(PSCI_FEATURES), u64::from(CPU_ON_64), 0, 0], &c), Action::Return(RET_SUCCESS));
        assert_eq!(handle([u64::from(PSCI_FEATURES), 0x8000_0000, 0, 0], &c), Action::Return(RET_NOT_SUPPORTED));
        for unknown in [0x8000_0000u64, 0x8400_00ff, 0xc400_0012, 0, u64::MAX] {
            assert_eq!(handle([unknown, 0, 0, 0], &c), Action::Return(RET_NOT_SUPPORTED), "{unknown:#x}");
        }
        assert_eq!(handle([u64::from(CPU_ON_64), 1, 0, 0], &[]), Action::Return(RET_INVALID_PARAMETERS));
    }
}
