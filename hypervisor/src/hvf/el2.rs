//! EL2 for the guest (`--nested`, macOS 15 on Apple M3 and later), looked up at run time
//! like the in-kernel GIC (see `gic.rs`): naming `hv_vm_config_*_el2_*` directly would
//! keep the binary from loading before macOS 15.

use std::ffi::c_void;

use crate::{Error, Result};

// Signatures from Apple's `hv_vm_config.h` (macOS 15).
type GetSupported = unsafe extern "C" fn(*mut bool) -> i32;
type SetEnabled = unsafe extern "C" fn(*mut c_void, bool) -> i32;

/// Whether this Mac can give a guest EL2.
pub fn supported() -> bool {
    let Some(get) = super::gic::symbol(c"hv_vm_config_get_el2_supported") else {
        return false;
    };
    // SAFETY: the symbol is the framework's `hv_vm_config_get_el2_supported`, whose C
    // signature `GetSupported` states.
    let get = unsafe { std::mem::transmute::<*mut c_void, GetSupported>(get) };
    let mut supported = false;
    // SAFETY: `supported` is a valid bool for the framework to write.
    let status = unsafe { get(&mut supported) };
    status == 0 && supported
}

/// Enables EL2 in the VM configuration `config`, or says why it cannot be.
pub fn enable(config: *mut c_void) -> Result<()> {
    let set = super::gic::symbol(c"hv_vm_config_set_el2_enabled").filter(|_| supported()).ok_or_else(|| {
        Error::Unsupported(
            "--nested: Hypervisor.framework on this Mac cannot give a guest EL2 (it needs macOS 15 or later on \
             Apple M3 or later); run without --nested"
                .into(),
        )
    })?;
    // SAFETY: the symbol is the framework's `hv_vm_config_set_el2_enabled`, whose C
    // signature `SetEnabled` states.
    let set = unsafe { std::mem::transmute::<*mut c_void, SetEnabled>(set) };
    // SAFETY: `config` is a live VM configuration object (the caller's).
    super::check("hv_vm_config_set_el2_enabled", unsafe { set(config, true) })
}
