//! Framework calls declared here rather than taken from `applevisor-sys` 1.0.0, whose
//! declarations of these get an enum wrong (`hv_interrupt_type_t` has FIQ = 0; Apple's
//! header has IRQ = 0) or only accept the registers their enums list, and the vCPU itself
//! ([`Vcpu`]): applevisor 1.0.0's `Vcpu::get_exit_info` reads `hv_exit_reason_t` as a
//! Rust enum, which is undefined behaviour the day Apple adds a reason, so hvrun creates
//! its vCPUs with the framework's own calls and reads the exit record as plain integers.
//! The framework itself is linked by `applevisor-sys`.

use std::sync::{Arc, Mutex, PoisonError};

use crate::hvf_regs::{place, Place};
use crate::raw::RawExit;
use crate::{Error, Reg, Result};

/// `hv_interrupt_type_t`'s IRQ.
const HV_INTERRUPT_TYPE_IRQ: u32 = 0;

#[repr(C)]
#[derive(Default)]
struct TimebaseInfo {
    numer: u32,
    denom: u32,
}

unsafe extern "C" {
    fn hv_vcpu_get_reg(vcpu: u64, reg: u32, value: *mut u64) -> i32;
    fn hv_vcpu_set_reg(vcpu: u64, reg: u32, value: u64) -> i32;
    fn hv_vcpu_get_sys_reg(vcpu: u64, reg: u16, value: *mut u64) -> i32;
    fn hv_vcpu_set_sys_reg(vcpu: u64, reg: u16, value: u64) -> i32;
    fn hv_vcpu_set_pending_interrupt(vcpu: u64, kind: u32, pending: bool) -> i32;
    fn hv_vcpu_get_simd_fp_reg(vcpu: u64, reg: u32, value: *mut [u8; 16]) -> i32;
    // `hv_return_t hv_vcpu_set_simd_fp_reg(hv_vcpu_t, hv_simd_fp_reg_t,
    // hv_simd_fp_uchar16_t)`: called only from `set_simd`'s assembly, which passes the
    // 16-byte vector in q0 as the AAPCS64 does. (applevisor-sys 1.0.0 declares the value
    // as a `u128`, which Rust passes in two general registers, and stable Rust cannot
    // pass a SIMD type through FFI.)
    fn hv_vcpu_set_simd_fp_reg();
    fn mach_absolute_time() -> u64;
    fn mach_timebase_info(info: *mut TimebaseInfo) -> i32;
}

fn status(call: &'static str, status: i32) -> Result<()> {
    super::check(call, status)
}

/// `hv_vcpu_exit_t` as Apple's header lays it out (`hv_exit_reason_t`, a 32-bit enum, then
/// `hv_vcpu_exit_exception_t`'s three 64-bit fields), with the reason as the number it is.
#[repr(C)]
struct ExitInfo {
    reason: u32,
    syndrome: u64,
    virtual_address: u64,
    physical_address: u64,
}

// The header's layout: a 4-byte reason, padding, then the exception's three u64s.
const _: () = assert!(std::mem::size_of::<ExitInfo>() == 32);
const _: () = assert!(std::mem::offset_of!(ExitInfo, syndrome) == 8);
const _: () = assert!(std::mem::offset_of!(ExitInfo, physical_address) == 24);

/// The process's VM (the framework has one per process), destroyed when the last handle
/// goes: the `HvfVm` and each of its vCPUs hold one. Created with the framework's own
/// calls rather than applevisor's, whose configuration cannot be given EL2 without
/// linking macOS 15 symbols (see [`super::el2`]).
#[derive(Debug)]
pub struct VmOwner(());

impl VmOwner {
    /// Creates the VM with `ipa_bits`-bit guest-physical addresses, and EL2 if `el2`.
    pub fn create(ipa_bits: u32, el2: bool) -> Result<Arc<Self>> {
        // SAFETY: no arguments; the framework returns a new configuration object or null.
        let config = unsafe { applevisor_sys::hv_vm_config_create() };
        if config.is_null() {
            return Err(Error::Platform { call: "hv_vm_config_create", source: std::io::Error::other("no object") });
        }
        let created = (|| {
            // SAFETY: `config` is the live configuration object created above.
            status("hv_vm_config_set_ipa_size", unsafe {
                applevisor_sys::hv_vm_config_set_ipa_size(config, ipa_bits)
            })?;
            if el2 {
                super::el2::enable(config)?;
            }
            // SAFETY: as above; the framework copies what it needs from the configuration.
            status("hv_vm_create", unsafe { applevisor_sys::hv_vm_create(config) })
        })();
        // SAFETY: the configuration was created above, and nothing uses it after this.
        unsafe { applevisor_sys::os_release(config) };
        created.map(|()| Arc::new(VmOwner(())))
    }
}

impl Drop for VmOwner {
    fn drop(&mut self) {
        // SAFETY: the VM exists (created by `create`); the last handle, and with it every
        // vCPU, is gone, so nothing runs on it.
        let rc = unsafe { applevisor_sys::hv_vm_destroy() };
        if rc != 0 {
            log::warn!("hv_vm_destroy failed: status {rc:#x}");
        }
    }
}

/// A vCPU of the process's VM, on the thread that created it (the type is neither `Send`
/// nor `Sync`: the framework ties a vCPU to its thread). Destroyed when dropped.
pub struct Vcpu {
    id: u64,
    /// The framework's exit record for this vCPU, valid until `hv_vcpu_destroy`.
    exit: *const ExitInfo,
    /// Whether the vCPU still exists, for cancellers on other threads: a destroyed id may
    /// be reused by the framework, so nobody may ask it to exit after the destroy.
    alive: Arc<Mutex<bool>>,
}

impl Vcpu {
    /// Creates a vCPU with the default configuration on the calling thread.
    pub fn create() -> Result<Self> {
        let (mut id, mut exit) = (0u64, std::ptr::null::<ExitInfo>());
        // SAFETY: both out-pointers are valid to write; `ExitInfo` has the layout of the
        // `hv_vcpu_exit_t` the framework points `exit` at; a null configuration is the
        // default one.
        let rc = unsafe {
            applevisor_sys::hv_vcpu_create(
                &mut id,
                (&raw mut exit).cast::<*const applevisor_sys::hv_vcpu_exit_t>(),
                std::ptr::null_mut(),
            )
        };
        status("hv_vcpu_create", rc)?;
        if exit.is_null() {
            return Err(Error::Platform { call: "hv_vcpu_create", source: std::io::Error::other("no exit record") });
        }
        Ok(Vcpu { id, exit, alive: Arc::new(Mutex::new(true)) })
    }

    /// The framework's id of this vCPU.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs the guest until an exit, and says which.
    pub fn run(&mut self) -> Result<RawExit> {
        // SAFETY: a vCPU of this thread, alive until `self` drops.
        status("hv_vcpu_run", unsafe { applevisor_sys::hv_vcpu_run(self.id) })?;
        // SAFETY: the framework filled the exit record this vCPU owns before `hv_vcpu_run`
        // returned; every field is read as a plain integer, so any reason is a valid value.
        let exit = unsafe { std::ptr::read(self.exit) };
        Ok(RawExit::from_framework(exit.reason, exit.syndrome, exit.virtual_address, exit.physical_address))
    }

    /// A function that makes a running [`Vcpu::run`] return (as `Canceled`), from any
    /// thread; after the vCPU is destroyed it does nothing.
    pub fn canceller(&self) -> Arc<dyn Fn() + Send + Sync> {
        let (id, alive) = (self.id, Arc::clone(&self.alive));
        Arc::new(move || {
            let alive = alive.lock().unwrap_or_else(PoisonError::into_inner);
            if *alive {
                // SAFETY: one valid id, alive while the lock is held (`drop` takes it).
                let rc = unsafe { applevisor_sys::hv_vcpus_exit(&id, 1) };
                if rc != 0 {
                    log::debug!("hv_vcpus_exit: status {rc:#x}");
                }
            }
        })
    }

    /// Masks or unmasks the virtual timer's exits.
    pub fn set_vtimer_mask(&mut self, masked: bool) -> Result<()> {
        // SAFETY: plain values, a vCPU of this thread.
        status("hv_vcpu_set_vtimer_mask", unsafe { applevisor_sys::hv_vcpu_set_vtimer_mask(self.id, masked) })
    }

    /// The offset between the host's absolute time and the guest's virtual counter.
    pub fn vtimer_offset(&mut self) -> Result<u64> {
        let mut offset = 0u64;
        // SAFETY: `offset` is a valid u64 to write; a vCPU of this thread.
        status("hv_vcpu_get_vtimer_offset", unsafe {
            applevisor_sys::hv_vcpu_get_vtimer_offset(self.id, &mut offset)
        })?;
        Ok(offset)
    }

    /// Sets that offset.
    pub fn set_vtimer_offset(&mut self, offset: u64) -> Result<()> {
        // SAFETY: plain values, a vCPU of this thread.
        status("hv_vcpu_set_vtimer_offset", unsafe { applevisor_sys::hv_vcpu_set_vtimer_offset(self.id, offset) })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        let mut alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        *alive = false;
        // SAFETY: a vCPU of this thread, destroyed once; no canceller can use its id now.
        let rc = unsafe { applevisor_sys::hv_vcpu_destroy(self.id) };
        if rc != 0 {
            log::warn!("hv_vcpu_destroy: status {rc:#x}");
        }
    }
}

/// Reads a register of `vcpu`, on its thread.
pub fn get(vcpu: u64, reg: Reg) -> Result<u64> {
    match place(reg) {
        Place::General(id) => get_general(vcpu, id),
        Place::System(id) => get_system(vcpu, id),
        Place::Zero => Ok(0),
    }
}

/// Writes a register of `vcpu`, on its thread.
pub fn set(vcpu: u64, reg: Reg, value: u64) -> Result<()> {
    match place(reg) {
        Place::General(id) => set_general(vcpu, id, value),
        Place::System(id) => set_system(vcpu, id, value),
        Place::Zero => Ok(()),
    }
}

/// Reads general register `id` (`hv_reg_t`) of `vcpu`.
pub fn get_general(vcpu: u64, id: u32) -> Result<u64> {
    let mut value = 0u64;
    // SAFETY: `value` is a valid u64 to write; the framework checks the vCPU and the
    // register id and reports a bad one as an error status.
    status("hv_vcpu_get_reg", unsafe { hv_vcpu_get_reg(vcpu, id, &mut value) })?;
    Ok(value)
}

/// Writes general register `id` (`hv_reg_t`) of `vcpu`.
pub fn set_general(vcpu: u64, id: u32, value: u64) -> Result<()> {
    // SAFETY: plain values; the framework validates the vCPU and register id.
    status("hv_vcpu_set_reg", unsafe { hv_vcpu_set_reg(vcpu, id, value) })
}

/// Reads the system register whose encoding is `id` (`hv_sys_reg_t`) of `vcpu`.
pub fn get_system(vcpu: u64, id: u16) -> Result<u64> {
    let mut value = 0u64;
    // SAFETY: as in `get_general`, for a system register encoding.
    status("hv_vcpu_get_sys_reg", unsafe { hv_vcpu_get_sys_reg(vcpu, id, &mut value) })?;
    Ok(value)
}

/// Writes the system register whose encoding is `id` (`hv_sys_reg_t`) of `vcpu`.
pub fn set_system(vcpu: u64, id: u16, value: u64) -> Result<()> {
    // SAFETY: plain values; the framework validates the vCPU and register id.
    status("hv_vcpu_set_sys_reg", unsafe { hv_vcpu_set_sys_reg(vcpu, id, value) })
}

/// Reads SIMD/FP register Q`q` of `vcpu`, as its 16 bytes in memory order.
pub fn get_simd(vcpu: u64, q: u8) -> Result<[u8; 16]> {
    let mut value = Simd([0; 16]);
    // SAFETY: `value` is 16 writable bytes aligned as `hv_simd_fp_uchar16_t` (16); the
    // framework checks the vCPU and register id.
    status("hv_vcpu_get_simd_fp_reg", unsafe { hv_vcpu_get_simd_fp_reg(vcpu, u32::from(q), &mut value.0) })?;
    Ok(value.0)
}

/// 16 bytes aligned as a 128-bit vector.
#[repr(C, align(16))]
struct Simd([u8; 16]);

/// Writes SIMD/FP register Q`q` of `vcpu` from its 16 bytes in memory order.
pub fn set_simd(vcpu: u64, q: u8, bytes: [u8; 16]) -> Result<()> {
    let value = Simd(bytes);
    let rc: u64;
    // SAFETY: a call to `hv_vcpu_set_simd_fp_reg` as the AAPCS64 makes it: the vCPU in x0,
    // the register id in w1, the vector in q0 (loaded from `value`, 16 readable bytes), the
    // status back in w0; `clobber_abi("C")` tells the compiler every register the callee
    // may change (x30 among them), and the stack is aligned for a call on entry to an
    // `asm!` block. The framework checks the vCPU and register id.
    unsafe {
        std::arch::asm!(
            "ldr q0, [{value}]",
            "bl {set}",
            value = in(reg) value.0.as_ptr(),
            set = sym hv_vcpu_set_simd_fp_reg,
            inlateout("x0") vcpu => rc,
            in("x1") u64::from(q),
            clobber_abi("C"),
        );
    }
    status("hv_vcpu_set_simd_fp_reg", rc as u32 as i32)
}

/// Sets or clears the vCPU's pending IRQ for its next run.
pub fn set_pending_irq(vcpu: u64, pending: bool) -> Result<()> {
    // SAFETY: plain values; IRQ is 0 in Apple's hv_interrupt_type_t.
    status("hv_vcpu_set_pending_interrupt", unsafe {
        hv_vcpu_set_pending_interrupt(vcpu, HV_INTERRUPT_TYPE_IRQ, pending)
    })
}

/// The host's absolute time, the counter the guest's virtual counter is offset from.
pub fn absolute_time() -> u64 {
    // SAFETY: no arguments, no preconditions.
    unsafe { mach_absolute_time() }
}

/// Ticks of [`absolute_time`] per second.
pub fn counter_frequency() -> Result<u64> {
    let mut info = TimebaseInfo::default();
    // SAFETY: `info` is a valid mach_timebase_info_data_t to fill.
    let kr = unsafe { mach_timebase_info(&mut info) };
    if kr != 0 || info.numer == 0 {
        return Err(Error::Platform { call: "mach_timebase_info", source: std::io::Error::other(format!("{kr}")) });
    }
    // ticks * numer / denom = nanoseconds, so a second is 1e9 * denom / numer ticks.
    Ok(1_000_000_000 * u64::from(info.denom) / u64::from(info.numer))
}
