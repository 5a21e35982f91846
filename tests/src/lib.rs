//! hvrun's end-to-end scenarios and the harness that runs them in the arm64 KVM rig.
//!
//! A scenario ([`scenario::Scenario`]) is data: the guest artifacts it needs, a shell
//! script run inside the rig, the exit status it must end with, and the console
//! markers it must (and must not) print. [`scenarios::ALL`] lists them; adding one is
//! adding an entry there. [`rig::Rig`] builds the outer initramfs (with [`cpio`]),
//! boots QEMU, collects the console with host timestamps, and [`report`] checks each
//! scenario's slice of it. `cargo xtask e2e` drives all of this.

pub mod checks;
pub mod cpio;
pub mod exchange;
pub mod report;
pub mod rig;
pub mod scenario;
pub mod scenarios;
