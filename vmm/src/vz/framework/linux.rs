//! Linux guests: a [`LinuxPlan`] as a `VZVirtualMachineConfiguration` with the
//! framework's Linux boot loader, then run. Everything that can fail before the guest
//! runs (files, the configuration's validation, Rosetta, the machine's creation) fails
//! in [`prepare`], which `VmBuilder::start` calls; the run only starts and watches.

use std::sync::Arc;

use objc2::rc::Retained;
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSFileHandle, NSString};
use objc2_virtualization::{
    VZEntropyDeviceConfiguration, VZFileHandleSerialPortAttachment, VZGenericPlatformConfiguration, VZLinuxBootLoader,
    VZLinuxRosettaAvailability, VZLinuxRosettaDirectoryShare, VZSerialPortConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration, VZVirtualMachineConfiguration,
};

use super::{disk_device, handle, set_nets, share_device, share_devices, url, vz_error, Machine};
use crate::control::Control;
use crate::embed::ConsoleIo;
use crate::vz::files::TempKernel;
use crate::vz::plan::{Console, LinuxPlan, ROSETTA_TAG};
use crate::{Error, ExitReason};

/// The console's file handles for an embedder's reader and writer: two pipes, each
/// pumped by a thread of its own (the framework reads and writes file handles only).
fn embedded_console(io: ConsoleIo) -> Result<(Option<Retained<NSFileHandle>>, Retained<NSFileHandle>), Error> {
    let pipe =
        || crate::backends::blocking_pipe().map_err(|source| Error::Console { what: "console pipe".into(), source });
    let ConsoleIo { input, mut output } = io;
    let (guest_writes, from_guest) = pipe()?;
    let _ = std::thread::Builder::new().name("vz-console-out".into()).spawn(move || {
        let mut from_guest = from_guest;
        let _ = crate::console::pump(&mut from_guest, &mut output);
    });
    let reading = match input {
        Some(mut reader) => {
            let (to_guest, guest_reads) = pipe()?;
            let _ = std::thread::Builder::new().name("vz-console-in".into()).spawn(move || {
                let mut to_guest = to_guest;
                let _ = std::io::copy(&mut reader, &mut to_guest);
            });
            Some(handle(guest_reads.into()))
        }
        None => None,
    };
    Ok((reading, handle(guest_writes.into())))
}

/// Builds the framework's configuration for `plan` (its console on `io` when given), and
/// checks it. Returns it with the sockets hvrun keeps for its network devices.
fn configuration(
    plan: &LinuxPlan,
    io: Option<ConsoleIo>,
) -> Result<(Retained<VZVirtualMachineConfiguration>, Vec<devices::virtio::net::backend::Unixgram>), Error> {
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
        if plan.nested {
            let platform = VZGenericPlatformConfiguration::new();
            platform.setNestedVirtualizationEnabled(true);
            config.setPlatform(&platform);
        }

        let disks = plan.disks.iter().map(disk_device).collect::<Result<Vec<_>, _>>()?;
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));
        let sockets = set_nets(&config, &plan.nets)?;

        let (reading, writing) = match (io, &plan.console) {
            (Some(io), _) => embedded_console(io)?,
            (None, Console::Terminal { input }) => {
                (input.then(NSFileHandle::fileHandleWithStandardInput), NSFileHandle::fileHandleWithStandardOutput())
            }
            (None, Console::File(path)) => {
                let file = std::fs::File::create(path)
                    .map_err(|source| Error::Console { what: format!("--console file={}", path.display()), source })?;
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

        let mut shares = share_devices(&plan.shares)?;
        if plan.rosetta {
            match VZLinuxRosettaDirectoryShare::availability() {
                VZLinuxRosettaAvailability::Installed => {}
                VZLinuxRosettaAvailability::NotInstalled => {
                    return Err(Error::Vz(
                        "--rosetta: Rosetta is not installed: softwareupdate --install-rosetta".into(),
                    ))
                }
                _ => return Err(Error::Vz("--rosetta: this Mac cannot give Linux guests Rosetta".into())),
            }
            let rosetta = VZLinuxRosettaDirectoryShare::initWithError(VZLinuxRosettaDirectoryShare::alloc())
                .map_err(|e| vz_error("--rosetta (is Rosetta installed? softwareupdate --install-rosetta)", &e))?;
            shares.push(share_device(ROSETTA_TAG, &rosetta)?);
        }
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        config.validateWithError().map_err(|e| vz_error("the configuration", &e))?;
        Ok((config, sockets))
    }
}

/// A Linux machine, created and ready to start: what [`prepare`] made.
pub struct Prepared {
    machine: Arc<Machine>,
    /// The sockets of its network interfaces, kept until the machine is gone.
    _sockets: Vec<devices::virtio::net::backend::Unixgram>,
    /// The unpacked kernel, kept until the machine is gone.
    _kernel: Option<TempKernel>,
    cpus: u32,
    memory: u64,
}

/// Prepares `plan` (files resolved, the kernel unpacked if compressed, the configuration
/// built and validated, the machine created); its console on `io` when given.
pub fn prepare(plan: &LinuxPlan, io: Option<ConsoleIo>) -> Result<Prepared, Error> {
    let (plan, kernel) = crate::vz::files::prepare(plan, &std::env::temp_dir())?;
    let (config, sockets) = configuration(&plan, io)?;
    let machine = Machine::new(&config);
    Ok(Prepared { machine, _sockets: sockets, _kernel: kernel, cpus: plan.cpus, memory: plan.memory })
}

impl Prepared {
    /// Starts the machine and runs it until the guest stops or `control` stops it; the
    /// machine has stopped when this returns.
    pub fn run(self, control: Arc<Control>) -> Result<ExitReason, Error> {
        log::info!("booting on vz with {} vCPU(s) and {} MiB", self.cpus, self.memory >> 20);
        self.machine.start_and_watch(&control)
    }
}
