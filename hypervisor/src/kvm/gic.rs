//! KVM's in-kernel GICv3 (vGICv3): probing, creation, SPI lines (and irqfd edges) and
//! the final initialisation once every vCPU exists.

use std::sync::Arc;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3 as VGIC_V3, KVM_CREATE_DEVICE_TEST,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{Cap, DeviceFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::platform;
use crate::kvm_regs::{irqfd_gsi, spi_irq_line};
use crate::{EdgeTrigger, Error, GicV3Layout, GicV3Needs, Result, SpiSink};

/// INTIDs the vGIC is created with: the 32 private ones and 96 SPIs (KVM wants a
/// multiple of 32).
const NR_IRQS: u32 = 128;

/// What KVM's vGICv3 needs for a VM of `vcpus` vCPUs, when the host can give one.
pub fn needs(vm: &VmFd, vcpus: u32) -> Option<GicV3Needs> {
    let mut probe = kvm_create_device { type_: VGIC_V3, fd: 0, flags: KVM_CREATE_DEVICE_TEST };
    // Workaround for kvm-ioctls 0.25.1: `VmFd::create_device` wraps `probe.fd` in a file
    // even for KVM_CREATE_DEVICE_TEST, where the kernel creates no descriptor and leaves
    // the field as we set it (0). Dropping that wrapper would close fd 0, our standard
    // input, and the vGIC created next would take its number (found in the rig: reading
    // stdin failed with EINVAL). Forget it instead: it owns nothing.
    std::mem::forget(vm.create_device(&mut probe).ok()?);
    // The vGICv3 has the standard geometry (arch/arm64/kvm/vgic).
    Some(GicV3Needs::standard(vcpus, (32, NR_IRQS - 32)))
}

fn set_attr(gic: &DeviceFd, call: &'static str, group: u32, attr: u64, addr: u64) -> Result<()> {
    gic.set_device_attr(&kvm_device_attr { group, attr, addr, flags: 0 }).map_err(platform(call))
}

/// Creates the vGICv3 at `layout`.
pub fn create(vm: &VmFd, layout: &GicV3Layout) -> Result<DeviceFd> {
    let mut device = kvm_create_device { type_: VGIC_V3, fd: 0, flags: 0 };
    let gic = vm.create_device(&mut device).map_err(platform("KVM_CREATE_DEVICE (vGICv3)"))?;
    let dist = layout.distributor.0;
    let redist = layout.redistributors.0;
    // KVM reads each value through the pointer in `addr` during the ioctl.
    let at = |v: &u64| v as *const u64 as u64;
    set_attr(
        &gic,
        "vGICv3 distributor address",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
        at(&dist),
    )?;
    set_attr(
        &gic,
        "vGICv3 redistributor address",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
        at(&redist),
    )?;
    let nr_irqs = NR_IRQS;
    set_attr(&gic, "vGICv3 interrupt count", KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &nr_irqs as *const u32 as u64)?;
    Ok(gic)
}

/// Finishes the vGIC once every vCPU exists and before any runs (KVM sizes the
/// redistributors by the vCPUs it has).
pub fn init(gic: &DeviceFd) -> Result<()> {
    set_attr(gic, "vGICv3 init", KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT.into(), 0)
}

/// SPI lines of the vGIC, through `KVM_IRQ_LINE` (a VM ioctl, fine from any thread),
/// and edges through irqfds where KVM has them.
#[derive(Debug)]
pub struct Spis {
    vm: Arc<VmFd>,
    irqfd: bool,
}

impl Spis {
    /// The SPIs of `vm`'s vGIC.
    pub fn new(vm: Arc<VmFd>) -> Self {
        let irqfd = vm.check_extension(Cap::Irqfd);
        Spis { vm, irqfd }
    }
}

impl SpiSink for Spis {
    fn set_spi(&self, intid: u32, level: bool) -> Result<()> {
        let line = spi_irq_line(intid).ok_or_else(|| Error::Unsupported(format!("INTID {intid} is not an SPI")))?;
        self.vm.set_irq_line(line, level).map_err(platform("KVM_IRQ_LINE (SPI)"))
    }

    fn has_edge_triggers(&self) -> bool {
        self.irqfd
    }

    fn edge_trigger(&self, intid: u32) -> Result<Box<dyn EdgeTrigger>> {
        let gsi = irqfd_gsi(intid, NR_IRQS)
            .ok_or_else(|| Error::Unsupported(format!("INTID {intid} is not one of the vGIC's SPIs")))?;
        let fd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Platform { call: "eventfd (irqfd)", source })?;
        self.vm.register_irqfd(&fd, gsi).map_err(platform("KVM_IRQFD"))?;
        Ok(Box::new(Irqfd { fd, vm: Arc::clone(&self.vm), gsi }))
    }
}

/// An irqfd: writing to the eventfd makes KVM pulse the SPI (line up, then down: an
/// edge for an edge-triggered SPI).
#[derive(Debug)]
struct Irqfd {
    fd: EventFd,
    vm: Arc<VmFd>,
    gsi: u32,
}

impl EdgeTrigger for Irqfd {
    fn trigger(&self) -> Result<()> {
        match self.fd.write(1) {
            // The counter is full (2^64 - 2 edges not yet taken by KVM): one more adds nothing.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other.map_err(|source| Error::Platform { call: "irqfd write", source }),
        }
    }
}

impl Drop for Irqfd {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.fd, self.gsi) {
            log::debug!("KVM_IRQFD deassign of GSI {}: {e}", self.gsi);
        }
    }
}
