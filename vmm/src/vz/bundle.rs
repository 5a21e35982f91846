//! A macOS VM bundle: a directory holding the guest's disk image, its auxiliary storage
//! (the boot NVRAM) and `hvrun-macos.json`, the hardware model and machine identifier the
//! framework gave the VM at install time, the VM's size and its MAC address. The
//! identifiers are opaque bytes (`dataRepresentation`), stored as hex.
//!
//! A bundle is made in two steps, so a failed or interrupted install never leaves one
//! that looks complete: [`Bundle::create`] marks the directory as an install in progress
//! ([`INSTALLING`]) and gives an [`Unfinished`] bundle, whose description is written only
//! by [`Unfinished::finish`] after the install succeeded; dropped unfinished, it removes
//! what it made. A bundle left unfinished by a killed hvrun is refused by
//! [`Bundle::open`], and a new install into it starts over. A lock ([`LOCK`]) keeps two
//! hvruns from using one bundle.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The bundle's description file.
pub const META: &str = "hvrun-macos.json";
/// The guest's disk image (a sparse raw file).
pub const DISK: &str = "Disk.img";
/// The guest's auxiliary storage, created by the framework at install time.
pub const AUX: &str = "AuxiliaryStorage";
/// The description format this hvrun writes and reads.
pub const FORMAT: u32 = 1;
/// Present while an install is in progress (or was interrupted).
pub const INSTALLING: &str = "hvrun-install.unfinished";
/// The lock file of the hvrun using the bundle (its process ID inside).
pub const LOCK: &str = "hvrun.lock";
/// The description while it is written (renamed to [`META`] when complete).
const META_PARTIAL: &str = "hvrun-macos.json.partial";
/// Every file hvrun puts in a bundle, and Finder's `.DS_Store` (made whenever the folder
/// is opened), none of which makes a directory "not empty" for a new install.
const FILES: [&str; 7] = [META, META_PARTIAL, DISK, AUX, INSTALLING, LOCK, ".DS_Store"];

/// Errors creating or opening a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file of the bundle cannot be read or written.
    #[error("bundle {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The description does not parse or makes no sense.
    #[error("bundle {path}: {why}")]
    Invalid {
        /// The description file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `install` into a directory that already has something in it.
    #[error("bundle {0}: exists and is not empty; pick a new directory")]
    NotEmpty(PathBuf),
    /// The bundle's install did not finish.
    #[error("bundle {0}: its macOS install did not finish; run `hvrun macos install` into it again to start over")]
    Unfinished(PathBuf),
    /// Another hvrun uses the bundle.
    #[error("bundle {dir}: in use by another hvrun ({holder}); stop that one first")]
    InUse {
        /// The bundle.
        dir: PathBuf,
        /// Who holds it (`"process 1234"`).
        holder: String,
    },
}

/// What a bundle says about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Size of the disk image in bytes.
    pub disk_size: u64,
    /// `VZMacHardwareModel.dataRepresentation`, hex.
    pub hardware_model: String,
    /// `VZMacMachineIdentifier.dataRepresentation`, hex.
    pub machine_identifier: String,
    /// The first network interface's MAC address (`XX:XX:XX:XX:XX:XX`), so the guest
    /// keeps its address from boot to boot. Bundles from before this field get the one
    /// [`Meta::new`] would have chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Meta {
    /// A description for new identifiers (raw bytes).
    pub fn new(cpus: u32, memory: u64, disk_size: u64, hardware_model: &[u8], machine_identifier: &[u8]) -> Self {
        Meta {
            format: FORMAT,
            cpus,
            memory,
            disk_size,
            hardware_model: hex(hardware_model),
            machine_identifier: hex(machine_identifier),
            mac: Some(format_mac(default_mac(&hex(machine_identifier)))),
        }
    }

    /// The MAC address of the VM's first network interface.
    pub fn mac(&self) -> [u8; 6] {
        self.mac.as_deref().and_then(parse_mac).unwrap_or_else(|| default_mac(&self.machine_identifier))
    }

    /// The hardware model's bytes.
    pub fn hardware_model_bytes(&self) -> Option<Vec<u8>> {
        unhex(&self.hardware_model)
    }

    /// The machine identifier's bytes.
    pub fn machine_identifier_bytes(&self) -> Option<Vec<u8>> {
        unhex(&self.machine_identifier)
    }
}

/// A stable, locally administered MAC address for the VM with this machine identifier.
fn default_mac(machine_identifier: &str) -> [u8; 6] {
    devices::virtio::net::mac_from_seed(&format!("macos:{machine_identifier}"))
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> =
        text.split(':').map(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2)).collect::<Option<_>>()?;
    let mac: [u8; 6] = bytes.try_into().ok()?;
    (mac[0] & 1 == 0).then_some(mac)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// A VM bundle on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// Starts a new bundle in `dir` (created if missing; it must be empty, or hold only an
    /// unfinished install, which is cleared): locks it, marks the install as in progress
    /// and makes a sparse disk image of `meta.disk_size` bytes. The auxiliary storage is
    /// the framework's to create, at [`Bundle::aux`]; the description is written by
    /// [`Unfinished::finish`].
    pub fn create(dir: &Path, meta: &Meta) -> Result<Unfinished, BundleError> {
        let made_dir = check_new(dir)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let bundle = Bundle { dir: dir.to_path_buf() };
        let mut unfinished = Unfinished { bundle, meta: meta.clone(), made_dir, lock: None };
        unfinished.lock = Some(unfinished.bundle.lock()?);
        for name in [META, META_PARTIAL, DISK, AUX] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        let marker = dir.join(INSTALLING);
        std::fs::write(&marker, b"").map_err(io(&marker))?;
        let disk = unfinished.bundle.disk();
        let file = OpenOptions::new().write(true).create_new(true).open(&disk).map_err(io(&disk))?;
        file.set_len(meta.disk_size).map_err(io(&disk))?;
        Ok(unfinished)
    }

    /// Locks the bundle for this process until the lock is dropped, or says who holds it.
    pub fn lock(&self) -> Result<BundleLock, BundleError> {
        let path = self.dir.join(LOCK);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(&path)(error));
            }
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut file, &mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("process {pid}"),
                Err(_) => "a process that has not written its ID yet".into(),
            };
            return Err(BundleError::InUse { dir: self.dir.clone(), holder });
        }
        file.set_len(0).map_err(io(&path))?;
        std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes()).map_err(io(&path))?;
        Ok(BundleLock { _file: file })
    }

    /// Opens the bundle in `dir`: reads and checks its description, and that its disk
    /// image and auxiliary storage exist.
    pub fn open(dir: &Path) -> Result<(Bundle, Meta), BundleError> {
        let bundle = Bundle { dir: dir.to_path_buf() };
        if dir.join(INSTALLING).exists() {
            return Err(BundleError::Unfinished(dir.to_path_buf()));
        }
        let path = bundle.meta_path();
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let invalid = |why: String| BundleError::Invalid { path: path.clone(), why };
        let meta: Meta = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(invalid(format!("format {} is not one this hvrun reads ({FORMAT})", meta.format)));
        }
        if meta.hardware_model_bytes().is_none_or(|b| b.is_empty())
            || meta.machine_identifier_bytes().is_none_or(|b| b.is_empty())
        {
            return Err(invalid("the hardware model or machine identifier is not hex".into()));
        }
        for file in [bundle.disk(), bundle.aux()] {
            File::open(&file).map_err(|source| BundleError::Io { path: file.clone(), source })?;
        }
        Ok((bundle, meta))
    }

    /// The bundle's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The description file.
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(META)
    }

    /// The disk image.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The auxiliary storage.
    pub fn aux(&self) -> PathBuf {
        self.dir.join(AUX)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError {
    let path = path.to_path_buf();
    move |source| BundleError::Io { path, source }
}

/// Checks that a new bundle can be made in `dir` (before a long download, say): it is
/// missing, empty, or holds only an unfinished install. Returns whether it is missing.
pub fn check_new(dir: &Path) -> Result<bool, BundleError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io(dir)(e)),
    };
    let names: Vec<_> = entries.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>().map_err(io(dir))?;
    let ours = |n: &std::ffi::OsString| FILES.iter().any(|f| n == *f);
    let empty = names.iter().all(|n| n == ".DS_Store");
    let unfinished = names.iter().any(|n| n == INSTALLING) && names.iter().all(ours);
    if empty || unfinished {
        Ok(false)
    } else {
        Err(BundleError::NotEmpty(dir.to_path_buf()))
    }
}

/// A bundle whose install is in progress. Dropped before [`Unfinished::finish`], it
/// removes the files it made (and the directory, if it made that too).
#[derive(Debug)]
pub struct Unfinished {
    bundle: Bundle,
    meta: Meta,
    made_dir: bool,
    lock: Option<BundleLock>,
}

impl Unfinished {
    /// The bundle being made.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The install succeeded: writes the description and clears the in-progress mark.
    /// Returns the bundle, still locked until the lock is dropped.
    pub fn finish(mut self) -> Result<(Bundle, BundleLock), BundleError> {
        let path = self.bundle.meta_path();
        let text = serde_json::to_string_pretty(&self.meta)
            .map_err(|e| BundleError::Invalid { path: path.clone(), why: e.to_string() })?;
        let partial = self.bundle.dir.join(META_PARTIAL);
        std::fs::write(&partial, text + "\n").map_err(io(&partial))?;
        std::fs::rename(&partial, &path).map_err(io(&path))?;
        let marker = self.bundle.dir.join(INSTALLING);
        std::fs::remove_file(&marker).map_err(io(&marker))?;
        // Taking the lock also tells `drop` the install finished.
        let lock = self.lock.take().ok_or_else(|| BundleError::Invalid { path, why: "finished twice".into() })?;
        Ok((self.bundle.clone(), lock))
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return; // finished
        }
        let dir = &self.bundle.dir;
        for name in [DISK, AUX, INSTALLING, LOCK, META_PARTIAL] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        if self.made_dir {
            let _ = std::fs::remove_dir(dir);
        }
        log::info!("bundle {}: the install did not finish; removed what it made", dir.display());
    }
}

/// A bundle's lock, held until dropped.
#[derive(Debug)]
pub struct BundleLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hvrun-bundle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_bundle_round_trips_and_its_disk_is_sparse() {
        let d = dir("round");
        let meta = Meta::new(4, 8 << 30, 64 << 30, &[1, 2, 0xfe], &[0xab; 16]);
        let unfinished = Bundle::create(&d, &meta).unwrap();
        let bundle = unfinished.bundle().clone();
        assert_eq!(std::fs::metadata(bundle.disk()).unwrap().len(), 64 << 30);
        // The framework creates the auxiliary storage at install time.
        std::fs::write(bundle.aux(), b"nvram").unwrap();
        let (finished, lock) = unfinished.finish().unwrap();
        drop(lock);
        let (opened, back) = Bundle::open(&d).unwrap();
        assert_eq!((opened, &back), (finished, &meta));
        assert_eq!(back.hardware_model_bytes().unwrap(), vec![1, 2, 0xfe]);
        assert!(back.hardware_model.chars().all(|c| c.is_ascii_hexdigit()));
        // A second install into it is refused.
        assert!(matches!(Bundle::create(&d, &meta), Err(BundleError::NotEmpty(_))));
        assert!(matches!(check_new(&d), Err(BundleError::NotEmpty(_))));
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Issue 15, item 9: the description used to be written before the install, so a
    /// failed install left a bundle `macos run` booted and a retry refused.
    #[test]
    fn a_failed_install_leaves_nothing_that_looks_like_a_bundle() {
        let meta = Meta::new(2, 4 << 30, 1 << 30, &[1], &[2]);
        // Into a directory hvrun made: the directory goes too.
        let d = dir("failed");
        assert!(check_new(&d).unwrap(), "missing");
        let unfinished = Bundle::create(&d, &meta).unwrap();
        std::fs::write(unfinished.bundle().aux(), b"nvram").unwrap();
        assert!(matches!(Bundle::open(&d), Err(BundleError::Unfinished(_))), "not while installing");
        drop(unfinished);
        assert!(!d.exists());
        // Into an empty directory the user made: it stays, empty.
        std::fs::create_dir_all(&d).unwrap();
        drop(Bundle::create(&d, &meta).unwrap());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir(&d).unwrap();
    }

    /// A killed hvrun leaves its mark: `macos run` refuses the bundle, and a new install
    /// into it starts over instead of being refused.
    #[test]
    fn an_interrupted_install_is_refused_by_run_and_restarted_by_install() {
        let meta = Meta::new(2, 4 << 30, 1 << 30, &[1], &[2]);
        let d = dir("killed");
        let unfinished = Bundle::create(&d, &meta).unwrap();
        std::fs::write(unfinished.bundle().aux(), b"nvram").unwrap();
        std::fs::write(unfinished.bundle().meta_path(), "{}").unwrap(); // an older hvrun's
                                                                        // As if killed: no clean-up runs, and the lock goes with the process.
        let Unfinished { lock, .. } = &mut *Box::leak(Box::new(unfinished));
        drop(lock.take());
        let err = Bundle::open(&d).unwrap_err().to_string();
        assert!(err.contains("did not finish") && err.contains("macos install"), "{err}");
        assert!(!check_new(&d).unwrap(), "present, holding only an unfinished install");
        // Finder's .DS_Store neither makes a directory "not empty" nor blocks a restart.
        std::fs::write(d.join(".DS_Store"), b"finder").unwrap();
        assert!(!check_new(&d).unwrap());
        // Another file in it: not ours to clear.
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        assert!(matches!(check_new(&d), Err(BundleError::NotEmpty(_))));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn two_hvruns_cannot_use_one_bundle() {
        let d = dir("locked");
        std::fs::create_dir_all(&d).unwrap();
        let bundle = Bundle { dir: d.clone() };
        let held = bundle.lock().unwrap();
        let err = bundle.lock().unwrap_err().to_string();
        assert!(
            err.contains("in use by another hvrun") && err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(held);
        drop(bundle.lock().unwrap());
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Issue 15, item 10: a macOS guest keeps its MAC address from boot to boot.
    #[test]
    fn the_vms_mac_address_is_stored_and_stable() {
        let meta = Meta::new(2, 4 << 30, 1 << 30, &[1], &[2, 3]);
        let mac = meta.mac();
        assert_eq!(meta.mac.as_deref(), Some(format_mac(mac).as_str()));
        assert_eq!(mac, Meta::new(4, 8 << 30, 2 << 30, &[9], &[2, 3]).mac(), "derived from the machine identifier");
        assert_ne!(mac, Meta::new(2, 4 << 30, 1 << 30, &[1], &[2, 4]).mac());
        assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
        // A bundle from before the field gets the same address; an edited one its own.
        let old = Meta { mac: None, ..meta.clone() };
        assert_eq!(old.mac(), mac);
        let edited = Meta { mac: Some("02:11:22:33:44:55".into()), ..meta.clone() };
        assert_eq!(edited.mac(), [2, 0x11, 0x22, 0x33, 0x44, 0x55]);
        for bad in ["01:11:22:33:44:55", "02:11:22:33:44", "zz:11:22:33:44:55", "2:11:22:33:44:55"] {
            assert_eq!(Meta { mac: Some(bad.into()), ..meta.clone() }.mac(), mac, "{bad}");
        }
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("\"mac\""), "{text}");
    }

    #[test]
    fn broken_descriptions_are_one_clear_error() {
        let d = dir("broken");
        let meta = Meta::new(2, 4 << 30, 1 << 30, &[1], &[2]);
        let unfinished = Bundle::create(&d, &meta).unwrap();
        std::fs::write(unfinished.bundle().aux(), b"").unwrap();
        let (bundle, _lock) = unfinished.finish().unwrap();
        for (text, needle) in [
            ("{", "EOF"),
            (
                r#"{"format":2,"cpus":1,"memory":1,"disk_size":1,"hardware_model":"01","machine_identifier":"02"}"#,
                "format 2",
            ),
            (
                r#"{"format":1,"cpus":1,"memory":1,"disk_size":1,"hardware_model":"zz","machine_identifier":"02"}"#,
                "not hex",
            ),
        ] {
            std::fs::write(bundle.meta_path(), text).unwrap();
            let err = Bundle::open(&d).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` should mention `{needle}`");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 1, 0x7f, 0xff])).unwrap(), vec![0, 1, 0x7f, 0xff]);
        assert!(unhex("abc").is_none());
        assert!(unhex("é1").is_none());
    }
}
