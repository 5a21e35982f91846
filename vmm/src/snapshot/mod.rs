//! Snapshots: a paused VM saved to a directory, to be continued by a new process.
//!
//! A snapshot directory holds the state file (`state`, see [`format`](mod@format)): what the restore
//! must honour ([`Requirements`], checked before anything else is read) and the state of
//! the vCPUs, the interrupt controller and the devices, each a section of its own. Guest
//! RAM is a file of its own beside it, mapped on restore so pages load on first touch.
//!
//! [`machine`] saves a paused machine's parts and reads a snapshot back for a restore.

pub mod format;
pub mod machine;
mod resume;

pub use crate::irqchip::SavedIrqchip;
pub use resume::Resume;

use std::path::PathBuf;

use hypervisor::state::VcpuState;

use serde::{Deserialize, Serialize};

/// Why a snapshot cannot be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file is not one this hvrun can use.
    #[error("snapshot: {0}")]
    Format(#[from] format::FormatError),
    /// A file of the snapshot, or a disk, could not be read or written.
    #[error("snapshot: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// There is no state file (the path given is the state file's).
    #[error("no snapshot at {}: there is no state file", .0.display())]
    NotASnapshot(PathBuf),
    /// This machine cannot be saved (a part that cannot be, yet).
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// What the restore was given differs from what the snapshot's guest had.
    #[error("cannot restore: {0}")]
    Mismatch(String),
    /// This host cannot continue the snapshot.
    #[error("cannot restore on this host: {0}")]
    Host(String),
    /// Guest RAM could not be mapped from the memory file.
    #[error("snapshot: {0}")]
    Memory(#[from] guest_memory::Error),
}

/// The CPU's identification registers in a vCPU's saved state, by name: what the guest
/// may have chosen its code paths by. (KVM's register ids; the Hypervisor.framework
/// backend saves none of these yet.)
pub fn cpu_features(vcpu: &VcpuState) -> Vec<(String, u64)> {
    vcpu.regs
        .iter()
        .filter_map(|r| {
            let name = hypervisor::kvm_regs::id_register_name(r.id)?;
            let value = u64::from_le_bytes(r.value.get(..8)?.try_into().ok()?);
            Some((name, value))
        })
        .collect()
}

/// The hypervisor a snapshot was taken on: a vCPU's and an interrupt controller's state
/// only make sense to the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hypervisor {
    /// Linux KVM.
    Kvm,
    /// Apple's Hypervisor.framework.
    Hvf,
}

/// The interrupt controller a snapshot's guest was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IrqChip {
    /// hvrun's own GICv2 (`--gic v2`).
    GicV2,
    /// The hypervisor's GICv3 (`--gic v3`).
    GicV3,
}

/// What a snapshot's machine is and needs. [`Requirements::check`] compares a
/// snapshot's with what the restoring host offers: the hypervisor, the interrupt
/// controller and the CPU's features. The vCPU count and RAM ranges are not the host's
/// to offer: the restore builds the machine with the snapshot's (a host that cannot
/// fails there, as any machine too large for it does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    /// The hypervisor.
    pub hypervisor: Hypervisor,
    /// The interrupt controller.
    pub irqchip: IrqChip,
    /// How many vCPUs.
    pub vcpus: u32,
    /// Guest RAM's ranges: (guest physical address, bytes).
    pub memory: Vec<(u64, u64)>,
    /// The CPU's feature registers the guest saw, by name (`ID_AA64PFR0_EL1`...), with
    /// their values: a guest may have chosen code paths by any of them.
    pub cpu_features: Vec<(String, u64)>,
}

impl Requirements {
    /// Whether `host` (what this process offers) can continue a snapshot that needs
    /// `self`; otherwise one line saying what differs.
    pub fn check(&self, host: &Requirements) -> Result<(), String> {
        if self.hypervisor != host.hypervisor {
            return Err(format!(
                "the snapshot was taken on {:?}, this host runs {:?}: a vCPU's state does not carry over",
                self.hypervisor, host.hypervisor
            ));
        }
        if self.irqchip != host.irqchip {
            return Err(format!(
                "the snapshot's guest has a {:?} interrupt controller, this machine would have {:?} \
                 (restore with the same --gic)",
                self.irqchip, host.irqchip
            ));
        }
        for (name, value) in &self.cpu_features {
            match host.cpu_features.iter().find(|(n, _)| n == name) {
                Some((_, here)) if here == value => {}
                Some((_, here)) => {
                    return Err(format!("the CPU differs: {name} is {here:#018x} here, {value:#018x} in the snapshot"))
                }
                None => return Err(format!("the CPU differs: this host does not report {name}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_v3() -> Requirements {
        Requirements {
            hypervisor: Hypervisor::Kvm,
            irqchip: IrqChip::GicV3,
            vcpus: 2,
            memory: vec![(0x4000_0000, 256 << 20)],
            cpu_features: vec![("ID_AA64PFR0_EL1".into(), 0x1100_0011), ("ID_AA64ISAR0_EL1".into(), 0x10_2120)],
        }
    }

    #[test]
    fn a_host_that_cannot_honour_a_snapshot_is_named_in_one_line() {
        let snap = kvm_v3();
        assert_eq!(snap.check(&kvm_v3()), Ok(()));
        let e = snap.check(&Requirements { hypervisor: Hypervisor::Hvf, ..kvm_v3() }).unwrap_err();
        assert!(e.contains("taken on Kvm, this host runs Hvf"), "{e}");
        let e = snap.check(&Requirements { irqchip: IrqChip::GicV2, ..kvm_v3() }).unwrap_err();
        assert!(e.contains("--gic"), "{e}");
        let mut other = kvm_v3();
        other.cpu_features[1].1 = 0x10_2121;
        let e = snap.check(&other).unwrap_err();
        assert!(e.contains("ID_AA64ISAR0_EL1 is 0x0000000000102121 here, 0x0000000000102120"), "{e}");
        other.cpu_features.truncate(1);
        let e = snap.check(&other).unwrap_err();
        assert!(e.contains("does not report ID_AA64ISAR0_EL1") && !e.contains('\n'), "{e}");
    }
}
