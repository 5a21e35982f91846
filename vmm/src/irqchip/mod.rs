//! The machine's interrupt controller: hvrun's emulated GICv2, or the hypervisor's own
//! GICv3 (KVM's vGICv3, macOS 15's in-kernel GIC).
//!
//! [`choose`] is the decision, portable and tested: what `--gic` asked for, how many
//! vCPUs, and what the hypervisor offers. [`Irqchip`] is the result the machine is built
//! around: the SPI lines devices drive, the device-tree node, and, for the emulated
//! GIC, its MMIO windows; [`VcpuIrq`] is what each vCPU's loop does for it around every
//! run. [`EmulatedGic`] (hvrun's GICv2, `emulated.rs`) feeds the timer in and the IRQ
//! line out on every vCPU; [`HypervisorGic`] (`hypervisor_gic.rs`) needs no hooks at
//! all, so its vCPUs' loops have nothing to do per exit.

mod emulated;
mod hypervisor_gic;
mod irq_lines;

use std::sync::Arc;

use arch_aarch64::layout::{place_gicv3, GicPlacementError, GicV3Layout, GicV3Needs};
use devices::bus::MmioBus;
use devices::gic::NUM_SPIS;
use devices::irq::IrqLine;
use hypervisor::{IrqInput, Kicker};

pub use self::emulated::EmulatedGic;
pub use self::hypervisor_gic::HypervisorGic;
use crate::config::{GicChoice, MAX_CPUS_GICV2};
use crate::Error;

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

/// The machine's interrupt controller, as the machine is built around it: the SPI lines
/// devices drive, the device-tree node, its MMIO windows if it has any, and what each
/// vCPU's loop must do around every run ([`VcpuIrq`]).
pub trait Irqchip: Send + Sync + std::fmt::Debug {
    /// What to log.
    fn name(&self) -> &'static str;
    /// The input line of SPI `spi` (INTID `32 + spi`), for a device.
    fn spi_line(&self, spi: u32) -> Arc<dyn IrqLine>;
    /// The line of a virtio transport's SPI `spi`: a rising edge per interrupt where the
    /// controller raises edges without the VMM's help ([`Irqchip::virtio_edge`]), else
    /// the level line of [`Irqchip::spi_line`].
    fn virtio_line(&self, spi: u32) -> Arc<dyn IrqLine> {
        self.spi_line(spi)
    }
    /// Whether [`Irqchip::virtio_line`] gives edges, so the device tree must describe the
    /// virtio SPIs as edge-triggered.
    fn virtio_edge(&self) -> bool {
        false
    }
    /// Puts the controller's MMIO windows on the bus, if the VMM emulates them.
    fn attach(&self, bus: &mut MmioBus) -> Result<(), Error> {
        let _ = bus;
        Ok(())
    }
    /// The device-tree node.
    fn fdt(&self) -> fdt::Gic;
    /// The GIC architecture version (2 or 3), and the base of the redistributors (0 for
    /// a GICv2), for the self-test probe.
    fn version(&self) -> (u64, u64);
    /// The hooks vCPU `index`'s loop calls around every run, set up on that vCPU's
    /// thread with its kicker; `None` when the hypervisor does it all.
    fn vcpu(&self, index: u32, kicker: Arc<dyn Kicker>) -> Option<Box<dyn VcpuIrq + '_>>;
    /// Every vCPU exists (called once, before any enters the guest).
    fn vcpus_created(&self) {}
    /// The controller's state for a snapshot, with every vCPU paused.
    fn save(&self) -> Result<SavedIrqchip, String> {
        Err(format!("{} cannot be saved in a snapshot yet", self.name()))
    }
    /// Puts back a state [`Irqchip::save`] gave (checked first), once every vCPU exists
    /// and has its own state back, before any runs.
    fn restore(&self, saved: &SavedIrqchip) -> Result<(), String> {
        let _ = saved;
        Err(format!("{} cannot be restored from a snapshot yet", self.name()))
    }
    /// The controller's state for a report on a hung guest
    /// ([`crate::VmBuilder::dump_state_after`]); `None` when it is the hypervisor's.
    fn dump(&self) -> Option<String> {
        None
    }
}

/// An interrupt controller's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedIrqchip {
    /// hvrun's GICv2.
    GicV2(devices::gic::SavedGic),
    /// The hypervisor's GICv3 (KVM's vGICv3 as its device attributes, macOS's as the
    /// framework's own serialized state).
    GicV3(hypervisor::gicv3_state::HypervisorGicState),
}

/// What one vCPU's loop does for the interrupt controller, on the vCPU's thread.
pub trait VcpuIrq {
    /// Before the vCPU enters the guest: what is pending for it goes in.
    fn before_run(&mut self, vcpu: &mut dyn IrqInput) -> hypervisor::Result<()>;
    /// After an exit: what the vCPU changed (its timer's level) goes to the controller.
    fn after_exit(&mut self, vcpu: &mut dyn IrqInput);
    /// How many times the timer's level changed, for the exit statistics.
    fn timer_changes(&self) -> u64 {
        0
    }
}

/// The controller chosen for this machine: hvrun's GICv2 for `cpus` vCPUs, or the
/// hypervisor's GICv3 at `layout` (created here, before any vCPU).
pub fn build<V: hypervisor::Vm>(vm: &mut V, layout: Option<GicV3Layout>, cpus: u32) -> Result<Arc<dyn Irqchip>, Error> {
    Ok(match layout {
        Some(layout) => Arc::new(HypervisorGic::new(vm.create_gicv3(&layout)?, layout)),
        None => Arc::new(EmulatedGic::new(cpus)),
    })
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
}
