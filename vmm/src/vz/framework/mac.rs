//! macOS guests: installing one from a restore image into a new bundle, and running it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use objc2::rc::Retained;
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSData, NSError};
use objc2_virtualization::{
    VZDiskImageStorageDeviceAttachment, VZGraphicsDeviceConfiguration, VZKeyboardConfiguration, VZMacAuxiliaryStorage,
    VZMacAuxiliaryStorageInitializationOptions, VZMacGraphicsDeviceConfiguration, VZMacGraphicsDisplayConfiguration,
    VZMacHardwareModel, VZMacMachineIdentifier, VZMacOSBootLoader, VZMacOSInstaller, VZMacOSRestoreImage,
    VZMacPlatformConfiguration, VZPointingDeviceConfiguration, VZStorageDeviceConfiguration,
    VZUSBKeyboardConfiguration, VZUSBScreenCoordinatePointingDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtualMachineConfiguration,
};

use super::{limits, machine, on_complete, set_nets, share_devices, start_and_watch, take, url, vz_error};
use super::{Completion, Machine, Pending};
use crate::control::Control;
use crate::vz::bundle::{Bundle, Meta};
use crate::vz::mac::{check_install, sizes, Install, Ipsw, Run};
use crate::vz::plan::Net;
use crate::{Error, ExitReason};

/// The display a macOS guest gets (pixels, and pixels per inch).
const DISPLAY: (isize, isize, isize) = (1920, 1200, 80);

/// How long loading a restore image (or asking for the latest one) may take.
const LOAD_LIMIT: Duration = Duration::from_secs(300);

/// What identifies a macOS VM to the framework.
struct Identity {
    hardware: Retained<VZMacHardwareModel>,
    machine: Retained<VZMacMachineIdentifier>,
    aux: Retained<VZMacAuxiliaryStorage>,
}

/// The configuration of a macOS VM.
fn configuration(
    identity: &Identity,
    disk: &Path,
    (cpus, memory): (u32, u64),
    run: &Run,
) -> Result<(Retained<VZVirtualMachineConfiguration>, Vec<devices::virtio::net::backend::Unixgram>), Error> {
    // SAFETY: framework calls with valid, retained objects built here (the whole body);
    // every object is created and configured on this thread before the machine exists.
    unsafe {
        let platform = VZMacPlatformConfiguration::new();
        platform.setHardwareModel(&identity.hardware);
        platform.setMachineIdentifier(&identity.machine);
        platform.setAuxiliaryStorage(Some(&identity.aux));
        let config = VZVirtualMachineConfiguration::new();
        config.setPlatform(&platform);
        config.setBootLoader(Some(&VZMacOSBootLoader::new()));
        config.setCPUCount(cpus as usize);
        config.setMemorySize(memory);

        let display = VZMacGraphicsDisplayConfiguration::initWithWidthInPixels_heightInPixels_pixelsPerInch(
            VZMacGraphicsDisplayConfiguration::alloc(),
            DISPLAY.0,
            DISPLAY.1,
            DISPLAY.2,
        );
        let graphics = VZMacGraphicsDeviceConfiguration::new();
        graphics.setDisplays(&NSArray::from_retained_slice(&[display]));
        let graphics: Vec<Retained<VZGraphicsDeviceConfiguration>> = vec![Retained::into_super(graphics)];
        config.setGraphicsDevices(&NSArray::from_retained_slice(&graphics));
        let keyboards: Vec<Retained<VZKeyboardConfiguration>> =
            vec![Retained::into_super(VZUSBKeyboardConfiguration::new())];
        config.setKeyboards(&NSArray::from_retained_slice(&keyboards));
        let pointers: Vec<Retained<VZPointingDeviceConfiguration>> =
            vec![Retained::into_super(VZUSBScreenCoordinatePointingDeviceConfiguration::new())];
        config.setPointingDevices(&NSArray::from_retained_slice(&pointers));

        let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
            VZDiskImageStorageDeviceAttachment::alloc(),
            &url(disk),
            false,
        )
        .map_err(|e| vz_error(&format!("disk {}", disk.display()), &e))?;
        let device = VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            &attachment,
        );
        let disks: Vec<Retained<VZStorageDeviceConfiguration>> = vec![Retained::into_super(device)];
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));
        let sockets = set_nets(&config, &run.nets)?;
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&share_devices(&run.shares)));

        config.validateWithError().map_err(|e| vz_error("the configuration", &e))?;
        Ok((config, sockets))
    }
}

/// Waits for a completion handler that also hands back a restore image.
fn restore_image(ipsw: &Path) -> Result<Retained<VZMacOSRestoreImage>, Error> {
    let slot: Pending<Retained<VZMacOSRestoreImage>> = Arc::default();
    let out = Arc::clone(&slot);
    let done = block2::RcBlock::new(move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
        // SAFETY: the framework passes a valid image or a valid error (the other nil).
        let outcome = unsafe {
            match (Retained::retain(image), error.as_ref()) {
                (Some(image), None) => Ok(image),
                (_, Some(e)) => Err(e.localizedDescription().to_string()),
                (None, None) => Err("no image and no error".into()),
            }
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    });
    // SAFETY: a local file URL and a completion block, as the method requires.
    unsafe { VZMacOSRestoreImage::loadFileURL_completionHandler(&url(ipsw), &done) };
    let deadline = std::time::Instant::now() + LOAD_LIMIT;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if std::time::Instant::now() > deadline {
            return Err(Error::Vz(format!(
                "restore image {}: not loaded after {} s",
                ipsw.display(),
                LOAD_LIMIT.as_secs()
            )));
        }
        if let Some(outcome) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return outcome.map_err(|why| Error::Vz(format!("restore image {}: {why}", ipsw.display())));
        }
    }
}

/// The newest restore image this Mac supports, downloaded into `dir` with `curl`.
fn download_latest(dir: &Path) -> Result<PathBuf, Error> {
    let slot: Pending<String> = Arc::default();
    let out = Arc::clone(&slot);
    let done = block2::RcBlock::new(move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
        // SAFETY: the framework passes a valid image or a valid error (the other nil).
        let outcome = unsafe {
            match (image.as_ref(), error.as_ref()) {
                (Some(image), None) => Ok(image.URL().absoluteString().map(|s| s.to_string()).unwrap_or_default()),
                (_, Some(e)) => Err(e.localizedDescription().to_string()),
                (None, None) => Err("no image and no error".into()),
            }
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    });
    // SAFETY: a completion block, as the method requires.
    unsafe { VZMacOSRestoreImage::fetchLatestSupportedWithCompletionHandler(&done) };
    let deadline = std::time::Instant::now() + LOAD_LIMIT;
    let remote = loop {
        std::thread::sleep(Duration::from_millis(100));
        if std::time::Instant::now() > deadline {
            return Err(Error::Vz(format!("--ipsw latest: no answer after {} s", LOAD_LIMIT.as_secs())));
        }
        if let Some(outcome) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            break outcome.map_err(|why| Error::Vz(format!("--ipsw latest: {why}")))?;
        }
    };
    let local = dir.join("restore.ipsw");
    eprintln!("hvrun: downloading {remote}");
    let status = std::process::Command::new("curl")
        .args(["--fail", "--location", "--progress-bar", "--output"])
        .arg(&local)
        .arg(&remote)
        .status()
        .map_err(|e| Error::Vz(format!("--ipsw latest: running curl: {e}")))?;
    if !status.success() {
        return Err(Error::Vz(format!("--ipsw latest: downloading {remote} failed ({status})")));
    }
    Ok(local)
}

/// Installs macOS from `install.ipsw` into a new bundle.
pub fn install(install: &Install) -> Result<(), Error> {
    check_install(install)?;
    let ipsw = match &install.ipsw {
        Ipsw::File(path) => path.clone(),
        Ipsw::Latest => {
            std::fs::create_dir_all(&install.bundle)
                .map_err(|e| Error::Vz(format!("bundle {}: {e}", install.bundle.display())))?;
            download_latest(&install.bundle)?
        }
    };
    let image = restore_image(&ipsw)?;
    // SAFETY: framework calls on valid objects (the whole block).
    let (identity, meta) = unsafe {
        let requirements = image.mostFeaturefulSupportedConfiguration().ok_or_else(|| {
            Error::Vz(format!("this Mac cannot run the macOS in {} (no supported hardware model)", ipsw.display()))
        })?;
        let hardware = requirements.hardwareModel();
        if !hardware.isSupported() {
            return Err(Error::Vz("the image's hardware model is not supported on this Mac".into()));
        }
        let required = (requirements.minimumSupportedCPUCount() as u32, requirements.minimumSupportedMemorySize());
        let (cpus, memory) = sizes(install.cpus, install.memory, required, &limits())?;
        let machine = VZMacMachineIdentifier::new();
        let meta = Meta::new(
            cpus,
            memory,
            install.disk_size,
            &hardware.dataRepresentation().to_vec(),
            &machine.dataRepresentation().to_vec(),
        );
        let bundle = Bundle::create(&install.bundle, &meta).map_err(|e| Error::Vz(e.to_string()))?;
        let aux = VZMacAuxiliaryStorage::initCreatingStorageAtURL_hardwareModel_options_error(
            VZMacAuxiliaryStorage::alloc(),
            &url(&bundle.aux()),
            &hardware,
            VZMacAuxiliaryStorageInitializationOptions::empty(),
        )
        .map_err(|e| vz_error("creating the auxiliary storage", &e))?;
        (Identity { hardware, machine, aux }, meta)
    };
    let run = Run { bundle: install.bundle.clone(), gui: false, nets: vec![(Net::Nat, None)], shares: Vec::new() };
    let disk = install.bundle.join(crate::vz::bundle::DISK);
    let (config, _sockets) = configuration(&identity, &disk, (meta.cpus, meta.memory), &run)?;
    let (machine, queue) = machine(&config);
    let installer = Arc::new(Mutex::new(None::<Installer>));
    let installed = Completion::default();
    {
        let (m, slot, ipsw) = (Arc::clone(&machine), Arc::clone(&installer), ipsw.clone());
        let done = Arc::clone(&installed);
        queue.exec_sync(move || {
            // SAFETY: the installer is made and started on the machine's queue, as required.
            let made = unsafe {
                let installer = VZMacOSInstaller::initWithVirtualMachine_restoreImageURL(
                    VZMacOSInstaller::alloc(),
                    &m.vm,
                    &url(&ipsw),
                );
                installer.installWithCompletionHandler(&on_complete(&done));
                installer
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Installer(made));
        });
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let slot = Arc::clone(&installer);
        let fraction = Arc::new(Mutex::new(0.0f64));
        let out = Arc::clone(&fraction);
        queue.exec_sync(move || {
            if let Some(i) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                // SAFETY: on the machine's queue, where the installer lives.
                *out.lock().unwrap_or_else(|e| e.into_inner()) = unsafe { i.0.progress().fractionCompleted() };
            }
        });
        let done = *fraction.lock().unwrap_or_else(|e| e.into_inner());
        let bar = (done * 40.0) as usize;
        eprint!("\rinstalling macOS: [{}{}] {:>3.0}%", "#".repeat(bar), ".".repeat(40 - bar.min(40)), done * 100.0);
        let _ = std::io::stderr().flush();
        if let Some(outcome) = take(&installed) {
            eprintln!();
            return outcome.map_err(|why| Error::Vz(format!("installing macOS: {why}")));
        }
    }
}

/// The installer, used only on its machine's queue.
struct Installer(Retained<VZMacOSInstaller>);

// SAFETY: made, started and read only in closures run on the machine's serial queue.
unsafe impl Send for Installer {}

/// Runs the macOS VM in `run.bundle` until it stops or `control` stops it.
pub fn run(run: &Run, control: Arc<Control>) -> Result<ExitReason, Error> {
    let (bundle, meta) = Bundle::open(&run.bundle).map_err(|e| Error::Vz(e.to_string()))?;
    let bytes = |b: Option<Vec<u8>>| NSData::with_bytes(&b.unwrap_or_default());
    // SAFETY: framework initialisers given the bundle's saved data; nil means invalid.
    let identity = unsafe {
        Identity {
            hardware: VZMacHardwareModel::initWithDataRepresentation(
                VZMacHardwareModel::alloc(),
                &bytes(meta.hardware_model_bytes()),
            )
            .ok_or_else(|| Error::Vz("the bundle's hardware model is not one this Mac knows".into()))?,
            machine: VZMacMachineIdentifier::initWithDataRepresentation(
                VZMacMachineIdentifier::alloc(),
                &bytes(meta.machine_identifier_bytes()),
            )
            .ok_or_else(|| Error::Vz("the bundle's machine identifier is invalid".into()))?,
            aux: VZMacAuxiliaryStorage::initWithURL(VZMacAuxiliaryStorage::alloc(), &url(&bundle.aux())),
        }
    };
    let (config, _sockets) = configuration(&identity, &bundle.disk(), (meta.cpus, meta.memory), run)?;
    if run.gui {
        log::info!("booting macOS on vz in a window with {} vCPU(s) and {} MiB", meta.cpus, meta.memory >> 20);
        let title = format!("hvrun: {}", bundle.dir().display());
        return super::window::run(&config, &title, &control);
    }
    let (machine, queue): (Arc<Machine>, _) = machine(&config);
    log::info!("booting macOS on vz with {} vCPU(s) and {} MiB", meta.cpus, meta.memory >> 20);
    start_and_watch(machine, &queue, &control)
}
