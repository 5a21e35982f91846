//! The hypervisor abstraction: [`Hypervisor`] → [`Vm`] → [`Vcpu`], and [`VcpuExit`].
//!
//! This crate turns a platform's virtualization API into the few operations the VMM
//! needs: create a VM, map guest memory, create vCPUs on the calling thread, set and
//! get registers, run a vCPU until it exits, and say why it exited. It never names a
//! device: an MMIO exit is an address and a buffer, and what lives there is the VMM's
//! business.
//!
//! Backends:
//! - `kvm` on arm64 Linux (`kvm-ioctls`), compiled only there;
//! - `hvf` on Apple Silicon macOS (`applevisor`), compiled only there.
//!
//! Register-id arithmetic that a backend needs but that is plain Rust lives in portable
//! modules ([`kvm_regs`]) so it is unit-tested on any host; so does [`exits`], what to do
//! with a raw exception (the HVF backend's exit decisions).

use std::sync::Arc;

pub use arch_aarch64::layout::{GicV3Layout, GicV3Needs};
pub use arch_aarch64::sysreg::SysReg;
pub use guest_memory::{GuestMemoryMmap, GuestRam};

pub mod exits;
pub mod gicv3_state;
pub mod hvf_regs;
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub mod kvm;
pub mod kvm_regs;
pub mod mapped;
pub mod raw;
pub mod state;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub mod hvf;

/// Errors from a hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host has no usable hypervisor of this kind.
    #[error("{0}")]
    Unavailable(String),
    /// A request the backend cannot honour (an IPA size too large, say).
    #[error("{0}")]
    Unsupported(String),
    /// A call into the platform's API failed.
    #[error("{call} failed: {source}")]
    Platform {
        /// The operation that failed (an ioctl or framework call).
        call: &'static str,
        /// The OS error it returned.
        source: std::io::Error,
    },
    /// A guest memory region the backend cannot map.
    #[error("guest memory region at {addr:#x} (+{size:#x}) cannot be mapped: {why}")]
    Memory {
        /// Guest-physical address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
        /// Why it cannot be mapped.
        why: &'static str,
    },
}

impl From<guest_memory::Error> for Error {
    fn from(e: guest_memory::Error) -> Self {
        Error::Memory { addr: e.addr, size: e.size, why: e.why }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What a VM is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest-physical address bits the VM needs (its RAM and MMIO lie below `1 << ipa_bits`).
    pub ipa_bits: u32,
    /// How many vCPUs it will have (backends that implement PSCI themselves track them).
    pub vcpus: u32,
    /// Give the guest EL2 (nested virtualization): its vCPUs start at EL2h. A host that
    /// cannot is an [`Error::Unsupported`] from [`Hypervisor::create_vm`]. A guest
    /// hypervisor needs the GIC's virtualization interface, so the VMM must also create
    /// the hypervisor's GICv3 ([`Vm::create_gicv3`]).
    pub nested: bool,
}

/// A host virtualization facility that creates VMs.
pub trait Hypervisor {
    /// The VM type this hypervisor creates.
    type Vm: Vm;

    /// A short name for logs and errors (`"kvm"`, `"hvf"`).
    fn name(&self) -> &'static str;

    /// Creates a VM.
    fn create_vm(&self, config: &VmConfig) -> Result<Self::Vm>;
}

/// Drives the shared peripheral interrupts of a hypervisor's own GIC, from any thread.
pub trait SpiSink: Send + Sync + std::fmt::Debug {
    /// Sets the level of SPI `intid` (an absolute INTID, 32 and up).
    fn set_spi(&self, intid: u32, level: bool) -> Result<()>;
    /// Whether [`SpiSink::edge_trigger`] gives triggers on this hypervisor (KVM with
    /// irqfd). Asked before the device tree is written: SPIs raised through triggers
    /// must be described as edge-triggered there.
    fn has_edge_triggers(&self) -> bool {
        false
    }
    /// A trigger that raises SPI `intid` as a rising edge from any thread, straight into
    /// the hypervisor's GIC: KVM's irqfd, an eventfd the kernel watches and injects from,
    /// with no ioctl and no lock of the VMM's. For SPIs the guest has configured
    /// edge-triggered.
    fn edge_trigger(&self, intid: u32) -> Result<Box<dyn EdgeTrigger>> {
        Err(Error::Unsupported(format!("SPI {intid}: this hypervisor has no edge triggers")))
    }
    /// The state of the hypervisor's GIC (distributor, redistributors, CPU interfaces,
    /// SPI levels), for a snapshot. Called once every vCPU exists and none runs (the VM
    /// paused).
    fn save_gic(&self) -> Result<gicv3_state::HypervisorGicState> {
        Err(Error::Unsupported("this hypervisor's GIC cannot be saved for a snapshot".into()))
    }
    /// Puts back a state [`SpiSink::save_gic`] gave, once every vCPU exists with its
    /// registers restored (MPIDR_EL1 included) and before any runs. The state is checked
    /// against this GIC first; nothing is written when it does not fit.
    fn restore_gic(&self, saved: &gicv3_state::HypervisorGicState) -> Result<()> {
        let _ = saved;
        Err(Error::Unsupported("this hypervisor's GIC cannot be restored from a snapshot".into()))
    }
}

/// Raises one SPI as an edge ([`SpiSink::edge_trigger`]).
pub trait EdgeTrigger: Send + Sync + std::fmt::Debug {
    /// One rising edge: the SPI becomes pending.
    fn trigger(&self) -> Result<()>;
}

/// The guest's sense of time across a pause: while the VM is paused its virtual counter
/// stands still, so the guest sees no jump when it runs again.
pub trait GuestClock: Send + Sync {
    /// Every vCPU is out of the guest for a pause: the counter stops.
    fn stop(&self);
    /// The vCPUs are about to run again: the counter goes on from where it stopped.
    fn start(&self);
}

/// A virtual machine: guest memory and vCPUs.
pub trait Vm: Send + Sync {
    /// The vCPU type of this VM. Every backend can also run its vCPUs under the VMM's own
    /// interrupt controller, hence [`IrqInput`].
    type Vcpu: Vcpu + IrqInput;

    /// What this VM's hypervisor-provided GICv3 needs from the memory map, or `None`
    /// when the host has none (KVM without vGICv3, macOS before 15). Asked before any
    /// vCPU exists.
    fn gicv3_needs(&self) -> Option<GicV3Needs> {
        None
    }

    /// Creates the hypervisor's GICv3 at `layout`, before any vCPU. From then on the
    /// hypervisor delivers interrupts, the virtual timer's included: the VMM raises
    /// SPIs through the returned sink and never uses its vCPUs' [`IrqInput`].
    fn create_gicv3(&mut self, layout: &GicV3Layout) -> Result<std::sync::Arc<dyn SpiSink>> {
        let _ = layout;
        Err(Error::Unsupported("this hypervisor has no GICv3 of its own".into()))
    }

    /// Maps every region of `memory` into the guest's physical address space. The VM
    /// keeps a reference, so the host mapping lives at least as long as the VM.
    fn map_memory(&mut self, memory: &Arc<GuestRam>) -> Result<()>;

    /// Creates vCPU `index` on the calling thread. vCPU 0 starts runnable; the others
    /// start powered off, waiting for PSCI CPU_ON.
    fn create_vcpu(&self, index: u32) -> Result<Self::Vcpu>;

    /// A file descriptor the hypervisor makes readable, instead of exiting to the VMM,
    /// whenever the guest writes the 4-byte value `value` at guest-physical `addr`
    /// (KVM's ioeventfd: the vCPU goes on running). Reading it (8 bytes, non-blocking)
    /// takes the writes that came since the last read. `None` where the hypervisor has no
    /// such thing (Hypervisor.framework): such writes stay MMIO exits. The registration
    /// lasts as long as the VM.
    fn write_notifier(&self, addr: u64, value: u32) -> Result<Option<std::os::fd::OwnedFd>> {
        let _ = (addr, value);
        Ok(None)
    }

    /// The guest's clock, where the VMM stops it during a pause; `None` where the
    /// hypervisor does not let it (KVM before Linux 6.4's counter offset: the guest's
    /// counter runs on while paused).
    fn clock(&self) -> Option<Arc<dyn GuestClock>> {
        None
    }
}

/// Makes a vCPU's [`Vcpu::run`] return [`VcpuExit::Interrupted`] soon, from any thread.
///
/// A kick that arrives while the vCPU is outside `run` is not lost: the next `run`
/// returns `Interrupted` at once. Callers set their own flag before kicking and check it
/// when `run` returns.
pub trait Kicker: Send + Sync {
    /// Kicks the vCPU. Does nothing once the vCPU is gone.
    fn kick(&self);
}

/// A general-purpose or system register of an arm64 vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// X0..X30.
    X(u8),
    /// SP_EL0 as the guest's `sp` at EL0 (KVM's `regs.sp`).
    Sp,
    /// The program counter.
    Pc,
    /// PSTATE (CPSR).
    Pstate,
    /// A system register.
    Sys(SysReg),
}

/// What the guest asked of the whole system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// PSCI SYSTEM_OFF.
    Shutdown,
    /// PSCI SYSTEM_RESET.
    Reset,
    /// The guest reported a crash (KVM's `KVM_SYSTEM_EVENT_CRASH`).
    Crash,
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuExit<'a> {
    /// The guest read `data.len()` bytes at guest-physical `addr`, which no memory
    /// backs. Fill `data` before the next [`Vcpu::run`]: the backend completes the
    /// guest's load with it then.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// The value to return, little-endian.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` at guest-physical `addr`, which no memory backs.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The value written, little-endian.
        data: &'a [u8],
    },
    /// The guest asked the system to power off, reset, or reported a crash.
    System(SystemEvent),
    /// `run` was interrupted (a kick from another thread, or a signal) before or while
    /// the guest ran; nothing for the VMM to emulate.
    Interrupted,
    /// An exit the backend does not handle, with the platform's reason for logs.
    Unhandled(String),
}

/// A vCPU's interrupt wiring for a VMM that emulates the interrupt controller itself:
/// the timer's output and the CPU's IRQ input. Backends whose vCPUs can run without the
/// hypervisor's GIC implement it; with the hypervisor's GIC ([`Vm::create_gicv3`]) it is
/// never used, which is why it is not part of [`Vcpu`].
pub trait IrqInput {
    /// Whether the guest's EL1 virtual timer is asserting its interrupt, as of the last
    /// exit. The VMM feeds this into its interrupt controller as the timer's PPI.
    fn vtimer_asserted(&mut self) -> bool;
    /// Drives this vCPU's IRQ input (the output of the VMM's interrupt controller) for
    /// the following runs. Called on the vCPU's own thread, between runs: other threads
    /// record the level and kick the vCPU instead. (On KVM, `KVM_IRQ_LINE` from another
    /// thread races with the vCPU's own non-atomic updates of HCR_EL2 in `vcpu_load`
    /// on Linux 6.1 and can be lost; on HVF a pending interrupt belongs to the vCPU's
    /// thread by design.)
    fn set_irq_line(&mut self, level: bool) -> Result<()>;
}

/// A virtual CPU. Belongs to the thread that created it.
pub trait Vcpu {
    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// A handle that kicks this vCPU out of `run` from another thread.
    fn kicker(&self) -> std::sync::Arc<dyn Kicker>;
    /// Writes a register.
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()>;
    /// Reads a register.
    fn get_reg(&mut self, reg: Reg) -> Result<u64>;
    /// The last exits this backend saw, oldest first, one line each (what a bug report
    /// needs: the syndrome, the addresses, the PC). Empty where the hypervisor decodes
    /// exits itself (KVM).
    fn recent_exits(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Everything the guest can observe of this vCPU, for a snapshot. Called on the
    /// vCPU's own thread while it is out of [`Vcpu::run`] (the VM paused).
    fn save_state(&mut self) -> Result<state::VcpuState> {
        Err(Error::Unsupported("this hypervisor backend cannot save a vCPU's state".into()))
    }
    /// Puts back a state [`Vcpu::save_state`] gave, on a vCPU created for it and not yet
    /// run. The state is checked first; nothing is written when it does not fit.
    fn restore_state(&mut self, state: &state::VcpuState) -> Result<()> {
        let _ = state;
        Err(Error::Unsupported("this hypervisor backend cannot restore a vCPU's state".into()))
    }
}
