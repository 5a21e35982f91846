//! arm64 knowledge that does not depend on any hypervisor.
//!
//! This crate owns the guest-physical memory map ([`layout`]), the register state a
//! Linux boot starts from ([`boot`]), system-register encodings ([`sysreg`]), ESR_EL2
//! syndrome decoding ([`esr`]), exception injection ([`inject`]) and the PSCI/SMCCC
//! calls and what to do for each ([`psci`]). The arm64 `Image` header and where a boot
//! places kernel, initrd and device tree live in [`image`]. Everything here is pure
//! logic with unit tests: both the KVM and the Hypervisor.framework backends, and the
//! VMM, build on it.

pub mod boot;
pub mod esr;
pub mod image;
pub mod inject;
pub mod layout;
pub mod psci;
pub mod sysreg;
