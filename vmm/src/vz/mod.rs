//! The Virtualization.framework backend (`--backend vz`): Linux guests through Apple's
//! Linux boot loader (with Rosetta and virtio-fs shares), and macOS guests from a bundle.
//!
//! The framework runs the whole machine itself, so this backend is not a
//! `hypervisor::Hypervisor`: hvrun translates its configuration into the framework's
//! objects and watches the machine. The translation's decisions are portable and tested
//! here ([`plan`]: what each flag becomes, and which flags this backend cannot honour;
//! [`bundle`]: the macOS VM bundle's files and their round trip); the framework calls
//! live in the macOS-only layer.

pub mod bundle;
pub mod files;
#[cfg(target_os = "macos")]
pub mod framework;
pub mod mac;
pub mod plan;
pub mod watch;

use std::sync::Arc;

use crate::control::Control;
use crate::{Error, ExitReason, VmHandle};

/// Installs macOS from a restore image into a new bundle (`hvrun macos install`),
/// showing progress on standard error. The request is checked first on every host.
/// `started` gets a handle whose stop (or request to shut down) cancels the install; a
/// bundle that did not finish is removed.
pub fn install_macos(install: &mac::Install, started: impl FnOnce(VmHandle)) -> Result<(), Error> {
    mac::check_install(install)?;
    let control = Control::new();
    started(VmHandle::new(Arc::clone(&control)));
    #[cfg(target_os = "macos")]
    {
        framework::mac::install(install, &control)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = control;
        Err(not_here())
    }
}

/// Runs the macOS VM in a bundle until it stops (`hvrun macos run`). `started` gets the
/// VM's handle first, to stop it or ask the guest to shut down from any thread (with
/// `--gui` this thread runs the window).
pub fn run_macos(run: &mac::Run, started: impl FnOnce(VmHandle)) -> Result<ExitReason, Error> {
    let control = Control::new();
    started(VmHandle::new(Arc::clone(&control)));
    #[cfg(target_os = "macos")]
    {
        framework::mac::run(run, control)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = (run, control);
        Err(not_here())
    }
}

#[cfg(not(target_os = "macos"))]
fn not_here() -> Error {
    Error::Vz("macOS guests need Apple's Virtualization.framework: run this on a Mac".into())
}
