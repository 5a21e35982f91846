//! Decoding ESR_EL2, the syndrome of an exception taken to the hypervisor (Arm ARM
//! D17.2.37), into what a VMM acts on. Backends that see raw syndromes (HVF) use it;
//! the decisions are plain functions of the bits, so they are tested here.

use crate::sysreg::SysReg;

/// Exception class: WFI/WFE/WFIT/WFET.
pub const EC_WFX: u8 = 0x01;
/// Exception class: HVC from AArch64.
pub const EC_HVC64: u8 = 0x16;
/// Exception class: SMC from AArch64.
pub const EC_SMC64: u8 = 0x17;
/// Exception class: MSR, MRS or system instruction from AArch64.
pub const EC_SYSREG: u8 = 0x18;
/// Exception class: instruction abort from a lower exception level.
pub const EC_IABT_LOW: u8 = 0x20;
/// Exception class: data abort from a lower exception level.
pub const EC_DABT_LOW: u8 = 0x24;

/// What an exception is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syndrome {
    /// A data abort: an access to an address with no memory behind it (MMIO).
    DataAbort(DataAbort),
    /// An instruction abort: the guest fetched an instruction from an address with no
    /// memory behind it.
    InstructionAbort,
    /// HVC with its immediate; the return address is already past the instruction.
    Hvc(u16),
    /// SMC with its immediate; the return address is the SMC itself.
    Smc(u16),
    /// A trapped wait instruction.
    Wait(Wait),
    /// A trapped MSR or MRS.
    SysReg(SysRegAccess),
    /// Any other class, with its EC.
    Other(u8),
}

/// The trapped wait instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// WFI: sleep until an interrupt.
    Wfi,
    /// WFE: a hint; continuing at once is correct.
    Wfe,
    /// WFIT: WFI that also ends when the virtual count reaches the value in register
    /// `reg` (the syndrome's RN when its RV bit says the field is valid).
    Wfit {
        /// The register holding the deadline (31: XZR), when the syndrome names it.
        reg: Option<u8>,
    },
    /// WFET: WFE with a deadline.
    Wfet,
}

/// A data abort's syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAbort {
    /// The access, when the syndrome describes it (ISV = 1). `None` for instructions
    /// the syndrome cannot describe (load/store pair, writeback): the VMM must not guess.
    pub access: Option<MmioAccess>,
    /// A cache maintenance or address translation instruction (CM): no data moves.
    pub cache_maintenance: bool,
    /// The fault was on a stage-1 translation table walk (S1PTW): not an MMIO access.
    pub stage1_walk: bool,
    /// The access writes (WnR).
    pub write: bool,
}

/// A single load or store the syndrome fully describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// Bytes accessed: 1, 2, 4 or 8 (SAS).
    pub size: usize,
    /// Sign-extend a load into the register (SSE).
    pub sign_extend: bool,
    /// The transfer register, 0..=30, or 31 for XZR/WZR (SRT).
    pub reg: u8,
    /// The register is 64-bit (SF); otherwise a load writes a 32-bit W register.
    pub sixty_four: bool,
    /// A store (WnR).
    pub write: bool,
}

impl MmioAccess {
    /// What a load puts in the register, from the `size` bytes read (little-endian, in
    /// the low bytes of `raw`): sign- or zero-extended, then cut to 32 bits for a W
    /// register (whose upper half reads as zero).
    pub fn load_value(&self, raw: u64) -> u64 {
        let bits = 8 * self.size as u32;
        let value = if bits >= 64 { raw } else { raw & ((1u64 << bits) - 1) };
        let value = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((value << shift) as i64) >> shift) as u64
        } else {
            value
        };
        if self.sixty_four {
            value
        } else {
            value & 0xffff_ffff
        }
    }

    /// The bytes a store writes, from the register's value (`0` for XZR).
    pub fn store_bytes(&self, reg_value: u64) -> [u8; 8] {
        let value = if self.reg == 31 { 0 } else { reg_value };
        value.to_le_bytes()
    }
}

/// A trapped MSR (write) or MRS (read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// The register.
    pub reg: SysReg,
    /// The general register transferred, 0..=30, or 31 for XZR.
    pub rt: u8,
    /// MRS: the guest reads the register into Xt.
    pub read: bool,
}

impl SysRegAccess {
    /// The ESR_EL2 syndrome of this trap, the inverse of [`decode`] (for test doubles of
    /// a framework, and tests).
    pub fn syndrome(&self) -> u64 {
        let r = self.reg;
        let field = |value: u8, shift: u32| u64::from(value) << shift;
        (u64::from(EC_SYSREG) << 26)
            | field(r.op0, 20)
            | field(r.op2, 17)
            | field(r.op1, 14)
            | field(r.crn, 10)
            | field(self.rt & 0x1f, 5)
            | field(r.crm, 1)
            | u64::from(self.read)
    }
}

/// The exception class (ESR bits 31:26).
pub fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// Decodes a syndrome.
pub fn decode(esr: u64) -> Syndrome {
    let iss = esr & 0x1ff_ffff;
    let bit = |n: u32| iss & (1 << n) != 0;
    match exception_class(esr) {
        EC_DABT_LOW => {
            let write = bit(6);
            let access = bit(24).then(|| MmioAccess {
                size: 1 << ((iss >> 22) & 3),
                sign_extend: bit(21),
                reg: ((iss >> 16) & 0x1f) as u8,
                sixty_four: bit(15),
                write,
            });
            Syndrome::DataAbort(DataAbort { access, cache_maintenance: bit(8), stage1_walk: bit(7), write })
        }
        EC_IABT_LOW => Syndrome::InstructionAbort,
        EC_HVC64 => Syndrome::Hvc(iss as u16),
        EC_SMC64 => Syndrome::Smc(iss as u16),
        EC_WFX => Syndrome::Wait(match iss & 3 {
            0 => Wait::Wfi,
            1 => Wait::Wfe,
            // RV (bit 2) says whether RN (bits 9:5) names the deadline's register.
            2 => Wait::Wfit { reg: (iss & (1 << 2) != 0).then_some(((iss >> 5) & 0x1f) as u8) },
            _ => Wait::Wfet,
        }),
        EC_SYSREG => {
            let field = |shift: u32, width: u32| ((iss >> shift) & ((1 << width) - 1)) as u8;
            Syndrome::SysReg(SysRegAccess {
                reg: SysReg::new(field(20, 2), field(14, 3), field(10, 4), field(1, 4), field(17, 3)),
                rt: field(5, 5),
                read: bit(0),
            })
        }
        ec => Syndrome::Other(ec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysreg::MPIDR_EL1;

    /// A data abort syndrome with ISV set.
    fn dabt(sas: u64, sse: bool, srt: u64, sf: bool, wnr: bool) -> u64 {
        (u64::from(EC_DABT_LOW) << 26)
            | (1 << 25) // IL: 32-bit instruction
            | (1 << 24)
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(wnr) << 6)
    }

    fn access(esr: u64) -> MmioAccess {
        match decode(esr) {
            Syndrome::DataAbort(DataAbort { access: Some(a), .. }) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loads_extend_the_way_the_instruction_says() {
        // ldrb w3, [x0]
        let a = access(dabt(0, false, 3, false, false));
        assert_eq!((a.size, a.reg, a.write), (1, 3, false));
        assert_eq!(a.load_value(0xffff_ff80), 0x80);
        // ldrsb x4, [x0]: sign-extended to 64 bits
        assert_eq!(access(dabt(0, true, 4, true, false)).load_value(0x80), 0xffff_ffff_ffff_ff80);
        // ldrsh w5, [x0]: sign-extended to 32 bits, upper half zero
        assert_eq!(access(dabt(1, true, 5, false, false)).load_value(0x8001), 0xffff_8001);
        // ldr w6 / ldr x7
        assert_eq!(access(dabt(2, false, 6, false, false)).load_value(0x1_2345_6789), 0x2345_6789);
        assert_eq!(access(dabt(3, false, 7, true, false)).load_value(u64::MAX), u64::MAX);
        // ldrsw x8
        assert_eq!(access(dabt(2, true, 8, true, false)).load_value(0x8000_0000), 0xffff_ffff_8000_0000);
    }

    #[test]
    fn stores_name_their_register_and_xzr_stores_zero() {
        let a = access(dabt(2, false, 9, false, true));
        assert!(a.write && a.size == 4 && a.reg == 9);
        assert_eq!(a.store_bytes(0x1122_3344)[..4], [0x44, 0x33, 0x22, 0x11]);
        let xzr = access(dabt(3, false, 31, true, true));
        assert_eq!(xzr.store_bytes(0xdead_beef), [0; 8], "str xzr stores zero whatever X31 holds");
    }

    #[test]
    fn aborts_without_a_valid_syndrome_describe_no_access() {
        // ISV = 0 (e.g. ldp x0, x1, [x2]); a store.
        let esr = (u64::from(EC_DABT_LOW) << 26) | (1 << 25) | (1 << 6);
        assert_eq!(
            decode(esr),
            Syndrome::DataAbort(DataAbort { access: None, cache_maintenance: false, stage1_walk: false, write: true })
        );
        // dc civac on MMIO: CM set.
        let cm = (u64::from(EC_DABT_LOW) << 26) | (1 << 8) | (1 << 6);
        assert!(matches!(decode(cm), Syndrome::DataAbort(DataAbort { cache_maintenance: true, .. })));
    }

    #[test]
    fn calls_waits_and_unknown_classes() {
        assert_eq!(decode((u64::from(EC_HVC64) << 26) | 0x1234), Syndrome::Hvc(0x1234));
        assert_eq!(decode(u64::from(EC_SMC64) << 26), Syndrome::Smc(0));
        assert_eq!(decode(u64::from(EC_WFX) << 26), Syndrome::Wait(Wait::Wfi));
        assert_eq!(decode((u64::from(EC_WFX) << 26) | 1), Syndrome::Wait(Wait::Wfe));
        assert_eq!(decode((u64::from(EC_WFX) << 26) | 2), Syndrome::Wait(Wait::Wfit { reg: None }));
        // wfit x7: RN = 7, RV set.
        let wfit_x7 = (u64::from(EC_WFX) << 26) | (7 << 5) | (1 << 2) | 2;
        assert_eq!(decode(wfit_x7), Syndrome::Wait(Wait::Wfit { reg: Some(7) }));
        assert_eq!(decode(0x3c << 26), Syndrome::Other(0x3c));
        assert_eq!(exception_class(u64::MAX), 0x3f);
    }

    /// An MSR/MRS trap syndrome.
    fn sysreg_trap(reg: SysReg, rt: u8, read: bool) -> u64 {
        SysRegAccess { reg, rt, read }.syndrome()
    }

    #[test]
    fn sysreg_traps_name_the_register_and_direction() {
        // mrs x2, mpidr_el1
        assert_eq!(
            decode(sysreg_trap(MPIDR_EL1, 2, true)),
            Syndrome::SysReg(SysRegAccess { reg: MPIDR_EL1, rt: 2, read: true })
        );
        // msr oslar_el1, x0; and a register with every field set, to catch a swapped field.
        let oslar = SysReg::new(2, 0, 1, 0, 4);
        assert_eq!(
            decode(sysreg_trap(oslar, 0, false)),
            Syndrome::SysReg(SysRegAccess { reg: oslar, rt: 0, read: false })
        );
        let all = SysReg::new(3, 7, 15, 14, 6);
        assert_eq!(decode(sysreg_trap(all, 31, true)), Syndrome::SysReg(SysRegAccess { reg: all, rt: 31, read: true }));
    }
}
