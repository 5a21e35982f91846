//! A machine's snapshot: what a running machine hands over to be saved ([`Parts`]), and
//! a snapshot read back and checked for a restore ([`Loaded`]).
//!
//! A snapshot is two files ([`SnapshotFiles`]), by default `state` and `memory` in one
//! directory: the state file holds the sections below, in the container of
//! [`format`](super::format); the memory file holds guest RAM ([`guest_memory::file`]).
//!
//! | section | holds |
//! |---|---|
//! | `requirements` | [`Requirements`]: checked before anything else is decoded |
//! | `config` | the machine's [`VmConfig`] (a restore builds the same machine) |
//! | `disks` | each disk's size and fingerprint ([`DiskPrint`]) |
//! | `memory` | the memory file's length |
//! | `vcpus` | every vCPU's [`VcpuState`] |
//! | `irqchip` | the interrupt controller's state |
//! | `uart`, `rtc` | the PL011's and the PL031's |
//! | `virtio` | every virtio-mmio transport's, in slot order |

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pl011::{Pl011, SavedPl011};
use devices::pl031::{Pl031, SavedPl031};
use devices::virtio::mmio::{MmioTransport, SavedTransport};
use guest_memory::GuestRam;
use hypervisor::state::VcpuState;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use super::format::{FormatError, StateFile, Writer};
use super::{Requirements, SnapshotError};
use crate::irqchip::{Irqchip, SavedIrqchip};
use crate::VmConfig;

/// The state file's name in a snapshot directory.
pub const STATE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY: &str = "memory";

/// Where a snapshot's two files are: `state` and `memory` in a directory
/// ([`SnapshotFiles::in_dir`]), or paths of their own (Firecracker's API names each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// The files [`STATE`] and [`MEMORY`] in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        SnapshotFiles { state: dir.join(STATE), memory: dir.join(MEMORY) }
    }

    /// The memory file while it is written (renamed to [`SnapshotFiles::memory`] once
    /// complete).
    fn partial_memory(&self) -> PathBuf {
        let mut name = self.memory.clone().into_os_string();
        name.push(".partial");
        name.into()
    }

    /// The directory holding `file` (`.` for a bare name).
    fn parent(file: &Path) -> &Path {
        match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }
}

/// Bytes of a disk read for its fingerprint: its first and last MiB, and 64 blocks of
/// 4 KiB spread between.
const PRINT_ENDS: u64 = 1 << 20;
const PRINT_BLOCKS: u64 = 64;
const PRINT_BLOCK: usize = 4096;

/// What identifies a disk image: its size and a CRC-32 of samples of it (its ends and
/// blocks spread over it), which tells another image in a few milliseconds whatever the
/// disk's size; and which file it was (device, inode) with its last change, which tells
/// the same file written since (a sample would miss a few blocks written). A copy is
/// another file: only its size and samples are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPrint {
    /// Bytes.
    pub size: u64,
    /// CRC-32 of the samples.
    pub fingerprint: u32,
    /// The file's device and inode.
    pub file: (u64, u64),
    /// Its last modification (seconds, nanoseconds).
    pub modified: (i64, i64),
}

impl DiskPrint {
    /// Why `self` (a disk given now) is not the image `saved` was, if it is not.
    fn differs(&self, saved: &DiskPrint) -> Option<String> {
        if (self.size, self.fingerprint) != (saved.size, saved.fingerprint) {
            return Some(format!(
                "is not the image the snapshot was taken with ({} bytes, fingerprint {:08x}; the snapshot's: {} \
                 bytes, {:08x})",
                self.size, self.fingerprint, saved.size, saved.fingerprint
            ));
        }
        (self.file == saved.file && self.modified != saved.modified)
            .then(|| "was written since the snapshot was taken".to_string())
    }
}

impl DiskPrint {
    /// The print of the image at `path`.
    pub fn of(path: &Path) -> std::io::Result<DiskPrint> {
        let file = devices::host_file::open_regular(path, false)?;
        let size = file.metadata()?.len();
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; PRINT_ENDS as usize];
        let mut sample = |at: u64, len: usize, crc: &mut crc32fast::Hasher| -> std::io::Result<()> {
            let len = len.min(usize::try_from(size.saturating_sub(at)).unwrap_or(usize::MAX));
            file.read_exact_at(&mut buf[..len], at)?;
            crc.update(&buf[..len]);
            Ok(())
        };
        sample(0, PRINT_ENDS as usize, &mut crc)?;
        for i in 1..PRINT_BLOCKS {
            sample(size / PRINT_BLOCKS * i, PRINT_BLOCK, &mut crc)?;
        }
        sample(size.saturating_sub(PRINT_ENDS), PRINT_ENDS as usize, &mut crc)?;
        let meta = file.metadata()?;
        Ok(DiskPrint {
            size,
            fingerprint: crc.finalize(),
            file: (meta.dev(), meta.ino()),
            modified: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// What a running machine hands over to be saved: its configuration and the parts
/// holding state. The vCPUs save themselves (`Control::save_vcpus`).
pub struct Parts {
    /// The machine's configuration.
    pub config: VmConfig,
    /// What a restore needs of its host (the CPU's features are filled in at saving).
    pub requirements: Requirements,
    /// Guest RAM.
    pub memory: Arc<GuestRam>,
    /// The interrupt controller.
    pub irqchip: Arc<dyn Irqchip>,
    /// The UART.
    pub uart: Arc<Mutex<Pl011>>,
    /// The RTC.
    pub rtc: Arc<Mutex<Pl031>>,
    /// The virtio transports, in slot order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").field("requirements", &self.requirements).finish_non_exhaustive()
    }
}

impl Parts {
    /// Saves the machine into `files` (their directories created if missing), with the
    /// vCPUs' states `vcpus`; the VM must be paused. The devices stop while they are
    /// saved and start again before this returns, whatever happened. The state file is
    /// written last: without one (a failed snapshot) there is no snapshot.
    pub fn save(&self, files: &SnapshotFiles, vcpus: Vec<VcpuState>) -> Result<(), SnapshotError> {
        let io = |what: &str, path: &Path| {
            let what = format!("{what} {}", path.display());
            move |source| SnapshotError::Io { what, source }
        };
        if files.state == files.memory {
            return Err(SnapshotError::Unsupported(format!(
                "the state and memory files are both {}",
                files.state.display()
            )));
        }
        for file in [&files.state, &files.memory] {
            let dir = SnapshotFiles::parent(file);
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        if vcpus.len() != self.config.cpus as usize {
            return Err(SnapshotError::Unsupported(format!(
                "{} of its {} vCPUs saved their state (it is still starting)",
                vcpus.len(),
                self.config.cpus
            )));
        }
        // The old state file goes first, durably: until the new one is written, there
        // is no snapshot (never an old state beside a new memory file).
        let (state, state_dir) = (&files.state, SnapshotFiles::parent(&files.state));
        match std::fs::remove_file(state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("replacing", state)(e)),
            _ => File::open(state_dir).and_then(|d| d.sync_all()).map_err(io("syncing", state_dir))?,
        }
        let powers: Vec<_> = vcpus.iter().map(|v| v.power).collect();
        log::info!("snapshot: {} vCPUs (power {powers:?}), {} virtio devices", vcpus.len(), self.transports.len());
        let mut requirements = self.requirements.clone();
        requirements.cpu_features = vcpus.first().map(super::cpu_features).unwrap_or_default();
        let irqchip = self.irqchip.save().map_err(SnapshotError::Unsupported)?;
        let uart = lock(&self.uart).save();
        let rtc = lock(&self.rtc).save();
        // Each device stops here (a disk's once it has answered the requests it took).
        let mut virtio = Vec::with_capacity(self.transports.len());
        for transport in &self.transports {
            match lock(transport).save() {
                Ok(saved) => virtio.push(saved),
                Err(e) => {
                    self.restart(&virtio);
                    return Err(SnapshotError::Unsupported(e.to_string()));
                }
            }
        }
        let result = self.write(files, &requirements, (vcpus, irqchip, uart, rtc), &virtio);
        self.restart(&virtio);
        result
    }

    /// Starts again the devices `saved` (the first ones) stopped.
    fn restart(&self, saved: &[SavedTransport]) {
        for (slot, (transport, saved)) in self.transports.iter().zip(saved).enumerate() {
            if let Err(e) = lock(transport).restore(saved) {
                log::error!("virtio slot {slot} does not start again after the snapshot: {e}");
            }
        }
    }

    fn write(
        &self,
        files: &SnapshotFiles,
        requirements: &Requirements,
        (vcpus, irqchip, uart, rtc): (Vec<VcpuState>, SavedIrqchip, SavedPl011, SavedPl031),
        virtio: &[SavedTransport],
    ) -> Result<(), SnapshotError> {
        let io = |what: String| move |source| SnapshotError::Io { what, source };
        // A new file, renamed over the old one: a VM restored from these files maps the
        // old one (truncating it in place would pull its pages from under it).
        let memory_path = &files.memory;
        let partial = files.partial_memory();
        let memory_file = File::create(&partial).map_err(io(format!("creating {}", partial.display())))?;
        guest_memory::file::save(&self.memory, &memory_file)
            .and_then(|_| memory_file.sync_all())
            .and_then(|()| std::fs::rename(&partial, memory_path))
            .map_err(io(format!("writing {}", memory_path.display())))?;
        let memory_len = memory_file.metadata().map_err(io(format!("reading {}", memory_path.display())))?.len();
        let mut disks = Vec::new();
        for disk in &self.config.disks {
            // Whatever the guest wrote is on the disk before its print is taken.
            devices::host_file::open_regular(&disk.path, false)
                .and_then(|f| f.sync_all())
                .and_then(|()| DiskPrint::of(&disk.path))
                .map(|print| disks.push(print))
                .map_err(io(format!("reading disk {}", disk.path.display())))?;
        }
        let mut w = Writer::new();
        w.add("requirements", requirements)?;
        w.add("config", &self.config)?;
        w.add("disks", &disks)?;
        w.add("memory", &memory_len)?;
        w.add("vcpus", &vcpus)?;
        w.add("irqchip", &irqchip)?;
        w.add("uart", &uart)?;
        w.add("rtc", &rtc)?;
        w.add("virtio", &virtio)?;
        w.write(&files.state)?;
        Ok(())
    }
}

/// A snapshot read back: every section decoded and checked against the others.
#[derive(Debug)]
pub struct Loaded {
    /// The snapshot's files.
    pub files: SnapshotFiles,
    /// What it needs of the host.
    pub requirements: Requirements,
    /// The machine's configuration when it was saved.
    pub config: VmConfig,
    /// Each disk's print.
    pub disks: Vec<DiskPrint>,
    /// Every vCPU's state.
    pub vcpus: Vec<VcpuState>,
    /// The interrupt controller's.
    pub irqchip: SavedIrqchip,
    /// The UART's.
    pub uart: SavedPl011,
    /// The RTC's.
    pub rtc: SavedPl031,
    /// The virtio transports', in slot order.
    pub virtio: Vec<SavedTransport>,
    memory_len: u64,
}

impl Loaded {
    /// Reads and checks the snapshot in `files` (the memory file is opened later, by
    /// [`Loaded::memory`]).
    pub fn read(files: &SnapshotFiles) -> Result<Loaded, SnapshotError> {
        let file = match StateFile::read(&files.state) {
            Err(FormatError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::NotASnapshot(files.state.clone()))
            }
            other => other?,
        };
        Self::decode(files, &file)
    }

    /// A state file's bytes, checked and decoded, as the snapshot in `files` (whose
    /// memory file is not looked at): what [`Loaded::read`] does after reading the file.
    pub fn parse(files: &SnapshotFiles, bytes: &[u8]) -> Result<Loaded, SnapshotError> {
        Self::decode(files, &StateFile::parse(bytes)?)
    }

    fn decode(files: &SnapshotFiles, file: &StateFile) -> Result<Loaded, SnapshotError> {
        let requirements: Requirements = file.get("requirements")?;
        let loaded = Loaded {
            files: files.clone(),
            config: file.get("config")?,
            disks: file.get("disks")?,
            memory_len: file.get("memory")?,
            vcpus: file.get("vcpus")?,
            irqchip: file.get("irqchip")?,
            uart: file.get("uart")?,
            rtc: file.get("rtc")?,
            virtio: file.get("virtio")?,
            requirements,
        };
        loaded.consistent()?;
        Ok(loaded)
    }

    /// The sections agree with each other (a hostile file could make them disagree).
    fn consistent(&self) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::Format(FormatError::Damaged(why)));
        let r = &self.requirements;
        if r.vcpus != self.config.cpus || self.vcpus.len() != self.config.cpus as usize {
            return bad(format!("{} vCPUs saved for a machine of {}", self.vcpus.len(), self.config.cpus));
        }
        if r.memory != [(arch_aarch64::layout::RAM_BASE, self.config.memory)] || self.memory_len != self.config.memory {
            return bad("the memory's size disagrees with the machine's".into());
        }
        if self.disks.len() != self.config.disks.len() {
            return bad(format!("{} disk prints for {} disks", self.disks.len(), self.config.disks.len()));
        }
        Ok(())
    }

    /// Whether a machine built from `config` on a host offering `host` (its CPU's
    /// features aside: those are checked on the first vCPU) can continue this snapshot:
    /// the same vCPUs, RAM and nesting, the same hypervisor and interrupt controller.
    pub fn fits(&self, config: &VmConfig, host: &Requirements) -> Result<(), SnapshotError> {
        let saved = &self.config;
        let shape = |c: &VmConfig| {
            let nested = if c.nested { ", nested" } else { "" };
            format!("{} vCPU(s), {} MiB{nested}", c.cpus, c.memory >> 20)
        };
        if (config.cpus, config.memory, config.nested) != (saved.cpus, saved.memory, saved.nested) {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's guest has {}, this configuration {}",
                shape(saved),
                shape(config)
            )));
        }
        let host = Requirements { cpu_features: self.requirements.cpu_features.clone(), ..host.clone() };
        self.requirements.check(&host).map_err(SnapshotError::Host)
    }

    /// Guest RAM, mapped copy-on-write from the memory file.
    pub fn memory(&self) -> Result<Arc<GuestRam>, SnapshotError> {
        let path = &self.files.memory;
        let file = devices::host_file::open_regular(path, false)
            .map_err(|source| SnapshotError::Io { what: path.display().to_string(), source })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != self.memory_len {
            return Err(SnapshotError::Format(FormatError::Damaged(format!(
                "the memory file is {len} bytes, the snapshot's guest had {}",
                self.memory_len
            ))));
        }
        let ranges: Vec<(GuestAddress, usize)> = self
            .requirements
            .memory
            .iter()
            .map(|&(at, len)| (GuestAddress(at), usize::try_from(len).unwrap_or(usize::MAX)))
            .collect();
        Ok(GuestRam::from_file(&ranges, &file)?)
    }

    /// Whether each of `disks` is the image the snapshot's guest had (by size and
    /// fingerprint), unless `trust` says to take them as they are.
    pub fn check_disks(&self, disks: &[crate::config::DiskConfig], trust: bool) -> Result<(), SnapshotError> {
        if disks.len() != self.disks.len() {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's guest had {} disk(s), {} given",
                self.disks.len(),
                disks.len()
            )));
        }
        for (disk, saved) in disks.iter().zip(&self.disks) {
            let print = DiskPrint::of(&disk.path).map_err(|source| SnapshotError::Io {
                what: format!("reading disk {}", disk.path.display()),
                source,
            })?;
            if let Some(why) = print.differs(saved).filter(|_| !trust) {
                return Err(SnapshotError::Mismatch(format!(
                    "disk {} {why}; give the image as it was, or --restore-trust-disks",
                    disk.path.display()
                )));
            }
        }
        Ok(())
    }
}

/// The configuration the snapshot in `files` was taken with (the CLI builds its restore
/// from it, with the backends given again).
pub fn saved_config(files: &SnapshotFiles) -> Result<VmConfig, SnapshotError> {
    Ok(Loaded::read(files)?.config)
}

#[cfg(test)]
mod tests;
