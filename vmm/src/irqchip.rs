//! The machine's interrupt controller: hvrun's emulated GICv2, or the hypervisor's own
//! GICv3 (KVM's vGICv3, macOS 15's in-kernel GIC).
//!
//! [`choose`] is the decision, portable and tested: what `--gic` asked for, how many
//! vCPUs, and what the hypervisor offers. [`Irqchip`] is the result the machine is built
//! around: the SPI lines devices drive, the device-tree node, and, for the emulated
//! GIC, its MMIO windows and the vCPUs' IRQ inputs.

use std::sync::Arc;

use arch_aarch64::layout::{
    place_gicv3, GicPlacementError, GicV3Layout, GicV3Needs, GIC_CPU_BASE, GIC_DIST_BASE, SPI_BASE,
};
use devices::bus::MmioBus;
use devices::gic::{Gic, NUM_SPIS};
use devices::irq::IrqLine;
use devices::warn_ratelimited;
use hypervisor::SpiSink;

use crate::config::{GicChoice, MAX_CPUS_GICV2};
use crate::irq_lines::IrqLines;
use crate::Error;

/// Size of the GICv2 CPU interface window in the device tree: two 4 KiB pages, the
/// second holding GICC_DIR.
const GIC_CPU_WINDOW: u64 = 0x2000;
/// Size of the GICv2 distributor window in the device tree.
const GIC_DIST_WINDOW: u64 = 0x1000;

/// Why the interrupt controller asked for cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GicError {
    /// More vCPUs than hvrun's GICv2 serves.
    #[error("--gic v2 serves at most {MAX_CPUS_GICV2} vCPUs, not {cpus}: use --gic v3 or auto")]
    TooManyCpusForV2 {
        /// The vCPUs asked for.
        cpus: u32,
    },
    /// `--gic v3` on a hypervisor without a GICv3 of its own.
    #[error(
        "--gic v3: this hypervisor has no GICv3 of its own (KVM needs a host with a GICv3, \
         Hypervisor.framework needs macOS 15 or later); use --gic v2 with at most 8 vCPUs"
    )]
    NoGicV3,
    /// The hypervisor's GICv3 cannot be placed in the memory map.
    #[error("--gic v3: the hypervisor's GICv3 won't fit: {0}")]
    WontFit(GicPlacementError),
    /// More vCPUs than the GICv2 serves, and no GICv3 to be had.
    #[error("--cpus {cpus} needs the hypervisor's GICv3, which this host {}; use at most {MAX_CPUS_GICV2} vCPUs", lacks(.placement.as_ref()))]
    CpusNeedGicV3 {
        /// The vCPUs asked for.
        cpus: u32,
        /// Why the hypervisor's GICv3 cannot be placed; `None`: there is none.
        placement: Option<GicPlacementError>,
    },
    /// `--nested` with `--gic v2`.
    #[error("--nested needs the hypervisor's GICv3: use --gic v3 or auto")]
    NestedWithV2,
    /// `--nested` where the hypervisor's GICv3 cannot be placed.
    #[error("--nested needs the hypervisor's GICv3, which won't fit: {0}")]
    NestedWontFit(GicPlacementError),
    /// `--nested` on a hypervisor without a GICv3 of its own.
    #[error(
        "--nested needs the hypervisor's GICv3, which this host does not have (KVM on a GICv3 host, \
         macOS 15 or later)"
    )]
    NestedNoGicV3,
}

fn lacks(placement: Option<&GicPlacementError>) -> String {
    match placement {
        Some(why) => format!("cannot place ({why})"),
        None => "does not have (KVM on a GICv3 host, or macOS 15+)".into(),
    }
}

/// Which controller to build: `Some(layout)` for the hypervisor's GICv3, `None` for the
/// emulated GICv2. `needs` is what the hypervisor's GICv3 asks for, `None` when it has
/// none. A `nested` guest (with EL2) must have the hypervisor's GICv3: its hypervisor
/// uses the GIC's virtualization interface, which hvrun's GICv2 lacks. Errors say what to
/// change.
pub fn choose(
    asked: GicChoice,
    cpus: u32,
    needs: Option<GicV3Needs>,
    nested: bool,
) -> Result<Option<GicV3Layout>, GicError> {
    let placed = needs.map(|n| place_gicv3(&n, cpus, NUM_SPIS));
    if nested {
        return match (asked, placed) {
            (GicChoice::V2, _) => Err(GicError::NestedWithV2),
            (_, Some(Ok(layout))) => Ok(Some(layout)),
            (_, Some(Err(why))) => Err(GicError::NestedWontFit(why)),
            (_, None) => Err(GicError::NestedNoGicV3),
        };
    }
    match (asked, placed) {
        (GicChoice::V2, _) if cpus > MAX_CPUS_GICV2 => Err(GicError::TooManyCpusForV2 { cpus }),
        (GicChoice::V2, _) => Ok(None),
        (_, Some(Ok(layout))) => Ok(Some(layout)),
        (GicChoice::V3, None) => Err(GicError::NoGicV3),
        (GicChoice::V3, Some(Err(why))) => Err(GicError::WontFit(why)),
        (GicChoice::Auto, placed) if cpus > MAX_CPUS_GICV2 => {
            Err(GicError::CpusNeedGicV3 { cpus, placement: placed.and_then(Result::err) })
        }
        (GicChoice::Auto, Some(Err(why))) => {
            log::warn!("the hypervisor's GICv3 won't fit ({why}); using hvrun's GICv2");
            Ok(None)
        }
        (GicChoice::Auto, None) => Ok(None),
    }
}

/// The machine's interrupt controller.
#[derive(Debug)]
pub enum Irqchip {
    /// hvrun's GICv2, and the vCPUs' IRQ inputs it drives.
    Emulated {
        /// The GIC.
        gic: Arc<Gic>,
        /// Each vCPU's IRQ input, applied by the vCPU's own thread.
        lines: Arc<IrqLines>,
    },
    /// The hypervisor's GICv3: it delivers everything; the VMM only drives SPIs.
    Hypervisor {
        /// The SPI inputs.
        spis: Arc<dyn SpiSink>,
        /// Where it sits.
        layout: GicV3Layout,
    },
}

impl Irqchip {
    /// hvrun's GICv2 for `cpus` vCPUs.
    pub fn emulated(cpus: u32) -> Self {
        let lines = IrqLines::new(cpus as usize);
        Irqchip::Emulated { gic: Gic::new(cpus as usize, lines.clone()), lines }
    }

    /// What to log.
    pub fn name(&self) -> &'static str {
        match self {
            Irqchip::Emulated { .. } => "hvrun's GICv2",
            Irqchip::Hypervisor { .. } => "the hypervisor's GICv3",
        }
    }

    /// The input line of SPI `spi` (INTID `32 + spi`), for a device.
    pub fn spi_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        match self {
            Irqchip::Emulated { gic, .. } => gic.spi_line(spi),
            Irqchip::Hypervisor { spis, .. } => {
                Arc::new(HypervisorSpi { spis: Arc::clone(spis), intid: SPI_BASE + spi })
            }
        }
    }

    /// Puts the emulated GIC's windows on the bus (the hypervisor's GIC needs none).
    pub fn attach(&self, bus: &mut MmioBus) -> Result<(), Error> {
        if let Irqchip::Emulated { gic, .. } = self {
            bus.insert(GIC_DIST_BASE, GIC_DIST_WINDOW, gic.distributor())?;
            bus.insert(GIC_CPU_BASE, GIC_CPU_WINDOW, gic.cpu_interface())?;
        }
        Ok(())
    }

    /// The device-tree node.
    pub fn fdt(&self) -> fdt::Gic {
        let window = |(base, size)| fdt::MmioWindow { base, size };
        match self {
            Irqchip::Emulated { .. } => fdt::Gic::V2 {
                distributor: window((GIC_DIST_BASE, GIC_DIST_WINDOW)),
                cpu_interface: window((GIC_CPU_BASE, GIC_CPU_WINDOW)),
            },
            Irqchip::Hypervisor { layout, .. } => {
                fdt::Gic::V3 { distributor: window(layout.distributor), redistributors: window(layout.redistributors) }
            }
        }
    }
}

/// A device's line into the hypervisor's GIC.
struct HypervisorSpi {
    spis: Arc<dyn SpiSink>,
    intid: u32,
}

impl IrqLine for HypervisorSpi {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.spis.set_spi(self.intid, level) {
            warn_ratelimited!("SPI {}: {e}", self.intid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_like(vcpus: u32) -> GicV3Needs {
        GicV3Needs::standard(vcpus, (32, 96))
    }

    #[test]
    fn auto_takes_the_hypervisors_gicv3_when_there_is_one_and_else_the_gicv2() {
        let layout = choose(GicChoice::Auto, 4, Some(kvm_like(4)), false).unwrap().unwrap();
        assert_eq!(layout.redistributors.1, 4 * 0x2_0000);
        assert_eq!(choose(GicChoice::Auto, 4, None, false).unwrap(), None);
        // A GIC that won't fit falls back, with a warning, while 8 vCPUs or fewer.
        let odd = GicV3Needs { redistributor_align: 3, ..kvm_like(4) };
        assert_eq!(choose(GicChoice::Auto, 4, Some(odd), false).unwrap(), None);
    }

    #[test]
    fn more_than_eight_vcpus_need_the_hypervisors_gicv3() {
        assert!(choose(GicChoice::Auto, 12, Some(kvm_like(12)), false).unwrap().is_some());
        let none = choose(GicChoice::Auto, 12, None, false).unwrap_err().to_string();
        assert!(none.contains("--cpus 12 needs the hypervisor's GICv3"), "{none}");
        let v2 = choose(GicChoice::V2, 9, Some(kvm_like(9)), false).unwrap_err().to_string();
        assert!(v2.contains("at most 8"), "{v2}");
    }

    #[test]
    fn v3_is_an_error_where_the_hypervisor_has_none_or_it_wont_fit() {
        assert_eq!(choose(GicChoice::V3, 1, None, false), Err(GicError::NoGicV3), "an error an embedder can match");
        let none = choose(GicChoice::V3, 1, None, false).unwrap_err().to_string();
        assert!(none.contains("no GICv3 of its own"), "{none}");
        let few = GicV3Needs { spis: (32, 32), ..kvm_like(1) };
        let err = choose(GicChoice::V3, 1, Some(few), false).unwrap_err().to_string();
        assert!(err.contains("won't fit"), "{err}");
        assert_eq!(choose(GicChoice::V2, 2, Some(kvm_like(2)), false).unwrap(), None, "v2 is v2 even where v3 exists");
    }

    #[test]
    fn a_nested_guest_gets_the_hypervisors_gicv3_or_a_clear_error_never_the_gicv2() {
        for asked in [GicChoice::Auto, GicChoice::V3] {
            assert!(choose(asked, 2, Some(kvm_like(2)), true).unwrap().is_some());
            let none = choose(asked, 2, None, true).unwrap_err().to_string();
            assert!(none.contains("--nested needs the hypervisor's GICv3, which this host does not have"), "{none}");
            let odd = GicV3Needs { redistributor_align: 3, ..kvm_like(2) };
            let err = choose(asked, 2, Some(odd), true).unwrap_err().to_string();
            assert!(err.contains("won't fit"), "no quiet fallback to the GICv2: {err}");
        }
        let v2 = choose(GicChoice::V2, 2, Some(kvm_like(2)), true).unwrap_err().to_string();
        assert!(v2.contains("--nested needs the hypervisor's GICv3: use --gic v3 or auto"), "{v2}");
    }

    #[test]
    fn device_tree_nodes_follow_the_choice() {
        assert!(matches!(Irqchip::emulated(2).fdt(), fdt::Gic::V2 { .. }));
        #[derive(Debug)]
        struct Sink;
        impl SpiSink for Sink {
            fn set_spi(&self, _: u32, _: bool) -> hypervisor::Result<()> {
                Ok(())
            }
        }
        let layout = place_gicv3(&kvm_like(2), 2, NUM_SPIS).unwrap();
        let chip = Irqchip::Hypervisor { spis: Arc::new(Sink), layout };
        let fdt::Gic::V3 { redistributors, .. } = chip.fdt() else { panic!("not a GICv3") };
        assert_eq!((redistributors.base, redistributors.size), layout.redistributors);
        let mut bus = MmioBus::new();
        chip.attach(&mut bus).unwrap();
        assert!(bus.read(0, GIC_DIST_BASE, &mut [0u8; 4]).is_err(), "no emulated windows on the bus");
    }
}
