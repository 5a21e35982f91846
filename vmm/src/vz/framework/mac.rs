//! macOS guests: installing one from a restore image into a new bundle, and running it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use objc2::rc::Retained;
use objc2::AnyThread;
use objc2_foundation::{NSArray, NSData, NSError};
use objc2_virtualization::{
    VZGraphicsDeviceConfiguration, VZKeyboardConfiguration, VZMacAuxiliaryStorage,
    VZMacAuxiliaryStorageInitializationOptions, VZMacGraphicsDeviceConfiguration, VZMacGraphicsDisplayConfiguration,
    VZMacHardwareModel, VZMacMachineIdentifier, VZMacOSBootLoader, VZMacOSInstaller, VZMacOSRestoreImage,
    VZMacPlatformConfiguration, VZPointingDeviceConfiguration, VZStorageDeviceConfiguration,
    VZUSBKeyboardConfiguration, VZUSBScreenCoordinatePointingDeviceConfiguration, VZVirtualMachineConfiguration,
};

use super::delegate::describe;
use super::{disk_device, limits, on_complete, set_nets, share_devices, take, url, vz_error};
use super::{Completion, Machine, Pending};
use crate::control::Control;
use crate::vz::bundle::{Bundle, Meta};
use crate::vz::files::canonical;
use crate::vz::mac::{check_install, download_paths, sizes, with_macs, Install, Ipsw, Run};
use crate::vz::plan::{Caching, Disk, Net, NetSpec};
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
    nets: &[NetSpec],
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

        // The framework's default caching, as Apple's samples and Tart use for macOS.
        let disk = Disk { path: disk.to_path_buf(), read_only: false, id: None, caching: Caching::Default };
        let disks: Vec<Retained<VZStorageDeviceConfiguration>> = vec![disk_device(&disk)?];
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));
        let sockets = set_nets(&config, nets)?;
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&share_devices(&run.shares)?));

        config.validateWithError().map_err(|e| vz_error("the configuration", &e))?;
        Ok((config, sockets))
    }
}

/// Waits up to [`LOAD_LIMIT`] for `slot` to be filled by a completion handler.
fn wait_for<T>(slot: &Pending<T>, what: &str) -> Result<T, Error> {
    let deadline = std::time::Instant::now() + LOAD_LIMIT;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(outcome) = take(slot) {
            return outcome.map_err(|why| Error::Vz(format!("{what}: {why}")));
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Vz(format!("{what}: no answer after {} s", LOAD_LIMIT.as_secs())));
        }
    }
}

/// Loads the restore image at `ipsw`.
fn restore_image(ipsw: &Path) -> Result<Retained<VZMacOSRestoreImage>, Error> {
    let slot: Pending<Retained<VZMacOSRestoreImage>> = Arc::default();
    let out = Arc::clone(&slot);
    let done = block2::RcBlock::new(move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
        // SAFETY: the framework passes a valid image or a valid error (the other nil).
        let outcome = unsafe {
            match (Retained::retain(image), error.as_ref()) {
                (Some(image), None) => Ok(image),
                (_, Some(e)) => Err(describe(e)),
                (None, None) => Err("no image and no error".into()),
            }
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    });
    // SAFETY: a local file URL and a completion block, as the method requires.
    unsafe { VZMacOSRestoreImage::loadFileURL_completionHandler(&url(ipsw), &done) };
    wait_for(&slot, &format!("restore image {}", ipsw.display()))
}

/// The newest restore image this Mac supports, downloaded with `curl` into `dir` (not
/// the bundle): resumed where an earlier download stopped, and reused when complete.
fn download_latest(dir: &Path) -> Result<PathBuf, Error> {
    let slot: Pending<String> = Arc::default();
    let out = Arc::clone(&slot);
    let done = block2::RcBlock::new(move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
        // SAFETY: the framework passes a valid image or a valid error (the other nil).
        let outcome = unsafe {
            match (image.as_ref(), error.as_ref()) {
                (Some(image), None) => Ok(image.URL().absoluteString().map(|s| s.to_string()).unwrap_or_default()),
                (_, Some(e)) => Err(describe(e)),
                (None, None) => Err("no image and no error".into()),
            }
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    });
    // SAFETY: a completion block, as the method requires.
    unsafe { VZMacOSRestoreImage::fetchLatestSupportedWithCompletionHandler(&done) };
    let remote = wait_for(&slot, "--ipsw latest")?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Vz(format!("--ipsw latest: {}: {e}", dir.display())))?;
    let (local, partial) = download_paths(&canonical("download directory", dir)?, &remote);
    if local.is_file() {
        eprintln!("hvrun: using {} (downloaded before)", local.display());
        return Ok(local);
    }
    eprintln!("hvrun: downloading {remote}\nhvrun: into {} (kept for later installs)", local.display());
    let status = std::process::Command::new("curl")
        .args(["--fail", "--location", "--progress-bar", "--continue-at", "-", "--output"])
        .arg(&partial)
        .arg(&remote)
        .status()
        .map_err(|e| Error::Vz(format!("--ipsw latest: running curl: {e}")))?;
    if !status.success() {
        return Err(Error::Vz(format!(
            "--ipsw latest: downloading {remote} failed ({status}); run the install again to resume"
        )));
    }
    std::fs::rename(&partial, &local).map_err(|e| Error::Vz(format!("--ipsw latest: {}: {e}", local.display())))?;
    Ok(local)
}

/// Installs macOS from `install.ipsw` into a new bundle; `control`'s stop or request to
/// shut down cancels the install. A bundle that did not finish is removed.
pub fn install(install: &Install, control: &Control) -> Result<(), Error> {
    check_install(install)?;
    let ipsw = match &install.ipsw {
        Ipsw::File(path) => canonical("restore image", path)?,
        Ipsw::Latest => download_latest(&install.downloads)?,
    };
    let image = restore_image(&ipsw).map_err(|e| match install.ipsw {
        // A download cut short and resumed wrongly stays cached: say how to start afresh.
        Ipsw::Latest => Error::Vz(format!("{e}; delete {} to download it again", ipsw.display())),
        Ipsw::File(_) => e,
    })?;
    // SAFETY: framework calls on valid objects (the whole block).
    let (hardware, machine_id, meta) = unsafe {
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
        (hardware, machine, meta)
    };
    // From here on, a failure removes what was made (`Unfinished`'s drop).
    let unfinished = Bundle::create(&install.bundle, &meta).map_err(|e| Error::Vz(e.to_string()))?;
    let dir = canonical("bundle", unfinished.bundle().dir())?;
    // SAFETY: a framework initialiser given a new file's URL and a supported model.
    let aux = unsafe {
        VZMacAuxiliaryStorage::initCreatingStorageAtURL_hardwareModel_options_error(
            VZMacAuxiliaryStorage::alloc(),
            &url(&dir.join(crate::vz::bundle::AUX)),
            &hardware,
            VZMacAuxiliaryStorageInitializationOptions::empty(),
        )
    }
    .map_err(|e| vz_error("creating the auxiliary storage", &e))?;
    let identity = Identity { hardware, machine: machine_id, aux };
    let run = Run { bundle: dir.clone(), gui: false, nets: vec![(Net::Nat, None)], shares: Vec::new() };
    let nets = with_macs(&run.nets, meta.mac());
    let disk = dir.join(crate::vz::bundle::DISK);
    let (config, _sockets) = configuration(&identity, &disk, (meta.cpus, meta.memory), &nets, &run)?;
    run_installer(&Machine::new(&config), &ipsw, control)?;
    unfinished.finish().map_err(|e| Error::Vz(e.to_string()))?;
    Ok(())
}

/// Runs the installer on `machine` with progress on standard error, until it finishes,
/// fails, or `control` cancels it.
fn run_installer(machine: &Arc<Machine>, ipsw: &Path, control: &Control) -> Result<(), Error> {
    let installer = Arc::new(Mutex::new(None::<Installer>));
    let installed = Completion::default();
    {
        let (slot, done, ipsw) = (Arc::clone(&installer), Arc::clone(&installed), ipsw.to_path_buf());
        machine.on_queue(move |vm| {
            // SAFETY: the installer is made and started on the machine's queue, as required.
            let made = unsafe {
                let installer = VZMacOSInstaller::initWithVirtualMachine_restoreImageURL(
                    VZMacOSInstaller::alloc(),
                    vm,
                    &url(&ipsw),
                );
                installer.installWithCompletionHandler(&on_complete(&done));
                installer
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Installer(made));
        });
    }
    let mut cancelled = false;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let cancel = !cancelled && (control.asked_to_stop().is_some() || control.stopping());
        cancelled |= cancel;
        let slot = Arc::clone(&installer);
        let done = machine.on_queue(move |_| {
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            let Some(installer) = slot.as_ref() else { return 0.0 };
            // SAFETY: on the machine's queue, where the installer lives.
            let progress = unsafe { installer.0.progress() };
            if cancel {
                progress.cancel();
            }
            progress.fractionCompleted()
        });
        let bar = (done.clamp(0.0, 1.0) * 40.0) as usize;
        eprint!("\rinstalling macOS: [{}{}] {:>3.0}%", "#".repeat(bar), ".".repeat(40 - bar), done * 100.0);
        let _ = std::io::stderr().flush();
        if let Some(outcome) = take(&installed) {
            eprintln!();
            return match outcome {
                Ok(()) => Ok(()),
                Err(_) if cancelled => {
                    Err(Error::Vz("installing macOS: cancelled; the unfinished bundle was removed".into()))
                }
                Err(why) => Err(Error::Vz(format!("installing macOS: {why}; the unfinished bundle was removed"))),
            };
        }
    }
}

/// The installer, used only on its machine's queue.
struct Installer(Retained<VZMacOSInstaller>);

// SAFETY: made, started and read only in closures run on the machine's serial queue.
unsafe impl Send for Installer {}

/// Runs the macOS VM in `run.bundle` until it stops or `control` stops it.
pub fn run(run: &Run, control: Arc<Control>) -> Result<ExitReason, Error> {
    let dir = canonical("bundle", &run.bundle)?;
    let (bundle, meta) = Bundle::open(&dir).map_err(|e| Error::Vz(e.to_string()))?;
    let _lock = bundle.lock().map_err(|e| Error::Vz(e.to_string()))?;
    let bytes = |b: Option<Vec<u8>>| NSData::with_bytes(&b.unwrap_or_default());
    // SAFETY: framework initialisers given the bundle's saved data; nil means invalid.
    let identity = unsafe {
        let hardware = VZMacHardwareModel::initWithDataRepresentation(
            VZMacHardwareModel::alloc(),
            &bytes(meta.hardware_model_bytes()),
        )
        .ok_or_else(|| Error::Vz("the bundle's hardware model is not one this Mac knows".into()))?;
        if !hardware.isSupported() {
            return Err(Error::Vz(format!(
                "this Mac cannot run the macOS version in {} (its hardware model is not supported here)",
                dir.display()
            )));
        }
        Identity {
            hardware,
            machine: VZMacMachineIdentifier::initWithDataRepresentation(
                VZMacMachineIdentifier::alloc(),
                &bytes(meta.machine_identifier_bytes()),
            )
            .ok_or_else(|| Error::Vz("the bundle's machine identifier is invalid".into()))?,
            aux: VZMacAuxiliaryStorage::initWithURL(VZMacAuxiliaryStorage::alloc(), &url(&bundle.aux())),
        }
    };
    let nets = with_macs(&run.nets, meta.mac());
    let mut run = run.clone();
    for share in &mut run.shares {
        share.host = canonical("shared directory", &share.host)?;
    }
    let (config, _sockets) = configuration(&identity, &bundle.disk(), (meta.cpus, meta.memory), &nets, &run)?;
    if run.gui {
        log::info!("booting macOS on vz in a window with {} vCPU(s) and {} MiB", meta.cpus, meta.memory >> 20);
        let title = format!("hvrun: {}", bundle.dir().display());
        return super::window::run(&config, &title, &control);
    }
    let machine = Machine::new(&config);
    log::info!("booting macOS on vz with {} vCPU(s) and {} MiB", meta.cpus, meta.memory >> 20);
    machine.start_and_watch(&control)
}
