//! A macOS VM bundle: a directory holding the guest's disk image, its auxiliary storage
//! (the boot NVRAM) and `hvrun-macos.json`, the hardware model and machine identifier the
//! framework gave the VM at install time and the VM's size. The identifiers are opaque
//! bytes (`dataRepresentation`), stored as hex.

use std::fs::{File, OpenOptions};
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
        }
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
    /// Makes a new bundle in `dir` (created if missing; it must be empty): writes `meta`
    /// and a sparse disk image of `meta.disk_size` bytes. The auxiliary storage is the
    /// framework's to create, at [`Bundle::aux`].
    pub fn create(dir: &Path, meta: &Meta) -> Result<Bundle, BundleError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BundleError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
            return Err(BundleError::NotEmpty(dir.to_path_buf()));
        }
        let bundle = Bundle { dir: dir.to_path_buf() };
        let disk = bundle.disk();
        let file = OpenOptions::new().write(true).create_new(true).open(&disk).map_err(io(&disk))?;
        file.set_len(meta.disk_size).map_err(io(&disk))?;
        let text = serde_json::to_string_pretty(meta)
            .map_err(|e| BundleError::Invalid { path: bundle.meta_path(), why: e.to_string() })?;
        let meta_path = bundle.meta_path();
        std::fs::write(&meta_path, text + "\n").map_err(io(&meta_path))?;
        Ok(bundle)
    }

    /// Opens the bundle in `dir`: reads and checks its description, and that its disk
    /// image and auxiliary storage exist.
    pub fn open(dir: &Path) -> Result<(Bundle, Meta), BundleError> {
        let bundle = Bundle { dir: dir.to_path_buf() };
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
        let bundle = Bundle::create(&d, &meta).unwrap();
        assert_eq!(std::fs::metadata(bundle.disk()).unwrap().len(), 64 << 30);
        // The framework creates the auxiliary storage at install time.
        assert!(matches!(Bundle::open(&d), Err(BundleError::Io { .. })));
        std::fs::write(bundle.aux(), b"nvram").unwrap();
        let (opened, back) = Bundle::open(&d).unwrap();
        assert_eq!((opened, &back), (bundle, &meta));
        assert_eq!(back.hardware_model_bytes().unwrap(), vec![1, 2, 0xfe]);
        assert!(back.hardware_model.chars().all(|c| c.is_ascii_hexdigit()));
        // A second install into it is refused.
        assert!(matches!(Bundle::create(&d, &meta), Err(BundleError::NotEmpty(_))));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn broken_descriptions_are_one_clear_error() {
        let d = dir("broken");
        let meta = Meta::new(2, 4 << 30, 1 << 30, &[1], &[2]);
        let bundle = Bundle::create(&d, &meta).unwrap();
        std::fs::write(bundle.aux(), b"").unwrap();
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
