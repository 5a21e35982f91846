//! The virtio-mmio slots: where each virtio device sits and which interrupt it raises.
//!
//! One allocator for everything that counts devices: the configuration's check
//! ([`crate::VmConfig::validate`]), the embedding API's check of a configuration plus an
//! embedder's own devices ([`crate::VmBuilder::start`]), and the machine, which places
//! the devices it built by the same [`assign`] (and the device tree names the same
//! slots). Slot `n` is the `n`-th virtio device in the order the guest enumerates them:
//! disks, network interfaces, the entropy device, the console, the power button, the
//! balloon, the vsock device, then an embedder's own devices.

use arch_aarch64::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_SPI_BASE};
use devices::gic::NUM_SPIS;

use crate::config::{ConfigError, ConsoleConfig, VmConfig};

/// The most virtio devices a machine can have: one SPI each, from `VIRTIO_SPI_BASE` up to
/// the last of the machine's SPIs.
pub const MAX_SLOTS: usize = (NUM_SPIS - VIRTIO_SPI_BASE) as usize;

/// Where one virtio device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical base of its MMIO window ([`VIRTIO_MMIO_SIZE`] bytes).
    pub base: u64,
    /// Its SPI, as an offset from the first SPI (INTID 32).
    pub spi: u32,
}

/// What a machine is given besides its configuration, as far as slots go: an
/// embedder's own disks, network interfaces and devices, and whether an embedder's
/// console replaces the configuration's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// Disks given to the builder.
    pub disks: usize,
    /// Network backends given to the builder.
    pub nets: usize,
    /// Virtio devices given to the builder.
    pub devices: usize,
    /// The builder was given a console (hvc0 on the embedder's reader and writer).
    pub console: bool,
}

/// How many virtio devices `config` with `extras` has.
pub fn count(config: &VmConfig, extras: &Extras) -> usize {
    let console = extras.console || config.effective_console() != ConsoleConfig::Serial;
    let (entropy, power_button) = (1, 1);
    config.disks.len()
        + extras.disks
        + config.nets.len()
        + extras.nets
        + entropy
        + usize::from(console)
        + power_button
        + usize::from(config.balloon.is_some())
        + usize::from(config.vsock.is_some())
        + extras.devices
}

/// The slots of `devices` virtio devices, in order; a machine with more than there are
/// interrupt lines for is refused (never built with a device whose interrupt the GIC
/// would drop).
pub fn assign(devices: usize) -> Result<Vec<Slot>, ConfigError> {
    if devices > MAX_SLOTS {
        return Err(ConfigError::TooManyDevices(devices));
    }
    Ok((0..devices as u32)
        .map(|n| Slot { base: VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE, spi: VIRTIO_SPI_BASE + n })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_disk;

    #[test]
    fn every_slot_has_its_own_window_and_an_interrupt_the_gic_has() {
        let slots = assign(MAX_SLOTS).unwrap();
        assert_eq!(slots.len(), 48);
        assert_eq!(slots[0], Slot { base: 0x0a00_0000, spi: 16 });
        assert_eq!(slots[47], Slot { base: 0x0a00_5e00, spi: 63 });
        assert!(slots.iter().all(|s| s.spi < NUM_SPIS), "no SPI past the last one the GIC has");
        assert_eq!(assign(MAX_SLOTS + 1), Err(ConfigError::TooManyDevices(49)));
    }

    #[test]
    fn the_count_includes_what_an_embedder_adds() {
        let serial = Some(ConsoleConfig::Serial);
        let config = VmConfig { disks: vec![parse_disk("a").unwrap(); 2], console: serial, ..VmConfig::new("Image") };
        assert_eq!(count(&config, &Extras::default()), 4, "two disks, the entropy device, the power button");
        let with_console = Extras { console: true, disks: 1, nets: 1, devices: 2 };
        assert_eq!(count(&config, &with_console), 4 + 1 + 1 + 1 + 2);
        let hvc = VmConfig { console: Some(ConsoleConfig::Terminal), ..config };
        assert_eq!(count(&hvc, &Extras { console: true, ..Extras::default() }), 5, "one console, not two");
        let default = VmConfig { console: None, ..hvc };
        assert_eq!(count(&default, &Extras::default()), 5, "with disks the default console is hvc0");
    }
}
