//! The framework calls of the Virtualization.framework backend (macOS only). Every
//! decision is made in the portable modules ([`super::plan`], [`super::mac`],
//! [`super::bundle`]); this layer only builds the framework's objects, runs the machine
//! on one serial dispatch queue of its own (so no caller's main thread is needed), and
//! watches it from the calling thread. It is type-checked and linted for
//! `aarch64-apple-darwin` on every CI run and has never run on a Mac.

pub mod linux;
pub mod mac;
mod window;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::net::backend::Unixgram;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::rc::Retained;
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZFileHandleNetworkDeviceAttachment, VZGenericPlatformConfiguration,
    VZMACAddress, VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration, VZSharedDirectory,
    VZSingleDirectoryShare, VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineState,
};

use super::plan::{Limits, Net, NetSpec};
use crate::config::ShareConfig;
use crate::control::Control;
use crate::{Error, ExitReason};

/// How often the watching thread looks at the machine's state.
const WATCH: Duration = Duration::from_millis(100);
/// How long a guest asked to shut down gets before it is stopped.
const GRACE: Duration = Duration::from_secs(30);

fn vz_error(what: &str, error: &NSError) -> Error {
    Error::Vz(format!("{what}: {}", error.localizedDescription()))
}

/// The framework's limits on this Mac.
pub fn limits() -> Limits {
    // SAFETY: class methods without arguments.
    unsafe {
        Limits {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u32,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u32,
            min_memory: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
            nested: nested_supported(),
        }
    }
}

/// Whether the framework can give a Linux guest EL2. The class method exists from macOS
/// 15 on; before that, asking would raise an unrecognized-selector exception.
fn nested_supported() -> bool {
    let class = <VZGenericPlatformConfiguration as objc2::ClassType>::class();
    if class.class_method(objc2::sel!(isNestedVirtualizationSupported)).is_none() {
        return false;
    }
    // SAFETY: a class method without arguments, which this macOS has (checked above).
    unsafe { VZGenericPlatformConfiguration::isNestedVirtualizationSupported() }
}

fn url(path: &std::path::Path) -> Retained<NSURL> {
    NSURL::fileURLWithPath(&NSString::from_str(&path.to_string_lossy()))
}

fn mac_address(mac: [u8; 6]) -> Option<Retained<VZMACAddress>> {
    let text = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    // SAFETY: initWithString: takes a string and returns nil for a malformed one.
    unsafe { VZMACAddress::initWithString(VZMACAddress::alloc(), &NSString::from_str(&text)) }
}

/// A file handle that owns `fd`.
fn handle(fd: std::os::fd::OwnedFd) -> Retained<NSFileHandle> {
    use std::os::fd::IntoRawFd;
    // The handle takes the descriptor and closes it when released.
    NSFileHandle::initWithFileDescriptor_closeOnDealloc(NSFileHandle::alloc(), fd.into_raw_fd(), true)
}

/// Sets `config`'s network devices; returns the sockets hvrun keeps for them (their
/// local files live as long as they do).
fn set_nets(config: &VZVirtualMachineConfiguration, nets: &[NetSpec]) -> Result<Vec<Unixgram>, Error> {
    let mut devices: Vec<Retained<VZNetworkDeviceConfiguration>> = Vec::new();
    let mut sockets = Vec::new();
    for (net, mac) in nets {
        // SAFETY: framework calls with valid objects built here, before the machine exists.
        unsafe {
            let device = VZVirtioNetworkDeviceConfiguration::new();
            match net {
                Net::Nat => device.setAttachment(Some(&VZNATNetworkDeviceAttachment::new())),
                Net::Unixgram { path, vfkit } => {
                    let fail = |source: std::io::Error| Error::Net {
                        what: format!("unixgram={}", path.display()),
                        source,
                        hint: "",
                    };
                    let socket = Unixgram::connect(path, *vfkit).map_err(fail)?;
                    let fd = socket.duplicate_fd().map_err(fail)?;
                    sockets.push(socket);
                    let attachment = VZFileHandleNetworkDeviceAttachment::initWithFileHandle(
                        VZFileHandleNetworkDeviceAttachment::alloc(),
                        &handle(fd),
                    );
                    device.setAttachment(Some(&attachment));
                }
                Net::Fd(fd) => {
                    let fd = fd.duplicate().map_err(|source| Error::Net {
                        what: format!("fd={}", fd.number()),
                        source,
                        hint: "",
                    })?;
                    let attachment = VZFileHandleNetworkDeviceAttachment::initWithFileHandle(
                        VZFileHandleNetworkDeviceAttachment::alloc(),
                        &handle(fd),
                    );
                    device.setAttachment(Some(&attachment));
                }
            }
            if let Some(address) = mac.and_then(mac_address) {
                device.setMACAddress(&address);
            }
            devices.push(Retained::into_super(device));
        }
    }
    // SAFETY: as above.
    unsafe { config.setNetworkDevices(&NSArray::from_retained_slice(&devices)) };
    Ok(sockets)
}

/// virtio-fs devices for `shares`.
fn share_devices(shares: &[ShareConfig]) -> Vec<Retained<VZDirectorySharingDeviceConfiguration>> {
    shares
        .iter()
        .map(|share| {
            // SAFETY: framework calls with valid objects built here, before the machine exists.
            unsafe {
                let directory = VZSharedDirectory::initWithURL_readOnly(
                    VZSharedDirectory::alloc(),
                    &url(&share.host),
                    share.read_only,
                );
                let single = VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &directory);
                let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                    VZVirtioFileSystemDeviceConfiguration::alloc(),
                    &NSString::from_str(&share.tag),
                );
                device.setShare(Some(&single));
                Retained::into_super(device)
            }
        })
        .collect()
}

/// A machine on its queue; the machine is touched only there.
struct Machine {
    vm: Retained<VZVirtualMachine>,
}

// SAFETY: the machine is created for its serial queue and every use of it (state,
// start, stop) happens in a closure run on that queue, as the framework requires; this
// wrapper only carries the pointer there.
unsafe impl Send for Machine {}
// SAFETY: as above: shared references are only dereferenced on the queue.
unsafe impl Sync for Machine {}

/// The outcome of a framework call with a completion handler, once it has called back:
/// its value, or the error's description.
type Pending<T> = Arc<Mutex<Option<Result<T, String>>>>;

/// A [`Pending`] call with no value.
type Completion = Pending<()>;

/// A completion handler that fills `slot`. Made where it is used: blocks stay on the
/// thread (queue) that makes them.
fn on_complete(slot: &Completion) -> block2::RcBlock<dyn Fn(*mut NSError)> {
    let out = Arc::clone(slot);
    block2::RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes nil or a valid NSError.
        let outcome = match unsafe { error.as_ref() } {
            None => Ok(()),
            Some(e) => Err(e.localizedDescription().to_string()),
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    })
}

fn take(slot: &Completion) -> Option<Result<(), String>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Creates the machine for `config` on a queue of its own.
fn machine(config: &VZVirtualMachineConfiguration) -> (Arc<Machine>, DispatchRetained<DispatchQueue>) {
    let queue = DispatchQueue::new("hvrun.vz", None);
    // SAFETY: the configuration was validated; the machine is only used on `queue`.
    let vm = unsafe { VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), config, &queue) };
    (Arc::new(Machine { vm }), queue)
}

/// The machine's state, read on its queue.
fn state(machine: &Arc<Machine>, queue: &DispatchQueue) -> VZVirtualMachineState {
    let out = Arc::new(Mutex::new(VZVirtualMachineState::Starting));
    let (m, o) = (Arc::clone(machine), Arc::clone(&out));
    // SAFETY: on the machine's queue, as required.
    queue.exec_sync(move || *o.lock().unwrap_or_else(|e| e.into_inner()) = unsafe { m.vm.state() });
    let state = *out.lock().unwrap_or_else(|e| e.into_inner());
    state
}

/// Starts the machine and watches it until the guest stops it, it fails, or `control`
/// stops it (then it is stopped, and `control`'s outcome returned). When `control` asks
/// the guest to stop, the guest gets the power button and [`GRACE`] to shut down before
/// it is stopped.
fn start_and_watch(machine: Arc<Machine>, queue: &DispatchQueue, control: &Control) -> Result<ExitReason, Error> {
    let mut pressed = false;
    let mut paused = false;
    let started = Completion::default();
    {
        let (m, slot) = (Arc::clone(&machine), Arc::clone(&started));
        // SAFETY: on the machine's queue, as required.
        queue.exec_async(move || unsafe { m.vm.startWithCompletionHandler(&on_complete(&slot)) });
    }
    loop {
        std::thread::sleep(WATCH);
        if let Some(Err(why)) = take(&started) {
            return Err(Error::Vz(format!("starting the machine: {why}")));
        }
        let now = state(&machine, queue);
        if now == VZVirtualMachineState::Stopped {
            return Ok(ExitReason::PowerOff);
        }
        if now == VZVirtualMachineState::Error {
            return Err(Error::Vz("the machine stopped with an error".into()));
        }
        // VmHandle::pause and resume: the framework pauses the whole machine.
        if control.paused() != paused && (now == VZVirtualMachineState::Running || now == VZVirtualMachineState::Paused)
        {
            paused = control.paused();
            let (m, slot) = (Arc::clone(&machine), Completion::default());
            // SAFETY: on the machine's queue, as required.
            queue.exec_async(move || unsafe {
                if paused {
                    m.vm.pauseWithCompletionHandler(&on_complete(&slot));
                } else {
                    m.vm.resumeWithCompletionHandler(&on_complete(&slot));
                }
            });
        }
        if let Some(asked) = control.asked_to_stop() {
            if !pressed {
                pressed = true;
                let m = Arc::clone(&machine);
                queue.exec_async(move || {
                    // SAFETY: on the machine's queue, as required.
                    if let Err(e) = unsafe { m.vm.requestStopWithError() } {
                        log::warn!("vz: asking the guest to stop: {}", e.localizedDescription());
                    }
                });
                log::info!("vz: asked the guest to shut down; stopping it in {} s otherwise", GRACE.as_secs());
            } else if asked.elapsed() >= GRACE {
                control.stop(Ok(ExitReason::Stopped));
            }
        }
        if control.stopping() {
            let (m, slot) = (Arc::clone(&machine), Completion::default());
            // SAFETY: on the machine's queue, as required.
            queue.exec_async(move || unsafe { m.vm.stopWithCompletionHandler(&on_complete(&slot)) });
            return control.take_outcome().unwrap_or(Ok(ExitReason::Stopped));
        }
    }
}
