//! KVM's in-kernel GICv3 (vGICv3): probing, creation, SPI lines (and irqfd edges), the
//! final initialisation once every vCPU exists, and its state for snapshots (through
//! `KVM_{GET,SET}_DEVICE_ATTR`, in the order and with the checks of
//! [`crate::gicv3_state`]).

use std::sync::Arc;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3 as VGIC_V3, KVM_CREATE_DEVICE_TEST,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT, KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST, VGIC_LEVEL_INFO_LINE_LEVEL,
};
use kvm_ioctls::{Cap, DeviceFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::platform;
use crate::gicv3_state::{self, Attr, GicV3Shape, HypervisorGicState};
use crate::kvm_regs::{irqfd_gsi, spi_irq_line};
use crate::{EdgeTrigger, Error, GicV3Layout, GicV3Needs, Result, SpiSink};

// The portable module's numbers are the kernel's (checked where kvm-bindings exists).
const _: () = {
    assert!(gicv3_state::GRP_DIST_REGS == KVM_DEV_ARM_VGIC_GRP_DIST_REGS);
    assert!(gicv3_state::GRP_REDIST_REGS == KVM_DEV_ARM_VGIC_GRP_REDIST_REGS);
    assert!(gicv3_state::GRP_CPU_SYSREGS == KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS);
    assert!(gicv3_state::GRP_LEVEL_INFO == KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO);
    assert!(gicv3_state::LINE_LEVEL_INFO_SHIFT == KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT);
    assert!(gicv3_state::LEVEL_INFO_LINE_LEVEL == VGIC_LEVEL_INFO_LINE_LEVEL);
};

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

/// Reads one attribute of the vGIC's state.
fn get_state_attr(gic: &DeviceFd, attr: Attr) -> Result<u64> {
    let mut wide: u64 = 0;
    let mut narrow: u32 = 0;
    let addr = if attr.is_64bit() { &mut wide as *mut u64 as u64 } else { &mut narrow as *mut u32 as u64 };
    let mut raw = kvm_device_attr { group: attr.group, attr: attr.attr, addr, flags: 0 };
    // SAFETY: `addr` points at `wide` (8 bytes) for the CPU interface group, whose registers
    // KVM reads out as 64-bit values, and at `narrow` (4 bytes) for the other groups of the
    // walk (distributor, redistributor, line levels), which KVM reads out as 32-bit values
    // (arm-vgic-v3.rst); both are live, writable and unaliased until the call returns.
    let read = unsafe { gic.get_device_attr(&mut raw) };
    read.map_err(|e| {
        log::warn!("KVM_GET_DEVICE_ATTR of the vGICv3's {attr}: {e}");
        platform("KVM_GET_DEVICE_ATTR (vGICv3 state)")(e)
    })?;
    Ok(if attr.is_64bit() { wide } else { u64::from(narrow) })
}

/// Writes one attribute of the vGIC's state (`value` within 32 bits for a 32-bit
/// attribute, as [`SavedGicV3::check`] made sure).
fn set_state_attr(gic: &DeviceFd, attr: Attr, value: u64) -> Result<()> {
    let narrow = match u32::try_from(value) {
        Ok(narrow) => narrow,
        Err(_) if attr.is_64bit() => 0,
        Err(_) => return Err(Error::Unsupported(format!("the vGICv3's {attr} cannot hold {value:#x}"))),
    };
    let addr = if attr.is_64bit() { &value as *const u64 as u64 } else { &narrow as *const u32 as u64 };
    // KVM reads the value through `addr` during the ioctl: `value` (8 bytes) for the CPU
    // interface group, `narrow` (4 bytes) for the others, both live until it returns.
    gic.set_device_attr(&kvm_device_attr { group: attr.group, attr: attr.attr, addr, flags: 0 }).map_err(|e| {
        let e = std::io::Error::from_raw_os_error(e.errno());
        Error::Unsupported(format!("KVM_SET_DEVICE_ATTR refused the vGICv3's {attr} = {value:#x}: {e}"))
    })
}

/// SPI lines of the vGIC, through `KVM_IRQ_LINE` (a VM ioctl, fine from any thread),
/// edges through irqfds where KVM has them, and the vGIC's state for snapshots.
#[derive(Debug)]
pub struct Spis {
    vm: Arc<VmFd>,
    irqfd: bool,
    /// The vGIC's device, for its state.
    gic: Arc<DeviceFd>,
    /// Its interrupts and vCPUs, which a saved state must match.
    shape: GicV3Shape,
}

impl Spis {
    /// The SPIs of `vm`'s vGIC `gic` (from [`create`]), which serves `vcpus` vCPUs.
    pub fn new(vm: Arc<VmFd>, gic: Arc<DeviceFd>, vcpus: u32) -> Self {
        let irqfd = vm.check_extension(Cap::Irqfd);
        Spis { vm, irqfd, gic, shape: GicV3Shape::new(NR_IRQS, vcpus) }
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

    /// KVM's `KVM_DEV_ARM_VGIC_GRP_{DIST,REDIST}_REGS`, `_CPU_SYSREGS` and `_LEVEL_INFO`
    /// attributes, read one by one: the vGIC must be initialised and no vCPU in
    /// `KVM_RUN` (KVM answers EBUSY otherwise).
    fn save_gic(&self) -> Result<HypervisorGicState> {
        gicv3_state::save(&self.shape, |attr| get_state_attr(&self.gic, attr)).map(HypervisorGicState::Kvm)
    }

    /// Checked against this vGIC, then written back in [`gicv3_state::for_each_attr`]'s
    /// order. KVM refuses a CPU interface with more priority or ID bits than this host's
    /// (`ICC_CTLR_EL1`), or a vGIC of another implementation (`GICD_IIDR`): the error
    /// names the attribute.
    fn restore_gic(&self, saved: &HypervisorGicState) -> Result<()> {
        let HypervisorGicState::Kvm(saved) = saved else {
            return Err(Error::Unsupported("the snapshot's GICv3 is macOS's, not KVM's".into()));
        };
        saved.restore(&self.shape, |attr, value| set_state_attr(&self.gic, attr, value))
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
