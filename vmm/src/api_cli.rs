//! (CLI) `--api-sock` and `--config-file`: Firecracker's API and configuration file.
//! The API starts the VM through [`CliHost`], which hands it to the main thread; the
//! main thread then waits for it as for any other run.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};

use hvrun::api::http::Limits;
use hvrun::api::model::{FullVmConfiguration, Logger};
use hvrun::api::router::{Api, Host, Running};
use hvrun::api::ApiServer;
use hvrun::snapshot::machine::SnapshotFiles;
use hvrun::{ExitReason, Vm, VmConfig, VmHandle};

use crate::signals;

/// What `--api-sock`, `--config-file` and their companions asked for.
#[derive(Debug)]
pub struct ApiOptions {
    /// `--api-sock`.
    pub socket: Option<PathBuf>,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--id`.
    pub id: String,
    /// `--http-api-max-payload-size`.
    pub max_body: usize,
}

/// Starts VMs for the API and hands each to the main thread.
struct CliHost {
    started: Sender<Vm>,
}

impl Host for CliHost {
    fn boot(&mut self, config: VmConfig) -> Result<Box<dyn Running>, String> {
        self.start(Vm::builder(config))
    }

    fn restore(&mut self, config: VmConfig, files: SnapshotFiles, paused: bool) -> Result<Box<dyn Running>, String> {
        // The disks are checked against the snapshot's (size and fingerprint).
        let builder = Vm::builder(config).restore_files(files, false);
        self.start(if paused { builder.start_paused() } else { builder })
    }

    fn saved_config(&mut self, files: &SnapshotFiles) -> Result<VmConfig, String> {
        let mut config = hvrun::snapshot::machine::saved_config(files).map_err(|e| e.to_string())?;
        config.console_stdin = true;
        Ok(config)
    }

    fn logger(&mut self, logger: &Logger) -> Result<(), String> {
        if logger.module.is_some() {
            return Err(hvrun::api::model::unsupported("a logger `module` filter"));
        }
        // Firecracker takes the level in any case.
        let level = match logger.level.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("off") => Some(log::LevelFilter::Off),
            Some("error") => Some(log::LevelFilter::Error),
            Some("warning" | "warn") => Some(log::LevelFilter::Warn),
            Some("info") => Some(log::LevelFilter::Info),
            Some("debug") => Some(log::LevelFilter::Debug),
            Some("trace") => Some(log::LevelFilter::Trace),
            Some(_) => {
                let given = logger.level.as_deref().unwrap_or_default();
                return Err(format!("Invalid log level `{given}`: use Error, Warning, Info, Debug, Trace or Off."));
            }
        };
        if let Some(path) = &logger.log_path {
            redirect_log(Path::new(path))?;
        }
        if let Some(level) = level {
            crate::set_log_level(level);
        }
        crate::set_log_format(logger.show_level, logger.show_log_origin);
        Ok(())
    }

    fn check_net(&mut self, net: &hvrun::config::NetConfig) -> Result<(), String> {
        match &net.backend {
            hvrun::config::NetBackendConfig::Tap(name) => check_tap(name),
            _ => Ok(()),
        }
    }
}

/// Opens the tap `name` and closes it again: Firecracker's check when a network
/// interface is put.
#[cfg(target_os = "linux")]
fn check_tap(name: &str) -> Result<(), String> {
    devices::virtio::net::backend::Tap::open(name)
        .map(drop)
        .map_err(|e| format!("Could not open the tap device {name}: {e} (create it first, or use hvrun_backend)."))
}

#[cfg(not(target_os = "linux"))]
fn check_tap(name: &str) -> Result<(), String> {
    Err(format!("host_dev_name `{name}`: tap devices exist on Linux only; use hvrun_backend (unixgram=PATH)."))
}

impl CliHost {
    fn start(&mut self, builder: hvrun::VmBuilder) -> Result<Box<dyn Running>, String> {
        let vm = builder.serial(std::io::stdout()).start().map_err(|e| e.to_string())?;
        let handle = vm.handle();
        self.started.send(vm).map_err(|_| "hvrun is exiting".to_string())?;
        Ok(Box::new(handle))
    }
}

/// Sends standard error (hvrun's log) to `path`, which must exist, as in Firecracker: a
/// file (appended to) or a FIFO (opened without waiting for a reader).
fn redirect_log(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("Cannot open the log file {}: {e}", path.display()))?;
    let _ = std::io::stderr().flush();
    // SAFETY: both descriptors are open; dup2 replaces descriptor 2 (standard error)
    // with a copy of the file's, which Rust's stderr handle writes through unchanged.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(format!("Cannot log to {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    hvrun::log_lines::redirected();
    Ok(())
}

/// Runs hvrun as Firecracker runs: configured by `--config-file`, by API calls on
/// `--api-sock`, or both; the VM starts at `InstanceStart` (or at once with a
/// configuration file). Returns when the VM stops; SIGTERM before it starts ends hvrun.
pub fn run(options: ApiOptions) -> Result<ExitReason, String> {
    // Before any thread exists, so that every thread inherits the mask.
    let blocked = signals::block();
    crate::raise_file_limit();
    let server = options.socket.as_deref().map(ApiServer::bind).transpose().map_err(|e| e.to_string())?;
    let (started, vms) = channel();
    let mut api = Api::new(Box::new(CliHost { started }), &options.id);
    if let Some(path) = &options.config_file {
        let config = read_config_file(path)?;
        api.start_from(config).map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    }
    let limits = Limits { max_body: options.max_body, ..Limits::default() };
    let server = server.map(|s| s.serve(api, limits)).transpose().map_err(|e| format!("--api-sock: {e}"))?;
    let running: Arc<OnceLock<VmHandle>> = Arc::default();
    // Removed only if it is still ours (another process may have put its own there).
    let socket = server.as_ref().map(ApiServer::socket_id);
    signals::press_then_stop_once_running(blocked, Arc::clone(&running), move || {
        // Standard error may be a full FIFO (`PUT /logger`): no eprintln!, which panics.
        let _ = writeln!(std::io::stderr(), "hvrun: stopped before the VM started");
        if let Some(socket) = &socket {
            socket.remove();
        }
        std::process::exit(crate::EXIT_STOPPED.into());
    });
    // The API's dispatcher holds the sender until the VM starts; without an API (and
    // a configuration file that started it) the VM is already in the channel.
    let vm = vms.recv().map_err(|_| "the API ended before the VM started".to_string())?;
    let _ = running.set(vm.handle());
    vm.wait().map_err(|e| e.to_string())
}

/// A Firecracker configuration file: the objects of `GET /vm/config`.
fn read_config_file(path: &Path) -> Result<FullVmConfiguration, String> {
    const MAX: u64 = 1 << 20;
    let file =
        devices::host_file::open_regular(path, false).map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX + 1), &mut text)
        .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    if text.len() as u64 > MAX {
        return Err(format!("--config-file {}: over {MAX} bytes", path.display()));
    }
    serde_json::from_str(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
}
