//! The machine as configured through the API before it starts (or from
//! `--config-file`), checked object by object as each arrives, and turned into a
//! [`VmConfig`] at `InstanceStart`.

use std::path::PathBuf;

use super::model::{
    unsupported, Balloon, BootSource, Drive, EntropyDevice, FullVmConfiguration, Logger, MachineConfiguration, Metrics,
    NetworkInterface, Vsock,
};
use crate::config::{self, BalloonOptions, DiskConfig, NetBackendConfig, NetConfig, VsockConfig};
use crate::VmConfig;

/// Firecracker's vCPU limit.
pub const MAX_VCPUS: u32 = 32;

/// A pre-boot configuration: what `PUT` calls have set so far.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `/machine-config`.
    pub machine: MachineConfiguration,
    /// Whether `/machine-config` was set (for `/snapshot/load`'s rule).
    pub machine_set: bool,
    /// `/boot-source`.
    pub boot: Option<BootSource>,
    /// `/drives/{id}`, in the order they were first put.
    pub drives: Vec<Drive>,
    /// `/network-interfaces/{id}`, likewise.
    pub nets: Vec<NetworkInterface>,
    /// `/vsock`.
    pub vsock: Option<Vsock>,
    /// `/balloon`.
    pub balloon: Option<Balloon>,
    /// `/entropy` (hvrun's machines always have virtio-rng; kept for `/vm/config`).
    pub entropy: Option<EntropyDevice>,
    /// `/logger`.
    pub logger: Option<Logger>,
    /// `/metrics`.
    pub metrics: Option<Metrics>,
}

/// A resource id as Firecracker takes it: not empty, alphanumeric and `_` only.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("The ID cannot be empty.".into());
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("API Resource IDs can only contain alphanumeric characters and underscores.".into());
    }
    Ok(())
}

/// A file that must be there and readable now (Firecracker opens them when they are put).
fn readable(what: &str, path: &str) -> Result<(), String> {
    std::fs::File::open(path).map(drop).map_err(|e| format!("{what} {path}: {e}"))
}

impl Setup {
    /// Whether anything but the logger and metrics was configured (a snapshot load
    /// must come first).
    pub fn configured(&self) -> bool {
        self.machine_set
            || self.boot.is_some()
            || !self.drives.is_empty()
            || !self.nets.is_empty()
            || self.vsock.is_some()
            || self.balloon.is_some()
            || self.entropy.is_some()
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfiguration) -> Result<(), String> {
        if !(1..=MAX_VCPUS).contains(&m.vcpu_count) {
            return Err(format!("The vCPU number is invalid: it must be from 1 to {MAX_VCPUS}."));
        }
        let (min, max) = (config::MIN_MEMORY.div_ceil(1 << 20), arch_aarch64::layout::RAM_MAX >> 20);
        if !(min..=max).contains(&m.mem_size_mib) {
            return Err(format!("The memory size (MiB) is invalid: it must be from {min} to {max}."));
        }
        if m.smt {
            return Err(unsupported("SMT (`smt: true`) on arm64"));
        }
        if m.track_dirty_pages {
            return Err(unsupported("dirty page tracking (`track_dirty_pages`): snapshots are full"));
        }
        if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(unsupported("CPU templates"));
        }
        if m.huge_pages.as_deref().is_some_and(|h| h != "None") {
            return Err(unsupported("huge pages"));
        }
        if let Some(balloon) = self.balloon.as_ref().filter(|b| u64::from(b.amount_mib) > m.mem_size_mib) {
            return Err(format!(
                "The balloon's target ({} MiB) is larger than this memory size ({} MiB).",
                balloon.amount_mib, m.mem_size_mib
            ));
        }
        self.machine = m;
        self.machine_set = true;
        Ok(())
    }

    /// `PUT /boot-source`.
    pub fn set_boot(&mut self, boot: BootSource) -> Result<(), String> {
        readable("Invalid kernel path:", &boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            readable("Invalid initrd path:", initrd)?;
        }
        self.boot = Some(boot);
        Ok(())
    }

    /// `PUT /drives/{id}`: a new drive, or one replaced.
    pub fn set_drive(&mut self, drive: Drive) -> Result<(), String> {
        check_id(&drive.drive_id)?;
        if drive.socket.is_some() {
            return Err(unsupported("vhost-user-block drives (`socket`)"));
        }
        if drive.rate_limiter.is_some() {
            return Err(unsupported("rate limiters on drives"));
        }
        if drive.io_engine.as_deref().is_some_and(|e| e != "Sync") {
            return Err(unsupported("the Async io_engine"));
        }
        if let Some(cache) = drive.cache_type.as_deref().filter(|c| !matches!(*c, "Unsafe" | "Writeback")) {
            return Err(format!("Invalid cache_type `{cache}`: use Unsafe or Writeback."));
        }
        if !config::valid_disk_id(&drive.drive_id) {
            return Err(format!("The drive id `{}` is too long for a virtio-blk serial (20 bytes).", drive.drive_id));
        }
        let path = drive.path_on_host.as_deref().ok_or("A drive needs `path_on_host`.")?;
        devices::host_file::open_regular(std::path::Path::new(path), !drive.is_read_only)
            .map_err(|e| format!("Unable to open the drive's file {path}: {e}"))?;
        if drive.is_root_device && self.drives.iter().any(|d| d.is_root_device && d.drive_id != drive.drive_id) {
            return Err("A root block device already exists!".into());
        }
        let full = self.devices() >= crate::slots::MAX_SLOTS;
        match self.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(old) => *old = drive,
            None if full => return Err(too_many()),
            None => self.drives.push(drive),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn set_net(&mut self, net: NetworkInterface) -> Result<(), String> {
        check_id(&net.iface_id)?;
        if net.mtu.is_some() {
            return Err(unsupported("`mtu` on network interfaces"));
        }
        if net.rx_rate_limiter.is_some() || net.tx_rate_limiter.is_some() {
            return Err(unsupported("rate limiters on network interfaces"));
        }
        net_config(&net)?;
        let full = self.devices() >= crate::slots::MAX_SLOTS;
        match self.nets.iter_mut().find(|n| n.iface_id == net.iface_id) {
            Some(old) => *old = net,
            None if full => return Err(too_many()),
            None => self.nets.push(net),
        }
        Ok(())
    }

    /// The drives and network interfaces configured: each takes one of the machine's
    /// virtio slots, so a client cannot grow the configuration past what can start.
    fn devices(&self) -> usize {
        self.drives.len() + self.nets.len()
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), String> {
        VsockConfig::new(vsock.guest_cid, &vsock.uds_path).validate().map_err(|e| e.to_string())?;
        // Firecracker binds the socket now; hvrun binds it at the start, so a directory
        // that is not there is said now.
        let dir = std::path::Path::new(&vsock.uds_path).parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(format!(
                "Cannot create the vsock socket {}: {} is not a directory.",
                vsock.uds_path,
                dir.display()
            ));
        }
        self.vsock = Some(vsock);
        Ok(())
    }

    /// `PUT /balloon`.
    pub fn set_balloon(&mut self, balloon: Balloon) -> Result<(), String> {
        if u64::from(balloon.amount_mib) > self.machine.mem_size_mib {
            return Err(super::router::TOO_LARGE.into());
        }
        if balloon.free_page_hinting {
            return Err(unsupported("free page hinting (free page reporting is supported)"));
        }
        self.balloon = Some(balloon);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, entropy: EntropyDevice) -> Result<(), String> {
        if entropy.rate_limiter.is_some() {
            return Err(unsupported("rate limiters on the entropy device"));
        }
        self.entropy = Some(entropy);
        Ok(())
    }

    /// The configuration as `GET /vm/config` shows it.
    pub fn export(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot.clone(),
            machine_config: Some(self.machine.clone()),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon.clone(),
            entropy: self.entropy.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            ..FullVmConfiguration::default()
        }
    }

    /// The machine to start, once a boot source is set.
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let boot = self.boot.as_ref().ok_or("Cannot start the microVM without a boot source (PUT /boot-source).")?;
        let mut config = VmConfig::new(&boot.kernel_image_path);
        config.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        config.cpus = self.machine.vcpu_count;
        config.memory = self.machine.mem_size_mib << 20;
        // The root device is the first disk (/dev/vda), as in Firecracker.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        config.disks = drives
            .iter()
            .map(|d| DiskConfig {
                path: d.path_on_host.clone().unwrap_or_default().into(),
                read_only: d.is_read_only,
                id: Some(d.drive_id.clone()),
            })
            .collect();
        // The balloon's target is within the memory: `set_balloon` and `set_machine` keep it.
        let args = boot.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS);
        config.cmdline = Some(cmdline(args, drives.first().copied()));
        config.nets = self.nets.iter().map(net_config).collect::<Result<_, _>>()?;
        config.vsock = self.vsock.as_ref().map(|v| VsockConfig::new(v.guest_cid, &v.uds_path));
        config.balloon = self.balloon.as_ref().map(|b| BalloonOptions {
            free_page_reporting: b.free_page_reporting,
            deflate_on_oom: b.deflate_on_oom,
            stats_interval: (b.stats_polling_interval_s > 0)
                .then(|| std::time::Duration::from_secs(b.stats_polling_interval_s)),
            initial_target: u64::from(b.amount_mib) << 20,
        });
        config.console_stdin = true;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// The boot arguments when `PUT /boot-source` gives none: Firecracker's default for
/// what applies to hvrun's machine (no PCI, 8250 or i8042 to turn off). A root drive
/// adds its `root=` as with any arguments; the console is the device tree's
/// `stdout-path`, the PL011.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1";

fn too_many() -> String {
    format!(
        "Too many devices: hvrun's machine has {} virtio slots for drives and network interfaces.",
        crate::slots::MAX_SLOTS
    )
}

/// Firecracker's boot arguments for hvrun's machine: `console=ttyS0` (Firecracker's
/// 8250 UART) is hvrun's PL011, `ttyAMA0`; a root drive adds `root=/dev/vda` (or its
/// PARTUUID) and `ro` or `rw`, as Firecracker does. Both concern the kernel's part of
/// the line: the words after `--` are the init's, left as they are, and the root words
/// go before them.
fn cmdline(args: &str, root: Option<&Drive>) -> String {
    let words: Vec<&str> = args.split_whitespace().collect();
    let split = words.iter().position(|w| *w == "--").unwrap_or(words.len());
    let (kernel, init) = words.split_at(split);
    let mut line: Vec<String> = kernel
        .iter()
        .map(|w| match w.strip_prefix("console=ttyS0") {
            Some(rest) => format!("console=ttyAMA0{rest}"),
            None => w.to_string(),
        })
        .collect();
    if let Some(root) = root.filter(|d| d.is_root_device) {
        match &root.partuuid {
            Some(uuid) => line.push(format!("root=PARTUUID={uuid}")),
            None => line.push("root=/dev/vda".into()),
        }
        line.push(if root.is_read_only { "ro" } else { "rw" }.into());
    }
    line.extend(init.iter().map(|w| w.to_string()));
    line.join(" ")
}

/// A network interface as `--net` would give it.
pub(super) fn net_config(net: &NetworkInterface) -> Result<NetConfig, String> {
    let mut config = match (&net.hvrun_backend, &net.host_dev_name) {
        (Some(backend), _) => NetConfig::parse(backend).map_err(|e| format!("hvrun_backend: {e}"))?,
        (None, tap) if !tap.is_empty() => {
            NetConfig { backend: NetBackendConfig::Tap(tap.clone()), mac: None, id: None }
        }
        _ => return Err("A network interface needs `host_dev_name` (a tap) or `hvrun_backend`.".into()),
    };
    config.id = Some(net.iface_id.clone());
    if let Some(mac) = &net.guest_mac {
        config.mac = Some(config::parse_mac(mac).ok_or_else(|| format!("Invalid guest_mac `{mac}`."))?);
    }
    Ok(config)
}
