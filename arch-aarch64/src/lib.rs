//! arm64 knowledge that does not depend on any hypervisor.
//!
//! This crate owns the guest-physical memory map ([`layout`]), the register state a
//! Linux boot starts from ([`boot`]), system-register encodings ([`sysreg`]) and the
//! PSCI/SMCCC function identifiers ([`psci`]). The arm64 `Image` header and where a
//! boot places kernel, initrd and device tree live in [`image`]. Everything here is pure logic with unit
//! tests: both the KVM and the Hypervisor.framework backends, and the VMM, build on it.

pub mod boot;
pub mod image;
pub mod layout;
pub mod psci;
pub mod sysreg;
