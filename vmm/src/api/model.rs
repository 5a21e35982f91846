//! The JSON objects of Firecracker's API (its `firecracker.yaml` definitions), as hvrun
//! takes and gives them. Every object refuses fields it does not define, as
//! Firecracker's do. Fields Firecracker defines that hvrun cannot honour are parsed, so
//! that using them is an error naming them ([`unsupported`]), never a silent success.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `PUT/GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86 only in Firecracker; refused here if true).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking for diff snapshots (not supported: refused if true).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A CPU template (only `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: `None` (or absent) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfiguration {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `PATCH /machine-config`: any of [`MachineConfiguration`]'s fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MachineConfigurationUpdate {
    pub vcpu_count: Option<u32>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel.
    pub kernel_image_path: String,
    /// An initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (also its virtio-blk serial, as in Firecracker).
    pub drive_id: String,
    /// The image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// The guest's root filesystem: first disk (`/dev/vda`) and `root=` on the command line.
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// The root partition's UUID (`root=PARTUUID=...` instead of `root=/dev/vda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` or `Writeback`: hvrun honours every flush either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// `Sync` (or absent) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
    /// vhost-user-block: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}` (after boot).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// Its new image.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Not supported.
    #[serde(default)]
    pub rate_limiter: Option<Value>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// The tap device (Linux hosts); empty with [`NetworkInterface::hvrun_backend`]
    /// (Firecracker's schema requires the field).
    #[serde(default)]
    pub host_dev_name: String,
    /// The guest's MAC, `XX:XX:XX:XX:XX:XX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// hvrun's extension: any of `--net`'s backends (`unixgram=PATH`, `unixstream=PATH`,
    /// `tap=NAME`, ...) instead of `host_dev_name`; for hosts without taps (macOS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hvrun_backend: Option<String>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<Value>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<Value>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The unix socket host programs connect to.
    pub uds_path: String,
    /// Deprecated by Firecracker; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The target: MiB the guest gives back (at most the guest's memory).
    pub amount_mib: u32,
    /// The guest takes balloon pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Statistics every this many seconds (0: none).
    #[serde(default)]
    pub stats_polling_interval_s: u64,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Free page hinting: not supported (refused if true).
    #[serde(default)]
    pub free_page_hinting: bool,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target in MiB (at most the guest's memory).
    pub amount_mib: u32,
}

/// `GET /balloon/statistics` (the guest's counters, where it sent them).
#[derive(Debug, Clone, Default, Serialize)]
#[allow(missing_docs)]
pub struct BalloonStats {
    pub target_pages: u64,
    pub actual_pages: u64,
    pub target_mib: u64,
    pub actual_mib: u64,
    #[serde(flatten)]
    pub guest: serde_json::Map<String, Value>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where the log goes (a file or a FIFO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Whether log lines show their level (hvrun's default when absent: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether log lines show their origin, the source file and line (default: no).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Metrics {
    pub metrics_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// `InstanceStart`, `SendCtrlAltDel` or `FlushMetrics`.
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// `Paused` or `Resumed`.
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file.
    pub mem_file_path: String,
    /// `Full` (or absent) only.
    #[serde(default)]
    pub snapshot_type: Option<String>,
}

/// `mem_backend` of [`SnapshotLoadParams`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` only (`Uffd` is not supported).
    pub backend_type: String,
    /// The memory file.
    pub backend_path: String,
}

/// One of [`SnapshotLoadParams::network_overrides`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new tap.
    pub host_dev_name: String,
}

/// [`SnapshotLoadParams::vsock_override`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The vsock device's new socket.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Not supported when true (Firecracker refuses it on arm64 too).
    #[serde(default)]
    pub clock_realtime: bool,
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// `GET /`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    /// `hvrun`.
    pub app_name: String,
    /// The instance's id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// hvrun's version.
    pub vmm_version: String,
}

/// `GET /vm/config`, and `--config-file`'s contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct FullVmConfiguration {
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    // Sections Firecracker has and hvrun does not: parsed, so that a file naming them
    // gets a clear error.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<Value>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<Value>,
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<Value>,
    #[serde(default, skip_serializing)]
    pub pmem: Option<Value>,
    #[serde(default, skip_serializing)]
    pub serial: Option<Value>,
}

/// The message for a field or value hvrun does not support, in Firecracker's error body.
pub fn unsupported(what: &str) -> String {
    format!("hvrun does not support {what}.")
}
