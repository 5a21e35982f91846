//! The register state a vCPU starts from.
//!
//! The arm64 Linux boot protocol (Documentation/arch/arm64/booting.rst) asks for the
//! MMU and caches off, all of DAIF masked, EL1 (or EL2) with SP_ELx, X0 = the device
//! tree's physical address and X1..X3 = 0. Secondary CPUs start powered off and are
//! brought up by PSCI CPU_ON.

/// PSTATE for entry at EL1h with D, A, I and F masked.
pub const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;
/// PSTATE for entry at EL2h with D, A, I and F masked (a guest given EL2: `--nested`).
pub const PSTATE_EL2H_DAIF_MASKED: u64 = 0x3c9;

/// What the boot vCPU's registers hold when it first runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRegs {
    /// Program counter: the kernel's entry point.
    pub pc: u64,
    /// X0: the guest-physical address of the device tree.
    pub x0: u64,
    /// PSTATE (CPSR).
    pub pstate: u64,
}

impl BootRegs {
    /// The state of the boot CPU for a kernel entered at `entry` with its device tree at `fdt`.
    pub const fn linux(entry: u64, fdt: u64) -> Self {
        BootRegs { pc: entry, x0: fdt, pstate: PSTATE_EL1H_DAIF_MASKED }
    }

    /// The same state at EL2h, for a guest that has EL2 and boots there as on hardware
    /// with virtualization (Linux then runs as a hypervisor, VHE or not).
    pub const fn at_el2(self) -> Self {
        BootRegs { pstate: PSTATE_EL2H_DAIF_MASKED, ..self }
    }
}

/// The MPIDR_EL1 value of vCPU `index`: Aff0 in bits 7:0 and Aff1 in bits 15:8, so
/// that the GICv2 target list (8 CPUs) and a GICv3 redistributor map agree.
pub const fn mpidr(index: u32) -> u64 {
    // Bit 31 is RES1 in MPIDR_EL1.
    (1 << 31) | ((((index as u64) >> 4) & 0xff) << 8) | ((index as u64) & 0xf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_entry_state() {
        let regs = BootRegs::linux(0x4020_0000, 0x7fe0_0000);
        assert_eq!(regs.pc, 0x4020_0000);
        assert_eq!(regs.x0, 0x7fe0_0000);
        // EL1h (M[3:0] = 0b0101) with D, A, I, F all masked.
        assert_eq!(regs.pstate & 0xf, 0b0101);
        assert_eq!(regs.pstate >> 6 & 0xf, 0xf);
    }

    #[test]
    fn a_nested_guest_enters_at_el2() {
        let regs = BootRegs::linux(0x4020_0000, 0x7fe0_0000).at_el2();
        // EL2h (M[3:0] = 0b1001), DAIF masked, the rest as at EL1.
        assert_eq!((regs.pstate & 0xf, regs.pstate >> 6 & 0xf), (0b1001, 0xf));
        assert_eq!((regs.pc, regs.x0), (0x4020_0000, 0x7fe0_0000));
    }

    #[test]
    fn mpidr_affinity() {
        assert_eq!(mpidr(0), 0x8000_0000);
        assert_eq!(mpidr(3), 0x8000_0003);
        assert_eq!(mpidr(17), 0x8000_0101);
    }
}
