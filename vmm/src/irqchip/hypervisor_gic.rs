//! The hypervisor's own GICv3 (KVM's vGICv3, macOS 15's in-kernel GIC) as the machine's
//! interrupt controller: it delivers everything, the virtual timer's interrupt included,
//! so the vCPU loops have no hooks to run, and the VMM only drives SPIs.

use std::sync::{Arc, Mutex, OnceLock};

use arch_aarch64::layout::{GicV3Layout, SPI_BASE};
use devices::irq::IrqLine;
use devices::warn_ratelimited;
use hypervisor::{EdgeTrigger, Kicker, SpiSink};

use super::{Irqchip, SavedIrqchip, VcpuIrq};

/// The hypervisor's GICv3.
#[derive(Debug)]
pub struct HypervisorGic {
    spis: Arc<dyn SpiSink>,
    layout: GicV3Layout,
    /// The virtio transports' SPIs are raised as edges through the hypervisor's own
    /// triggers (KVM's irqfd): an interrupt costs one write to an eventfd, and no ioctl.
    edges: bool,
    /// The virtio lines, given their triggers once every vCPU exists.
    edge_lines: Mutex<Vec<Arc<EdgeSpi>>>,
}

impl HypervisorGic {
    /// The GICv3 at `layout`, driven through `spis`.
    pub fn new(spis: Arc<dyn SpiSink>, layout: GicV3Layout) -> Self {
        let edges = spis.has_edge_triggers();
        HypervisorGic { spis, layout, edges, edge_lines: Mutex::new(Vec::new()) }
    }
}

impl Irqchip for HypervisorGic {
    fn name(&self) -> &'static str {
        "the hypervisor's GICv3"
    }

    fn spi_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        Arc::new(HypervisorSpi { spis: Arc::clone(&self.spis), intid: SPI_BASE + spi })
    }

    fn virtio_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        if !self.edges {
            return self.spi_line(spi);
        }
        let line = Arc::new(EdgeSpi { spis: Arc::clone(&self.spis), intid: SPI_BASE + spi, trigger: OnceLock::new() });
        devices::bus::lock(&self.edge_lines).push(Arc::clone(&line));
        line
    }

    fn virtio_edge(&self) -> bool {
        self.edges
    }

    /// KVM takes irqfds only once its vGIC is initialised, which it is when the last
    /// vCPU exists (`kvm_irqfd_assign` answers EAGAIN before): the virtio lines get their
    /// triggers now. A line without one raises its SPI through the level ioctl, which is
    /// a rising edge per interrupt too.
    fn vcpus_created(&self) {
        for line in devices::bus::lock(&self.edge_lines).iter() {
            match self.spis.edge_trigger(line.intid) {
                Ok(trigger) => {
                    let _ = line.trigger.set(trigger);
                }
                Err(e) => log::warn!("SPI {}: no edge trigger ({e}); raising it through its level", line.intid),
            }
        }
    }

    fn save(&self) -> Result<SavedIrqchip, String> {
        self.spis.save_gic().map(SavedIrqchip::GicV3).map_err(|e| e.to_string())
    }

    fn restore(&self, saved: &SavedIrqchip) -> Result<(), String> {
        match saved {
            SavedIrqchip::GicV3(gic) => self.spis.restore_gic(gic).map_err(|e| e.to_string()),
            SavedIrqchip::GicV2(_) => Err("the snapshot's guest had hvrun's GICv2, not the hypervisor's GICv3".into()),
        }
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

/// A virtio transport's line into an edge-triggered SPI: each rise is one trigger, a fall
/// is nothing (the GIC latched the rise). Until it has its trigger, and if it never gets
/// one, the line's level goes through [`SpiSink::set_spi`], whose rises are edges too.
#[derive(Debug)]
struct EdgeSpi {
    spis: Arc<dyn SpiSink>,
    intid: u32,
    trigger: OnceLock<Box<dyn EdgeTrigger>>,
}

impl IrqLine for EdgeSpi {
    fn set_level(&self, level: bool) {
        let result = match self.trigger.get() {
            Some(trigger) if level => trigger.trigger(),
            Some(_) => Ok(()),
            None => self.spis.set_spi(self.intid, level),
        };
        if let Err(e) = result {
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
        let chip = HypervisorGic::new(sink.clone(), layout);
        let fdt::Gic::V3 { redistributors, .. } = chip.fdt() else { panic!("not a GICv3") };
        assert_eq!((redistributors.base, redistributors.size), layout.redistributors);
        assert_eq!(chip.version(), (3, layout.redistributors.0));
        let mut bus = MmioBus::new();
        chip.attach(&mut bus).unwrap();
        assert!(bus.read(0, GIC_DIST_BASE, &mut [0u8; 4]).is_err(), "no emulated windows on the bus");
        chip.spi_line(5).set_level(true);
        assert_eq!(*sink.0.lock().unwrap(), vec![(37, true)]);
        assert!(chip.dump().is_none());
        // Without edge triggers a virtio line is the level line.
        assert!(!chip.virtio_edge());
        chip.virtio_line(6).set_level(false);
        assert_eq!(sink.0.lock().unwrap()[1], (38, false));
    }

    /// A sink with edge triggers that count, and one SPI whose trigger cannot be had.
    #[derive(Debug, Default)]
    struct EdgeSink {
        levels: Mutex<Vec<(u32, bool)>>,
        edges: Arc<Mutex<Vec<u32>>>,
    }
    #[derive(Debug)]
    struct Counted(Arc<Mutex<Vec<u32>>>, u32);
    impl EdgeTrigger for Counted {
        fn trigger(&self) -> hypervisor::Result<()> {
            self.0.lock().unwrap().push(self.1);
            Ok(())
        }
    }
    impl SpiSink for EdgeSink {
        fn set_spi(&self, intid: u32, level: bool) -> hypervisor::Result<()> {
            self.levels.lock().unwrap().push((intid, level));
            Ok(())
        }
        fn has_edge_triggers(&self) -> bool {
            true
        }
        fn edge_trigger(&self, intid: u32) -> hypervisor::Result<Box<dyn EdgeTrigger>> {
            if intid == 40 {
                return Err(hypervisor::Error::Unsupported("no more eventfds".into()));
            }
            Ok(Box::new(Counted(Arc::clone(&self.edges), intid)))
        }
    }

    #[test]
    fn with_edge_triggers_virtio_lines_pulse_on_each_rise_and_fall_back_to_levels() {
        let layout = place_gicv3(&GicV3Needs::standard(1, (32, 96)), 1, NUM_SPIS).unwrap();
        let sink = Arc::new(EdgeSink::default());
        let chip = HypervisorGic::new(sink.clone(), layout);
        assert!(chip.virtio_edge(), "the device tree must say edge");
        let (line, fallback) = (chip.virtio_line(4), chip.virtio_line(8));
        // Before the vCPUs exist (KVM's vGIC not initialised), levels through the ioctl.
        line.set_level(true);
        line.set_level(false);
        assert_eq!(std::mem::take(&mut *sink.levels.lock().unwrap()), vec![(36, true), (36, false)]);
        chip.vcpus_created();
        for level in [true, false, true, true, false] {
            line.set_level(level);
        }
        assert_eq!(*sink.edges.lock().unwrap(), vec![36, 36, 36], "one edge per rise, none per fall");
        assert!(sink.levels.lock().unwrap().is_empty(), "no ioctl on the edge path");
        // A trigger that cannot be had: the level line, whose rise is an edge too.
        fallback.set_level(true);
        fallback.set_level(false);
        assert_eq!(*sink.levels.lock().unwrap(), vec![(40, true), (40, false)]);
        // The UART's line stays a level line.
        chip.spi_line(1).set_level(true);
        assert_eq!(sink.levels.lock().unwrap()[2], (33, true));
    }
}
