//! macOS 15's in-kernel GICv3 (`hv_gic_*`), looked up at run time.
//!
//! hvrun is built against the macOS 13 API (applevisor's `macos-13-0` feature), so one
//! binary runs on macOS 13 and later: naming a `hv_gic_*` symbol directly would make
//! the binary fail to load before macOS 15. The entry points are found with `dlsym` in
//! the already-linked Hypervisor.framework instead; when any is missing there is no
//! in-kernel GIC and the VMM uses its own GICv2.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use crate::gicv3_state::{HypervisorGicState, MAX_HVF_BLOB};
use crate::{Error, GicV3Layout, GicV3Needs, Result, SpiSink};

// Signatures from Apple's `hv_gic.h`, as `applevisor-sys` 1.0.0 declares them under its
// `macos-15-0` feature.
type GetSize = unsafe extern "C" fn(*mut usize) -> i32;
type ConfigCreate = unsafe extern "C" fn() -> *mut c_void;
type ConfigSetBase = unsafe extern "C" fn(*mut c_void, u64) -> i32;
type Create = unsafe extern "C" fn(*mut c_void) -> i32;
type SetSpi = unsafe extern "C" fn(u32, bool) -> i32;
type SpiRange = unsafe extern "C" fn(*mut u32, *mut u32) -> i32;
type RedistributorBase = unsafe extern "C" fn(u64, *mut u64) -> i32;
type GetIntid = unsafe extern "C" fn(u32, *mut u32) -> i32;
type GetRedistributorReg = unsafe extern "C" fn(u64, u32, *mut u64) -> i32;
type Release = unsafe extern "C" fn(*mut c_void);
type GetIccReg = unsafe extern "C" fn(u64, u16, *mut u64) -> i32;
type SetIccReg = unsafe extern "C" fn(u64, u16, u64) -> i32;
type StateCreate = unsafe extern "C" fn() -> *mut c_void;
type StateGetSize = unsafe extern "C" fn(*mut c_void, *mut usize) -> i32;
type StateGetData = unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32;
type SetState = unsafe extern "C" fn(*const c_void, usize) -> i32;

/// The `hv_gic_*` entry points a snapshot uses: the CPU interfaces' registers and the
/// rest of the GIC's state as the framework serializes it.
struct StateApi {
    get_icc_reg: GetIccReg,
    set_icc_reg: SetIccReg,
    state_create: StateCreate,
    state_get_size: StateGetSize,
    state_get_data: StateGetData,
    set_state: SetState,
    os_release: Release,
}

/// The `hv_gic_*` entry points hvrun uses.
struct Api {
    config_create: ConfigCreate,
    config_set_distributor_base: ConfigSetBase,
    config_set_redistributor_base: ConfigSetBase,
    create: Create,
    set_spi: SetSpi,
    distributor_size: GetSize,
    distributor_base_alignment: GetSize,
    redistributor_region_size: GetSize,
    redistributor_size: GetSize,
    redistributor_base_alignment: GetSize,
    spi_interrupt_range: SpiRange,
    redistributor_base: RedistributorBase,
    get_intid: GetIntid,
    get_redistributor_reg: GetRedistributorReg,
    os_release: Release,
}

/// `hv_gic_redistributor_reg_t`'s GICR_ISENABLER0 and GICR_ISPENDR0 (in the SGI frame).
const GICR_ISENABLER0: u32 = 0x1_0100;
const GICR_ISPENDR0: u32 = 0x1_0200;

/// `hv_gic_intid_t`'s EL1 virtual timer (its value is the architected INTID).
const HV_GIC_INT_EL1_VIRTUAL_TIMER: u32 = 27;

/// Looks `name` up among the symbols already loaded (the framework is linked).
pub(super) fn symbol(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches the loaded images and
    // returns null when the symbol is absent.
    let ptr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!ptr.is_null()).then_some(ptr)
}

macro_rules! load {
    ($name:literal, $ty:ty) => {
        // SAFETY: the symbol, when present, is the framework's function of this name,
        // whose C signature `$ty` states.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(symbol($name)?) }
    };
}

fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| {
        Some(Api {
            config_create: load!(c"hv_gic_config_create", ConfigCreate),
            config_set_distributor_base: load!(c"hv_gic_config_set_distributor_base", ConfigSetBase),
            config_set_redistributor_base: load!(c"hv_gic_config_set_redistributor_base", ConfigSetBase),
            create: load!(c"hv_gic_create", Create),
            set_spi: load!(c"hv_gic_set_spi", SetSpi),
            distributor_size: load!(c"hv_gic_get_distributor_size", GetSize),
            distributor_base_alignment: load!(c"hv_gic_get_distributor_base_alignment", GetSize),
            redistributor_region_size: load!(c"hv_gic_get_redistributor_region_size", GetSize),
            redistributor_size: load!(c"hv_gic_get_redistributor_size", GetSize),
            redistributor_base_alignment: load!(c"hv_gic_get_redistributor_base_alignment", GetSize),
            spi_interrupt_range: load!(c"hv_gic_get_spi_interrupt_range", SpiRange),
            redistributor_base: load!(c"hv_gic_get_redistributor_base", RedistributorBase),
            get_intid: load!(c"hv_gic_get_intid", GetIntid),
            get_redistributor_reg: load!(c"hv_gic_get_redistributor_reg", GetRedistributorReg),
            os_release: load!(c"os_release", Release),
        })
    })
    .as_ref()
}

fn state_api() -> Result<&'static StateApi> {
    static API: OnceLock<Option<StateApi>> = OnceLock::new();
    API.get_or_init(|| {
        Some(StateApi {
            get_icc_reg: load!(c"hv_gic_get_icc_reg", GetIccReg),
            set_icc_reg: load!(c"hv_gic_set_icc_reg", SetIccReg),
            state_create: load!(c"hv_gic_state_create", StateCreate),
            state_get_size: load!(c"hv_gic_state_get_size", StateGetSize),
            state_get_data: load!(c"hv_gic_state_get_data", StateGetData),
            set_state: load!(c"hv_gic_set_state", SetState),
            os_release: load!(c"os_release", Release),
        })
    })
    .as_ref()
    .ok_or_else(|| Error::Unsupported("this macOS's GIC cannot save its state (macOS 15+)".into()))
}

/// CPU interface register `encoding` (`hv_gic_icc_reg_t`) of `vcpu`, the calling thread's.
pub fn icc_reg(vcpu: u64, encoding: u16) -> Result<u64> {
    let mut value = 0u64;
    // SAFETY: `value` is a valid u64 to write; the framework checks the vCPU and register.
    super::check("hv_gic_get_icc_reg", unsafe { (state_api()?.get_icc_reg)(vcpu, encoding, &mut value) })?;
    Ok(value)
}

/// Writes CPU interface register `encoding` of `vcpu`, the calling thread's.
pub fn set_icc_reg(vcpu: u64, encoding: u16, value: u64) -> Result<()> {
    // SAFETY: plain values; the framework checks the vCPU and register.
    super::check("hv_gic_set_icc_reg", unsafe { (state_api()?.set_icc_reg)(vcpu, encoding, value) })
}

/// The GIC's state but its CPU interfaces, as the framework serializes it (every vCPU
/// out of the guest).
fn save_state() -> Result<Vec<u8>> {
    let api = state_api()?;
    // SAFETY: no arguments; returns an os_object we release below, or null.
    let state = unsafe { (api.state_create)() };
    if state.is_null() {
        return Err(Error::Platform { call: "hv_gic_state_create", source: std::io::Error::other("null") });
    }
    let mut size = 0usize;
    // SAFETY: `state` is live; `size` is a valid usize to write.
    let sized = super::check("hv_gic_state_get_size", unsafe { (api.state_get_size)(state, &mut size) });
    let blob = sized.and_then(|()| {
        if size > MAX_HVF_BLOB {
            return Err(Error::Unsupported(format!("the framework's GIC state is {size} bytes")));
        }
        let mut blob = vec![0u8; size];
        // SAFETY: `blob` has the `size` bytes the framework asked for.
        super::check("hv_gic_state_get_data", unsafe { (api.state_get_data)(state, blob.as_mut_ptr().cast()) })?;
        Ok(blob)
    });
    // SAFETY: `state` came from hv_gic_state_create and is released once, here.
    unsafe { (api.os_release)(state) };
    blob
}

/// Puts back a state [`save_state`] gave: after the GIC and every vCPU exist, before
/// any runs. The framework checks the blob (it is versioned) and refuses one it cannot
/// take.
fn restore_state(blob: &[u8]) -> Result<()> {
    if blob.len() > MAX_HVF_BLOB {
        return Err(Error::Unsupported(format!("a GIC state of {} bytes", blob.len())));
    }
    // SAFETY: `blob` is `blob.len()` readable bytes; the framework only reads them.
    super::check("hv_gic_set_state", unsafe { (state_api()?.set_state)(blob.as_ptr().cast(), blob.len()) })
}

fn size(get: GetSize) -> Option<u64> {
    let mut value = 0usize;
    // SAFETY: `value` is a valid usize for the framework to write.
    let status = unsafe { get(&mut value) };
    (status == 0).then_some(value as u64)
}

/// What the framework's GICv3 needs, or `None` before macOS 15 (or if it won't say).
pub fn needs() -> Option<GicV3Needs> {
    let api = api()?;
    let (mut first, mut count) = (0u32, 0u32);
    // SAFETY: both pointers are valid u32s for the framework to write.
    let status = unsafe { (api.spi_interrupt_range)(&mut first, &mut count) };
    if status != 0 {
        return None;
    }
    let needs = GicV3Needs {
        distributor_size: size(api.distributor_size)?,
        distributor_align: size(api.distributor_base_alignment)?,
        redistributor_size: size(api.redistributor_size)?,
        redistributor_region: size(api.redistributor_region_size)?,
        redistributor_align: size(api.redistributor_base_alignment)?,
        spis: (first, count),
    };
    log::info!(
        "Hypervisor.framework's GICv3: distributor {:#x} bytes (aligned {:#x}), redistributors {:#x} bytes each \
         (region for every vCPU {:#x}, aligned {:#x}), SPIs {first}..{}",
        needs.distributor_size,
        needs.distributor_align,
        needs.redistributor_size,
        needs.redistributor_region,
        needs.redistributor_align,
        u64::from(first) + u64::from(count),
    );
    Some(needs)
}

/// Where the framework put the redistributor of the calling thread's vCPU `vcpu`.
pub fn redistributor_base(vcpu: u64) -> Result<u64> {
    let api = api().ok_or_else(|| Error::Unsupported("no in-kernel GICv3".into()))?;
    let mut base = 0u64;
    // SAFETY: `base` is a valid u64 to write; the framework checks the vCPU id.
    super::check("hv_gic_get_redistributor_base", unsafe { (api.redistributor_base)(vcpu, &mut base) })?;
    Ok(base)
}

/// Whether an SGI or PPI is pending and enabled in the redistributor of `vcpu` (the
/// calling thread's).
pub fn sgi_or_ppi_pending(vcpu: u64) -> Result<bool> {
    let api = api().ok_or_else(|| Error::Unsupported("no in-kernel GICv3".into()))?;
    let (mut pending, mut enabled) = (0u64, 0u64);
    // SAFETY: valid u64s to write; the framework checks the vCPU and the register id.
    unsafe {
        super::check("hv_gic_get_redistributor_reg", (api.get_redistributor_reg)(vcpu, GICR_ISPENDR0, &mut pending))?;
        super::check("hv_gic_get_redistributor_reg", (api.get_redistributor_reg)(vcpu, GICR_ISENABLER0, &mut enabled))?;
    }
    Ok(pending & enabled & 0xffff_ffff != 0)
}

/// The INTID the framework raises the EL1 virtual timer with.
pub fn vtimer_intid() -> Result<u32> {
    intid(HV_GIC_INT_EL1_VIRTUAL_TIMER)
}

/// The INTID the framework raises `interrupt` (an `hv_gic_intid_t`) with.
pub fn intid(interrupt: u32) -> Result<u32> {
    let api = api().ok_or_else(|| Error::Unsupported("no in-kernel GICv3".into()))?;
    let mut intid = 0u32;
    // SAFETY: `intid` is a valid u32 to write; the interrupt is a value of hv_gic_intid_t.
    super::check("hv_gic_get_intid", unsafe { (api.get_intid)(interrupt, &mut intid) })?;
    Ok(intid)
}

/// Creates the framework's GICv3 at `layout`: after the VM, before any vCPU.
pub fn create(layout: &GicV3Layout) -> Result<()> {
    let api = api().ok_or_else(|| Error::Unsupported("this macOS has no in-kernel GICv3 (macOS 15+)".into()))?;
    // SAFETY: no arguments; returns an os_object we release below, or null.
    let config = unsafe { (api.config_create)() };
    if config.is_null() {
        return Err(Error::Platform { call: "hv_gic_config_create", source: std::io::Error::other("null") });
    }
    // SAFETY: `config` is the live configuration just created; the bases are plain values
    // the framework validates.
    let configured = unsafe {
        super::check(
            "hv_gic_config_set_distributor_base",
            (api.config_set_distributor_base)(config, layout.distributor.0),
        )
        .and_then(|()| {
            super::check(
                "hv_gic_config_set_redistributor_base",
                (api.config_set_redistributor_base)(config, layout.redistributors.0),
            )
        })
        .and_then(|()| super::check("hv_gic_create", (api.create)(config)))
    };
    // SAFETY: `config` came from hv_gic_config_create and is released once, here.
    unsafe { (api.os_release)(config) };
    configured
}

/// SPI lines of the framework's GIC (`hv_gic_set_spi`, callable from any thread).
#[derive(Debug)]
pub struct Spis;

impl SpiSink for Spis {
    fn set_spi(&self, intid: u32, level: bool) -> Result<()> {
        let api = api().ok_or_else(|| Error::Unsupported("no in-kernel GICv3".into()))?;
        // SAFETY: plain values; the framework refuses an INTID outside its SPI range.
        super::check("hv_gic_set_spi", unsafe { (api.set_spi)(intid, level) })
    }

    fn save_gic(&self) -> Result<HypervisorGicState> {
        save_state().map(HypervisorGicState::Hvf)
    }

    fn restore_gic(&self, saved: &HypervisorGicState) -> Result<()> {
        match saved {
            HypervisorGicState::Hvf(blob) => restore_state(blob),
            HypervisorGicState::Kvm(_) => Err(Error::Unsupported("the snapshot's GICv3 is KVM's, not macOS's".into())),
        }
    }
}
