//! The guest RAM a VM has mapped, kept by the VM and by each of its vCPUs.
//!
//! Once a backend has pointed the hypervisor at host memory (a KVM memory slot,
//! `hv_vm_map`), that memory must stay mapped for as long as anything can make the guest
//! touch it: not only the VM but every vCPU, which can outlive it (a `Vcpu` is a value of
//! its own). So both hold a [`Mapped`], and a region goes into it before the hypervisor
//! learns of it.

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::GuestMemoryBackend;

use crate::GuestRam;

/// Guest RAM kept mapped; clones share it.
#[derive(Debug, Default, Clone)]
pub struct Mapped(Arc<Mutex<Vec<Arc<GuestRam>>>>);

impl Mapped {
    /// Keeps `memory` mapped as long as any clone of this lives.
    pub fn keep(&self, memory: &Arc<GuestRam>) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::clone(memory));
    }

    /// How many regions are kept, counting every `GuestRam`'s.
    pub fn regions(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|m| m.num_regions()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_clone_keeps_the_memory_after_the_first_goes() {
        let mapped = Mapped::default();
        let ram = GuestRam::new(&[(GuestAddress(0), 2 << 20)]).unwrap();
        mapped.keep(&ram);
        let weak = Arc::downgrade(&ram);
        drop(ram);
        let vcpu_side = mapped.clone();
        drop(mapped);
        assert_eq!(vcpu_side.regions(), 1);
        weak.upgrade().expect("still mapped").write_slice(&[1], GuestAddress(0)).unwrap();
        drop(vcpu_side);
        assert!(weak.upgrade().is_none(), "unmapped with the last holder");
    }
}
