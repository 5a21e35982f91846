//! A vCPU's saved state, as a backend hands it to a snapshot and takes it back.
//!
//! The registers are kept in the backend's own numbering (KVM's `ONE_REG` ids, or
//! [`crate::hvf_regs::StateReg`]'s ids on Hypervisor.framework), each with its bytes, so
//! a backend saves everything it can enumerate without a list of ours to fall behind the
//! hardware. A state read from a file is checked ([`VcpuState::check`]) before any of
//! it reaches the hypervisor: a snapshot is the host's input, and a damaged one must be
//! refused in one line, never half-applied.

use serde::{Deserialize, Serialize};

/// The largest register a backend saves, in bytes (an SVE Z register at 2048 bits).
pub const MAX_REG_BYTES: usize = 256;

/// The most registers one vCPU's state may hold (KVM lists about 600 on a 2024 arm64
/// host; SVE's Z, P and FFR slices add a few hundred).
pub const MAX_REGS: usize = 4096;

/// One register's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegValue {
    /// The register's id in the backend's numbering.
    pub id: u64,
    /// Its bytes, little-endian, as many as the register is wide.
    pub value: Vec<u8>,
}

/// Whether a vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Power {
    /// Running (or ready to).
    On,
    /// Powered off: never started by PSCI CPU_ON, or stopped by CPU_OFF.
    Off,
    /// Suspended by PSCI CPU_SUSPEND or waiting in WFI as the backend tracks it: it runs
    /// again on an interrupt.
    Suspended,
}

/// An SError the hypervisor holds for the guest (KVM's `KVM_GET_VCPU_EVENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSerror {
    /// The syndrome it carries, where one was given.
    pub esr: Option<u64>,
}

/// Everything about a vCPU that the guest can observe and the backend keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// Every register, in the order it was read (a restore writes them in that order).
    pub regs: Vec<RegValue>,
    /// Whether it runs.
    pub power: Power,
    /// An SError pending delivery, if any.
    pub serror: Option<PendingSerror>,
}

/// Why a saved state cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// More registers than any vCPU has.
    #[error("the saved vCPU state holds {0} registers, more than the {MAX_REGS} any vCPU has")]
    TooMany(usize),
    /// A register whose size does not match its id.
    #[error("saved register {id:#x} has {got} bytes where it is {want} bytes wide")]
    Size {
        /// The register's id.
        id: u64,
        /// Bytes saved.
        got: usize,
        /// Bytes the id says.
        want: usize,
    },
    /// A register this backend does not know.
    #[error("saved register {0:#x} is not one this hypervisor has")]
    Unknown(u64),
    /// The same register twice.
    #[error("saved register {0:#x} appears twice")]
    Twice(u64),
}

impl VcpuState {
    /// Checks every register against `width`, the backend's size in bytes of a register
    /// id (`None`: no such register): the count bounded, each size right, none twice.
    pub fn check(&self, width: impl Fn(u64) -> Option<usize>) -> Result<(), StateError> {
        if self.regs.len() > MAX_REGS {
            return Err(StateError::TooMany(self.regs.len()));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.regs.len());
        for reg in &self.regs {
            let want = width(reg.id).ok_or(StateError::Unknown(reg.id))?;
            if reg.value.len() != want || want > MAX_REG_BYTES {
                return Err(StateError::Size { id: reg.id, got: reg.value.len(), want });
            }
            if !seen.insert(reg.id) {
                return Err(StateError::Twice(reg.id));
            }
        }
        Ok(())
    }

    /// The value of register `id` as a `u64` (its first 8 bytes), if it was saved.
    pub fn get_u64(&self, id: u64) -> Option<u64> {
        let reg = self.regs.iter().find(|r| r.id == id)?;
        let mut bytes = [0u8; 8];
        let n = reg.value.len().min(8);
        bytes[..n].copy_from_slice(&reg.value[..n]);
        Some(u64::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: u64, len: usize) -> RegValue {
        RegValue { id, value: vec![0xab; len] }
    }

    fn state(regs: Vec<RegValue>) -> VcpuState {
        VcpuState { regs, power: Power::On, serror: None }
    }

    /// Ids 1..=3 are 8 bytes wide, 4 is 16; nothing else exists.
    fn width(id: u64) -> Option<usize> {
        match id {
            1..=3 => Some(8),
            4 => Some(16),
            _ => None,
        }
    }

    #[test]
    fn a_state_is_checked_register_by_register() {
        assert_eq!(state(vec![reg(1, 8), reg(4, 16)]).check(width), Ok(()));
        assert_eq!(state(vec![reg(1, 4)]).check(width), Err(StateError::Size { id: 1, got: 4, want: 8 }));
        assert_eq!(state(vec![reg(4, 8)]).check(width), Err(StateError::Size { id: 4, got: 8, want: 16 }));
        assert_eq!(state(vec![reg(9, 8)]).check(width), Err(StateError::Unknown(9)));
        assert_eq!(state(vec![reg(2, 8), reg(2, 8)]).check(width), Err(StateError::Twice(2)));
        let many = (0..=MAX_REGS as u64).map(|_| reg(1, 8)).collect();
        assert_eq!(state(many).check(width), Err(StateError::TooMany(MAX_REGS + 1)));
        // A backend that claims a huge register is still bounded.
        assert!(matches!(state(vec![reg(1, 4096)]).check(|_| Some(4096)), Err(StateError::Size { .. })));
    }

    #[test]
    fn a_register_reads_back_as_a_u64() {
        let s = state(vec![RegValue { id: 1, value: 0x1122_3344_5566_7788u64.to_le_bytes().to_vec() }, reg(4, 16)]);
        assert_eq!(s.get_u64(1), Some(0x1122_3344_5566_7788));
        assert_eq!(s.get_u64(4), Some(0xabab_abab_abab_abab));
        assert_eq!(s.get_u64(2), None);
    }
}
