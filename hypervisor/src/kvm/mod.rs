//! The KVM backend for arm64 Linux hosts, over `kvm-ioctls`.
//!
//! Interrupts come one of two ways:
//! - KVM's own GICv3 (`gic.rs`), when the host has one and the VMM asks for it: KVM
//!   delivers everything, the virtual timer included, and the VMM drives SPIs;
//! - otherwise the VMM emulates the GIC and drives each vCPU's IRQ input with
//!   `KVM_IRQ_LINE`, and KVM reports the virtual timer's level in `kvm_run` after every
//!   exit (`KVM_CAP_ARM_USER_IRQ`).
//!
//! PSCI is handled
//! by KVM itself (`KVM_ARM_VCPU_PSCI_0_2`), including CPU_ON for secondary vCPUs; it
//! reports SYSTEM_OFF and SYSTEM_RESET as `KVM_EXIT_SYSTEM_EVENT`.

mod gic;
mod kick;

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_enable_cap, kvm_mp_state, kvm_userspace_memory_region, kvm_vcpu_events, kvm_vcpu_init, RegList,
    KVM_ARM_VCPU_HAS_EL2, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_CAP_ARM_INJECT_EXT_DABT,
    KVM_CAP_ARM_NISV_TO_USER, KVM_EXIT_ARM_NISV, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, DeviceFd, IoEventAddress, Kvm as KvmFd, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm_regs::{cpu_irq_line, mp_state_of, one_reg_id, power_of, reg_width, SERROR_ESR_MASK};
use crate::mapped::Mapped;
use crate::state::{PendingSerror, RegValue, VcpuState, MAX_REGS, MAX_REG_BYTES};
use crate::{Error, GicV3Layout, GicV3Needs, GuestRam, Kicker, Reg, Result, SpiSink, SystemEvent, VcpuExit, VmConfig};

/// `KVM_CAP_ARM_EL2` (Linux 6.16): KVM can give a guest EL2. Not in kvm-bindings 0.14.
const KVM_CAP_ARM_EL2: u32 = 240;

fn platform(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Platform { call, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// The KVM hypervisor (`/dev/kvm`).
#[derive(Debug)]
pub struct Kvm {
    kvm: KvmFd,
}

impl Kvm {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self> {
        let kvm = KvmFd::new().map_err(|e| {
            Error::Unavailable(format!(
                "cannot open /dev/kvm ({}): run on an arm64 Linux host with KVM enabled and access to /dev/kvm",
                std::io::Error::from_raw_os_error(e.errno())
            ))
        })?;
        Ok(Kvm { kvm })
    }
}

impl crate::Hypervisor for Kvm {
    type Vm = KvmVm;

    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self, config: &VmConfig) -> Result<KvmVm> {
        // KVM's default IPA size on arm64 is 40 bits; ask for exactly what we need when
        // the kernel lets us choose, so a smaller host limit fails here, clearly.
        let max_ipa = self.kvm.get_host_ipa_limit();
        let vm = if max_ipa > 0 {
            if (max_ipa as u32) < config.ipa_bits {
                let most = arch_aarch64::layout::ram_limit(max_ipa as u32) >> 30;
                return Err(Error::Unsupported(format!(
                    "this host's KVM gives guests {max_ipa}-bit physical addresses and this much RAM needs {}: \
                     use --memory {most}G or less",
                    config.ipa_bits
                )));
            }
            self.kvm.create_vm_with_ipa_size(config.ipa_bits.max(32)).map_err(platform("KVM_CREATE_VM"))?
        } else {
            self.kvm.create_vm().map_err(platform("KVM_CREATE_VM"))?
        };
        if !vm.check_extension(Cap::ArmPsci02) {
            return Err(Error::Unsupported("KVM on this host lacks PSCI 0.2 (KVM_CAP_ARM_PSCI_0_2)".into()));
        }
        // KVM_CAP_ARM_USER_IRQ: KVM reports timer levels to userspace, which an emulated
        // GIC needs. kvm-ioctls' `Cap` has no variant for it, so ask with the raw number.
        let user_irq = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_ARM_USER_IRQ)) > 0;
        if config.nested && vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_ARM_EL2)) <= 0 {
            return Err(Error::Unsupported(
                "--nested: KVM on this host cannot give a guest EL2 (KVM_CAP_ARM_EL2: Linux 6.16 or later on a CPU \
                 with FEAT_NV2, booted with kvm-arm.mode=nested); run without --nested"
                    .into(),
            ));
        }
        report_unemulable_accesses(&vm)?;
        kick::install_handler().map_err(|source| Error::Platform { call: "sigaction", source })?;
        let mut target = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut target).map_err(platform("KVM_ARM_PREFERRED_TARGET"))?;
        let ioeventfd = vm.check_extension(Cap::Ioeventfd);
        Ok(KvmVm {
            vm: Arc::new(vm),
            target,
            memory: Mapped::default(),
            created: Mutex::new(Creation::default()),
            turn: Condvar::new(),
            vcpus: config.vcpus,
            user_irq,
            nested: config.nested,
            gic: None,
            ioeventfd,
        })
    }
}

/// Asks KVM to hand the VMM the MMIO accesses it cannot decode, so the guest can be given
/// the data abort hardware would give it.
///
/// A load/store pair or an access with writeback to an address no memslot backs comes
/// with no syndrome (ISV = 0). By default `KVM_RUN` then fails with ENOSYS, and the VMM
/// could only end the VM: a guest could stop itself with an error at will. With
/// `KVM_CAP_ARM_NISV_TO_USER` (Linux 5.5) KVM returns `KVM_EXIT_ARM_NISV` instead, and
/// with `KVM_CAP_ARM_INJECT_EXT_DABT` the VMM injects an external data abort (QEMU does
/// the same). Without them, such an access still ends the VM, with a warning now.
fn report_unemulable_accesses(vm: &VmFd) -> Result<()> {
    let has = |cap: u32| vm.check_extension_raw(libc::c_ulong::from(cap)) > 0;
    if !(has(KVM_CAP_ARM_NISV_TO_USER) && has(KVM_CAP_ARM_INJECT_EXT_DABT)) {
        log::warn!(
            "KVM on this host cannot hand undecodable MMIO accesses to hvrun (Linux 5.5+): a guest's load/store \
             pair on a device ends the VM instead of giving it a data abort"
        );
        return Ok(());
    }
    let cap = kvm_enable_cap { cap: KVM_CAP_ARM_NISV_TO_USER, ..Default::default() };
    vm.enable_cap(&cap).map_err(platform("KVM_ENABLE_CAP(KVM_CAP_ARM_NISV_TO_USER)"))
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    vm: Arc<VmFd>,
    target: kvm_vcpu_init,
    /// Keeps the mapped host memory alive as long as KVM may reach it (each vCPU holds it too).
    memory: Mapped,
    /// Which vCPU's turn it is to be created (see `create_vcpu` below): KVM's creation
    /// order must be the index order.
    created: Mutex<Creation>,
    /// Wakes the vCPU whose turn has come.
    turn: Condvar,
    /// How many vCPUs the VM will have.
    vcpus: u32,
    /// Whether KVM reports timer levels to userspace (needed without an in-kernel GIC).
    user_irq: bool,
    /// The guest has EL2 (`KVM_ARM_VCPU_HAS_EL2`): its vCPUs reset to EL2h.
    nested: bool,
    /// The in-kernel vGICv3, when the VMM created one.
    gic: Option<Arc<DeviceFd>>,
    /// KVM signals eventfds for guest writes (`KVM_CAP_IOEVENTFD`).
    ioeventfd: bool,
}

impl crate::Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn map_memory(&mut self, memory: &Arc<GuestRam>) -> Result<()> {
        let first_slot = self.memory.regions();
        // Kept before KVM knows of it, so a failure halfway leaves no slot pointing at
        // memory nobody keeps.
        self.memory.keep(memory);
        for (i, region) in memory.iter().enumerate() {
            let addr = region.start_addr().0;
            let size = region.len();
            let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|_| Error::Memory {
                addr,
                size,
                why: "region has no host mapping",
            })?;
            let slot =
                u32::try_from(first_slot + i).map_err(|_| Error::Memory { addr, size, why: "too many regions" })?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: addr,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: the region describes host memory owned by `memory`, which this VM and
            // each of its vCPUs keep alive (`Mapped`) for as long as any of them can make the
            // guest reach it; the slot is new, so no other mapping is replaced.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(platform("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    fn gicv3_needs(&self) -> Option<GicV3Needs> {
        gic::needs(&self.vm, self.vcpus)
    }

    fn write_notifier(&self, addr: u64, value: u32) -> Result<Option<OwnedFd>> {
        if !self.ioeventfd {
            return Ok(None);
        }
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Platform { call: "eventfd", source })?;
        // A u32 `datamatch`: KVM matches 4-byte writes of exactly that value.
        self.vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), value).map_err(platform("KVM_IOEVENTFD"))?;
        // SAFETY: `into_raw_fd` hands over the descriptor the EventFd owned; nothing else
        // owns or closes it.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) }))
    }

    fn create_gicv3(&mut self, layout: &GicV3Layout) -> Result<Arc<dyn SpiSink>> {
        if self.gic.is_some() {
            return Err(Error::Unsupported("the VM already has a GICv3".into()));
        }
        let gic = Arc::new(gic::create(&self.vm, layout)?);
        self.gic = Some(Arc::clone(&gic));
        Ok(Arc::new(gic::Spis::new(Arc::clone(&self.vm), gic, self.vcpus)))
    }

    /// Creates vCPU `index` once vCPUs `0..index` exist (waiting for their threads, at
    /// most [`TURN_WAIT`]), so that KVM's creation order is the index order. KVM needs
    /// that twice over:
    /// - `KVM_IRQ_LINE` names a vCPU by its position in the creation order
    ///   (`kvm_get_vcpu(kvm, vcpu_idx)` in arch/arm64/kvm/arm.c), not by the id given to
    ///   KVM_CREATE_VCPU. When vCPU 1's thread won the race, its interrupts went to vCPU
    ///   0 and vice versa (the "lost IPIs" and "IAR storms" of issue 3);
    /// - Linux 6.1's vGIC injects a vCPU's timer into `kvm_get_vcpu(kvm, vcpu->vcpu_id)`
    ///   (arch/arm64/kvm/arch_timer.c), again a lookup by position with the id: a vCPU
    ///   created out of turn got another's timer interrupts, or none (seen in the rig).
    fn create_vcpu(&self, index: u32) -> Result<KvmVcpu> {
        if self.gic.is_none() && self.nested {
            return Err(Error::Unsupported("--nested needs KVM's vGICv3, created before the vCPUs".into()));
        }
        if self.gic.is_none() && !self.user_irq {
            return Err(Error::Unsupported(
                "KVM on this host cannot report timer interrupts to userspace (KVM_CAP_ARM_USER_IRQ, Linux 4.15+), \
                 which hvrun's emulated GIC needs"
                    .into(),
            ));
        }
        let created = self.created.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut created, waited) = self
            .turn
            .wait_timeout_while(created, TURN_WAIT, |c| !c.failed && c.next != index)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if created.failed || waited.timed_out() {
            return Err(Error::Unsupported(format!("vCPU {index}: the vCPUs before it were not created")));
        }
        let made = self.make_vcpu(index, created.next + 1 == self.vcpus);
        // Whatever happened, the next vCPU's turn has come; after a failure, it fails too.
        created.next += 1;
        created.failed |= made.is_err();
        self.turn.notify_all();
        drop(created);
        let fd = made?;
        let irq_line =
            cpu_irq_line(index).ok_or_else(|| Error::Unsupported(format!("no IRQ line for vCPU {index}")))?;
        let kicker = Arc::new(kick::ThreadKicker::for_current_thread());
        let mut vcpu = KvmVcpu {
            fd,
            kicker,
            vm: Arc::clone(&self.vm),
            irq_line,
            abort_pending: false,
            entered: false,
            _memory: self.memory.clone(),
            _on_its_thread: std::marker::PhantomData,
        };
        kick::register(vcpu.fd.get_kvm_run());
        Ok(vcpu)
    }
}

/// Whether a guest's undecodable MMIO access has been reported (once per process).
static UNDECODABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long a vCPU waits for the ones before it to be created.
const TURN_WAIT: Duration = Duration::from_secs(30);

/// Where vCPU creation stands.
#[derive(Debug, Default)]
struct Creation {
    /// The index of the next vCPU to create.
    next: u32,
    /// A creation failed: the ones after it cannot keep the order, so they fail too.
    failed: bool,
}

impl KvmVm {
    /// Creates and initialises vCPU `index` in KVM, in its turn; the `last` one finishes
    /// the vGIC: every vCPU exists then and, since the VMM runs none before all are
    /// created, none has run.
    fn make_vcpu(&self, index: u32, last: bool) -> Result<VcpuFd> {
        let fd = self.vm.create_vcpu(u64::from(index)).map_err(platform("KVM_CREATE_VCPU"))?;
        let mut init = self.target;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if index > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        if self.nested {
            init.features[0] |= 1 << KVM_ARM_VCPU_HAS_EL2;
        }
        fd.vcpu_init(&init).map_err(platform("KVM_ARM_VCPU_INIT"))?;
        if let (Some(gic), true) = (&self.gic, last) {
            gic::init(gic)?;
        }
        Ok(fd)
    }
}

/// The most registers a `KVM_GET_REG_LIST` is asked for: kvm-bindings' `RegList` limit.
const REG_LIST_MAX: usize = 500;

/// A KVM vCPU. Lives on the thread that created it.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    kicker: Arc<kick::ThreadKicker>,
    vm: Arc<VmFd>,
    /// This vCPU's `KVM_IRQ_LINE` number.
    irq_line: u32,
    /// The guest made an MMIO access KVM could not decode (`KVM_EXIT_ARM_NISV`): it takes
    /// an external data abort when it next runs.
    abort_pending: bool,
    /// `KVM_RUN` has been called: an exit may be half done ([`KvmVcpu::complete_pending`]).
    entered: bool,
    /// The guest RAM this vCPU's VM has mapped: it can run the guest, so it keeps it.
    _memory: Mapped,
    /// Not `Send`: the kick signal's handler finds this vCPU's `kvm_run` through the
    /// creating thread's thread-local, and KVM expects `KVM_RUN` from one thread.
    _on_its_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kicker.disarm();
        kick::unregister();
    }
}

fn reg_id(reg: Reg) -> Result<u64> {
    one_reg_id(reg).ok_or_else(|| Error::Unsupported(format!("no KVM register id for {reg:?}")))
}

impl KvmVcpu {
    /// The ids of every register KVM gives this vCPU (`KVM_GET_REG_LIST`).
    fn reg_ids(&self) -> Result<Vec<u64>> {
        // kvm-bindings 0.14 caps a `RegList` at 500 entries (its `ARM64_REGS_MAX`), as
        // Firecracker's does; a vCPU with more (SVE with its Z and P registers, on a host
        // with long vectors) gets E2BIG from KVM, reported as such.
        let mut list = RegList::new(REG_LIST_MAX.min(MAX_REGS))
            .map_err(|e| Error::Unsupported(format!("a register list of {REG_LIST_MAX}: {e:?}")))?;
        self.fd.get_reg_list(&mut list).map_err(platform("KVM_GET_REG_LIST"))?;
        Ok(list.as_slice().to_vec())
    }
}

impl KvmVcpu {
    /// Finishes what the last exit left half done, without running a guest instruction:
    /// an MMIO load completes into its register only at the next `KVM_RUN` (KVM's API
    /// documentation: userspace re-enters with `immediate_exit` set before it saves a
    /// vCPU's state), and a data abort owed for an access KVM could not decode is taken.
    fn complete_pending(&mut self) -> Result<()> {
        // A vCPU that never ran has nothing half done, and its first KVM_RUN would
        // initialise it for running (fixing its ID registers) before a restore writes them.
        if !self.entered {
            return Ok(());
        }
        if self.abort_pending {
            let mut events = kvm_vcpu_events::default();
            events.exception.ext_dabt_pending = 1;
            self.fd.set_vcpu_events(&events).map_err(platform("KVM_SET_VCPU_EVENTS"))?;
            self.abort_pending = false;
        }
        self.fd.get_kvm_run().immediate_exit = 1;
        let result = match self.fd.run() {
            Ok(kvm_ioctls::VcpuExit::Intr) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(platform("KVM_RUN")(e)),
            Ok(other) => Err(Error::Unsupported(format!("KVM ran the guest to {other:?} while completing an exit"))),
        };
        self.fd.get_kvm_run().immediate_exit = 0;
        result
    }
}

impl crate::IrqInput for KvmVcpu {
    fn vtimer_asserted(&mut self) -> bool {
        // SAFETY: with KVM_CAP_ARM_USER_IRQ, KVM keeps `s.regs` (kvm_sync_regs, one u64
        // on arm64) valid in every kvm_run; reading a u64 from the union is always defined.
        let level = unsafe { self.fd.get_kvm_run().s.regs.device_irq_level };
        level & u64::from(kvm_bindings::KVM_ARM_DEV_EL1_VTIMER) != 0
    }

    fn set_irq_line(&mut self, level: bool) -> Result<()> {
        self.vm.set_irq_line(self.irq_line, level).map_err(platform("KVM_IRQ_LINE"))
    }
}

impl crate::Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // A kick that landed since the last run: consume it here, so the caller gets to
        // look at its flags before the guest runs again.
        if kick::take_pending(self.fd.get_kvm_run()) {
            return Ok(VcpuExit::Interrupted);
        }
        if self.abort_pending {
            let mut events = kvm_vcpu_events::default();
            events.exception.ext_dabt_pending = 1;
            self.fd.set_vcpu_events(&events).map_err(platform("KVM_SET_VCPU_EVENTS"))?;
            self.abort_pending = false;
        }
        self.entered = true;
        match self.fd.run() {
            Ok(kvm_ioctls::VcpuExit::MmioRead(addr, data)) => Ok(VcpuExit::MmioRead { addr, data }),
            Ok(kvm_ioctls::VcpuExit::MmioWrite(addr, data)) => Ok(VcpuExit::MmioWrite { addr, data }),
            Ok(kvm_ioctls::VcpuExit::SystemEvent(kind, _)) => Ok(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::System(SystemEvent::Shutdown),
                KVM_SYSTEM_EVENT_RESET => VcpuExit::System(SystemEvent::Reset),
                KVM_SYSTEM_EVENT_CRASH => VcpuExit::System(SystemEvent::Crash),
                other => VcpuExit::Unhandled(format!("KVM_EXIT_SYSTEM_EVENT type {other}")),
            }),
            Ok(kvm_ioctls::VcpuExit::Intr) => Ok(VcpuExit::Interrupted),
            Ok(kvm_ioctls::VcpuExit::Unsupported(KVM_EXIT_ARM_NISV)) => {
                // (Set here, carried out at the next entry: `self.fd` is still borrowed.)
                self.abort_pending = true;
                crate::raw::warn_once(
                    &UNDECODABLE,
                    format_args!("an MMIO access KVM cannot decode (a load/store pair?); the guest gets a data abort"),
                );
                Ok(VcpuExit::Interrupted)
            }
            Ok(other) => Ok(VcpuExit::Unhandled(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Interrupted),
            Err(e) => Err(platform("KVM_RUN")(e)),
        }
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        self.fd.set_one_reg(reg_id(reg)?, &value.to_le_bytes()).map_err(platform("KVM_SET_ONE_REG"))?;
        Ok(())
    }

    fn get_reg(&mut self, reg: Reg) -> Result<u64> {
        let mut bytes = [0u8; 8];
        self.fd.get_one_reg(reg_id(reg)?, &mut bytes).map_err(platform("KVM_GET_ONE_REG"))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Every register KVM lists for this vCPU (`KVM_GET_REG_LIST`: core, FP/SIMD, system
    /// registers with the timer's, the firmware's pseudo-registers, the cache geometry),
    /// so nothing a new kernel or CPU adds is forgotten; then the power state and a
    /// pending SError. The timer's `KVM_REG_ARM_TIMER_CNT` is among them: written back,
    /// it sets the VM's counter offset, so the guest's counter goes on from the value
    /// saved, without the time the VM spent saved.
    fn save_state(&mut self) -> Result<VcpuState> {
        self.complete_pending()?;
        let ids = self.reg_ids()?;
        let mut regs = Vec::with_capacity(ids.len());
        let mut bytes = [0u8; MAX_REG_BYTES];
        for id in ids {
            let width = reg_width(id).filter(|&w| w <= MAX_REG_BYTES).ok_or_else(|| {
                Error::Unsupported(format!("KVM lists register {id:#x}, whose size hvrun cannot save"))
            })?;
            self.fd.get_one_reg(id, &mut bytes[..width]).map_err(platform("KVM_GET_ONE_REG"))?;
            regs.push(RegValue { id, value: bytes[..width].to_vec() });
        }
        let mp = self.fd.get_mp_state().map_err(platform("KVM_GET_MP_STATE"))?;
        let power = power_of(mp.mp_state)
            .ok_or_else(|| Error::Unsupported(format!("KVM reports power state {}, unknown to hvrun", mp.mp_state)))?;
        let events = self.fd.get_vcpu_events().map_err(platform("KVM_GET_VCPU_EVENTS"))?;
        let serror = (events.exception.serror_pending != 0).then(|| PendingSerror {
            esr: (events.exception.serror_has_esr != 0).then_some(events.exception.serror_esr),
        });
        Ok(VcpuState { regs, power, serror })
    }

    /// Checked whole before the first write: the saved registers must be exactly the
    /// ones this vCPU has (a snapshot from another kernel or CPU lists others), and a
    /// pending SError's syndrome must fit its ISS.
    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        state.check(reg_width).map_err(|e| Error::Unsupported(e.to_string()))?;
        let ours: std::collections::HashSet<u64> = self.reg_ids()?.into_iter().collect();
        if let Some(reg) = state.regs.iter().find(|r| !ours.contains(&r.id)) {
            return Err(Error::Unsupported(format!(
                "the snapshot has register {:#x}, which this host's KVM does not give a vCPU (taken on another kernel or CPU?)",
                reg.id
            )));
        }
        if state.regs.len() != ours.len() {
            return Err(Error::Unsupported(format!(
                "the snapshot saved {} of the {} registers this host's KVM gives a vCPU (taken on another kernel or CPU?)",
                state.regs.len(),
                ours.len()
            )));
        }
        if state.serror.and_then(|s| s.esr).is_some_and(|esr| esr & !SERROR_ESR_MASK != 0) {
            return Err(Error::Unsupported("the snapshot's pending SError has a syndrome past its ISS".into()));
        }
        for reg in &state.regs {
            self.fd.set_one_reg(reg.id, &reg.value).map_err(|e| Error::Platform {
                call: "KVM_SET_ONE_REG",
                source: std::io::Error::other(format!(
                    "register {:#x}: {} (a snapshot from a different CPU or kernel?)",
                    reg.id,
                    std::io::Error::from_raw_os_error(e.errno())
                )),
            })?;
        }
        let mut events = kvm_vcpu_events::default();
        if let Some(serror) = state.serror {
            events.exception.serror_pending = 1;
            if let Some(esr) = serror.esr {
                events.exception.serror_has_esr = 1;
                events.exception.serror_esr = esr;
            }
        }
        self.fd.set_vcpu_events(&events).map_err(platform("KVM_SET_VCPU_EVENTS"))?;
        let mp = kvm_mp_state { mp_state: mp_state_of(state.power) };
        self.fd.set_mp_state(mp).map_err(platform("KVM_SET_MP_STATE"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12, hole 7: `KvmVcpu` was `Send`, so safe code could move a vCPU off the
    /// thread whose signal handler and thread-local kick it. (Whether a type is `Send`,
    /// asked of a concrete type: the inherent method exists only when it is.)
    #[test]
    fn a_vcpu_cannot_leave_its_thread() {
        struct Probe<T>(std::marker::PhantomData<T>);
        trait NotSend {
            fn is_send(&self) -> bool {
                false
            }
        }
        impl<T> NotSend for Probe<T> {}
        impl<T: Send> Probe<T> {
            #[allow(dead_code)]
            fn is_send(&self) -> bool {
                true
            }
        }
        assert!(!Probe::<KvmVcpu>(std::marker::PhantomData).is_send());
        assert!(Probe::<KvmVm>(std::marker::PhantomData).is_send(), "the probe tells them apart");
    }
}
