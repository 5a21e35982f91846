//! What a [`VmConfig`] becomes on Virtualization.framework, or why it cannot.
//!
//! The framework's limits (CPU counts, memory sizes) are the host's, so they come in as
//! [`Limits`], read from the framework at run time on a Mac and made up in tests.

use std::path::PathBuf;

use crate::config::{ConsoleConfig, GicChoice, NetBackendConfig, ShareConfig, VmConfig};
use crate::ConfigError;

/// One mebibyte: the framework's memory size granularity.
const MIB: u64 = 1 << 20;
/// The tag under which Rosetta is shared with the guest.
pub const ROSETTA_TAG: &str = "rosetta";

/// The framework's limits on this host (`VZVirtualMachineConfiguration`'s
/// `minimumAllowedCPUCount` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Fewest vCPUs.
    pub min_cpus: u32,
    /// Most vCPUs.
    pub max_cpus: u32,
    /// Least memory, in bytes.
    pub min_memory: u64,
    /// Most memory, in bytes.
    pub max_memory: u64,
    /// Whether a Linux guest can have EL2 (`--nested`: macOS 15 on Apple M3 or later).
    pub nested: bool,
}

/// Why a configuration cannot run on Virtualization.framework.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The configuration is invalid whatever the backend.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag this backend cannot honour, with what to do instead.
    #[error("{flag}: {instead}")]
    Unsupported {
        /// The flag, as the user wrote it.
        flag: String,
        /// What to use instead.
        instead: &'static str,
    },
    /// A number outside what the framework allows on this host.
    #[error("{what} {value}: Virtualization.framework on this Mac allows {min} to {max}")]
    OutOfRange {
        /// Which setting.
        what: &'static str,
        /// What was asked.
        value: u64,
        /// The least allowed.
        min: u64,
        /// The most allowed.
        max: u64,
    },
}

/// A network interface on the framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// The framework's NAT.
    Nat,
    /// A unix datagram socket hvrun connects (and hands to the framework as a file
    /// handle), with vfkit's handshake first when asked.
    Unixgram {
        /// The peer's socket.
        path: PathBuf,
        /// Send vfkit's magic datagram first.
        vfkit: bool,
    },
    /// A connected datagram socket handed to hvrun (the framework gets a duplicate).
    Fd(crate::config::NetFd),
}

/// A network interface and its MAC address (`None`: the framework's random one).
pub type NetSpec = (Net, Option<[u8; 6]>);

/// Where the guest's virtio console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// This terminal: output, and standard input when `input`.
    Terminal {
        /// Whether standard input feeds the guest.
        input: bool,
    },
    /// A file, output only.
    File(PathBuf),
}

/// A Linux VM on Virtualization.framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxPlan {
    /// The uncompressed arm64 `Image`.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes (a whole number of MiB).
    pub memory: u64,
    /// Disk images with read-only flags and block device identifiers, in order.
    pub disks: Vec<(PathBuf, bool, Option<String>)>,
    /// Network interfaces with their MAC addresses (`None`: the framework's random one).
    pub nets: Vec<NetSpec>,
    /// The virtio console.
    pub console: Console,
    /// virtio-fs shares, Rosetta's (tag [`ROSETTA_TAG`]) not among them.
    pub shares: Vec<ShareConfig>,
    /// Share Rosetta with the guest.
    pub rosetta: bool,
    /// Nested virtualization (EL2 for the guest).
    pub nested: bool,
}

fn unsupported(flag: impl Into<String>, instead: &'static str) -> PlanError {
    PlanError::Unsupported { flag: flag.into(), instead }
}

fn in_range(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), PlanError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(PlanError::OutOfRange { what, value, min, max })
    }
}

/// Translates `config` for the framework with `limits`, refusing what it cannot honour.
pub fn linux(config: &VmConfig, limits: &Limits) -> Result<LinuxPlan, PlanError> {
    config.validate()?;
    in_range("--cpus", config.cpus.into(), limits.min_cpus.into(), limits.max_cpus.into())?;
    in_range("--memory", config.memory, limits.min_memory, limits.max_memory)?;
    if config.memory % MIB != 0 {
        return Err(unsupported(
            format!("--memory {}", config.memory),
            "not a whole number of MiB, which --backend vz needs",
        ));
    }
    if config.nested && !limits.nested {
        return Err(unsupported(
            "--nested",
            "this Mac's Virtualization.framework cannot give a guest EL2 (it needs macOS 15 or later on Apple M3 or later)",
        ));
    }
    if config.gic != GicChoice::Auto {
        return Err(unsupported(
            "--gic",
            "not with --backend vz: the framework chooses the interrupt controller; leave --gic out",
        ));
    }
    let console = match &config.effective_console() {
        ConsoleConfig::Terminal => Console::Terminal { input: config.console_stdin },
        ConsoleConfig::File(path) => Console::File(path.clone()),
        ConsoleConfig::Socket(path) => {
            return Err(unsupported(format!("--console socket={}", path.display()), "not with --backend vz: use --console hvc or file=PATH"))
        }
        ConsoleConfig::Serial => {
            return Err(unsupported(
                "the serial console (ttyAMA0)",
                "not with --backend vz: the framework has no PL011; boot with --cmdline 'console=hvc0 ...' for the virtio console",
            ))
        }
    };
    let nets = config
        .nets
        .iter()
        .map(|net| {
            let backend = match &net.backend {
                NetBackendConfig::Nat => Net::Nat,
                NetBackendConfig::Unixgram { path, vfkit } => Net::Unixgram { path: path.clone(), vfkit: *vfkit },
                NetBackendConfig::Fd(fd) => Net::Fd(fd.clone()),
                NetBackendConfig::Tap(name) => {
                    return Err(unsupported(
                        format!("--net tap={name}"),
                        "not with --backend vz: macOS has no taps, use nat or unixgram=PATH",
                    ))
                }
                NetBackendConfig::Unixstream(path) => {
                    return Err(unsupported(
                        format!("--net unixstream={}", path.display()),
                        "not with --backend vz: the framework takes datagram sockets, use unixgram=PATH or nat",
                    ))
                }
            };
            Ok((backend, net.mac))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if config.rosetta && config.shares.iter().any(|s| s.tag == ROSETTA_TAG) {
        return Err(unsupported(format!("--share with tag {ROSETTA_TAG}"), "--rosetta uses that tag; pick another"));
    }
    let mut tags: Vec<&str> = config.shares.iter().map(|s| s.tag.as_str()).collect();
    tags.sort_unstable();
    if let Some(pair) = tags.windows(2).find(|p| p[0] == p[1]) {
        return Err(unsupported(format!("--share with tag {} twice", pair[0]), "give each share its own tag"));
    }
    Ok(LinuxPlan {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: config.effective_cmdline(),
        cpus: config.cpus,
        memory: config.memory,
        disks: config.disks.iter().map(|d| (d.path.clone(), d.read_only, d.id.clone())).collect(),
        nets,
        console,
        shares: config.shares.clone(),
        rosetta: config.rosetta,
        nested: config.nested,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_disk, Backend, NetConfig};

    const LIMITS: Limits =
        Limits { min_cpus: 1, max_cpus: 10, min_memory: 128 << 20, max_memory: 16 << 30, nested: true };

    fn vz() -> VmConfig {
        VmConfig {
            backend: Some(Backend::Vz),
            cmdline: Some("console=hvc0".into()),
            console: Some(ConsoleConfig::Terminal),
            ..VmConfig::new("Image")
        }
    }

    #[test]
    fn a_linux_guest_with_everything_the_framework_offers() {
        let config = VmConfig {
            cpus: 4,
            memory: 2 << 30,
            disks: vec![parse_disk("root.img,id=root").unwrap(), parse_disk("data.img,readonly").unwrap()],
            nets: vec![NetConfig::parse("nat").unwrap(), NetConfig::parse("unixgram=/tmp/gv.sock,vfkit").unwrap()],
            shares: vec![ShareConfig::parse("/Users/me/src:src").unwrap()],
            rosetta: true,
            console_stdin: true,
            ..vz()
        };
        let plan = linux(&config, &LIMITS).unwrap();
        assert_eq!((plan.cpus, plan.memory), (4, 2 << 30));
        assert_eq!(plan.disks[0], ("root.img".into(), false, Some("root".into())));
        assert!(plan.disks[1].1, "read-only");
        assert_eq!(plan.nets[0].0, Net::Nat);
        assert_eq!(plan.nets[1].0, Net::Unixgram { path: "/tmp/gv.sock".into(), vfkit: true });
        assert_eq!(plan.console, Console::Terminal { input: true });
        assert!(plan.rosetta);
        assert_eq!(plan.shares[0].tag, "src");
    }

    #[test]
    fn numbers_outside_the_hosts_limits_are_refused() {
        let err = linux(&VmConfig { cpus: 11, ..vz() }, &LIMITS).unwrap_err();
        assert_eq!(err.to_string(), "--cpus 11: Virtualization.framework on this Mac allows 1 to 10");
        let err = linux(&VmConfig { memory: 64 << 20, ..vz() }, &LIMITS).unwrap_err();
        assert!(matches!(err, PlanError::OutOfRange { what: "--memory", .. }), "{err}");
        let odd = VmConfig { memory: (512 << 20) + (16 << 10), ..vz() };
        assert!(linux(&odd, &LIMITS).unwrap_err().to_string().contains("whole number of MiB"));
    }

    #[test]
    fn flags_the_framework_cannot_honour_are_errors_not_ignored() {
        let cases: Vec<(VmConfig, &str)> = vec![
            (VmConfig { nets: vec![NetConfig::parse("tap=tap0").unwrap()], ..vz() }, "--net tap=tap0"),
            (VmConfig { nets: vec![NetConfig::parse("unixstream=/s").unwrap()], ..vz() }, "--net unixstream=/s"),
            (VmConfig { console: Some(ConsoleConfig::Socket("/c".into())), ..vz() }, "--console socket=/c"),
            (VmConfig { console: Some(ConsoleConfig::Serial), ..vz() }, "console=hvc0"),
            (VmConfig { gic: GicChoice::V3, ..vz() }, "--gic"),
            (
                VmConfig { rosetta: true, shares: vec![ShareConfig::parse("/x:rosetta").unwrap()], ..vz() },
                "tag rosetta",
            ),
            (
                VmConfig {
                    shares: vec![ShareConfig::parse("/x:t").unwrap(), ShareConfig::parse("/y:t").unwrap()],
                    ..vz()
                },
                "tag t twice",
            ),
        ];
        for (config, needle) in cases {
            let err = linux(&config, &LIMITS).unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` should mention `{needle}`");
        }
        // Invalid whatever the backend: the configuration's own error.
        assert!(matches!(linux(&VmConfig { cpus: 0, ..vz() }, &LIMITS), Err(PlanError::Config(_))));
    }

    #[test]
    fn nested_virtualization_where_the_framework_offers_it_and_a_clear_error_elsewhere() {
        let nested = VmConfig { nested: true, ..vz() };
        assert!(linux(&nested, &LIMITS).unwrap().nested);
        assert!(!linux(&vz(), &LIMITS).unwrap().nested);
        let err = linux(&nested, &Limits { nested: false, ..LIMITS }).unwrap_err().to_string();
        assert!(err.contains("--nested") && err.contains("macOS 15 or later on Apple M3"), "{err}");
    }
}
