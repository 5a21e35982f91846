//! hvrun's device models and the MMIO bus.
//!
//! A device implements [`bus::MmioDevice`] and is placed on an [`bus::MmioBus`] at a
//! guest-physical range; the VMM routes every MMIO exit through the bus. Devices raise
//! interrupts through the [`irq::IrqLine`] trait and never name a hypervisor: the
//! interrupt controller behind the line, and the backend behind that, are the VMM's
//! business. Everything a device reads from the guest is validated; malformed accesses
//! are logged through [`ratelimit`] and never panic.

pub mod boot_timer;
pub mod bus;
pub mod gic;
pub mod host_file;
pub mod host_socket;
pub mod irq;
pub mod output;
pub mod pl011;
pub mod pl031;
pub mod probe;
pub mod ratelimit;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod virtio;
