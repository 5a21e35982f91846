//! Framework calls declared here rather than taken from `applevisor-sys` 1.0.0, whose
//! declarations of these get an enum wrong (`hv_interrupt_type_t` has FIQ = 0; Apple's
//! header has IRQ = 0) or only accept the registers their enums list. The framework
//! itself is linked by `applevisor-sys`.

use crate::hvf_regs::{place, Place};
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
    fn mach_absolute_time() -> u64;
    fn mach_timebase_info(info: *mut TimebaseInfo) -> i32;
}

fn status(call: &'static str, status: i32) -> Result<()> {
    super::check(call, status)
}

/// Reads a register of `vcpu`, on its thread.
pub fn get(vcpu: u64, reg: Reg) -> Result<u64> {
    let mut value = 0u64;
    match place(reg) {
        // SAFETY: `value` is a valid u64 to write; the framework checks the vCPU and the
        // register id and reports a bad one as an error status.
        Place::General(id) => status("hv_vcpu_get_reg", unsafe { hv_vcpu_get_reg(vcpu, id, &mut value) })?,
        // SAFETY: as above, for a system register encoding.
        Place::System(id) => status("hv_vcpu_get_sys_reg", unsafe { hv_vcpu_get_sys_reg(vcpu, id, &mut value) })?,
        Place::Zero => {}
    }
    Ok(value)
}

/// Writes a register of `vcpu`, on its thread.
pub fn set(vcpu: u64, reg: Reg, value: u64) -> Result<()> {
    match place(reg) {
        // SAFETY: plain values; the framework validates the vCPU and register id.
        Place::General(id) => status("hv_vcpu_set_reg", unsafe { hv_vcpu_set_reg(vcpu, id, value) }),
        // SAFETY: as above.
        Place::System(id) => status("hv_vcpu_set_sys_reg", unsafe { hv_vcpu_set_sys_reg(vcpu, id, value) }),
        Place::Zero => Ok(()),
    }
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
