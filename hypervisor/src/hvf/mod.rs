//! The Hypervisor.framework backend for Apple Silicon macOS, over `applevisor` 1.0.0.
//!
//! Only the framework calls live here: creating the VM with its IPA size (and EL2 for
//! `--nested`), mapping guest RAM, creating each vCPU on its own thread, and [`HvfRaw`],
//! the per-vCPU calls behind [`RawLoop`], which makes every decision in portable, tested
//! code (`crate::raw`, `crate::exits`). Interrupts come from macOS 15's in-kernel GICv3 when the VMM
//! creates it (`gic.rs`, looked up at run time), or else from the VMM's emulated GICv2
//! through `hv_vcpu_set_pending_interrupt`, set again before every run.
//!
//! Workarounds for applevisor 1.0.0 (see `../shared/notes/hvf.md`):
//! - `Memory::map` turns `MemPerms` into the wrong permission bits, so guest RAM is
//!   mapped with `applevisor_sys::hv_vm_map` and explicit `HV_MEMORY_*` bits;
//! - `hv_interrupt_type_t` is declared with FIQ = 0, while Apple's header has IRQ = 0,
//!   so `set_pending_interrupt(IRQ)` would raise a FIQ: [`ffi`] declares the call with a
//!   plain integer;
//! - registers are read and written through [`ffi`] with their raw encodings, so any
//!   system register the decisions name can be reached (the crate's enums list only some);
//! - `Vcpu::get_exit_info` reads the exit reason as a Rust enum (undefined behaviour for a
//!   reason Apple adds later): vCPUs are [`ffi::Vcpu`]s, whose exit record is read as
//!   integers, and an unknown reason ends the run with its number;
//! - its VM configuration can be given EL2 only with the `macos-15-0` feature, which links
//!   macOS 15 symbols: the VM is created with the framework's calls ([`ffi::VmOwner`]) and
//!   EL2 enabled through a symbol found at run time (`el2.rs`).
//!
//! Not run on Apple hardware yet: it is type-checked and linted for
//! `aarch64-apple-darwin` on every CI run.

mod el2;
mod ffi;
mod gic;

use std::sync::Arc;

use applevisor::vm::VirtualMachineConfig;
use arch_aarch64::boot::mpidr;
use arch_aarch64::inject::{PSTATE_EL1H_MASKED, PSTATE_EL2H_MASKED};
use arch_aarch64::sysreg::{ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, MPIDR_EL1};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::hvf_regs::{visible_features, StateReg};
use crate::mapped::Mapped;
use crate::raw::{Power, RawExit, RawLoop, RawVcpu, VmClock, WakingSpis};
use crate::{Error, GicV3Layout, GicV3Needs, GuestClock, GuestRam, Reg, Result, SpiSink, VmConfig};

fn check(call: &'static str, status: i32) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Platform { call, source: std::io::Error::other(format!("status {status:#x}")) })
    }
}

/// Hypervisor.framework.
#[derive(Debug)]
pub struct Hvf {
    max_ipa_bits: u32,
}

impl Hvf {
    /// Checks that the framework is usable in this process.
    pub fn new() -> Result<Self> {
        let max_ipa_bits = VirtualMachineConfig::get_max_ipa_size().map_err(|e| {
            Error::Unavailable(format!(
                "Hypervisor.framework is not usable ({e}): run on Apple Silicon with the \
                 com.apple.security.hypervisor entitlement"
            ))
        })?;
        Ok(Hvf { max_ipa_bits })
    }
}

impl crate::Hypervisor for Hvf {
    type Vm = HvfVm;

    fn name(&self) -> &'static str {
        "hvf"
    }

    fn create_vm(&self, config: &VmConfig) -> Result<HvfVm> {
        if config.ipa_bits > self.max_ipa_bits {
            let most = arch_aarch64::layout::ram_limit(self.max_ipa_bits) >> 30;
            return Err(Error::Unsupported(format!(
                "this Mac gives guests {}-bit physical addresses and this much RAM needs {}: use --memory {most}G \
                 or less",
                self.max_ipa_bits, config.ipa_bits
            )));
        }
        let vm = ffi::VmOwner::create(config.ipa_bits, config.nested)?;
        let mpidrs: Vec<u64> = (0..config.vcpus).map(mpidr).collect();
        Ok(HvfVm {
            vm,
            el2: config.nested,
            power: Power::new(&mpidrs),
            clock: VmClock::new(ffi::absolute_time),
            memory: Mapped::default(),
            kernel_gic: false,
            gic: None,
        })
    }
}

/// A Hypervisor.framework VM (one per process).
pub struct HvfVm {
    vm: Arc<ffi::VmOwner>,
    /// The guest has EL2 (`--nested`).
    el2: bool,
    power: Arc<Power>,
    /// The guest's virtual counter, one for all vCPUs.
    clock: Arc<VmClock>,
    /// Mapped guest RAM, kept alive as long as the VM and each of its vCPUs.
    memory: Mapped,
    /// Whether the framework's GICv3 was created.
    kernel_gic: bool,
    /// Its layout and the size of one redistributor, to check each vCPU's against.
    gic: Option<(GicV3Layout, u64)>,
}

impl std::fmt::Debug for HvfVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvfVm").field("power", &self.power).finish_non_exhaustive()
    }
}

impl crate::Vm for HvfVm {
    type Vcpu = RawLoop<HvfRaw>;

    fn map_memory(&mut self, memory: &Arc<GuestRam>) -> Result<()> {
        const PAGE: u64 = 16 << 10;
        // Kept before the framework knows of it, so a failure halfway leaves nothing
        // mapped into the guest that nobody keeps.
        self.memory.keep(memory);
        for region in memory.iter() {
            let (addr, size) = (region.start_addr().0, region.len());
            let host = region.as_ptr();
            if addr % PAGE != 0 || size % PAGE != 0 || host as usize as u64 % PAGE != 0 {
                return Err(Error::Memory { addr, size, why: "Hypervisor.framework maps 16 KiB pages" });
            }
            let flags =
                applevisor_sys::HV_MEMORY_READ | applevisor_sys::HV_MEMORY_WRITE | applevisor_sys::HV_MEMORY_EXEC;
            // SAFETY: `host..host + size` is a live mapping owned by `memory`, which the VM
            // and each of its vCPUs keep (`Mapped`) for as long as the guest can reach it;
            // the IPA range was checked against the VM's IPA size by the VMM's memory map.
            let status = unsafe { applevisor_sys::hv_vm_map(host.cast(), addr, size as usize, flags) };
            check("hv_vm_map", status)?;
        }
        Ok(())
    }

    fn gicv3_needs(&self) -> Option<GicV3Needs> {
        gic::needs()
    }

    fn create_gicv3(&mut self, layout: &GicV3Layout) -> Result<Arc<dyn SpiSink>> {
        let size = gic::needs()
            .map(|n| n.redistributor_size)
            .ok_or_else(|| Error::Unsupported("this macOS has no in-kernel GICv3 (macOS 15+)".into()))?;
        gic::create(layout)?;
        arch_aarch64::layout::check_vtimer_intid(gic::vtimer_intid()?).map_err(Error::Unsupported)?;
        if self.el2 {
            // `hv_gic_intid_t` names these by their architected INTIDs; they exist with EL2.
            for (what, expected) in arch_aarch64::layout::EL2_INTIDS {
                arch_aarch64::layout::check_intid(what, expected, gic::intid(expected)?).map_err(Error::Unsupported)?;
            }
        }
        self.kernel_gic = true;
        self.gic = Some((*layout, size));
        Ok(Arc::new(WakingSpis::new(Arc::new(gic::Spis), Arc::clone(&self.power))))
    }

    fn create_vcpu(&self, index: u32) -> Result<RawLoop<HvfRaw>> {
        if self.el2 && !self.kernel_gic {
            return Err(Error::Unsupported("--nested needs the framework's GICv3, created before the vCPUs".into()));
        }
        let vcpu = ffi::Vcpu::create()?;
        let mut raw = HvfRaw::new(vcpu, Arc::clone(&self.vm), self.memory.clone())?;
        // The GICv3 routes by affinity, so MPIDR_EL1 must be set before the vCPU runs (and,
        // Apple's header says, before its redistributor's base is asked for).
        raw.set_reg(Reg::Sys(MPIDR_EL1), mpidr(index))?;
        if let Some((layout, size)) = &self.gic {
            let base = gic::redistributor_base(raw.vcpu.id())?;
            layout.check_redistributor(index, *size, base).map_err(Error::Unsupported)?;
            raw.kernel_gic = true;
        }
        let pstate = if self.el2 { PSTATE_EL2H_MASKED } else { PSTATE_EL1H_MASKED };
        raw.set_reg(Reg::Pstate, pstate)?;
        raw.hide_features(self.kernel_gic, self.el2);
        let vcpu = RawLoop::new(raw, index as usize, Arc::clone(&self.power)).with_clock(Arc::clone(&self.clock));
        let vcpu = if self.kernel_gic { vcpu.with_kernel_gic() } else { vcpu };
        Ok(if self.el2 { vcpu.with_el2() } else { vcpu })
    }

    fn clock(&self) -> Option<Arc<dyn GuestClock>> {
        Some(self.clock.clone())
    }
}

/// One vCPU's framework calls, made on its own thread.
pub struct HvfRaw {
    /// Dropped (destroyed) before the VM and the memory it runs on.
    vcpu: ffi::Vcpu,
    cancel: Arc<dyn Fn() + Send + Sync>,
    frequency: u64,
    /// Whether the framework's GIC serves it.
    kernel_gic: bool,
    /// The VM, which must outlive its vCPUs.
    _vm: Arc<ffi::VmOwner>,
    /// The guest RAM the VM has mapped: this vCPU can run the guest, so it keeps it.
    _memory: Mapped,
}

impl std::fmt::Debug for HvfRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvfRaw").field("vcpu", &self.vcpu.id()).finish_non_exhaustive()
    }
}

impl HvfRaw {
    fn new(vcpu: ffi::Vcpu, vm: Arc<ffi::VmOwner>, memory: Mapped) -> Result<Self> {
        let cancel = vcpu.canceller();
        Ok(HvfRaw { vcpu, cancel, frequency: ffi::counter_frequency()?, kernel_gic: false, _vm: vm, _memory: memory })
    }

    /// Gives the vCPU [`visible_features`]. A framework that will not take them (before
    /// macOS 15 the ID registers may be read-only) has no SME to hide either: logged.
    fn hide_features(&mut self, kernel_gic: bool, el2: bool) {
        let set = |raw: &mut Self| -> Result<()> {
            let (pfr0, pfr1) = (raw.reg(Reg::Sys(ID_AA64PFR0_EL1))?, raw.reg(Reg::Sys(ID_AA64PFR1_EL1))?);
            let (new0, new1) = visible_features(pfr0, pfr1, kernel_gic, el2);
            raw.set_reg(Reg::Sys(ID_AA64PFR0_EL1), new0)?;
            raw.set_reg(Reg::Sys(ID_AA64PFR1_EL1), new1)
        };
        if let Err(e) = set(self) {
            log::warn!("the vCPU's feature registers could not be adjusted ({e}); the framework's are used");
        }
    }
}

impl RawVcpu for HvfRaw {
    fn run(&mut self) -> Result<RawExit> {
        self.vcpu.run()
    }

    fn reg(&mut self, reg: Reg) -> Result<u64> {
        ffi::get(self.vcpu.id(), reg)
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        ffi::set(self.vcpu.id(), reg, value)
    }

    fn set_pending_irq(&mut self, pending: bool) -> Result<()> {
        ffi::set_pending_irq(self.vcpu.id(), pending)
    }

    fn set_vtimer_mask(&mut self, masked: bool) -> Result<()> {
        self.vcpu.set_vtimer_mask(masked)
    }

    fn set_vtimer_offset(&mut self, offset: u64) -> Result<()> {
        self.vcpu.set_vtimer_offset(offset)
    }

    fn virtual_counter(&mut self) -> Result<u64> {
        Ok(ffi::absolute_time().wrapping_sub(self.vcpu.vtimer_offset()?))
    }

    fn counter_frequency(&self) -> u64 {
        self.frequency
    }

    fn pending_interrupt(&mut self) -> Result<Option<bool>> {
        if !self.kernel_gic {
            return Ok(None);
        }
        Ok(match gic::sgi_or_ppi_pending(self.vcpu.id()) {
            Ok(pending) => Some(pending),
            Err(e) => {
                log::debug!("{e}");
                None
            }
        })
    }

    fn state_reg(&mut self, reg: StateReg) -> Result<Vec<u8>> {
        let id = self.vcpu.id();
        Ok(match reg {
            StateReg::General(r) => ffi::get_general(id, r)?.to_le_bytes().to_vec(),
            StateReg::Simd(q) => ffi::get_simd(id, q)?.to_vec(),
            StateReg::System(encoding) => ffi::get_system(id, encoding)?.to_le_bytes().to_vec(),
            StateReg::GicCpu(encoding) => gic::icc_reg(id, encoding)?.to_le_bytes().to_vec(),
            StateReg::VirtualCounter => return Err(Error::Unsupported("the virtual counter is the VM clock's".into())),
        })
    }

    fn set_state_reg(&mut self, reg: StateReg, value: &[u8]) -> Result<()> {
        let id = self.vcpu.id();
        let bad = || Error::Unsupported(format!("{reg:?}: {} bytes", value.len()));
        let word = || value.try_into().map(u64::from_le_bytes).map_err(|_| bad());
        match reg {
            StateReg::General(r) => ffi::set_general(id, r, word()?),
            StateReg::Simd(q) => ffi::set_simd(id, q, value.try_into().map_err(|_| bad())?),
            StateReg::System(encoding) => ffi::set_system(id, encoding, word()?),
            StateReg::GicCpu(encoding) => gic::set_icc_reg(id, encoding, word()?),
            StateReg::VirtualCounter => Err(Error::Unsupported("the virtual counter is the VM clock's".into())),
        }
    }

    fn canceller(&self) -> Arc<dyn Fn() + Send + Sync> {
        Arc::clone(&self.cancel)
    }
}
