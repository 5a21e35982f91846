//! The framework calls of the Virtualization.framework backend: a [`LinuxPlan`] becomes a
//! `VZVirtualMachineConfiguration`, the machine runs on one serial dispatch queue of its
//! own (so no caller's main thread is needed), and the calling thread watches its state.
//!
//! Every decision is made in [`super::plan`]; this layer only builds objects. It is
//! type-checked and linted for `aarch64-apple-darwin` on every CI run and has never run
//! on a Mac.

use std::sync::Arc;
use std::time::Duration;

use dispatch2::DispatchQueue;
use objc2::rc::Retained;
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZDiskImageStorageDeviceAttachment, VZEntropyDeviceConfiguration,
    VZFileHandleNetworkDeviceAttachment, VZFileHandleSerialPortAttachment, VZLinuxBootLoader,
    VZLinuxRosettaDirectoryShare, VZMACAddress, VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration,
    VZSerialPortConfiguration, VZSharedDirectory, VZSingleDirectoryShare, VZStorageDeviceConfiguration,
    VZVirtioBlockDeviceConfiguration, VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration, VZVirtualMachine,
    VZVirtualMachineConfiguration, VZVirtualMachineState,
};

use devices::virtio::net::backend::Unixgram;

use super::plan::{Console, Limits, LinuxPlan, Net, ROSETTA_TAG};
use crate::control::Control;
use crate::{Error, ExitReason};

/// How often the watching thread looks at the machine's state.
const WATCH: Duration = Duration::from_millis(100);

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
        }
    }
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

/// Builds the framework's configuration for `plan`, and checks it.
/// Returns it with the sockets hvrun keeps for it (their local files live as long as they do).
fn configuration(plan: &LinuxPlan) -> Result<(Retained<VZVirtualMachineConfiguration>, Vec<Unixgram>), Error> {
    // SAFETY: framework calls with valid, retained objects built here (the whole body);
    // every object is created and configured on this thread before the machine exists.
    unsafe {
        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &url(&plan.kernel));
        boot.setCommandLine(&NSString::from_str(&plan.cmdline));
        if let Some(initrd) = &plan.initrd {
            boot.setInitialRamdiskURL(Some(&url(initrd)));
        }
        let config = VZVirtualMachineConfiguration::new();
        config.setBootLoader(Some(&boot));
        config.setCPUCount(plan.cpus as usize);
        config.setMemorySize(plan.memory);

        let mut disks: Vec<Retained<VZStorageDeviceConfiguration>> = Vec::new();
        for (path, read_only, id) in &plan.disks {
            let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &url(path),
                *read_only,
            )
            .map_err(|e| vz_error(&format!("disk {}", path.display()), &e))?;
            let device = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &attachment,
            );
            if let Some(id) = id {
                device.setBlockDeviceIdentifier(&NSString::from_str(id));
            }
            disks.push(Retained::into_super(device));
        }
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));

        let mut nets: Vec<Retained<VZNetworkDeviceConfiguration>> = Vec::new();
        let mut sockets = Vec::new();
        for (net, mac) in &plan.nets {
            let device = VZVirtioNetworkDeviceConfiguration::new();
            match net {
                Net::Nat => device.setAttachment(Some(&VZNATNetworkDeviceAttachment::new())),
                Net::Unixgram { path, vfkit } => {
                    let fail = |e: std::io::Error| Error::Net(format!("--net unixgram={}: {e}", path.display()));
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
                    let attachment = VZFileHandleNetworkDeviceAttachment::initWithFileHandle(
                        VZFileHandleNetworkDeviceAttachment::alloc(),
                        &NSFileHandle::initWithFileDescriptor(NSFileHandle::alloc(), *fd),
                    );
                    device.setAttachment(Some(&attachment));
                }
            }
            if let Some(address) = mac.and_then(mac_address) {
                device.setMACAddress(&address);
            }
            nets.push(Retained::into_super(device));
        }
        config.setNetworkDevices(&NSArray::from_retained_slice(&nets));

        let (reading, writing) = match &plan.console {
            Console::Terminal { input } => {
                (input.then(NSFileHandle::fileHandleWithStandardInput), NSFileHandle::fileHandleWithStandardOutput())
            }
            Console::File(path) => {
                let file = std::fs::File::create(path)
                    .map_err(|e| Error::Console(format!("--console file={}: {e}", path.display())))?;
                (None, handle(file.into()))
            }
        };
        let attachment = VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
            VZFileHandleSerialPortAttachment::alloc(),
            reading.as_deref(),
            Some(&writing),
        );
        let console = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        console.setAttachment(Some(&attachment));
        let ports: Vec<Retained<VZSerialPortConfiguration>> = vec![Retained::into_super(console)];
        config.setSerialPorts(&NSArray::from_retained_slice(&ports));

        let entropy: Vec<Retained<VZEntropyDeviceConfiguration>> =
            vec![Retained::into_super(VZVirtioEntropyDeviceConfiguration::new())];
        config.setEntropyDevices(&NSArray::from_retained_slice(&entropy));

        let mut shares: Vec<Retained<VZDirectorySharingDeviceConfiguration>> = Vec::new();
        for share in &plan.shares {
            let directory =
                VZSharedDirectory::initWithURL_readOnly(VZSharedDirectory::alloc(), &url(&share.host), share.read_only);
            let single = VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &directory);
            let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &NSString::from_str(&share.tag),
            );
            device.setShare(Some(&single));
            shares.push(Retained::into_super(device));
        }
        if plan.rosetta {
            let rosetta = VZLinuxRosettaDirectoryShare::initWithError(VZLinuxRosettaDirectoryShare::alloc())
                .map_err(|e| vz_error("--rosetta (is Rosetta installed? softwareupdate --install-rosetta)", &e))?;
            let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &NSString::from_str(ROSETTA_TAG),
            );
            device.setShare(Some(&rosetta));
            shares.push(Retained::into_super(device));
        }
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        config.validateWithError().map_err(|e| vz_error("the configuration", &e))?;
        Ok((config, sockets))
    }
}

/// The machine, touched only on its queue.
struct OnQueue(Retained<VZVirtualMachine>);

// SAFETY: the machine is created for `queue` and every use of it (state, start, stop,
// pause, resume) happens in a closure run on that serial queue, as the framework
// requires; the wrapper only carries the pointer there.
unsafe impl Send for OnQueue {}
// SAFETY: as above: shared references are only dereferenced on the queue.
unsafe impl Sync for OnQueue {}

/// Runs `plan` until the guest stops or `control` stops it.
pub fn run_linux(plan: &LinuxPlan, control: Arc<Control>) -> Result<ExitReason, Error> {
    let (config, _sockets) = configuration(plan)?;
    let queue = DispatchQueue::new("hvrun.vz", None);
    // SAFETY: the configuration was validated; the machine will only be used on `queue`.
    let vm = Arc::new(OnQueue(unsafe {
        VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), &config, &queue)
    }));
    let started = Arc::new(std::sync::Mutex::new(None::<Result<(), String>>));
    {
        let (vm, started) = (Arc::clone(&vm), Arc::clone(&started));
        queue.exec_async(move || {
            let done = block2::RcBlock::new(move |error: *mut NSError| {
                // SAFETY: the framework passes nil or a valid NSError.
                let outcome = match unsafe { error.as_ref() } {
                    None => Ok(()),
                    Some(e) => Err(e.localizedDescription().to_string()),
                };
                *started.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            });
            // SAFETY: on the machine's queue, as required.
            unsafe { vm.0.startWithCompletionHandler(&done) };
        });
    }
    log::info!("booting on vz with {} vCPU(s) and {} MiB", plan.cpus, plan.memory >> 20);
    loop {
        std::thread::sleep(WATCH);
        if let Some(Err(why)) = started.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(Error::Vz(format!("starting the machine: {why}")));
        }
        let state = {
            let vm = Arc::clone(&vm);
            let state = Arc::new(std::sync::Mutex::new(VZVirtualMachineState::Starting));
            let out = Arc::clone(&state);
            // SAFETY: on the machine's queue, as required.
            queue.exec_sync(move || *out.lock().unwrap_or_else(|e| e.into_inner()) = unsafe { vm.0.state() });
            let s = *state.lock().unwrap_or_else(|e| e.into_inner());
            s
        };
        if state == VZVirtualMachineState::Stopped {
            return Ok(ExitReason::PowerOff);
        }
        if state == VZVirtualMachineState::Error {
            return Err(Error::Vz("the machine stopped with an error".into()));
        }
        if control.stopping() {
            let vm = Arc::clone(&vm);
            queue.exec_async(move || {
                let done = block2::RcBlock::new(|_error: *mut NSError| {});
                // SAFETY: on the machine's queue, as required.
                unsafe { vm.0.stopWithCompletionHandler(&done) };
            });
            return control.take_outcome().unwrap_or(Ok(ExitReason::Stopped));
        }
    }
}
