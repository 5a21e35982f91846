//! Firecracker's API, request by request: which path and method does what, in which
//! phase (before `InstanceStart`, or once the VM runs), with Firecracker's status codes
//! and error messages. The VM itself is behind [`Host`] and [`Running`], so this runs
//! in tests without one.

use devices::virtio::balloon::BalloonHandle;
use serde::de::DeserializeOwned;

use super::http::{Request, Response};
use super::model::{
    unsupported, Balloon, BalloonStats, BalloonUpdate, BootSource, Drive, EntropyDevice, FullVmConfiguration,
    InstanceActionInfo, InstanceInfo, Logger, MachineConfiguration, MachineConfigurationUpdate, Metrics,
    NetworkInterface, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, VmState, Vsock,
};
use super::setup::Setup;
use super::sink::{ApiCounters, Sink};
use crate::config::{NetBackendConfig, NetConfig, VsockConfig};
use crate::snapshot::machine::SnapshotFiles;
use crate::VmConfig;

/// The version of Firecracker's API that hvrun follows (`GET /version`).
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
/// Firecracker's answer to a balloon target above the guest's memory.
pub(super) const TOO_LARGE: &str = "Amount of pages requested is too large.";

/// A VM that runs (a [`crate::VmHandle`], or a stand-in in tests).
pub trait Running: Send {
    /// Pauses it.
    fn pause(&self) -> Result<(), String>;
    /// Lets it run again.
    fn resume(&self);
    /// Whether it is paused.
    fn paused(&self) -> bool;
    /// Presses its power button; false if no driver listens.
    fn ctrl_alt_del(&self) -> bool;
    /// Saves it (left paused).
    fn snapshot(&self, files: &SnapshotFiles) -> Result<(), String>;
    /// Its balloon, if it has one.
    fn balloon(&self) -> Option<BalloonHandle>;
    /// Gives the disk `id` the image at `path` (`PATCH /drives/{id}`).
    fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), String>;
    /// Its counters, as totals ([`crate::metrics::collect`]).
    fn metrics(&self) -> serde_json::Value;
}

/// What the API does to the process: start a VM, continue a snapshot, send the log
/// somewhere.
pub trait Host: Send {
    /// Boots `config`.
    fn boot(&mut self, config: VmConfig) -> Result<Box<dyn Running>, String>;
    /// Continues the snapshot `files` with `config` (the snapshot's, with overrides);
    /// `paused`: the guest runs nothing until it is resumed.
    fn restore(&mut self, config: VmConfig, files: SnapshotFiles, paused: bool) -> Result<Box<dyn Running>, String>;
    /// The configuration a snapshot was taken with.
    fn saved_config(&mut self, files: &SnapshotFiles) -> Result<VmConfig, String>;
    /// Applies `PUT /logger`.
    fn logger(&mut self, logger: &Logger) -> Result<(), String>;
    /// Checks a network interface's backend as it is put (Firecracker opens its tap
    /// then); the VM opens it again when it starts.
    fn check_net(&mut self, net: &NetConfig) -> Result<(), String> {
        let _ = net;
        Ok(())
    }
}

/// The API's state: the configuration until the VM starts, then the VM.
pub struct Api {
    host: Box<dyn Host>,
    id: String,
    setup: Setup,
    running: Option<(Box<dyn Running>, FullVmConfiguration)>,
    /// `PUT /metrics`' destination.
    metrics: Option<Sink>,
    counters: ApiCounters,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("id", &self.id).field("started", &self.running.is_some()).finish_non_exhaustive()
    }
}

/// The body of `request`, decoded as `T` (Firecracker's message when it is not).
fn body<T: DeserializeOwned>(request: &Request) -> Result<T, String> {
    let bytes = request.body.as_deref().unwrap_or_default();
    serde_json::from_slice(bytes)
        .map_err(|e| format!("An error occurred when deserializing the json body of a request: {e}."))
}

/// 204, or 400 with the message.
fn done(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => Response::no_content(),
        Err(message) => Response::fault(400, &message),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(text) => Response::ok(text),
        Err(e) => Response::fault(500, &e.to_string()),
    }
}

impl Api {
    /// An API for instance `id` that starts VMs through `host`.
    pub fn new(host: Box<dyn Host>, id: &str) -> Self {
        Api {
            host,
            id: id.to_string(),
            setup: Setup::default(),
            running: None,
            metrics: None,
            counters: ApiCounters::default(),
        }
    }

    /// Configures the VM from a Firecracker configuration file's objects (each checked
    /// as its `PUT` would be) and starts it.
    pub fn start_from(&mut self, file: FullVmConfiguration) -> Result<(), String> {
        let absent = [
            ("cpu-config", file.cpu_config.is_some()),
            ("mmds-config", file.mmds_config.is_some()),
            ("memory-hotplug", file.memory_hotplug.is_some()),
            ("pmem", file.pmem.is_some()),
            ("serial", file.serial.is_some()),
        ];
        if let Some((name, _)) = absent.iter().find(|(_, given)| *given) {
            return Err(unsupported(&format!("`{name}`")));
        }
        if let Some(logger) = &file.logger {
            self.host.logger(logger)?;
            self.setup.logger = Some(logger.clone());
        }
        if let Some(metrics) = &file.metrics {
            self.set_metrics(metrics.clone())?;
        }
        if let Some(machine) = file.machine_config {
            self.setup.set_machine(machine)?;
        }
        self.setup.set_boot(file.boot_source.ok_or("it has no `boot-source`")?)?;
        for drive in file.drives {
            self.setup.set_drive(drive)?;
        }
        for net in file.network_interfaces {
            self.put_net(net)?;
        }
        if let Some(vsock) = file.vsock {
            self.setup.set_vsock(vsock)?;
        }
        if let Some(balloon) = file.balloon {
            self.setup.set_balloon(balloon)?;
        }
        if let Some(entropy) = file.entropy {
            self.setup.set_entropy(entropy)?;
        }
        let vm = self.host.boot(self.setup.vm_config()?)?;
        self.running = Some((vm, self.setup.export()));
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: checked as an object, then its backend by the host.
    fn put_net(&mut self, net: NetworkInterface) -> Result<(), String> {
        let config = super::setup::net_config(&net)?;
        self.host.check_net(&config)?;
        self.setup.set_net(net)
    }

    /// Whether the VM was started (booted or restored).
    pub fn started(&self) -> bool {
        self.running.is_some()
    }

    /// The answer to `request` (counted for the API's metrics).
    pub fn handle(&mut self, request: &Request) -> Response {
        let response = self.route(request);
        self.counters.requests += 1;
        self.counters.errors += u64::from(response.status >= 400);
        response
    }

    /// How long until [`Api::tick`] has work: the periodic metrics line (metrics
    /// configured and the VM started), or the end of a line the metrics destination took
    /// only in part. `None`: nothing to wait for.
    pub fn next_tick(&self) -> Option<std::time::Duration> {
        let sink = self.metrics.as_ref()?;
        let periodic = self.started().then(|| sink.until_due());
        periodic.into_iter().chain(sink.until_retry()).min()
    }

    /// Goes on with a metrics line the destination took only in part, and writes the
    /// periodic line if it is due.
    pub fn tick(&mut self) {
        if let Some(sink) = self.metrics.as_mut() {
            sink.finish_line();
        }
        if self.metrics.as_ref().is_some_and(Sink::due) && self.started() {
            if let Err(e) = self.flush_metrics() {
                devices::warn_ratelimited!("metrics: {e}");
            }
        }
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        let machine = match &self.running {
            Some((vm, _)) => vm.metrics(),
            None => serde_json::json!({}),
        };
        let sink = self.metrics.as_mut().ok_or("The metrics system is not configured (PUT /metrics first).")?;
        sink.write(machine, self.counters)
    }

    fn set_metrics(&mut self, metrics: Metrics) -> Result<(), String> {
        if self.metrics.is_some() {
            return Err("Reinitialization of metrics not allowed.".into());
        }
        self.metrics = Some(Sink::open(&metrics, &self.id)?);
        self.setup.metrics = Some(metrics);
        Ok(())
    }

    fn route(&mut self, request: &Request) -> Response {
        let method = request.method.as_str();
        let path: Vec<&str> = request.path.trim_start_matches('/').split_terminator('/').collect();
        // Firecracker's balloon operations hvrun lacks (some have no body): refused by name.
        if let ("GET" | "PATCH", ["balloon", "hinting", ..]) | ("PATCH", ["balloon", "statistics"]) =
            (method, path.as_slice())
        {
            return Response::fault(400, &unsupported(&format!("{method} {}", request.path)));
        }
        match (method, &request.body) {
            ("GET", Some(_)) => return Response::fault(400, "GET request cannot have a body."),
            ("PUT", None) => return Response::fault(400, "Empty PUT request."),
            ("PATCH", None) => return Response::fault(400, "Empty PATCH request."),
            _ => {}
        }
        match (method, path.as_slice()) {
            ("GET", []) => json(&self.info()),
            ("GET", ["version"]) => json(&serde_json::json!({ "firecracker_version": FIRECRACKER_API_VERSION })),
            ("GET", ["machine-config"]) => json(self.config().machine_config.as_ref().unwrap_or(&self.setup.machine)),
            ("GET", ["vm", "config"]) => json(&self.config()),
            ("GET", ["balloon"]) => match &self.config().balloon {
                Some(balloon) => json(balloon),
                None => Response::fault(400, "No balloon device found."),
            },
            ("GET", ["balloon", "statistics"]) => self.balloon_stats(),
            ("PUT", ["actions"]) => self.action(request),
            ("PATCH", ["vm"]) => self.patch_vm(request),
            ("PUT", ["snapshot", "create"]) => self.snapshot_create(request),
            ("PUT", ["snapshot", "load"]) => self.snapshot_load(request),
            ("PATCH", ["balloon"]) => self.patch_balloon(request),
            // Firecracker configures its logger and metrics once, before the start.
            ("PUT", ["logger" | "metrics"]) if self.started() => Response::fault(400, POST_BOOT),
            ("PUT", ["logger"]) => done(body::<Logger>(request).and_then(|l| {
                self.host.logger(&l)?;
                self.setup.logger = Some(l);
                Ok(())
            })),
            ("PUT", ["metrics"]) => done(body::<Metrics>(request).and_then(|m| self.set_metrics(m))),
            ("PATCH", ["drives", id]) if self.started() => done(body(request).and_then(|d| self.patch_drive(id, d))),
            ("PATCH", ["network-interfaces", _]) if self.started() => {
                done(Err(unsupported("rate limiters on network interfaces")))
            }
            ("PATCH", ["drives" | "network-interfaces", _]) => Response::fault(400, PRE_BOOT),
            ("PUT", [resource, ..]) if self.started() && Self::pre_boot(resource) => Response::fault(400, POST_BOOT),
            ("PATCH", ["machine-config"]) if self.started() => Response::fault(400, POST_BOOT),
            ("PUT", ["machine-config"]) => done(body(request).and_then(|m| self.setup.set_machine(m))),
            ("PATCH", ["machine-config"]) => done(body(request).and_then(|u| self.patch_machine(u))),
            ("PUT", ["boot-source"]) => done(body(request).and_then(|b: BootSource| self.setup.set_boot(b))),
            ("PUT", ["drives", id]) => done(body(request).and_then(|d: Drive| {
                same_id(id, &d.drive_id)?;
                self.setup.set_drive(d)
            })),
            ("PUT", ["network-interfaces", id]) => done(body(request).and_then(|n: NetworkInterface| {
                same_id(id, &n.iface_id)?;
                self.put_net(n)
            })),
            ("PUT", ["vsock"]) => done(body(request).and_then(|v: Vsock| self.setup.set_vsock(v))),
            ("PUT", ["balloon"]) => done(body(request).and_then(|b: Balloon| self.setup.set_balloon(b))),
            ("PUT", ["entropy"]) => done(body(request).and_then(|e: EntropyDevice| self.setup.set_entropy(e))),
            ("PUT", ["cpu-config" | "mmds" | "pmem" | "serial" | "hotplug", ..])
            | ("PATCH", ["mmds" | "pmem" | "hotplug", ..])
            | ("GET", ["mmds" | "hotplug", ..]) => Response::fault(400, &unsupported(&request.path)),
            _ => Response::fault(400, &format!("Invalid request method and/or path: {method} {}.", request.path)),
        }
    }

    /// Resources that can only be put before boot.
    fn pre_boot(resource: &str) -> bool {
        matches!(
            resource,
            "machine-config" | "boot-source" | "drives" | "network-interfaces" | "vsock" | "balloon" | "entropy"
        )
    }

    fn info(&self) -> InstanceInfo {
        let state = match &self.running {
            None => "Not started",
            Some((vm, _)) if vm.paused() => "Paused",
            Some(_) => "Running",
        };
        InstanceInfo {
            app_name: "hvrun".into(),
            id: self.id.clone(),
            state: state.into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn config(&self) -> FullVmConfiguration {
        match &self.running {
            Some((_, config)) => config.clone(),
            None => self.setup.export(),
        }
    }

    /// `PATCH /drives/{id}` after boot: a new image for the drive.
    fn patch_drive(&mut self, id: &str, drive: PartialDrive) -> Result<(), String> {
        same_id(id, &drive.drive_id)?;
        if drive.rate_limiter.is_some() {
            return Err(unsupported("rate limiters on drives"));
        }
        let Some((vm, config)) = &mut self.running else { return Err(PRE_BOOT.into()) };
        let entry = config.drives.iter_mut().find(|d| d.drive_id == id).ok_or_else(|| format!("No drive `{id}`."))?;
        if let Some(path) = drive.path_on_host {
            vm.replace_disk(id, std::path::Path::new(&path)).map_err(|e| format!("Cannot update drive `{id}`: {e}"))?;
            entry.path_on_host = Some(path);
        }
        Ok(())
    }

    fn patch_machine(&mut self, update: MachineConfigurationUpdate) -> Result<(), String> {
        let old = self.setup.machine.clone();
        self.setup.set_machine(MachineConfiguration {
            vcpu_count: update.vcpu_count.unwrap_or(old.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(old.mem_size_mib),
            smt: update.smt.unwrap_or(old.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(old.track_dirty_pages),
            cpu_template: update.cpu_template.or(old.cpu_template),
            huge_pages: update.huge_pages.or(old.huge_pages),
        })
    }

    fn action(&mut self, request: &Request) -> Response {
        let action = match body::<InstanceActionInfo>(request) {
            Ok(action) => action,
            Err(e) => return Response::fault(400, &e),
        };
        match (action.action_type.as_str(), &self.running) {
            ("InstanceStart", Some(_)) => Response::fault(400, POST_BOOT),
            ("InstanceStart", None) => {
                let started = self
                    .setup
                    .vm_config()
                    .and_then(|config| self.host.boot(config).map_err(|e| format!("Failed to start the microVM: {e}")));
                match started {
                    Ok(vm) => {
                        self.running = Some((vm, self.setup.export()));
                        Response::no_content()
                    }
                    Err(e) => Response::fault(400, &e),
                }
            }
            ("SendCtrlAltDel", None) => Response::fault(400, PRE_BOOT),
            ("SendCtrlAltDel", Some((vm, _))) if vm.ctrl_alt_del() => Response::no_content(),
            ("SendCtrlAltDel", Some(_)) => {
                Response::fault(400, "The guest has no driver for its power button (virtio-input); nothing was sent.")
            }
            ("FlushMetrics", None) => Response::fault(400, PRE_BOOT),
            // Without `PUT /metrics` there is nothing to flush: Firecracker answers 204.
            ("FlushMetrics", Some(_)) if self.metrics.is_none() => Response::no_content(),
            ("FlushMetrics", Some(_)) => done(self.flush_metrics()),
            (other, _) => Response::fault(
                400,
                &format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{other}`, \
                     expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."
                ),
            ),
        }
    }

    fn patch_vm(&mut self, request: &Request) -> Response {
        let state = match body::<VmState>(request) {
            Ok(state) => state,
            Err(e) => return Response::fault(400, &e),
        };
        let Some((vm, _)) = &self.running else { return Response::fault(400, PRE_BOOT) };
        match state.state.as_str() {
            "Paused" => done(vm.pause().map_err(|e| format!("Failed to pause the microVM: {e}"))),
            "Resumed" => {
                vm.resume();
                Response::no_content()
            }
            other => Response::fault(
                400,
                &format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{other}`, \
                     expected `Paused` or `Resumed`."
                ),
            ),
        }
    }

    fn snapshot_create(&mut self, request: &Request) -> Response {
        let params = match body::<SnapshotCreateParams>(request) {
            Ok(params) => params,
            Err(e) => return Response::fault(400, &e),
        };
        let Some((vm, _)) = &self.running else { return Response::fault(400, PRE_BOOT) };
        if params.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
            return Response::fault(400, &unsupported("diff snapshots"));
        }
        if !vm.paused() {
            return Response::fault(400, "Cannot create a snapshot: the microVM is not paused (PATCH /vm first).");
        }
        let files = SnapshotFiles { state: params.snapshot_path.into(), memory: params.mem_file_path.into() };
        done(vm.snapshot(&files).map_err(|e| format!("Cannot create the snapshot: {e}")))
    }

    fn snapshot_load(&mut self, request: &Request) -> Response {
        let params = match body::<SnapshotLoadParams>(request) {
            Ok(params) => params,
            Err(e) => return Response::fault(400, &e),
        };
        if self.running.is_some() {
            return Response::fault(400, POST_BOOT);
        }
        if self.setup.configured() {
            return Response::fault(
                400,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        match self.load(params) {
            Ok((vm, config)) => {
                self.running = Some((vm, config));
                Response::no_content()
            }
            Err(e) => Response::fault(400, &format!("Cannot load the snapshot: {e}")),
        }
    }

    fn load(&mut self, params: SnapshotLoadParams) -> Result<(Box<dyn Running>, FullVmConfiguration), String> {
        let memory = match (params.mem_file_path, params.mem_backend) {
            (Some(path), None) => path,
            (None, Some(backend)) if backend.backend_type == "File" => backend.backend_path,
            (None, Some(_)) => return Err(unsupported("memory backends other than File (Uffd)")),
            _ => return Err("exactly one of `mem_file_path` and `mem_backend` must be given".into()),
        };
        if params.clock_realtime {
            return Err(unsupported("`clock_realtime` (the guest's clock goes on from the snapshot's time)"));
        }
        if params.enable_diff_snapshots || params.track_dirty_pages {
            return Err(unsupported("dirty page tracking"));
        }
        if params.huge_pages.as_deref().is_some_and(|h| h != "None" && h != "Snapshot") {
            return Err(unsupported("huge pages"));
        }
        let files = SnapshotFiles { state: params.snapshot_path.into(), memory: memory.into() };
        let mut config = self.host.saved_config(&files)?;
        for o in &params.network_overrides {
            let net = config
                .nets
                .iter_mut()
                .find(|n| n.id.as_deref() == Some(o.iface_id.as_str()))
                .ok_or_else(|| format!("the snapshot has no network interface `{}`", o.iface_id))?;
            net.backend = NetBackendConfig::Tap(o.host_dev_name.clone());
        }
        if let Some(o) = &params.vsock_override {
            let vsock = config.vsock.as_mut().ok_or("the snapshot has no vsock device")?;
            *vsock = VsockConfig::new(vsock.cid, &o.uds_path);
        }
        let exported = exported(&config);
        let vm = self.host.restore(config, files, !params.resume_vm)?;
        Ok((vm, exported))
    }

    fn patch_balloon(&mut self, request: &Request) -> Response {
        if request.path != "/balloon" {
            return Response::fault(400, &unsupported(&request.path));
        }
        let update = match body::<BalloonUpdate>(request) {
            Ok(update) => update,
            Err(e) => return Response::fault(400, &e),
        };
        let Some((vm, config)) = &mut self.running else { return Response::fault(400, PRE_BOOT) };
        let memory_mib = config.machine_config.as_ref().map_or(u64::MAX, |m| m.mem_size_mib);
        match (vm.balloon(), &mut config.balloon) {
            (Some(_), Some(_)) if u64::from(update.amount_mib) > memory_mib => Response::fault(400, TOO_LARGE),
            (Some(handle), Some(balloon)) => {
                handle.set_target(u64::from(update.amount_mib) << 20);
                balloon.amount_mib = update.amount_mib;
                Response::no_content()
            }
            _ => Response::fault(400, "No balloon device found."),
        }
    }

    fn balloon_stats(&self) -> Response {
        let Some((vm, config)) = &self.running else { return Response::fault(400, PRE_BOOT) };
        let (Some(handle), Some(balloon)) = (vm.balloon(), &config.balloon) else {
            return Response::fault(400, "No balloon device found.");
        };
        if balloon.stats_polling_interval_s == 0 {
            return Response::fault(400, "Statistics are not enabled on the balloon device.");
        }
        let mut stats = BalloonStats {
            target_pages: handle.target() >> 12,
            actual_pages: handle.actual() >> 12,
            target_mib: handle.target() >> 20,
            actual_mib: handle.actual() >> 20,
            ..BalloonStats::default()
        };
        if let Some(guest) = handle.stats() {
            use devices::virtio::balloon::stats as tag;
            let names = [
                (tag::SWAP_IN, "swap_in"),
                (tag::SWAP_OUT, "swap_out"),
                (tag::MAJFLT, "major_faults"),
                (tag::MINFLT, "minor_faults"),
                (tag::MEMFREE, "free_memory"),
                (tag::MEMTOT, "total_memory"),
                (tag::AVAIL, "available_memory"),
                (tag::CACHES, "disk_caches"),
            ];
            for (t, name) in names {
                if let Some(value) = guest.get(t) {
                    stats.guest.insert(name.into(), value.into());
                }
            }
        }
        json(&stats)
    }
}

/// The path's id and the body's must be the same (Firecracker's rule).
fn same_id(path_id: &str, body_id: &str) -> Result<(), String> {
    super::setup::check_id(path_id)?;
    if path_id != body_id {
        return Err("The id from the path does not match the id from the body!".into());
    }
    Ok(())
}

/// What `GET /vm/config` shows for a VM restored from a snapshot (Firecracker leaves
/// the boot source out too).
fn exported(config: &VmConfig) -> FullVmConfiguration {
    FullVmConfiguration {
        machine_config: Some(MachineConfiguration {
            vcpu_count: config.cpus,
            mem_size_mib: config.memory >> 20,
            ..MachineConfiguration::default()
        }),
        drives: config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| Drive {
                drive_id: d.id.clone().unwrap_or_else(|| format!("drive{i}")),
                path_on_host: Some(d.path.display().to_string()),
                is_root_device: false,
                is_read_only: d.read_only,
                partuuid: None,
                cache_type: None,
                io_engine: None,
                rate_limiter: None,
                socket: None,
            })
            .collect(),
        network_interfaces: config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: match &n.backend {
                    NetBackendConfig::Tap(name) => name.clone(),
                    _ => String::new(),
                },
                guest_mac: n.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                hvrun_backend: match &n.backend {
                    NetBackendConfig::Tap(_) => None,
                    _ => Some(n.mac_seed()),
                },
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect(),
        vsock: config.vsock.as_ref().map(|v| Vsock {
            guest_cid: v.cid,
            uds_path: v.socket.display().to_string(),
            vsock_id: None,
        }),
        balloon: config.balloon.as_ref().map(|b| Balloon {
            amount_mib: u32::try_from(b.initial_target >> 20).unwrap_or(u32::MAX),
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_interval.map_or(0, |d| d.as_secs()),
            free_page_reporting: b.free_page_reporting,
            free_page_hinting: false,
        }),
        ..FullVmConfiguration::default()
    }
}

#[cfg(test)]
pub(super) mod tests;
