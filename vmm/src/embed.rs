//! The embedding API: start a VM from code, control it from any thread, hear its events.
//!
//! ```no_run
//! use std::io::Cursor;
//! use hvrun::{Event, Vm, VmConfig};
//!
//! let mut config = VmConfig::new("Image");
//! config.initrd = Some("initramfs.cpio".into());
//! config.cmdline = Some("console=hvc0 quiet".into());
//! let vm = Vm::builder(config)
//!     .console(Cursor::new(b"echo hi\n".to_vec()), std::io::sink())
//!     .start()?;
//! let control = vm.handle();
//! std::thread::spawn(move || {
//!     if control.pause().is_ok() {
//!         control.resume();
//!     }
//! });
//! for event in vm.events().iter() {
//!     if let Event::Exited(reason) = event {
//!         println!("guest stopped: {reason:?}");
//!         break;
//!     }
//! }
//! let reason = vm.wait()?;
//! # Ok::<(), hvrun::Error>(())
//! ```
//!
//! The library installs no handlers for the usual signals and leaves the terminal alone
//! unless the configuration asks for it ([`VmConfig::console_stdin`],
//! [`crate::config::ConsoleConfig::Terminal`]). On KVM it does install one handler, for
//! a real-time signal (`SIGRTMIN`) that kicks vCPU threads out of `KVM_RUN`; it never
//! sends that signal to threads other than its own vCPUs.

use std::io::{Read, Write};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::virtio::block::disk::Disk;
use devices::virtio::net::backend::NetBackend;
use devices::virtio::net::Mac;
use devices::virtio::VirtioDevice;

use crate::boot_files::Images;
use crate::control::Control;
pub use crate::control::PauseError;
use crate::snapshot::machine::SnapshotFiles;
use crate::{Error, ExitReason, VmConfig};

/// Something that happened to a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The guest wrote the boot-timer device (its init is running).
    BootTimer {
        /// Since the VM was started.
        since_start: Duration,
        /// Since the first vCPU first entered the guest.
        since_first_entry: Option<Duration>,
    },
    /// Every vCPU has left the guest and waits ([`VmHandle::pause`]).
    Paused,
    /// The vCPUs run again ([`VmHandle::resume`]).
    Resumed,
    /// The machine stopped: the guest powered off, reset or crashed, or the host stopped
    /// it. The last event; [`Vm::wait`] returns the same reason (or the error that
    /// stopped it, with no event).
    Exited(ExitReason),
}

/// The guest's virtio console (hvc0) on an embedder's reader and writer.
pub struct ConsoleIo {
    /// What the guest reads; `None`: the console has no input.
    pub input: Option<Box<dyn Read + Send>>,
    /// Where the guest's output goes.
    pub output: Box<dyn Write + Send>,
}

impl std::fmt::Debug for ConsoleIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleIo").field("input", &self.input.is_some()).finish_non_exhaustive()
    }
}

/// What a machine is built with besides its configuration: an embedder's readers,
/// writers, backends and devices.
// Only arm64 hosts build machines; elsewhere `start` stops at the host check.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
#[derive(Default)]
pub(crate) struct Io {
    /// hvc0 on the embedder's reader and writer (instead of `VmConfig::console`).
    pub console: Option<ConsoleIo>,
    /// Where the serial port's output goes (discarded when `None`).
    pub serial: Option<Box<dyn Write + Send>>,
    /// What the serial port's input reads.
    pub serial_input: Option<Box<dyn Read + Send>>,
    /// The embedder's disks, each with its serial, after the configuration's.
    pub disks: Vec<(Box<dyn Disk>, String)>,
    /// The embedder's network backends, each with its MAC, after the configuration's.
    pub nets: Vec<(Box<dyn NetBackend>, Option<Mac>)>,
    /// The embedder's own virtio devices, after the built-in ones.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// A kernel and initrd given as bytes.
    pub images: Images,
    /// The self-test probe, with where its verdict goes (`hvrun selftest` only).
    pub probe: Option<Arc<std::sync::Mutex<devices::probe::Verdict>>>,
    /// When to print the emulated GIC's state, for debugging a hung guest.
    pub dump_after: Option<Duration>,
    /// Vsock ports the embedder serves in-process, each with where its connections go.
    pub vsock_listeners: Vec<(u32, std::sync::mpsc::SyncSender<std::os::unix::net::UnixStream>)>,
    /// Continue this snapshot instead of booting.
    pub restore: Option<Restore>,
    /// The vCPUs park before their first entry, until [`VmHandle::resume`].
    pub start_paused: bool,
}

/// A restore asked for: the snapshot's files, and whether to take the disks as they
/// are even if they are not the images the snapshot was taken with.
#[derive(Debug, Clone)]
pub(crate) struct Restore {
    /// The snapshot.
    pub files: SnapshotFiles,
    /// Take the disks as they are.
    pub trust_disks: bool,
}

impl Io {
    /// The first thing here that Virtualization.framework cannot take (it builds the
    /// machine itself and boots files by path), if any. (A serial writer is fine: the
    /// framework's machine has no serial port, so it gets nothing.)
    fn not_for_vz(&self) -> Option<&'static str> {
        [
            (!self.disks.is_empty(), "VmBuilder::disk"),
            (!self.nets.is_empty(), "VmBuilder::net"),
            (!self.devices.is_empty(), "VmBuilder::virtio"),
            (self.images.kernel.is_some(), "VmBuilder::kernel_image"),
            (self.images.initrd.is_some(), "VmBuilder::initrd_image"),
            (self.serial_input.is_some(), "VmBuilder::serial_input"),
            (!self.vsock_listeners.is_empty(), "VmBuilder::vsock_listener"),
            (self.restore.is_some(), "VmBuilder::restore"),
            (self.start_paused, "VmBuilder::start_paused"),
        ]
        .into_iter()
        .find_map(|(given, what)| given.then_some(what))
    }

    /// What these add to the configuration's virtio devices.
    fn extras(&self) -> crate::slots::Extras {
        crate::slots::Extras {
            disks: self.disks.len(),
            nets: self.nets.len(),
            devices: self.devices.len(),
            console: self.console.is_some(),
        }
    }
}

/// Builds a [`Vm`]: a configuration plus what is not data (readers and writers, an
/// embedder's own disks, network backends and virtio devices, a kernel in memory).
pub struct VmBuilder {
    config: VmConfig,
    io: Io,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .field("console", &self.io.console)
            .field("disks", &self.io.disks.len())
            .field("nets", &self.io.nets.len())
            .field("devices", &self.io.devices.len())
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// Gives the guest a virtio console (hvc0) reading `input` and writing to `output`,
    /// in place of what the configuration's `console` says. Input is copied to the guest
    /// by a thread of its own as the guest reads it; a slow guest stalls that thread,
    /// never a vCPU.
    pub fn console(mut self, input: impl Read + Send + 'static, output: impl Write + Send + 'static) -> Self {
        self.io.console = Some(ConsoleIo { input: Some(Box::new(input)), output: Box::new(output) });
        self
    }

    /// Gives the guest a virtio console (hvc0) with output only.
    pub fn console_output(mut self, output: impl Write + Send + 'static) -> Self {
        self.io.console = Some(ConsoleIo { input: None, output: Box::new(output) });
        self
    }

    /// Sends the serial port's (PL011, `ttyAMA0`) output to `output`. Without this it is
    /// discarded: the library does not write to standard output unless asked.
    pub fn serial(mut self, output: impl Write + Send + 'static) -> Self {
        self.io.serial = Some(Box::new(output));
        self
    }

    /// Feeds `input` to the serial port (what the guest reads from `ttyAMA0`), by a thread
    /// of its own as the guest takes it (the PL011's receive FIFO holds 32 bytes; a guest
    /// that does not read stalls that thread, never a vCPU).
    pub fn serial_input(mut self, input: impl Read + Send + 'static) -> Self {
        self.io.serial_input = Some(Box::new(input));
        self
    }

    /// Adds a disk of the embedder's own (in memory, over the network, copy-on-write...)
    /// as a virtio-blk device after the configuration's disks: the guest sees it as the
    /// next `/dev/vdX`, with `id` as its serial (1 to 20 ASCII bytes). The device calls it
    /// from its own thread; [`Disk::flush`] must make completed writes durable before it
    /// returns, since the guest's flush is acknowledged then.
    pub fn disk(mut self, disk: impl Disk + 'static, id: &str) -> Self {
        self.io.disks.push((Box::new(disk), id.into()));
        self
    }

    /// Adds a network interface on the embedder's backend (an in-process network stack,
    /// say; see [`NetBackend`] for how it wakes the device), after the configuration's
    /// interfaces, with MAC address `mac` (`None`: one derived from its position).
    pub fn net(mut self, backend: impl NetBackend + 'static, mac: Option<Mac>) -> Self {
        self.io.nets.push((Box::new(backend), mac));
        self
    }

    /// Adds a virtio device of the embedder's own, after the built-in ones. It is placed
    /// and wired like them: a virtio-mmio window, an interrupt line and a device-tree
    /// node, from the same allocator (so [`VmBuilder::start`] refuses a machine with more
    /// devices than interrupt lines).
    pub fn virtio(mut self, device: impl VirtioDevice + 'static) -> Self {
        self.io.devices.push(Box::new(device));
        self
    }

    /// Boots `image` (an arm64 Linux `Image`) instead of reading the configuration's
    /// kernel file, whose path then only names it in messages.
    pub fn kernel_image(mut self, image: impl Into<Arc<[u8]>>) -> Self {
        self.io.images.kernel = Some(image.into());
        self
    }

    /// Hands the kernel `initrd` as its initramfs instead of the configuration's file.
    pub fn initrd_image(mut self, initrd: impl Into<Arc<[u8]>>) -> Self {
        self.io.images.initrd = Some(initrd.into());
        self
    }

    /// Gives the guest a virtio-balloon with `options` (as `--balloon` does): with free
    /// page reporting, memory the guest frees goes back to the host within seconds; the
    /// target is set with [`VmHandle::set_balloon_target`]. Not with `--backend vz`.
    pub fn balloon(mut self, options: crate::config::BalloonOptions) -> Self {
        self.config.balloon = Some(options);
        self
    }

    /// Gives the guest a virtio-vsock device (as `--vsock` does): CID `vsock.cid`,
    /// listening on the unix socket `vsock.socket` for host programs, which write
    /// `CONNECT <port>\n` and read `OK <host port>\n` once the guest accepts; the guest's
    /// connections to host port P go to the socket `vsock.socket`_P, or to the embedder
    /// ([`VmBuilder::vsock_listener`]). Firecracker's and Cloud Hypervisor's protocol.
    /// Not with `--backend vz`.
    pub fn vsock(mut self, vsock: crate::config::VsockConfig) -> Self {
        self.config.vsock = Some(vsock);
        self
    }

    /// Serves the guest's vsock connections to host port `port` in-process: for each, the
    /// host end of a connected socket pair is sent down `connections` (a blocking
    /// [`UnixStream`](std::os::unix::net::UnixStream); the device holds the other end and
    /// moves its bytes to and from the guest). The socket `vsock.socket`_`port` is then not
    /// tried; once the receiver is dropped, it is again. The channel's bound
    /// (`std::sync::mpsc::sync_channel(n)`) is how many connections may wait for the
    /// embedder: while it is full, the guest's connections to the port are refused.
    /// [`VmHandle::vsock`] adds and removes ports while the guest runs. Needs
    /// [`VmBuilder::vsock`].
    pub fn vsock_listener(
        mut self,
        port: u32,
        connections: std::sync::mpsc::SyncSender<std::os::unix::net::UnixStream>,
    ) -> Self {
        self.io.vsock_listeners.push((port, connections));
        self
    }

    /// For debugging a guest that hangs: prints the state of hvrun's emulated GIC and of
    /// each vCPU's interrupt line to standard error `after` the start (nothing with the
    /// hypervisor's GIC). The `hvrun` command takes it from `HVRUN_DUMP_AFTER=SECS`.
    pub fn dump_state_after(mut self, after: Duration) -> Self {
        self.io.dump_after = Some(after);
        self
    }

    /// Continues the guest saved in the snapshot directory `dir` ([`VmHandle::snapshot`])
    /// instead of booting one. The configuration must be the snapshot's
    /// ([`crate::snapshot::machine::saved_config`]) with, where they changed, the paths of
    /// its disks and its network, console and vsock backends; an embedder gives again
    /// the disks, backends and devices it added, in the same order. The disks must be the
    /// images the snapshot was taken with (same size and fingerprint) unless
    /// `trust_disks`. A snapshot this host or this configuration cannot continue is an
    /// error from [`VmBuilder::start`], before any vCPU runs.
    pub fn restore(self, dir: impl AsRef<std::path::Path>, trust_disks: bool) -> Self {
        self.restore_files(SnapshotFiles::in_dir(dir.as_ref()), trust_disks)
    }

    /// [`VmBuilder::restore`] from a state file and a memory file wherever they are
    /// ([`VmHandle::snapshot_files`]).
    pub fn restore_files(mut self, files: SnapshotFiles, trust_disks: bool) -> Self {
        self.io.restore = Some(Restore { files, trust_disks });
        self
    }

    /// Starts the machine paused: the devices run, but every vCPU parks before its first
    /// entry into the guest until [`VmHandle::resume`] (on Hypervisor.framework the
    /// guest's virtual counter stands still meanwhile; on KVM it runs on, as in any
    /// pause: [`VmHandle::pause`]). A restored guest then does not run a single instruction
    /// before it is resumed (Firecracker's snapshot load with `resume_vm: false`).
    pub fn start_paused(mut self) -> Self {
        self.io.start_paused = true;
        self
    }

    /// Adds the self-test probe (`devices::probe`), which records the guest's verdict in
    /// `verdict`: for `hvrun selftest`'s guests.
    pub(crate) fn probe(mut self, verdict: Arc<std::sync::Mutex<devices::probe::Verdict>>) -> Self {
        self.io.probe = Some(verdict);
        self
    }

    /// Validates the configuration, opens its files and backends, creates the VM and
    /// loads the guest, then starts the vCPUs on their own threads. Every error that can
    /// be found before the guest runs is returned here.
    pub fn start(self) -> Result<Vm, Error> {
        let VmBuilder { config, io } = self;
        config.validate()?;
        if config.vsock.is_none() && !io.vsock_listeners.is_empty() {
            return Err(crate::config::ConfigError::VsockListenerWithoutVsock.into());
        }
        if config.backend == Some(crate::config::Backend::Vz) {
            if let Some(what) = io.not_for_vz() {
                return Err(crate::config::ConfigError::NotWithVz(what).into());
            }
        } else {
            crate::slots::assign(crate::slots::count(&config, &io.extras()))?;
        }
        crate::config::Backend::for_host(config.backend, std::env::consts::OS)?;
        if let Some((_, id)) = io.disks.iter().find(|(_, id)| !crate::config::valid_disk_id(id)) {
            return Err(crate::config::ConfigError::BadDisk(format!("id={id}")).into());
        }
        let control = Control::new();
        let (events, receiver) = channel();
        control.set_events(events);
        if io.start_paused {
            control.pause_before_start();
        }
        let run = if config.backend == Some(crate::config::Backend::Vz) {
            build_vz(&config, io, Arc::clone(&control))?
        } else {
            build(&config, io, Arc::clone(&control))?
        };
        let runner = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name("hvrun-vm".into())
            .spawn(move || {
                let outcome = run();
                if let Ok(reason) = &outcome {
                    runner.emit(Event::Exited(*reason));
                }
                outcome
            })
            .map_err(Error::Thread)?;
        Ok(Vm { handle: VmHandle::new(control), thread, events: receiver })
    }
}

/// A built machine, ready to run on its own thread.
type Ready = Box<dyn FnOnce() -> Result<ExitReason, Error> + Send>;

/// The run on Virtualization.framework: the configuration translated and checked against
/// this Mac's limits now, the machine started by the run.
#[cfg(target_os = "macos")]
fn build_vz(config: &VmConfig, io: Io, control: Arc<Control>) -> Result<Ready, Error> {
    use crate::config::ConsoleConfig;
    use crate::console::{self, InputTarget, RawTerminal};
    // The framework has no serial port: the embedder's serial writer has nothing to carry.
    let Io { mut console, .. } = io;
    // The terminal goes through hvrun, as on the other backends: raw mode, and Ctrl-A X
    // to quit; the framework reads the other end of a pipe. The pipe is made now, but
    // raw mode and the thread reading standard input start only once everything else
    // is ready, so a failed start leaves the terminal as it was.
    let mut terminal_pipe = None;
    if console.is_none() && config.effective_console() == ConsoleConfig::Terminal && config.console_stdin {
        let (pipe, input) = crate::backends::blocking_pipe()
            .map_err(|source| Error::Console { what: "the terminal".into(), source })?;
        console = Some(ConsoleIo { input: Some(Box::new(input)), output: Box::new(std::io::stdout()) });
        terminal_pipe = Some(pipe);
    }
    // An embedder's (or the terminal's) console takes the place of the configuration's.
    let mut config = config.clone();
    if console.is_some() {
        config.console = Some(ConsoleConfig::Terminal);
        config.console_stdin = false;
    }
    let plan = crate::vz::plan::linux(&config, &crate::vz::framework::limits())?;
    // Files, the configuration, Rosetta and the machine: every error before the run.
    let prepared = crate::vz::framework::linux::prepare(&plan, console)?;
    let mut terminal = None;
    if let Some(pipe) = terminal_pipe {
        let raw = RawTerminal::enter().map_err(|source| Error::Console { what: "the terminal".into(), source })?;
        console::spawn_input(Box::new(std::io::stdin()), InputTarget::Pipe(pipe), control.clone(), raw.is_some());
        terminal = raw;
    }
    Ok(Box::new(move || {
        let _terminal = terminal;
        prepared.run(control)
    }))
}

#[cfg(not(target_os = "macos"))]
fn build_vz(_config: &VmConfig, _io: Io, _control: Arc<Control>) -> Result<Ready, Error> {
    // `Backend::for_host` refuses vz off macOS before this; say so again, to be sure.
    Err(crate::config::ConfigError::BackendUnavailable("vz", "Virtualization.framework exists on macOS only").into())
}

#[cfg(target_arch = "aarch64")]
fn build(config: &VmConfig, io: Io, control: Arc<Control>) -> Result<Ready, Error> {
    crate::machine::build(config, io, control)
}

#[cfg(not(target_arch = "aarch64"))]
fn build(config: &VmConfig, io: Io, _control: Arc<Control>) -> Result<Ready, Error> {
    // Check the files anyway, so a typo gets the same error on every host.
    match &io.restore {
        Some(restore) => {
            crate::snapshot::machine::Loaded::read(&restore.files)?.check_disks(&config.disks, restore.trust_disks)?
        }
        None => drop(crate::boot_files::BootFiles::open_with(config, &io.images)?),
    }
    Err(Error::UnsupportedHost(format!("{} {}", std::env::consts::ARCH, std::env::consts::OS)))
}

/// How long [`VmHandle::pause`] waits for every vCPU to leave the guest.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    handle: VmHandle,
    thread: JoinHandle<Result<ExitReason, Error>>,
    events: Receiver<Event>,
}

impl Vm {
    /// Starts building a VM for `config`.
    pub fn builder(config: VmConfig) -> VmBuilder {
        VmBuilder { config, io: Io::default() }
    }

    /// A handle that pauses, resumes and stops this VM from any thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The VM's events, in the order they happened.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Waits until the machine stops and says why.
    pub fn wait(self) -> Result<ExitReason, Error> {
        self.thread.join().unwrap_or(Err(Error::Panicked))
    }
}

/// Pauses, resumes and stops a VM; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct VmHandle {
    control: Arc<Control>,
}

impl VmHandle {
    /// The handle of the machine `control` controls.
    pub(crate) fn new(control: Arc<Control>) -> Self {
        VmHandle { control }
    }

    /// Takes every vCPU out of the guest and keeps it out until [`VmHandle::resume`];
    /// returns once they are all out. Devices finish the I/O they have started. On
    /// Hypervisor.framework the guest's virtual counter stands still while paused (no
    /// jump on resume); on KVM it runs on. A vCPU that does not come out within
    /// [`PAUSE_TIMEOUT`] fails the pause and the VM runs on. With `--backend vz` the
    /// framework pauses the machine within 100 ms of the call (hvrun watches it at that
    /// pace), after it returns.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.control.pause(PAUSE_TIMEOUT)
    }

    /// Each vCPU's last exits (oldest first, with syndrome and addresses, then the PC) as they
    /// were when the VM stopped: for a bug report. Empty while it runs, and on KVM, which
    /// decodes exits itself.
    pub fn recent_exits(&self) -> Vec<(u32, Vec<String>)> {
        self.control.recent_exits()
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.paused()
    }

    /// Asks the guest to shut down cleanly, as a power button does: on KVM and
    /// Hypervisor.framework the machine's virtio-input power button sends KEY_POWER (which
    /// systemd-logind, acpid or the guest's own script acts on); on Virtualization.framework
    /// the framework's `requestStop`. Returns whether the guest can hear it (it has a
    /// driver for the button); a guest that ignores it keeps running, and
    /// [`VmHandle::stop`] ends it.
    pub fn request_shutdown(&self) -> bool {
        self.control.ask_guest_to_stop()
    }

    /// The machine's counters so far, as one JSON object of totals: each vCPU's exits
    /// by kind, each virtio device's starts, resets, interrupts and failures, the UART's
    /// bytes ([`crate::metrics::collect`]).
    pub fn metrics(&self) -> serde_json::Value {
        self.control.collect_metrics()
    }

    /// Asks the guest to hold `bytes` in its balloon (rounded down to 4 KiB pages): the
    /// guest inflates (gives the host that much memory) or deflates towards it, and says
    /// how far it got in [`devices::virtio::balloon::BalloonHandle::actual`] (see
    /// [`VmHandle::balloon`]). Returns false if the machine has no balloon
    /// ([`VmBuilder::balloon`], `--balloon`).
    pub fn set_balloon_target(&self, bytes: u64) -> bool {
        self.control.balloon().map(|b| b.set_target(bytes)).is_some()
    }

    /// The machine's balloon, for its target, what the guest holds (`actual`), the
    /// memory given back so far and the guest's last statistics; `None` without one.
    pub fn balloon(&self) -> Option<devices::virtio::balloon::BalloonHandle> {
        self.control.balloon().cloned()
    }

    /// The machine's vsock device, to serve ports in-process
    /// ([`devices::virtio::vsock::VsockHandle::listen`]) or send the guest a transport
    /// reset; `None` without one ([`VmBuilder::vsock`], `--vsock`).
    pub fn vsock(&self) -> Option<devices::virtio::vsock::VsockHandle> {
        self.control.vsock().cloned()
    }

    /// Stops the VM (the guest gets no say); [`Vm::wait`] then returns
    /// [`ExitReason::Stopped`].
    pub fn stop(&self) {
        self.control.stop(Ok(ExitReason::Stopped));
    }

    /// Saves the VM into the directory `dir` (created if needed; a snapshot there is
    /// replaced): pauses it if it runs (within [`PAUSE_TIMEOUT`]), saves every vCPU, the
    /// interrupt controller, the devices and guest RAM, and leaves it paused
    /// ([`VmHandle::resume`] lets it go on). `hvrun --restore DIR` or
    /// [`VmBuilder::restore`] continue it in a new process, as many times as wanted.
    /// Devices stop while they are saved: a disk's requests in flight reach the disk
    /// and are served again after a restore; vsock connections end (the guest is told
    /// with a transport reset).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), Error> {
        self.snapshot_files(&SnapshotFiles::in_dir(dir))
    }

    /// Gives the disk whose id is `id` (its [`crate::config::DiskConfig::id`], or
    /// `hvrun-diskN` for the configuration's disk N without one) the image at `path`
    /// (Firecracker's `PATCH /drives`): opened as disks are at boot (locked; read-only if
    /// the drive is), swapped in once the requests in hand on the old image are done (the
    /// old image is flushed first), and the guest sees the new image's size, with a
    /// configuration-change interrupt. A snapshot taken afterwards names the new image.
    /// The same path again picks up the file's new size. On KVM and Hypervisor.framework
    /// only; an embedder's own disks ([`VmBuilder::disk`]) have no path to replace.
    pub fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), Error> {
        self.control.replace_disk(id, path)
    }

    /// [`VmHandle::snapshot`] into a state file and a memory file wherever they are
    /// (Firecracker's API names each); [`VmBuilder::restore_files`] continues it.
    pub fn snapshot_files(&self, files: &SnapshotFiles) -> Result<(), Error> {
        self.control.snapshot(files, PAUSE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_fail_in_start_before_anything_runs() {
        let config = VmConfig { cpus: 0, ..VmConfig::new("/nonexistent/Image") };
        assert!(matches!(Vm::builder(config).start(), Err(Error::Config(_))));
        let missing = Vm::builder(VmConfig::new("/nonexistent/Image")).start().unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/Image"), "{missing}");
    }

    /// Issue 13: the configuration and the machine counted devices apart; a full set of
    /// disks and an embedder's console passed the check, and the console got an SPI past
    /// the GIC's last, whose interrupts were dropped. One allocator counts everything now.
    #[test]
    fn a_machine_with_more_devices_than_interrupt_lines_is_refused_before_anything_runs() {
        let disks = vec![crate::config::parse_disk("/nonexistent/disk").unwrap(); 46];
        let serial = Some("console=ttyAMA0".into());
        let config = VmConfig { disks, cmdline: serial, ..VmConfig::new("/nonexistent/Image") };
        assert_eq!(config.validate(), Ok(()), "46 disks, the entropy device and the power button: 48 lines");
        let err = Vm::builder(config.clone()).console_output(std::io::sink()).start().unwrap_err();
        assert!(matches!(err, Error::Config(crate::ConfigError::TooManyDevices(49))), "{err}");
        assert_eq!(
            err.to_string(),
            "49 virtio devices (disks, network interfaces, the console, the entropy device and the power button): at most 48"
        );
        let few = VmConfig { disks: config.disks[..45].to_vec(), ..config };
        let err = Vm::builder(few).virtio(Fixed).virtio(Fixed).start().unwrap_err();
        assert!(matches!(err, Error::Config(crate::ConfigError::TooManyDevices(49))), "{err}");
    }

    #[test]
    fn a_vsock_listener_needs_a_vsock_device() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(4);
        let err = Vm::builder(VmConfig::new("/nonexistent/Image")).vsock_listener(5, tx).start().unwrap_err();
        assert!(matches!(err, Error::Config(crate::ConfigError::VsockListenerWithoutVsock)), "{err}");
    }

    /// A do-nothing device, for counting.
    struct Fixed;

    impl VirtioDevice for Fixed {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn activate(&mut self, _: devices::virtio::Activation) -> Result<(), devices::virtio::ActivateError> {
            Ok(())
        }
        fn queue_notify(&mut self, _: u16) {}
        fn reset(&mut self) {}
    }

    /// Review of issue 13: Virtualization.framework's machine silently went without an
    /// embedder's disks, devices and in-memory kernel. They are refused, one by one.
    #[test]
    fn what_virtualization_framework_cannot_take_is_refused_not_dropped() {
        let vz = VmConfig { backend: Some(crate::config::Backend::Vz), ..VmConfig::new("/nonexistent/Image") };
        let disk = devices::virtio::block::disk::MemDisk { bytes: vec![0; 4096], ..Default::default() };
        let refused = |b: VmBuilder| match b.start() {
            Err(Error::Config(crate::ConfigError::NotWithVz(what))) => what,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(Vm::builder(vz.clone()).disk(disk, "d")), "VmBuilder::disk");
        assert_eq!(refused(Vm::builder(vz.clone()).virtio(Fixed)), "VmBuilder::virtio");
        assert_eq!(refused(Vm::builder(vz.clone()).kernel_image(vec![0u8; 64])), "VmBuilder::kernel_image");
        assert_eq!(refused(Vm::builder(vz.clone()).serial_input(std::io::empty())), "VmBuilder::serial_input");
        // A serial writer is fine: the framework's machine has no serial port to feed it.
        let plain = Vm::builder(vz).serial(std::io::sink()).start().unwrap_err();
        assert!(!matches!(plain, Error::Config(crate::ConfigError::NotWithVz(_))), "{plain}");
    }

    #[test]
    fn an_embedders_disk_needs_a_serial_the_guest_can_read() {
        let disk = devices::virtio::block::disk::MemDisk { bytes: vec![0; 4096], ..Default::default() };
        let err = Vm::builder(VmConfig::new("/nonexistent/Image")).disk(disk, "a serial far over twenty bytes").start();
        assert!(matches!(err, Err(Error::Config(crate::ConfigError::BadDisk(_)))));
    }

    #[cfg(not(target_arch = "aarch64"))]
    #[test]
    fn a_host_without_a_hypervisor_is_one_clear_error() {
        use crate::testing::temp_file;
        let mut image = vec![0u8; 4096];
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp_file("embed-Image", &image);
        let err = Vm::builder(VmConfig::new(&kernel)).console_output(std::io::sink()).start().unwrap_err();
        assert!(matches!(err, Error::UnsupportedHost(_)), "{err}");
        std::fs::remove_file(kernel).unwrap();
    }
}
