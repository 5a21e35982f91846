//! A VM's configuration, as the CLI or an embedder gives it, and its validation.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use arch_aarch64::layout::{PAGE_SIZE, RAM_MAX};

/// The most vCPUs a machine may have: as many GICv3 redistributors as fit below the
/// UART in the memory map (`arch_aarch64::layout::place_gicv3`; a hypervisor that
/// reserves more goes higher).
pub const MAX_CPUS: u32 = 127;
/// The most vCPUs hvrun's emulated GICv2 serves (the architecture's limit).
pub const MAX_CPUS_GICV2: u32 = 8;
/// The least RAM a machine may have.
pub const MIN_MEMORY: u64 = 16 << 20;
/// RAM when none is asked for.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size `{0}`: use a number with an optional K, M, G or T suffix, e.g. 512M or 2G")]
    BadSize(String),
    /// RAM outside the supported range.
    #[error("--memory {0}: must be between 16 MiB and 1023 GiB, in multiples of 16 KiB")]
    MemoryOutOfRange(String),
    /// A `--disk` value that does not parse.
    #[error("--disk {0}: use PATH[,readonly][,id=NAME] (NAME: up to 20 ASCII characters)")]
    BadDisk(String),
    /// vCPU count outside the supported range.
    #[error("--cpus {0}: must be between 1 and 127")]
    CpusOutOfRange(u32),
    /// More vCPUs than the emulated GICv2 serves.
    #[error("--cpus {0} with --gic v2: the GICv2 serves at most 8 vCPUs; use --gic v3 or auto")]
    TooManyCpusForGicv2(u32),
    /// More virtio devices than the machine has interrupt lines for.
    #[error("{0} virtio devices (disks, network interfaces, the console, the entropy device and the power button): at most 48")]
    TooManyDevices(usize),
    /// A `--gic` value that is not one of the documented ones.
    #[error("--gic {0}: use auto, v2 or v3")]
    BadGic(String),
    /// A `--share` value that does not parse.
    #[error("--share {0}: use HOST_DIR:TAG[,ro] (TAG: 1 to 35 bytes, no commas or colons)")]
    BadShare(String),
    /// `--nested` with hvrun's GICv2, which has no virtualization interface.
    #[error("--nested with --gic v2: a guest hypervisor needs the hypervisor's GICv3; use --gic v3 or auto")]
    NestedNeedsGicv3,
    /// Something an embedder gave the builder that Virtualization.framework cannot take.
    #[error("{0}: not with --backend vz (Virtualization.framework builds the machine itself)")]
    NotWithVz(&'static str),
    /// A feature only Virtualization.framework offers, asked of another backend.
    #[error("{0} needs --backend vz (Apple's Virtualization.framework, on macOS)")]
    NeedsVz(&'static str),
    /// A backend this host does not have.
    #[error("--backend {0}: {1}")]
    BackendUnavailable(&'static str, &'static str),
    /// A `--net` argument that is not one of the documented forms.
    #[error(
        "--net {0}: use tap=NAME, unixgram=PATH[,vfkit], unixstream=PATH or fd=N, each with an optional ,mac=XX:XX:XX:XX:XX:XX"
    )]
    BadNet(String),
    /// `--net fd=N` where nothing can hand descriptor N over (see [`NetConfig::parse_with`]).
    #[error(
        "--net fd={0}: an inherited descriptor can be named only on hvrun's command line; \
         an embedder passes one as NetBackendConfig::Fd(NetFd::new(fd))"
    )]
    InheritedFd(i32),
    /// `--net fd=N` naming a descriptor that cannot be used.
    #[error("--net fd={0}: {1}")]
    BadFd(i32, String),
    /// A `--console` argument that is not one of the documented forms.
    #[error("--console {0}: use serial, hvc, file=PATH or socket=PATH")]
    BadConsole(String),
    /// A `--balloon` argument that is not one of the documented forms.
    #[error(
        "--balloon={0}: use a comma-separated list of reporting=on|off, deflate-on-oom=on|off, \
         stats=SECONDS (0: off, at most 3600), target=SIZE"
    )]
    BadBalloon(String),
    /// A `--vsock` argument that is not `cid=N,socket=PATH`.
    #[error("--vsock {0}: use cid=N,socket=PATH (N from 3 to 4294967294)")]
    BadVsock(String),
    /// A vsock device that cannot be (its CID, what is at its socket's path).
    #[error("--vsock: {0}")]
    Vsock(String),
    /// `VmBuilder::vsock_listener` without a vsock device.
    #[error("VmBuilder::vsock_listener needs a vsock device (VmBuilder::vsock, --vsock)")]
    VsockListenerWithoutVsock,
}

/// What to boot and on what machine: start from [`VmConfig::new`] and set fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct VmConfig {
    /// The arm64 Linux `Image` (or any program with that header) to boot.
    pub kernel: PathBuf,
    /// An initramfs to hand the kernel.
    pub initrd: Option<PathBuf>,
    /// The kernel command line; `None`: the library's default for the disks
    /// ([`default_cmdline`]: the serial console, or with a disk
    /// `console=hvc0 earlycon root=/dev/vda rw`). [`VmConfig::effective_cmdline`] is what
    /// the guest gets.
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in the order the guest sees them (`eth0`, `eth1`, ...).
    pub nets: Vec<NetConfig>,
    /// Where the guest's virtio console (`hvc0`) goes; `None`: the terminal when the command
    /// line makes hvc0 the console, else no hvc0 ([`ConsoleConfig::for_cmdline`]).
    /// [`VmConfig::effective_console`] is what the machine gets.
    pub console: Option<ConsoleConfig>,
    /// The hypervisor to run on; `None` picks this host's (KVM on Linux,
    /// Hypervisor.framework on macOS).
    pub backend: Option<Backend>,
    /// The interrupt controller the guest gets.
    pub gic: GicChoice,
    /// Give the guest Rosetta for x86_64 Linux binaries (Virtualization.framework only).
    pub rosetta: bool,
    /// Nested virtualization: the guest boots at EL2 and can run its own VMs (KVM with
    /// `KVM_CAP_ARM_EL2`, Hypervisor.framework or Virtualization.framework on macOS 15
    /// with Apple M3 or later). It needs the hypervisor's GICv3.
    pub nested: bool,
    /// Host directories shared with the guest over virtio-fs (Virtualization.framework
    /// only); the guest mounts each by its tag.
    pub shares: Vec<ShareConfig>,
    /// Feed standard input to the guest's interactive console (hvc0 with
    /// [`ConsoleConfig::Terminal`], else the serial port), with the terminal in raw mode
    /// while the guest runs when it is one (Ctrl-A X quits). Off by default: a library
    /// must not touch the terminal unless asked.
    pub console_stdin: bool,
    /// A virtio-balloon device with these features (`--balloon`); `None`: no balloon.
    /// The embedder sets its target through [`crate::VmHandle::set_balloon_target`].
    pub balloon: Option<BalloonOptions>,
    /// A virtio-vsock device (`--vsock`); `None`: none.
    pub vsock: Option<VsockConfig>,
}

pub use devices::virtio::balloon::BalloonOptions;

/// A virtio-vsock device: the guest's CID and the host's unix socket (Firecracker's
/// hybrid vsock: host programs connect to `socket` and write `CONNECT <port>\n`; the
/// guest's connections to host port P go to `socket`_P).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's CID, 3 to 4294967294.
    pub cid: u64,
    /// The unix socket the device listens on (a stale one is replaced).
    pub socket: PathBuf,
}

impl VsockConfig {
    /// A device for guest `cid` listening on `socket`.
    pub fn new(cid: u64, socket: impl Into<PathBuf>) -> Self {
        VsockConfig { cid, socket: socket.into() }
    }

    /// Checks the CID, and what is at the socket's path (nothing, or a stale socket).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let vsock_error = |e: devices::virtio::vsock::VsockError| ConfigError::Vsock(e.to_string());
        devices::virtio::vsock::check_cid(self.cid).map_err(vsock_error)?;
        devices::virtio::vsock::check_socket_path(&self.socket).map_err(vsock_error)
    }
}

/// Parses `--vsock cid=N,socket=PATH` (in either order); the CID's range and the path are
/// checked by [`VsockConfig::validate`].
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let bad = || ConfigError::BadVsock(text.into());
    let (mut cid, mut socket) = (None, None);
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("cid", value)) if cid.is_none() => cid = Some(value.parse::<u64>().map_err(|_| bad())?),
            Some(("socket", value)) if socket.is_none() && !value.is_empty() => socket = Some(PathBuf::from(value)),
            _ => return Err(bad()),
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(VsockConfig { cid, socket }),
        _ => Err(bad()),
    }
}

/// Parses `--balloon[=OPTIONS]`: empty for everything on (free page reporting,
/// deflate-on-OOM, statistics every 5 s), or a comma-separated list changing that:
/// `reporting=on|off`, `deflate-on-oom=on|off`, `stats=SECONDS` (0: no statistics queue),
/// `target=SIZE` (the balloon's size at boot, e.g. 256M: the guest gives that much back
/// as it starts).
pub fn parse_balloon(text: &str) -> Result<BalloonOptions, ConfigError> {
    let bad = || ConfigError::BadBalloon(text.into());
    let mut options = BalloonOptions::default();
    for item in text.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(bad)?;
        let on = || match value {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(bad()),
        };
        match key {
            "reporting" => options.free_page_reporting = on()?,
            "deflate-on-oom" => options.deflate_on_oom = on()?,
            "stats" => {
                let secs: u64 = value.parse().map_err(|_| bad())?;
                if secs > 3600 {
                    return Err(bad());
                }
                options.stats_interval = (secs > 0).then(|| std::time::Duration::from_secs(secs));
            }
            "target" => options.initial_target = parse_size(value).map_err(|_| bad())?,
            _ => return Err(bad()),
        }
    }
    Ok(options)
}

/// Which interrupt controller the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum GicChoice {
    /// The hypervisor's own GICv3 when it has one (KVM's vGICv3 on a GICv3 host, the
    /// in-kernel GIC of macOS 15 and later), else hvrun's emulated GICv2.
    #[default]
    Auto,
    /// hvrun's emulated GICv2 (at most 8 vCPUs).
    V2,
    /// The hypervisor's own GICv3; an error where there is none.
    V3,
}

impl GicChoice {
    /// Parses `--gic`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text {
            "auto" => Ok(GicChoice::Auto),
            "v2" => Ok(GicChoice::V2),
            "v3" => Ok(GicChoice::V3),
            _ => Err(ConfigError::BadGic(text.into())),
        }
    }
}

/// A host directory shared with the guest (virtio-fs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    /// The directory on the host.
    pub host: PathBuf,
    /// The tag the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// Refuse the guest's writes.
    pub read_only: bool,
}

impl ShareConfig {
    /// Parses `--share HOST_DIR:TAG[,ro]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadShare(text.into());
        let (spec, read_only) = match text.strip_suffix(",ro") {
            Some(spec) => (spec, true),
            None => (text, false),
        };
        let (host, tag) = spec.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || !valid_share_tag(tag) || tag.contains([',', ':']) {
            return Err(bad());
        }
        Ok(ShareConfig { host: host.into(), tag: tag.into(), read_only })
    }
}

/// Whether `tag` can name a virtio-fs share: 1 to 35 bytes. The device's tag field holds
/// 36, and Virtualization.framework wants fewer than 36 (`initWithTag:` raises an
/// Objective-C exception on a longer one, which aborts the process).
pub fn valid_share_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() < 36 && !tag.contains('\0')
}

/// A hypervisor backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Backend {
    /// Linux KVM.
    Kvm,
    /// Apple's Hypervisor.framework.
    Hvf,
    /// Apple's Virtualization.framework (macOS guests, Rosetta, virtio-fs).
    Vz,
}

impl Backend {
    /// Parses `--backend`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "kvm" => Some(Backend::Kvm),
            "hvf" => Some(Backend::Hvf),
            "vz" => Some(Backend::Vz),
            _ => None,
        }
    }

    /// The backend to use on a host running `os` (`std::env::consts::OS`), given the one
    /// asked for, or why it cannot be.
    pub fn for_host(asked: Option<Backend>, os: &str) -> Result<Backend, ConfigError> {
        match (asked, os) {
            (None | Some(Backend::Kvm), "linux") => Ok(Backend::Kvm),
            (None | Some(Backend::Hvf), "macos") => Ok(Backend::Hvf),
            (Some(Backend::Kvm), _) => Err(ConfigError::BackendUnavailable("kvm", "KVM exists on Linux hosts only")),
            (Some(Backend::Hvf), _) => {
                Err(ConfigError::BackendUnavailable("hvf", "Hypervisor.framework exists on macOS only"))
            }
            (Some(Backend::Vz), "macos") => Ok(Backend::Vz),
            (Some(Backend::Vz), _) => {
                Err(ConfigError::BackendUnavailable("vz", "Virtualization.framework exists on macOS only"))
            }
            (None, _) => Err(ConfigError::BackendUnavailable("default", "this host has no supported hypervisor")),
        }
    }
}

/// A network interface: its backend and MAC address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Where its frames go.
    pub backend: NetBackendConfig,
    /// Its MAC address; `None` derives a stable one from the backend.
    pub mac: Option<[u8; 6]>,
    /// A name for it (Firecracker's `iface_id`), by which a restore may give it another
    /// backend.
    #[serde(default)]
    pub id: Option<String>,
}

/// Where a network interface's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum NetBackendConfig {
    /// A Linux tap device (created if missing, given CAP_NET_ADMIN).
    Tap(String),
    /// A unix datagram socket at this path, one frame per datagram (gvproxy,
    /// socket_vmnet's datagram mode, a frame forwarder); with `vfkit`, the connection
    /// starts with vfkit's magic datagram, as gvproxy's `--listen-vfkit` expects.
    Unixgram {
        /// The peer's socket.
        path: PathBuf,
        /// Send vfkit's handshake first.
        vfkit: bool,
    },
    /// A unix stream socket at this path, each frame behind its 4-byte big-endian length
    /// (QEMU's stream netdev protocol: socket_vmnet, passt).
    Unixstream(PathBuf),
    /// A connected datagram socket handed to hvrun (e.g. from vmnet-helper). (A snapshot
    /// cannot name it: the restore gives the network again.)
    #[serde(skip)]
    Fd(NetFd),
    /// Virtualization.framework's own NAT (no helper needed; `--backend vz` only).
    Nat,
}

/// A socket descriptor handed to hvrun for a network interface. Clones of a
/// configuration share it, and every VM started from one uses a duplicate
/// ([`NetFd::duplicate`]): the descriptor has one owner and is closed once, when the last
/// configuration holding it goes.
#[derive(Clone)]
pub struct NetFd(Arc<OwnedFd>);

impl NetFd {
    /// The descriptor `fd`, which the caller owns and gives up.
    pub fn new(fd: OwnedFd) -> Self {
        NetFd(Arc::new(fd))
    }

    /// Claims descriptor `fd`, which this process inherited from whoever started it
    /// (`hvrun --net fd=N`). A number already claimed, one that is not open, or one of
    /// the standard streams is refused.
    ///
    /// # Safety
    ///
    /// Nothing else in the process may own or use descriptor `fd`: from here on this
    /// `NetFd` does, and closes it.
    pub unsafe fn claim_inherited(fd: RawFd) -> Result<Self, ConfigError> {
        static CLAIMED: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
        let fail = |why: String| ConfigError::BadFd(fd, why);
        if fd < 3 {
            return Err(fail("0, 1 and 2 are the standard streams".into()));
        }
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        if claimed.contains(&fd) {
            return Err(fail("named twice".into()));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; a closed number fails.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(fail(format!("{} (is it inherited from the parent?)", std::io::Error::last_os_error())));
        }
        claimed.push(fd);
        // SAFETY: the descriptor is open, the caller vouches that nothing else owns it,
        // and `CLAIMED` makes sure no second `NetFd` is made of it here.
        Ok(NetFd::new(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A new descriptor for the same socket, for one VM to own.
    pub fn duplicate(&self) -> std::io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// The descriptor's number (for messages).
    pub fn number(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl std::fmt::Debug for NetFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetFd({})", self.number())
    }
}

/// Two `NetFd`s are equal when they are the same descriptor.
impl PartialEq for NetFd {
    fn eq(&self, other: &Self) -> bool {
        self.number() == other.number()
    }
}

impl Eq for NetFd {}

impl NetConfig {
    /// Parses `--net`: `tap=NAME`, `unixgram=PATH[,vfkit]`, `unixstream=PATH`, `fd=N` or `nat`,
    /// each with an optional `,mac=XX:XX:XX:XX:XX:XX`. Text cannot hand over a
    /// descriptor, so `fd=N` is [`ConfigError::InheritedFd`] here: see
    /// [`NetConfig::parse_with`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, |n| Err(ConfigError::InheritedFd(n)))
    }

    /// Parses `--net` as [`NetConfig::parse`] does, asking `claim` for the socket that
    /// `fd=N` names (the command line claims the descriptor the process inherited).
    pub fn parse_with(
        text: &str,
        claim: impl FnOnce(RawFd) -> Result<NetFd, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadNet(text.into());
        let mut parts = text.split(',');
        let first = parts.next().unwrap_or_default();
        let backend = match first.split_once('=') {
            None if first == "nat" => NetBackendConfig::Nat,
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 && name.is_ascii() => {
                NetBackendConfig::Tap(name.into())
            }
            Some(("unixgram", path)) if !path.is_empty() => {
                NetBackendConfig::Unixgram { path: path.into(), vfkit: false }
            }
            Some(("unixstream", path)) if !path.is_empty() => NetBackendConfig::Unixstream(path.into()),
            Some(("fd", n)) => NetBackendConfig::Fd(claim(n.parse().map_err(|_| bad())?)?),
            _ => return Err(bad()),
        };
        let mut net = NetConfig { backend, mac: None, id: None };
        for option in parts {
            match (option.split_once('='), &mut net.backend) {
                (None, NetBackendConfig::Unixgram { vfkit, .. }) if option == "vfkit" => *vfkit = true,
                (Some(("mac", mac)), _) => net.mac = Some(parse_mac(mac).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        Ok(net)
    }

    /// The MAC address of each of `nets`: its own, or a stable one derived from its
    /// backend ([`NetConfig::mac_seed`]). A backend that does not tell VMs apart (`nat`,
    /// `fd=N`) adds the VM's `identity` ([`VmConfig::identity`]), so two VMs on one NAT
    /// get two addresses; a second interface on the same backend adds its position.
    pub fn macs(nets: &[NetConfig], identity: &str) -> Vec<[u8; 6]> {
        nets.iter()
            .enumerate()
            .map(|(i, net)| {
                net.mac.unwrap_or_else(|| {
                    let seed = match net.backend {
                        NetBackendConfig::Nat | NetBackendConfig::Fd(_) => format!("{}@{identity}", net.mac_seed()),
                        _ => net.mac_seed(),
                    };
                    let again = nets[..i].iter().any(|n| n.mac_seed() == net.mac_seed());
                    devices::virtio::net::mac_from_seed(&if again { format!("{seed}#{i}") } else { seed })
                })
            })
            .collect()
    }

    /// What the stable default MAC address is derived from.
    pub fn mac_seed(&self) -> String {
        match &self.backend {
            NetBackendConfig::Tap(name) => format!("tap={name}"),
            NetBackendConfig::Unixgram { path, .. } => format!("unixgram={}", path.display()),
            NetBackendConfig::Unixstream(path) => format!("unixstream={}", path.display()),
            NetBackendConfig::Fd(fd) => format!("fd={}", fd.number()),
            NetBackendConfig::Nat => "nat".into(),
        }
    }
}

/// Parses `XX:XX:XX:XX:XX:XX` (a unicast address).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// Where the guest's virtio console (`hvc0`) goes. The serial port (`ttyAMA0`) always
/// writes to standard output; it also gets standard input unless hvc0 has the terminal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ConsoleConfig {
    /// No virtio console; the terminal is the serial port's.
    Serial,
    /// hvc0 is the terminal: standard output, and standard input when enabled.
    Terminal,
    /// hvc0's output goes to this file (created or truncated); it has no input.
    File(PathBuf),
    /// hvc0 is served on this unix socket (one client at a time).
    Socket(PathBuf),
}

impl ConsoleConfig {
    /// The console that suits `cmdline`: the terminal on hvc0 when the kernel's console
    /// (the last `console=` before any `--`) is hvc0, otherwise the serial port.
    pub fn for_cmdline(cmdline: &str) -> Self {
        let words = cmdline.split_whitespace().take_while(|w| *w != "--");
        let last = words.filter_map(|w| w.strip_prefix("console=")).last();
        if last.is_some_and(|c| c == "hvc0" || c.starts_with("hvc0,")) {
            ConsoleConfig::Terminal
        } else {
            ConsoleConfig::Serial
        }
    }

    /// Parses `--console`: `serial`, `hvc`, `file=PATH` or `socket=PATH`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text.split_once('=') {
            None if text == "serial" => Ok(ConsoleConfig::Serial),
            None if text == "hvc" => Ok(ConsoleConfig::Terminal),
            Some(("file", path)) if !path.is_empty() => Ok(ConsoleConfig::File(path.into())),
            Some(("socket", path)) if !path.is_empty() => Ok(ConsoleConfig::Socket(path.into())),
            _ => Err(ConfigError::BadConsole(text.into())),
        }
    }
}

impl VmConfig {
    /// What tells this VM from others on the host, for the MAC addresses of interfaces
    /// whose backend does not ([`NetConfig::macs`]): its first disk, which no two running
    /// VMs share (it is locked), else its kernel; the path resolved where it exists.
    pub fn identity(&self) -> String {
        let path = self.disks.first().map_or(&self.kernel, |d| &d.path);
        std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()).display().to_string()
    }

    /// The MAC address of each network interface ([`NetConfig::macs`]).
    pub fn macs(&self) -> Vec<[u8; 6]> {
        NetConfig::macs(&self.nets, &self.identity())
    }

    /// The kernel command line the guest gets: [`VmConfig::cmdline`], or the default.
    pub fn effective_cmdline(&self) -> String {
        self.cmdline.clone().unwrap_or_else(|| default_cmdline(&self.disks))
    }

    /// Where hvc0 goes: [`VmConfig::console`], or what suits the command line.
    pub fn effective_console(&self) -> ConsoleConfig {
        self.console.clone().unwrap_or_else(|| ConsoleConfig::for_cmdline(&self.effective_cmdline()))
    }

    /// A configuration booting `kernel` with the defaults: one vCPU, 512 MiB, the default
    /// command line and console.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory: DEFAULT_MEMORY,
            nets: Vec::new(),
            console: None,
            backend: None,
            gic: GicChoice::Auto,
            rosetta: false,
            nested: false,
            shares: Vec::new(),
            console_stdin: false,
            disks: Vec::new(),
            balloon: None,
            vsock: None,
        }
    }

    /// Checks the numbers (files are checked when they are opened).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::CpusOutOfRange(self.cpus));
        }
        if self.gic == GicChoice::V2 && self.cpus > MAX_CPUS_GICV2 {
            return Err(ConfigError::TooManyCpusForGicv2(self.cpus));
        }
        if self.nested && self.gic == GicChoice::V2 {
            return Err(ConfigError::NestedNeedsGicv3);
        }
        if self.backend != Some(Backend::Vz) {
            if self.rosetta {
                return Err(ConfigError::NeedsVz("--rosetta"));
            }
            if !self.shares.is_empty() {
                return Err(ConfigError::NeedsVz("--share"));
            }
            if self.nets.iter().any(|n| n.backend == NetBackendConfig::Nat) {
                return Err(ConfigError::NeedsVz("--net nat"));
            }
        }
        if self.backend == Some(Backend::Vz) && self.balloon.is_some() {
            return Err(ConfigError::NotWithVz("--balloon"));
        }
        if let Some(vsock) = &self.vsock {
            if self.backend == Some(Backend::Vz) {
                return Err(ConfigError::NotWithVz("--vsock"));
            }
            vsock.validate()?;
        }
        if self.backend != Some(Backend::Vz) {
            crate::slots::assign(crate::slots::count(self, &crate::slots::Extras::default()))?;
        }
        if self.memory < MIN_MEMORY || self.memory > RAM_MAX || self.memory % PAGE_SIZE != 0 {
            return Err(ConfigError::MemoryOutOfRange(format_size(self.memory)));
        }
        Ok(())
    }
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse the guest's writes (and open the file read-only).
    pub read_only: bool,
    /// The ID the guest reads with GET_ID (`/sys/block/vdX/serial`); at most 20 bytes.
    pub id: Option<String>,
}

impl DiskConfig {
    /// A writable disk on the raw image at `path`, with the default serial.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig { path: path.into(), read_only: false, id: None }
    }
}

/// The kernel command line when none is given: the console on the PL011; with a disk,
/// the root filesystem on the first one and the console on hvc0, the PL011 carrying the
/// output until hvc0 exists (earlycon finds it through the device tree's stdout-path).
pub fn default_cmdline(disks: &[DiskConfig]) -> String {
    if disks.is_empty() {
        "console=ttyAMA0".into()
    } else {
        "console=hvc0 earlycon root=/dev/vda rw".into()
    }
}

/// The longest serial a disk may have: virtio-blk's GET_ID answer.
pub const MAX_DISK_ID: usize = 20;

/// Whether `id` can be a disk's serial: 1 to [`MAX_DISK_ID`] ASCII bytes.
pub fn valid_disk_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_DISK_ID && id.is_ascii()
}

/// Parses `--disk PATH[,readonly][,id=NAME]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| ConfigError::BadDisk(text.into()))?;
    let mut disk = DiskConfig { path: path.into(), read_only: false, id: None };
    for option in parts {
        match option.split_once('=') {
            None if option == "readonly" || option == "ro" => disk.read_only = true,
            Some(("id", id)) if valid_disk_id(id) => disk.id = Some(id.into()),
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
    fn backends_exist_where_their_platform_does() {
        assert_eq!(Backend::parse("hvf"), Some(Backend::Hvf));
        assert_eq!(Backend::parse("vz"), Some(Backend::Vz));
        assert_eq!(Backend::parse("qemu"), None);
        assert_eq!(Backend::for_host(None, "linux"), Ok(Backend::Kvm));
        assert_eq!(Backend::for_host(None, "macos"), Ok(Backend::Hvf));
        assert_eq!(Backend::for_host(Some(Backend::Kvm), "linux"), Ok(Backend::Kvm));
        let e = Backend::for_host(Some(Backend::Hvf), "linux").unwrap_err().to_string();
        assert_eq!(e, "--backend hvf: Hypervisor.framework exists on macOS only");
        assert!(Backend::for_host(Some(Backend::Kvm), "macos").is_err());
    }

    #[test]
    fn nets_parse() {
        let tap = NetConfig::parse("tap=tap0").unwrap();
        assert_eq!(tap, NetConfig { backend: NetBackendConfig::Tap("tap0".into()), mac: None, id: None });
        let gram = NetConfig::parse("unixgram=/run/gv.sock,vfkit,mac=5a:94:ef:e4:0c:ee").unwrap();
        assert_eq!(gram.backend, NetBackendConfig::Unixgram { path: "/run/gv.sock".into(), vfkit: true });
        assert_eq!(gram.mac, Some([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]));
        assert_eq!(NetConfig::parse("fd=7"), Err(ConfigError::InheritedFd(7)), "text alone hands over no descriptor");
        let (ours, _theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fd = NetFd::new(OwnedFd::from(ours));
        let number = fd.number();
        let claimed = NetConfig::parse_with(&format!("fd={number}"), |n| {
            assert_eq!(n, number);
            Ok(fd.clone())
        });
        assert_eq!(claimed.unwrap().backend, NetBackendConfig::Fd(fd));
        let stream = NetConfig::parse("unixstream=/var/run/socket_vmnet").unwrap();
        assert_eq!(stream.backend, NetBackendConfig::Unixstream("/var/run/socket_vmnet".into()));
        assert_ne!(tap.mac_seed(), NetConfig::parse("tap=tap1").unwrap().mac_seed());
        // Stable MACs on every backend; two interfaces on one backend still differ.
        let nat = NetConfig::parse("nat").unwrap();
        let own = NetConfig::parse("nat,mac=02:00:00:00:00:07").unwrap();
        let nets = [nat.clone(), tap.clone(), nat.clone(), own];
        let macs = NetConfig::macs(&nets, "/vm/a/root.img");
        assert_eq!(macs[0], devices::virtio::net::mac_from_seed("nat@/vm/a/root.img"));
        assert_eq!(macs[1], devices::virtio::net::mac_from_seed("tap=tap0"), "as before: the tap tells VMs apart");
        assert_ne!(macs[2], macs[0]);
        assert_eq!(macs[3], [2, 0, 0, 0, 0, 7]);
        assert_eq!(macs, NetConfig::macs(&nets, "/vm/a/root.img"), "stable");
        // Two VMs on one NAT get two addresses (found by review).
        let other = NetConfig::macs(&nets, "/vm/b/root.img");
        assert_ne!(other[0], macs[0]);
        assert_eq!(other[1], macs[1]);
        let a = VmConfig { disks: vec![parse_disk("/vm/a/root.img").unwrap()], ..VmConfig::new("Image") };
        assert_eq!(a.identity(), "/vm/a/root.img");
        assert_eq!(VmConfig::new("/boot/Image").identity(), "/boot/Image");
        for bad in [
            "",
            "tap",
            "tap=",
            "tap=a-name-far-too-long",
            "unixgram=",
            "unixstream=",
            "unixstream=/s,vfkit",
            "tap=t,vfkit",
            "fd=1",
            "fd=x",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,mac=02:00:00:00:00:0g",
            "bridge=br0",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn consoles_parse_and_follow_the_command_line() {
        assert_eq!(ConsoleConfig::parse("serial"), Ok(ConsoleConfig::Serial));
        assert_eq!(ConsoleConfig::parse("hvc"), Ok(ConsoleConfig::Terminal));
        assert_eq!(ConsoleConfig::parse("file=/tmp/c.log"), Ok(ConsoleConfig::File("/tmp/c.log".into())));
        assert_eq!(ConsoleConfig::parse("socket=c.sock"), Ok(ConsoleConfig::Socket("c.sock".into())));
        for bad in ["", "tty", "file=", "socket", "pipe=x"] {
            assert!(ConsoleConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ConsoleConfig::for_cmdline(&default_cmdline(&[])), ConsoleConfig::Serial);
        let disk = parse_disk("root.img").unwrap();
        assert_eq!(ConsoleConfig::for_cmdline(&default_cmdline(&[disk])), ConsoleConfig::Terminal);
        assert_eq!(ConsoleConfig::for_cmdline("console=hvc0 console=ttyAMA0"), ConsoleConfig::Serial);
        assert_eq!(ConsoleConfig::for_cmdline("console=ttyAMA0 console=hvc0,115200"), ConsoleConfig::Terminal);
        assert_eq!(ConsoleConfig::for_cmdline("console=ttyAMA0 -- console=hvc0"), ConsoleConfig::Serial);
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
        for cpus in [0, 128] {
            assert_eq!(VmConfig { cpus, ..ok.clone() }.validate(), Err(ConfigError::CpusOutOfRange(cpus)));
        }
        assert_eq!(VmConfig { cpus: 127, ..ok.clone() }.validate(), Ok(()));
        let v2 = VmConfig { gic: GicChoice::V2, ..ok.clone() };
        assert_eq!(VmConfig { cpus: 8, ..v2.clone() }.validate(), Ok(()));
        assert_eq!(VmConfig { cpus: 9, ..v2.clone() }.validate(), Err(ConfigError::TooManyCpusForGicv2(9)));
        assert_eq!(VmConfig { nested: true, ..v2 }.validate(), Err(ConfigError::NestedNeedsGicv3));
        assert_eq!(VmConfig { nested: true, ..ok.clone() }.validate(), Ok(()), "auto: the hypervisor's GICv3");
        let disks = |n| vec![parse_disk("a").unwrap(); n];
        // With disks the default console is hvc0: 45 disks + the entropy device + the
        // console + the power button fit; 46 disks do not.
        assert_eq!(VmConfig { disks: disks(45), ..ok.clone() }.validate(), Ok(()));
        assert_eq!(VmConfig { disks: disks(46), ..ok.clone() }.validate(), Err(ConfigError::TooManyDevices(49)));
        assert_eq!(GicChoice::parse("v3"), Ok(GicChoice::V3));
        // Virtualization.framework's features are refused elsewhere, one line each.
        let share = ShareConfig::parse("/srv/data:data,ro").unwrap();
        assert_eq!(share, ShareConfig { host: "/srv/data".into(), tag: "data".into(), read_only: true });
        for bad in ["nodir", ":tag", "/x:", "/x:a,b", &format!("/x:{}", "t".repeat(37))] {
            assert!(ShareConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(VmConfig { rosetta: true, ..ok.clone() }.validate(), Err(ConfigError::NeedsVz("--rosetta")));
        assert_eq!(
            VmConfig { shares: vec![share.clone()], ..ok.clone() }.validate(),
            Err(ConfigError::NeedsVz("--share"))
        );
        let nat = NetConfig::parse("nat,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(nat.backend, NetBackendConfig::Nat);
        assert!(nat.mac.is_some());
        assert!(NetConfig::parse("nat=1").is_err());
        assert_eq!(
            VmConfig { nets: vec![nat.clone()], ..ok.clone() }.validate(),
            Err(ConfigError::NeedsVz("--net nat"))
        );
        let vz =
            VmConfig { backend: Some(Backend::Vz), rosetta: true, shares: vec![share], nets: vec![nat], ..ok.clone() };
        assert_eq!(vz.validate(), Ok(()));
        assert_eq!(
            Backend::for_host(Some(Backend::Vz), "linux").unwrap_err().to_string(),
            "--backend vz: Virtualization.framework exists on macOS only"
        );
        assert_eq!(Backend::for_host(Some(Backend::Vz), "macos"), Ok(Backend::Vz));
        assert_eq!(GicChoice::parse("v4"), Err(ConfigError::BadGic("v4".into())));
        for memory in [0, 1 << 20, RAM_MAX + PAGE_SIZE, (512 << 20) + 4096] {
            assert!(matches!(VmConfig { memory, ..ok.clone() }.validate(), Err(ConfigError::MemoryOutOfRange(_))));
        }
        assert_eq!(VmConfig { memory: RAM_MAX, cpus: 8, ..ok }.validate(), Ok(()));
    }

    #[test]
    fn balloon_options_parse_and_vz_refuses_them() {
        let all = BalloonOptions::default();
        assert_eq!(parse_balloon(""), Ok(all));
        assert_eq!(
            parse_balloon("reporting=off,stats=0"),
            Ok(BalloonOptions { free_page_reporting: false, stats_interval: None, ..all })
        );
        assert_eq!(
            parse_balloon("deflate-on-oom=off,stats=2"),
            Ok(BalloonOptions {
                deflate_on_oom: false,
                stats_interval: Some(std::time::Duration::from_secs(2)),
                ..all
            })
        );
        assert_eq!(parse_balloon("target=256M"), Ok(BalloonOptions { initial_target: 256 << 20, ..all }));
        for bad in ["reporting", "reporting=yes", "stats=-1", "stats=3601", "hints=on", "target=lots"] {
            assert_eq!(parse_balloon(bad), Err(ConfigError::BadBalloon(bad.into())), "{bad}");
        }
        let vz = VmConfig { backend: Some(Backend::Vz), balloon: Some(all), ..VmConfig::new("Image") };
        assert_eq!(vz.validate(), Err(ConfigError::NotWithVz("--balloon")));
        let kvm = VmConfig { backend: None, ..vz };
        assert_eq!(kvm.validate(), Ok(()));
        assert_eq!(crate::slots::count(&kvm, &crate::slots::Extras::default()), 3, "entropy, power button, balloon");
    }

    #[test]
    fn vsock_options_parse_with_one_line_errors_and_vz_refuses_them() {
        let dir = std::env::temp_dir().join(format!("hvrun-config-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("v.sock");
        let text = format!("cid=3,socket={}", socket.display());
        assert_eq!(parse_vsock(&text), Ok(VsockConfig::new(3, &socket)));
        assert_eq!(parse_vsock("socket=/tmp/a,cid=42"), Ok(VsockConfig::new(42, "/tmp/a")));
        for bad in ["", "cid=3", "socket=/tmp/a", "cid=x,socket=/a", "cid=3,socket=", "cid=3,socket=/a,cid=4", "port=3"]
        {
            assert_eq!(parse_vsock(bad), Err(ConfigError::BadVsock(bad.into())), "{bad}");
        }
        let with = |cid: u64, path: &std::path::Path| VmConfig {
            vsock: Some(VsockConfig::new(cid, path)),
            ..VmConfig::new("Image")
        };
        assert_eq!(with(3, &socket).validate(), Ok(()));
        for cid in [0, 2, u64::from(u32::MAX), 1 << 32] {
            let e = with(cid, &socket).validate().unwrap_err();
            assert_eq!(e, ConfigError::Vsock(format!("vsock CID {cid} is invalid: a guest's CID is 3 to 4294967294")));
            assert!(!e.to_string().contains('\n'), "one line");
        }
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            with(3, &file).validate().unwrap_err().to_string(),
            format!("--vsock: {}: exists and is not a socket", file.display())
        );
        // A stale socket file is fine: it is replaced when the device binds.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert_eq!(with(3, &socket).validate(), Ok(()));
        let vz = VmConfig { backend: Some(Backend::Vz), ..with(3, &socket) };
        assert_eq!(vz.validate(), Err(ConfigError::NotWithVz("--vsock")));
        assert_eq!(crate::slots::count(&with(3, &socket), &crate::slots::Extras::default()), 3, "+ vsock");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
