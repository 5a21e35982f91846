//! The Virtualization.framework backend (`--backend vz`): Linux guests through Apple's
//! Linux boot loader (with Rosetta and virtio-fs shares), and macOS guests from a bundle.
//!
//! The framework runs the whole machine itself, so this backend is not a
//! `hypervisor::Hypervisor`: hvrun translates its configuration into the framework's
//! objects and watches the machine. The translation's decisions are portable and tested
//! here ([`plan`]: what each flag becomes, and which flags this backend cannot honour;
//! [`bundle`]: the macOS VM bundle's files and their round trip); the framework calls
//! live in the macOS-only layer.

pub mod bundle;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod plan;
