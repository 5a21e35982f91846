//! PSCI and SMCCC function identifiers (Arm DEN0022 and DEN0028).
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
