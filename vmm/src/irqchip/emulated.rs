//! hvrun's own GICv2 as the machine's interrupt controller: its MMIO windows on the bus,
//! and on every vCPU the two hooks that wire it to the hypervisor's CPU: the virtual
//! timer's level goes in as PPI 27 after each exit, and the CPU interface's output goes
//! to the vCPU's IRQ input before each run.

use std::sync::Arc;

use arch_aarch64::layout::{GIC_CPU_BASE, GIC_DIST_BASE};
use devices::bus::MmioBus;
use devices::gic::{Gic, VTIMER_PPI};
use devices::irq::IrqLine;
use hypervisor::{IrqInput, Kicker};

use super::irq_lines::IrqLines;
use super::{Irqchip, SavedIrqchip, VcpuIrq};
use crate::Error;

/// Size of the GICv2 CPU interface window in the device tree: two 4 KiB pages, the
/// second holding GICC_DIR.
const GIC_CPU_WINDOW: u64 = 0x2000;
/// Size of the GICv2 distributor window in the device tree.
const GIC_DIST_WINDOW: u64 = 0x1000;

/// hvrun's GICv2 and the vCPUs' IRQ inputs it drives.
#[derive(Debug)]
pub struct EmulatedGic {
    gic: Arc<Gic>,
    lines: Arc<IrqLines>,
}

impl EmulatedGic {
    /// A GICv2 for `cpus` vCPUs.
    pub fn new(cpus: u32) -> Self {
        let lines = IrqLines::new(cpus as usize);
        EmulatedGic { gic: Gic::new(cpus as usize, lines.clone()), lines }
    }

    /// The GIC itself (tests program it through its registers).
    #[cfg(test)]
    pub fn gic(&self) -> &Arc<Gic> {
        &self.gic
    }
}

impl Irqchip for EmulatedGic {
    fn name(&self) -> &'static str {
        "hvrun's GICv2"
    }

    fn spi_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        self.gic.spi_line(spi)
    }

    fn attach(&self, bus: &mut MmioBus) -> Result<(), Error> {
        bus.insert(GIC_DIST_BASE, GIC_DIST_WINDOW, self.gic.distributor())?;
        bus.insert(GIC_CPU_BASE, GIC_CPU_WINDOW, self.gic.cpu_interface())?;
        Ok(())
    }

    fn fdt(&self) -> fdt::Gic {
        fdt::Gic::V2 {
            distributor: fdt::MmioWindow { base: GIC_DIST_BASE, size: GIC_DIST_WINDOW },
            cpu_interface: fdt::MmioWindow { base: GIC_CPU_BASE, size: GIC_CPU_WINDOW },
        }
    }

    fn version(&self) -> (u64, u64) {
        (2, 0)
    }

    fn vcpu(&self, index: u32, kicker: Arc<dyn Kicker>) -> Option<Box<dyn VcpuIrq + '_>> {
        self.lines.attach(index as usize, kicker);
        // The level the GIC has is not known here (a restored state may hold either), so
        // the first exit tells it the vCPU's, whatever it is: the hypervisor reports a
        // timer that was asserted when the vCPU was created only once.
        Some(Box::new(Wiring { gic: &self.gic, lines: &self.lines, index: index as usize, timer: None, changes: 0 }))
    }

    fn save(&self) -> Result<SavedIrqchip, String> {
        Ok(SavedIrqchip::GicV2(self.gic.save()))
    }

    fn restore(&self, saved: &SavedIrqchip) -> Result<(), String> {
        match saved {
            SavedIrqchip::GicV2(gic) => self.gic.restore(gic).map_err(|e| e.to_string()),
            SavedIrqchip::GicV3(_) => Err("the snapshot's guest had the hypervisor's GICv3, not hvrun's GICv2".into()),
        }
    }

    fn dump(&self) -> Option<String> {
        Some(format!("{}irq lines (level, dirty, kicker): {:?}", self.gic.dump(), self.lines))
    }
}

/// One vCPU's wires to the GIC.
struct Wiring<'a> {
    gic: &'a Gic,
    lines: &'a IrqLines,
    index: usize,
    /// The timer level the GIC has, once this vCPU has told it.
    timer: Option<bool>,
    changes: u64,
}

impl VcpuIrq for Wiring<'_> {
    fn before_run(&mut self, vcpu: &mut dyn IrqInput) -> hypervisor::Result<()> {
        self.lines.sync(self.index, vcpu)
    }

    fn after_exit(&mut self, vcpu: &mut dyn IrqInput) {
        let level = vcpu.vtimer_asserted();
        if Some(level) != self.timer {
            self.timer = Some(level);
            self.changes += 1;
            self.gic.set_ppi_level(self.index, VTIMER_PPI, level);
        }
    }

    fn timer_changes(&self) -> u64 {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gicv2_has_its_windows_on_the_bus_and_a_v2_node() {
        let chip = EmulatedGic::new(2);
        assert!(matches!(chip.fdt(), fdt::Gic::V2 { .. }));
        assert_eq!(chip.version(), (2, 0));
        let mut bus = MmioBus::new();
        chip.attach(&mut bus).unwrap();
        let mut typer = [0u8; 4];
        bus.read(0, GIC_DIST_BASE + 4, &mut typer).unwrap();
        assert_eq!((u32::from_le_bytes(typer) >> 5) & 7, 1, "GICD_TYPER says two CPUs");
        assert!(chip.dump().is_some());
    }

    /// A vCPU whose timer is asserted.
    struct Asserted;
    impl IrqInput for Asserted {
        fn vtimer_asserted(&mut self) -> bool {
            true
        }
        fn set_irq_line(&mut self, _: bool) -> hypervisor::Result<()> {
            Ok(())
        }
    }

    /// Issue 18: a restored vCPU whose timer was asserted when it was saved reports it
    /// once, at its first exit; the loop took the GIC's line as already high and never
    /// told it, and the guest's CPU waited for its timer for ever.
    #[test]
    fn the_timer_level_at_the_first_exit_reaches_the_gic_whatever_it_held() {
        let chip = EmulatedGic::new(1);
        let mut bus = MmioBus::new();
        chip.attach(&mut bus).unwrap();
        let write = |addr: u64, value: u32| bus.write(0, addr, &value.to_le_bytes()).unwrap();
        write(GIC_DIST_BASE, 1); // GICD_CTLR
        write(GIC_DIST_BASE + 0x100, 1 << VTIMER_PPI); // GICD_ISENABLER0
        write(GIC_CPU_BASE, 1); // GICC_CTLR
        write(GIC_CPU_BASE + 4, 0xff); // GICC_PMR
        assert!(!chip.gic().irq_asserted(0));
        let mut wiring = chip.vcpu(0, Arc::new(crate::testing::CountingKicker::default())).unwrap();
        wiring.after_exit(&mut Asserted);
        assert!(chip.gic().irq_asserted(0), "the timer's interrupt reaches the CPU");
        assert_eq!(wiring.timer_changes(), 1);
    }
}
