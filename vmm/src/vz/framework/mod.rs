//! The framework calls of the Virtualization.framework backend (macOS only). Every
//! decision is made in the portable modules ([`super::plan`], [`super::mac`],
//! [`super::bundle`], [`super::files`], [`super::watch`]); this layer only builds the framework's objects, runs the machine
//! on one serial dispatch queue of its own (so no caller's main thread is needed), and
//! watches it from the calling thread. It is type-checked and linted for
//! `aarch64-apple-darwin` on every CI run and has never run on a Mac.

pub mod delegate;
pub mod linux;
pub mod mac;
mod window;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::net::backend::Unixgram;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::{AnyClass, ProtocolObject};
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZDiskImageCachingMode, VZDiskImageStorageDeviceAttachment,
    VZDiskImageSynchronizationMode, VZFileHandleNetworkDeviceAttachment, VZGenericPlatformConfiguration, VZMACAddress,
    VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration, VZSharedDirectory, VZSingleDirectoryShare,
    VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration, VZVirtioFileSystemDeviceConfiguration,
    VZVirtioNetworkDeviceConfiguration, VZVirtualMachine, VZVirtualMachineConfiguration,
};

use self::delegate::{describe, Delegate, Heard};
use super::plan::{size_socket_buffers, Caching, Disk, Limits, Net, NetSpec};
use super::watch::{Action, Asked, Finish, Seen, State, Watch};
use crate::config::ShareConfig;
use crate::control::Control;
use crate::{Error, ExitReason};

/// How often the watching thread looks at the machine's state.
const WATCH: Duration = Duration::from_millis(100);

fn vz_error(what: &str, error: &NSError) -> Error {
    Error::Vz(format!("{what}: {}", describe(error)))
}

/// Whether this macOS has the class `name`.
fn has_class(name: &std::ffi::CStr) -> bool {
    AnyClass::get(name).is_some()
}

/// The framework's limits on this Mac.
pub fn limits() -> Limits {
    let block = <VZVirtioBlockDeviceConfiguration as objc2::ClassType>::class();
    // SAFETY: class methods without arguments.
    unsafe {
        Limits {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u32,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u32,
            min_memory: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
            nested: nested_supported(),
            rosetta: has_class(c"VZLinuxRosettaDirectoryShare"),
            disk_ids: block.instance_method(objc2::sel!(setBlockDeviceIdentifier:)).is_some(),
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

fn mac_address(mac: [u8; 6]) -> Result<Retained<VZMACAddress>, Error> {
    let text = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    // SAFETY: initWithString: takes a string and returns nil for a malformed one.
    unsafe { VZMACAddress::initWithString(VZMACAddress::alloc(), &NSString::from_str(&text)) }
        .ok_or_else(|| Error::Vz(format!("the framework refuses the MAC address {text}")))
}

/// A file handle that owns `fd`.
fn handle(fd: std::os::fd::OwnedFd) -> Retained<NSFileHandle> {
    use std::os::fd::IntoRawFd;
    // The handle takes the descriptor and closes it when released.
    NSFileHandle::initWithFileDescriptor_closeOnDealloc(NSFileHandle::alloc(), fd.into_raw_fd(), true)
}

/// A datagram socket for the framework: a duplicate of `fd`, with the buffers Apple asks
/// for (the duplicate shares the socket, so hvrun's own end gets them too).
fn socket_for_framework(fd: std::os::fd::OwnedFd) -> std::io::Result<Retained<NSFileHandle>> {
    size_socket_buffers(std::os::fd::AsFd::as_fd(&fd))?;
    Ok(handle(fd))
}

/// Sets `config`'s network devices; returns the sockets hvrun keeps for them (their
/// local files live as long as they do).
fn set_nets(config: &VZVirtualMachineConfiguration, nets: &[NetSpec]) -> Result<Vec<Unixgram>, Error> {
    let mut devices: Vec<Retained<VZNetworkDeviceConfiguration>> = Vec::new();
    let mut sockets = Vec::new();
    for (net, mac) in nets {
        let (what, hint) = match net {
            Net::Nat => ("nat".to_string(), ""),
            Net::Unixgram { path, .. } => {
                (format!("unixgram={}", path.display()), " (is the network proxy listening?)")
            }
            Net::Fd(fd) => (format!("fd={}", fd.number()), ""),
        };
        let fail = |source: std::io::Error| Error::Net { what: what.clone(), source, hint };
        let file_handle = match net {
            Net::Nat => None,
            Net::Unixgram { path, vfkit } => {
                let socket = Unixgram::connect(path, *vfkit).map_err(fail)?;
                let fd = socket.duplicate_fd().map_err(fail)?;
                sockets.push(socket);
                Some(socket_for_framework(fd).map_err(fail)?)
            }
            Net::Fd(fd) => Some(socket_for_framework(fd.duplicate().map_err(fail)?).map_err(fail)?),
        };
        // SAFETY: framework calls with valid objects built here, before the machine exists.
        unsafe {
            let device = VZVirtioNetworkDeviceConfiguration::new();
            match file_handle {
                None => device.setAttachment(Some(&VZNATNetworkDeviceAttachment::new())),
                Some(file_handle) => {
                    device.setAttachment(Some(&VZFileHandleNetworkDeviceAttachment::initWithFileHandle(
                        VZFileHandleNetworkDeviceAttachment::alloc(),
                        &file_handle,
                    )))
                }
            }
            let address = mac_address(*mac)?;
            device.setMACAddress(&address);
            devices.push(Retained::into_super(device));
        }
    }
    // SAFETY: as above.
    unsafe { config.setNetworkDevices(&NSArray::from_retained_slice(&devices)) };
    Ok(sockets)
}

/// A virtio-fs device sharing `share` with the tag `tag`, the tag first checked by the
/// framework itself (`initWithTag:` raises an exception on a tag it refuses).
fn share_device(
    tag: &str,
    share: &objc2_virtualization::VZDirectoryShare,
) -> Result<Retained<VZDirectorySharingDeviceConfiguration>, Error> {
    let tag_text = NSString::from_str(tag);
    // SAFETY: framework calls with valid objects built here, before the machine exists;
    // the tag is validated before `initWithTag:` sees it.
    unsafe {
        VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag_text)
            .map_err(|e| vz_error(&format!("--share with tag {tag:?}"), &e))?;
        let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &tag_text,
        );
        device.setShare(Some(share));
        Ok(Retained::into_super(device))
    }
}

/// virtio-fs devices for `shares`.
fn share_devices(shares: &[ShareConfig]) -> Result<Vec<Retained<VZDirectorySharingDeviceConfiguration>>, Error> {
    shares
        .iter()
        .map(|share| {
            // SAFETY: framework calls with valid objects built here, before the machine exists.
            let single = unsafe {
                let directory = VZSharedDirectory::initWithURL_readOnly(
                    VZSharedDirectory::alloc(),
                    &url(&share.host),
                    share.read_only,
                );
                VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &directory)
            };
            share_device(&share.tag, &single)
        })
        .collect()
}

/// A virtio block device for `disk`.
fn disk_device(disk: &Disk) -> Result<Retained<VZStorageDeviceConfiguration>, Error> {
    let fail = |e: Retained<NSError>| vz_error(&format!("disk {}", disk.path.display()), &e);
    // SAFETY: framework calls with valid objects built here, before the machine exists.
    unsafe {
        let attachment = match disk.caching {
            Caching::Default => VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &url(&disk.path),
                disk.read_only,
            ),
            Caching::CachedFsync => {
                VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
                    VZDiskImageStorageDeviceAttachment::alloc(),
                    &url(&disk.path),
                    disk.read_only,
                    VZDiskImageCachingMode::Cached,
                    VZDiskImageSynchronizationMode::Fsync,
                )
            }
        }
        .map_err(fail)?;
        let device = VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            &attachment,
        );
        if let Some(id) = &disk.id {
            // Checked by the framework first, as share tags are: an identifier it refuses
            // would raise an exception in the setter.
            let id_text = NSString::from_str(id);
            VZVirtioBlockDeviceConfiguration::validateBlockDeviceIdentifier_error(&id_text)
                .map_err(|e| vz_error(&format!("disk {} id={id}", disk.path.display()), &e))?;
            device.setBlockDeviceIdentifier(&id_text);
        }
        Ok(Retained::into_super(device))
    }
}

/// A machine on its queue, with its delegate; the machine is touched only there.
pub struct Machine {
    vm: Retained<VZVirtualMachine>,
    queue: DispatchRetained<DispatchQueue>,
    heard: Heard,
    _delegate: Retained<Delegate>,
}

// SAFETY: the machine is created for its serial queue and every use of it (state,
// start, stop) happens in a closure run on that queue, as the framework requires; this
// wrapper only carries the pointers there. The delegate is only called by the framework
// (on the queue) and holds a thread-safe slot.
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
            Some(e) => Err(describe(e)),
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    })
}

fn take<T>(slot: &Pending<T>) -> Option<Result<T, String>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl Machine {
    /// Creates the machine for `config` on a queue of its own, with a delegate.
    fn new(config: &VZVirtualMachineConfiguration) -> Arc<Self> {
        let queue = DispatchQueue::new("hvrun.vz", None);
        // SAFETY: the configuration was validated; the machine is only used on `queue`.
        let vm = unsafe { VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), config, &queue) };
        let heard = Heard::default();
        let delegate = Delegate::new(Arc::clone(&heard));
        let machine = Arc::new(Machine { vm, queue, heard, _delegate: delegate });
        let m = Arc::clone(&machine);
        machine.queue.exec_sync(move || {
            // SAFETY: on the machine's queue; the delegate (a weak reference for the
            // framework) lives as long as the machine, which owns it.
            unsafe { m.vm.setDelegate(Some(ProtocolObject::from_ref(&*m._delegate))) }
        });
        machine
    }

    /// Runs `f` on the machine's queue and returns its result.
    fn on_queue<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&VZVirtualMachine) -> T + Send + 'static) -> T {
        let out = Arc::new(Mutex::new(None));
        let (m, o) = (Arc::clone(self), Arc::clone(&out));
        self.queue.exec_sync(move || *o.lock().unwrap_or_else(|e| e.into_inner()) = Some(f(&m.vm)));
        let value = out.lock().unwrap_or_else(|e| e.into_inner()).take();
        value.expect("exec_sync ran the closure before returning")
    }

    /// The machine's state, read on its queue.
    fn state(self: &Arc<Self>) -> State {
        // SAFETY: on the machine's queue, as required.
        self.on_queue(|vm| State::from_raw(unsafe { vm.state() }.0))
    }

    /// Starts the machine, then watches it until the guest stops it, it fails, or
    /// `control` stops it (see [`super::watch`]).
    fn start_and_watch(self: &Arc<Self>, control: &Control) -> Result<ExitReason, Error> {
        let started = Completion::default();
        let stopped = Completion::default();
        {
            let slot = Arc::clone(&started);
            // SAFETY: on the machine's queue, as required.
            self.on_queue(move |vm| unsafe { vm.startWithCompletionHandler(&on_complete(&slot)) });
        }
        let mut watch = Watch::new(Instant::now());
        loop {
            std::thread::sleep(WATCH);
            let seen = Seen {
                state: Some(self.state()),
                started: take(&started),
                stopped: take(&stopped),
                ended: self.heard.lock().unwrap_or_else(|e| e.into_inner()).take(),
            };
            match watch.step(seen, asked(control), Instant::now()) {
                Action::Wait => {}
                Action::Press => {
                    // SAFETY: on the machine's queue, as required.
                    self.on_queue(|vm| unsafe { vm.requestStopWithError() }.map_err(|e| describe(&e)))
                        .unwrap_or_else(|why| log::warn!("vz: asking the guest to stop: {why}"));
                }
                Action::GraceOver => control.stop(Ok(ExitReason::Stopped)),
                Action::Stop => {
                    let slot = Arc::clone(&stopped);
                    // SAFETY: on the machine's queue, as required.
                    self.on_queue(move |vm| unsafe { vm.stopWithCompletionHandler(&on_complete(&slot)) });
                }
                Action::Pause(pause) => {
                    let slot = Completion::default();
                    // SAFETY: on the machine's queue, as required.
                    self.on_queue(move |vm| unsafe {
                        if pause {
                            vm.pauseWithCompletionHandler(&on_complete(&slot));
                        } else {
                            vm.resumeWithCompletionHandler(&on_complete(&slot));
                        }
                    });
                }
                Action::Finish(finish) => return outcome(finish, control),
            }
        }
    }
}

/// What `control` asks of the machine now.
fn asked(control: &Control) -> Asked {
    Asked { shutdown: control.asked_to_stop(), stop: control.stopping(), pause: control.paused() }
}

/// The run's result for how the watch ended.
fn outcome(finish: Finish, control: &Control) -> Result<ExitReason, Error> {
    match finish {
        Finish::ByGuest => Ok(ExitReason::PowerOff),
        Finish::ByHost => control.take_outcome().unwrap_or(Ok(ExitReason::Stopped)),
        Finish::Failed(why) => Err(Error::Vz(why)),
    }
}
