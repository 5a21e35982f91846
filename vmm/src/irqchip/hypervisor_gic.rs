//! The hypervisor's own GICv3 (KVM's vGICv3, macOS 15's in-kernel GIC) as the machine's
//! interrupt controller: it delivers everything, the virtual timer's interrupt included,
//! so the vCPU loops have no hooks to run, and the VMM only drives SPIs.

use std::sync::Arc;

use arch_aarch64::layout::{GicV3Layout, SPI_BASE};
use devices::irq::IrqLine;
use devices::warn_ratelimited;
use hypervisor::{Kicker, SpiSink};

use super::{Irqchip, VcpuIrq};

/// The hypervisor's GICv3.
#[derive(Debug)]
pub struct HypervisorGic {
    /// The SPI inputs.
    pub spis: Arc<dyn SpiSink>,
    /// Where it sits.
    pub layout: GicV3Layout,
}

impl Irqchip for HypervisorGic {
    fn name(&self) -> &'static str {
        "the hypervisor's GICv3"
    }

    fn spi_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        Arc::new(HypervisorSpi { spis: Arc::clone(&self.spis), intid: SPI_BASE + spi })
    }

    fn fdt(&self) -> fdt::Gic {
        let window = |(base, size)| fdt::MmioWindow { base, size };
        fdt::Gic::V3 {
            distributor: window(self.layout.distributor),
            redistributors: window(self.layout.redistributors),
        }
    }

    fn version(&self) -> (u64, u64) {
        (3, self.layout.redistributors.0)
    }

    fn vcpu(&self, _index: u32, _kicker: Arc<dyn Kicker>) -> Option<Box<dyn VcpuIrq + '_>> {
        None
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
    use arch_aarch64::layout::{place_gicv3, GIC_DIST_BASE};
    use devices::bus::MmioBus;
    use devices::gic::NUM_SPIS;
    use hypervisor::GicV3Needs;
    use std::sync::Mutex;

    /// Records the SPIs set.
    #[derive(Debug, Default)]
    pub(crate) struct Sink(pub Mutex<Vec<(u32, bool)>>);
    impl SpiSink for Sink {
        fn set_spi(&self, intid: u32, level: bool) -> hypervisor::Result<()> {
            self.0.lock().unwrap().push((intid, level));
            Ok(())
        }
    }

    #[test]
    fn a_v3_node_no_windows_and_spis_by_absolute_intid() {
        let layout = place_gicv3(&GicV3Needs::standard(2, (32, 96)), 2, NUM_SPIS).unwrap();
        let sink = Arc::new(Sink::default());
        let chip = HypervisorGic { spis: sink.clone(), layout };
        let fdt::Gic::V3 { redistributors, .. } = chip.fdt() else { panic!("not a GICv3") };
        assert_eq!((redistributors.base, redistributors.size), layout.redistributors);
        assert_eq!(chip.version(), (3, layout.redistributors.0));
        let mut bus = MmioBus::new();
        chip.attach(&mut bus).unwrap();
        assert!(bus.read(0, GIC_DIST_BASE, &mut [0u8; 4]).is_err(), "no emulated windows on the bus");
        chip.spi_line(5).set_level(true);
        assert_eq!(*sink.0.lock().unwrap(), vec![(37, true)]);
        assert!(chip.dump().is_none());
    }
}
