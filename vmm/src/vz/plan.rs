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
    /// Whether the framework can share Rosetta (`VZLinuxRosettaDirectoryShare`, macOS 13).
    pub rosetta: bool,
    /// Whether a disk can have an identifier (`blockDeviceIdentifier`, macOS 12.3).
    pub disk_ids: bool,
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

/// A network interface and its MAC address: given, or stable (never the framework's
/// random default, which would give the guest a new address every boot).
pub type NetSpec = (Net, [u8; 6]);

/// The send buffer of a datagram socket handed to the framework. Apple's documentation
/// asks for a receive buffer of at least twice, ideally four times, the send buffer;
/// vfkit and Lima use these sizes.
pub const SOCKET_SEND_BUFFER: usize = 1 << 20;
/// The receive buffer of a datagram socket handed to the framework.
pub const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;
const _: () = assert!(SOCKET_RECEIVE_BUFFER >= 2 * SOCKET_SEND_BUFFER, "Apple: at least twice the send buffer");

/// How the host caches a disk image and makes the guest's flushes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// The framework's default. For macOS guests, as Apple's samples and Tart use.
    Default,
    /// Cached by the host, a flush made durable with `fsync`: for Linux guests. The
    /// default mode is known to corrupt ext4 and btrfs in Linux guests (UTM and Lima hit
    /// it); Lima, vfkit and Tart use this.
    CachedFsync,
}

/// A disk on the framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse the guest's writes.
    pub read_only: bool,
    /// Its block device identifier.
    pub id: Option<String>,
    /// Its caching mode.
    pub caching: Caching,
}

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
    /// The disks, in order.
    pub disks: Vec<Disk>,
    /// Network interfaces with their MAC addresses.
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
        .zip(config.macs())
        .map(|(net, mac)| {
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
            Ok((backend, mac))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if config.rosetta && !limits.rosetta {
        return Err(unsupported(
            "--rosetta",
            "this macOS cannot share Rosetta with Linux guests: it needs macOS 13 or later",
        ));
    }
    if config.rosetta && config.shares.iter().any(|s| s.tag == ROSETTA_TAG) {
        return Err(unsupported(format!("--share with tag {ROSETTA_TAG}"), "--rosetta uses that tag; pick another"));
    }
    check_shares(&config.shares)?;
    if let Some(disk) = config.disks.iter().find(|d| d.id.is_some()) {
        if !limits.disk_ids {
            return Err(unsupported(
                format!("--disk {},id=…", disk.path.display()),
                "this macOS cannot give a disk an identifier: it needs macOS 12.3 or later; leave id= out",
            ));
        }
    }
    Ok(LinuxPlan {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: config.effective_cmdline(),
        cpus: config.cpus,
        memory: config.memory,
        disks: config
            .disks
            .iter()
            .map(|d| Disk {
                path: d.path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
                caching: Caching::CachedFsync,
            })
            .collect(),
        nets,
        console,
        shares: config.shares.clone(),
        rosetta: config.rosetta,
        nested: config.nested,
    })
}

/// Checks share tags as the framework would, before it can raise an exception: each
/// valid ([`crate::config::valid_share_tag`]) and used once.
pub fn check_shares(shares: &[ShareConfig]) -> Result<(), PlanError> {
    if let Some(bad) = shares.iter().find(|s| !crate::config::valid_share_tag(&s.tag)) {
        return Err(unsupported(
            format!("--share with tag {:?}", bad.tag),
            "a share's tag must be 1 to 35 bytes (Virtualization.framework wants fewer than 36)",
        ));
    }
    let mut tags: Vec<&str> = shares.iter().map(|s| s.tag.as_str()).collect();
    tags.sort_unstable();
    if let Some(pair) = tags.windows(2).find(|p| p[0] == p[1]) {
        return Err(unsupported(format!("--share with tag {} twice", pair[0]), "give each share its own tag"));
    }
    Ok(())
}

/// Gives a datagram socket handed to the framework the buffers Apple asks for
/// ([`SOCKET_SEND_BUFFER`], [`SOCKET_RECEIVE_BUFFER`]).
pub fn size_socket_buffers(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for (option, size) in [(libc::SO_SNDBUF, SOCKET_SEND_BUFFER), (libc::SO_RCVBUF, SOCKET_RECEIVE_BUFFER)] {
        let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt on a descriptor the caller keeps open, with an int option
        // value that lives across the call and its exact size.
        let done = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{parse_disk, Backend, NetConfig};

    /// Limits of a made-up Mac that has every feature.
    pub(crate) const LIMITS: Limits = Limits {
        min_cpus: 1,
        max_cpus: 10,
        min_memory: 128 << 20,
        max_memory: 16 << 30,
        nested: true,
        rosetta: true,
        disk_ids: true,
    };

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
        let root =
            Disk { path: "root.img".into(), read_only: false, id: Some("root".into()), caching: Caching::CachedFsync };
        assert_eq!(plan.disks[0], root);
        assert!(plan.disks[1].read_only);
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

    /// Issue 15, item 7: the framework's default caching corrupts Linux filesystems.
    #[test]
    fn linux_disks_are_cached_with_fsync_synchronization() {
        let config =
            VmConfig { disks: vec![parse_disk("a.img").unwrap(), parse_disk("b.img,readonly").unwrap()], ..vz() };
        let plan = linux(&config, &LIMITS).unwrap();
        assert!(plan.disks.iter().all(|d| d.caching == Caching::CachedFsync), "{:?}", plan.disks);
    }

    /// Issue 15, item 10: the framework's random MAC gave the guest a new address every
    /// boot; the plan always carries the stable one the other backends use.
    #[test]
    fn every_interface_gets_a_stable_mac_address() {
        let nets = vec![NetConfig::parse("nat").unwrap(), NetConfig::parse("unixgram=/tmp/gv.sock").unwrap()];
        let config = VmConfig { nets: nets.clone(), ..vz() };
        let first = linux(&config, &LIMITS).unwrap().nets;
        assert_eq!(first, linux(&config, &LIMITS).unwrap().nets, "the same every run");
        assert_eq!(first.iter().map(|n| n.1).collect::<Vec<_>>(), config.macs());
        assert_ne!(first[0].1, first[1].1);
        assert!(first.iter().all(|(_, mac)| mac[0] & 0b11 == 0b10), "locally administered unicast");
    }

    /// Issue 15, item 5: a tag of 36 bytes or more made `initWithTag:` raise an
    /// Objective-C exception (an abort); it is refused first, with one line.
    #[test]
    fn share_tags_the_framework_would_abort_on_are_refused() {
        let share = |tag: &str| ShareConfig { host: "/src".into(), tag: tag.into(), read_only: false };
        for (tag, ok) in [
            ("a", true),
            (&"t".repeat(35), true),
            (&"t".repeat(36), false),
            ("", false),
            ("é".repeat(18).as_str(), false),
        ] {
            let got = linux(&VmConfig { shares: vec![share(tag)], ..vz() }, &LIMITS);
            assert_eq!(got.is_ok(), ok, "tag {tag:?}: {got:?}");
        }
        let err = linux(&VmConfig { shares: vec![share(&"t".repeat(36))], ..vz() }, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("1 to 35 bytes"), "{err}");
        // The command line's parser says the same.
        assert!(ShareConfig::parse(&format!("/src:{}", "t".repeat(36))).is_err());
        assert!(ShareConfig::parse(&format!("/src:{}", "t".repeat(35))).is_ok());
    }

    /// Issue 15, item 14: what an older macOS lacks is a clear error, not a missing class.
    #[test]
    fn rosetta_and_disk_ids_need_a_macos_that_has_them() {
        let old = Limits { rosetta: false, disk_ids: false, ..LIMITS };
        let err = linux(&VmConfig { rosetta: true, ..vz() }, &old).unwrap_err().to_string();
        assert!(err.starts_with("--rosetta: ") && err.contains("macOS 13"), "{err}");
        let err = linux(&VmConfig { disks: vec![parse_disk("r.img,id=root").unwrap()], ..vz() }, &old).unwrap_err();
        assert!(err.to_string().contains("macOS 12.3"), "{err}");
        assert!(linux(&VmConfig { disks: vec![parse_disk("r.img").unwrap()], ..vz() }, &old).is_ok());
    }

    /// Issue 15, item 12: Apple asks for a receive buffer of 2-4 times the send buffer.
    #[test]
    fn sockets_for_the_framework_get_large_buffers() {
        assert_eq!((SOCKET_SEND_BUFFER, SOCKET_RECEIVE_BUFFER), (1 << 20, 4 << 20));
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let get = |option| {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a local int of the size given.
            let done = unsafe {
                libc::getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&a),
                    libc::SOL_SOCKET,
                    option,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(done, 0);
            value
        };
        let before = (get(libc::SO_SNDBUF), get(libc::SO_RCVBUF));
        size_socket_buffers(std::os::fd::AsFd::as_fd(&a)).unwrap();
        // The host may cap the sizes (Linux: net.core.rmem_max), never shrink them.
        assert!(get(libc::SO_SNDBUF) >= before.0 && get(libc::SO_RCVBUF) >= before.1);
    }
}
