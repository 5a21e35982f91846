//! hvrun: a virtual machine monitor for arm64 Linux guests.
//!
//! This is the library behind the `hvrun` binary and the API for embedding it. It owns
//! the machine: it validates a [`VmConfig`], lays out guest memory, loads the kernel,
//! builds the device tree, creates the VM through the host's hypervisor (KVM on arm64
//! Linux; Hypervisor.framework on Apple Silicon macOS), wires the devices onto the MMIO
//! bus and runs the vCPU loop until the guest powers off.
//!
//! ```no_run
//! let config = hvrun::VmConfig::new("Image");
//! match hvrun::run(&config) {
//!     Ok(reason) => println!("guest stopped: {reason:?}"),
//!     Err(e) => eprintln!("hvrun: {e}"),
//! }
//! ```

// The machine's parts: built only where a machine is (arm64 hosts), tested everywhere.
pub mod api;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod backends;
mod boot_files;
pub mod config;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod console;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod control;
pub mod control_socket;
pub mod embed;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod irqchip;
pub mod kernel_file;
pub mod log_lines;
#[cfg(target_arch = "aarch64")]
mod machine;
pub mod metrics;
pub mod selftest;
mod slots;
pub mod snapshot;
#[cfg(test)]
mod testing;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod timeline;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod vcpu;
pub mod vz;

/// What an embedder implements to give the guest devices of its own, and the types those
/// traits name: a [`Disk`](extend::Disk) for [`VmBuilder::disk`], a
/// [`NetBackend`](extend::NetBackend) for [`VmBuilder::net`], a
/// [`VirtioDevice`](extend::VirtioDevice) for [`VmBuilder::virtio`].
///
/// A device of one's own serves its queues with [`drain_queue`](extend::drain_queue),
/// which carries hvrun's defences against a hostile driver (a runaway ring index, a
/// chain that loops, a used ring outside memory) and interrupts the driver as it asked;
/// `vmm/examples/own_device.rs` is a complete one. The crates the traits are written in
/// ([`virtio_queue`], [`vm_memory`]) are
/// re-exported so an embedder builds against the same versions.
pub mod extend {
    pub use devices::virtio::block::disk::{Disk, MemDisk};
    pub use devices::virtio::iovec::GuestIovecs;
    pub use devices::virtio::net::backend::{NetBackend, Wake, VNET_HDR_LEN};
    pub use devices::virtio::net::Mac;
    pub use devices::virtio::{
        drain_queue, queue_pair, read_config_bytes, single_queue, ActivateError, Activation, Chain, GuestMemory,
        Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING,
    };
    pub use {virtio_queue, vm_memory};
}

pub use config::{BalloonOptions, ConfigError, VmConfig, VsockConfig};
pub use devices::ratelimit::GuestLogLimiter;
pub use devices::virtio::balloon::{stats as balloon_stats, BalloonHandle, Stats as BalloonStats};
pub use devices::virtio::vsock::VsockHandle;
pub use embed::{ConsoleIo, Event, PauseError, Vm, VmBuilder, VmHandle};
pub use irqchip::GicError;

/// Why a guest stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest powered off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET).
    Reset,
    /// The guest reported a crash.
    Crash,
    /// The host stopped it (the console's Ctrl-A X).
    Stopped,
}

/// Errors starting or running a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file named in the configuration cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// Which file it is (`"kernel"`, `"initrd"`).
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel image is unusable.
    #[error("kernel {path}: {source}")]
    Kernel {
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        source: arch_aarch64::image::ImageError,
    },
    /// The kernel file is compressed in a way hvrun cannot unpack, or damaged.
    #[error("kernel {path}: {source}")]
    KernelFormat {
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        source: kernel_file::FormatError,
    },
    /// A disk's image could not be replaced ([`VmHandle::replace_disk`]).
    #[error("disk {id}: {why}")]
    DiskUpdate {
        /// The disk's id.
        id: String,
        /// Why not.
        why: String,
    },
    /// This host cannot run arm64 guests.
    #[error(
        "this host ({0}) cannot run arm64 guests: hvrun needs an arm64 Linux host with KVM or an Apple Silicon Mac"
    )]
    UnsupportedHost(String),
    /// The hypervisor failed.
    #[error("{0}")]
    Hypervisor(#[from] hypervisor::Error),
    /// Setting up guest memory or loading into it failed.
    #[error("guest memory: {what}{}", with_source(source.as_deref()))]
    Memory {
        /// What was being done (`"loading kernel Image"`, `"writing the device tree"`).
        what: String,
        /// Why it failed, where something said.
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Building the device tree failed.
    #[error(transparent)]
    Fdt(#[from] fdt::FdtError),
    /// The devices could not be wired up.
    #[error("devices: {0}")]
    Devices(#[from] devices::bus::BusError),
    /// A virtio device asked for queues virtio does not allow.
    #[error("virtio: device type {device}: {source}")]
    Virtio {
        /// Its virtio device type.
        device: u32,
        /// What is wrong with its queues.
        source: virtio_queue::Error,
    },
    /// The console could not be set up.
    #[error("console: {what}: {source}")]
    Console {
        /// Which console (`"--console socket=PATH"`, `"the terminal"`).
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A network backend could not be opened.
    #[error("--net {what}: {source}{hint}")]
    Net {
        /// The interface, as `--net` names it.
        what: String,
        /// Why.
        source: std::io::Error,
        /// What to check, or "".
        hint: &'static str,
    },
    /// The vsock device's socket could not be set up.
    #[error("--vsock: {0}")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The thread running the VM panicked (a bug in hvrun).
    #[error("the VM thread panicked")]
    Panicked,
    /// The interrupt controller asked for cannot be had.
    #[error(transparent)]
    Gic(#[from] irqchip::GicError),
    /// Virtualization.framework refused or failed.
    #[error("vz: {0}")]
    Vz(String),
    /// A configuration Virtualization.framework cannot run.
    #[error(transparent)]
    VzPlan(#[from] vz::plan::PlanError),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A vCPU exited for a reason the VMM cannot serve.
    #[error("vcpu{vcpu} stopped on an exit hvrun cannot handle: {why}")]
    UnhandledExit {
        /// The vCPU.
        vcpu: u32,
        /// The backend's description of the exit.
        why: String,
    },
}

/// `: source`, or nothing.
fn with_source(source: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    source.map(|e| format!(": {e}")).unwrap_or_default()
}

/// Boots the VM `config` describes on this host's hypervisor and runs it until the guest
/// stops, the serial port's output going to standard output: what the `hvrun` command
/// does. Everything is validated before any vCPU runs. [`Vm::builder`] gives more
/// control.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    Vm::builder(config.clone()).serial(std::io::stdout()).start()?.wait()
}
