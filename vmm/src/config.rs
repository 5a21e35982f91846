//! A VM's configuration, as the CLI or an embedder gives it, and its validation.

use std::path::PathBuf;

use arch_aarch64::layout::{PAGE_SIZE, RAM_MAX};

/// The most vCPUs a machine may have (the GICv2 limit).
pub const MAX_CPUS: u32 = 8;
/// The least RAM a machine may have.
pub const MIN_MEMORY: u64 = 16 << 20;
/// RAM when none is asked for.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size `{0}`: use a number with an optional K, M, G or T suffix, e.g. 512M or 2G")]
    BadSize(String),
    /// RAM outside the supported range.
    #[error("--memory {0}: must be between 16 MiB and 63 GiB, in multiples of 16 KiB")]
    MemoryOutOfRange(String),
    /// A `--disk` value that does not parse.
    #[error("--disk {0}: use PATH[,readonly][,id=NAME] (NAME: up to 20 ASCII characters)")]
    BadDisk(String),
    /// vCPU count outside the supported range.
    #[error("--cpus {0}: must be between 1 and 8")]
    CpusOutOfRange(u32),
}

/// What to boot and on what machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The arm64 Linux `Image` (or any program with that header) to boot.
    pub kernel: PathBuf,
    /// An initramfs to hand the kernel.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskConfig>,
    /// Feed standard input to the guest's console, with the terminal in raw mode while
    /// the guest runs when it is one (Ctrl-A X quits). Off by default: a library must
    /// not touch the terminal unless asked.
    pub console_stdin: bool,
}

impl VmConfig {
    /// A configuration booting `kernel` with the defaults: one vCPU, 512 MiB, and a
    /// command line that puts the console on the PL011.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyAMA0".into(),
            cpus: 1,
            memory: DEFAULT_MEMORY,
            console_stdin: false,
            disks: Vec::new(),
        }
    }

    /// Checks the numbers (files are checked when they are opened).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::CpusOutOfRange(self.cpus));
        }
        if self.memory < MIN_MEMORY || self.memory > RAM_MAX || self.memory % PAGE_SIZE != 0 {
            return Err(ConfigError::MemoryOutOfRange(format_size(self.memory)));
        }
        Ok(())
    }
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse the guest's writes (and open the file read-only).
    pub read_only: bool,
    /// The ID the guest reads with GET_ID (`/sys/block/vdX/serial`); at most 20 bytes.
    pub id: Option<String>,
}

/// The kernel command line when none is given: the console on the PL011 and, with a
/// disk, the root filesystem on the first one.
pub fn default_cmdline(disks: &[DiskConfig]) -> String {
    if disks.is_empty() {
        "console=ttyAMA0".into()
    } else {
        "console=ttyAMA0 root=/dev/vda rw".into()
    }
}

/// Parses `PATH[,readonly][,id=NAME]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| ConfigError::BadDisk(text.into()))?;
    let mut disk = DiskConfig { path: path.into(), read_only: false, id: None };
    for option in parts {
        match option.split_once('=') {
            None if option == "readonly" || option == "ro" => disk.read_only = true,
            Some(("id", id)) if !id.is_empty() && id.len() <= 20 && id.is_ascii() => disk.id = Some(id.into()),
            _ => return Err(ConfigError::BadDisk(text.into())),
        }
    }
    Ok(disk)
}

/// Parses a size like `512M`, `2G`, `2GiB` or `1048576` (bytes when there is no suffix
/// and the number is large, MiB when it is below 16384, as QEMU's `-m` reads it).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" if number < 16384 => 20,
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// Formats a byte count the way [`parse_size`] reads it.
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999T", "16777216T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_format_back() {
        for text in ["512M", "2G", "64K", "1T"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
        assert_eq!(format_size(12345), "12345B");
    }

    #[test]
    fn disks_parse() {
        assert_eq!(parse_disk("a.img"), Ok(DiskConfig { path: "a.img".into(), read_only: false, id: None }));
        assert_eq!(
            parse_disk("/x/b.img,readonly,id=data"),
            Ok(DiskConfig { path: "/x/b.img".into(), read_only: true, id: Some("data".into()) })
        );
        for bad in ["", ",readonly", "a,rw", "a,id=", "a,id=012345678901234567890", "a,bogus=1"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert_eq!(default_cmdline(&[]), "console=ttyAMA0");
        assert!(default_cmdline(&[parse_disk("a").unwrap()]).contains("root=/dev/vda"));
    }

    #[test]
    fn validation() {
        let ok = VmConfig::new("Image");
        assert_eq!(ok.validate(), Ok(()));
        for cpus in [0, 9] {
            assert_eq!(VmConfig { cpus, ..ok.clone() }.validate(), Err(ConfigError::CpusOutOfRange(cpus)));
        }
        for memory in [0, 1 << 20, RAM_MAX + PAGE_SIZE, (512 << 20) + 4096] {
            assert!(matches!(VmConfig { memory, ..ok.clone() }.validate(), Err(ConfigError::MemoryOutOfRange(_))));
        }
        assert_eq!(VmConfig { memory: RAM_MAX, cpus: 8, ..ok }.validate(), Ok(()));
    }
}
