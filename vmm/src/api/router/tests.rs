use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// What the fake host and VM were asked to do (also for the contract tests).
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) booted: Option<VmConfig>,
    pub(crate) restored: Option<(VmConfig, SnapshotFiles)>,
    pub(crate) snapshots: Vec<SnapshotFiles>,
    pub(crate) presses: u32,
    pub(crate) paused: AtomicBool,
    pub(crate) loggers: Vec<Logger>,
    pub(crate) replaced: Vec<(String, PathBuf)>,
}

/// A VM that records what it is asked; it has a balloon if its configuration does.
pub(crate) struct FakeVm(Arc<Mutex<Seen>>, Option<BalloonHandle>);

impl Running for FakeVm {
    fn pause(&self) -> Result<(), String> {
        self.0.lock().unwrap().paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) {
        self.0.lock().unwrap().paused.store(false, Ordering::SeqCst);
    }
    fn paused(&self) -> bool {
        self.0.lock().unwrap().paused.load(Ordering::SeqCst)
    }
    fn ctrl_alt_del(&self) -> bool {
        self.0.lock().unwrap().presses += 1;
        true
    }
    fn snapshot(&self, files: &SnapshotFiles) -> Result<(), String> {
        self.0.lock().unwrap().snapshots.push(files.clone());
        Ok(())
    }
    fn balloon(&self) -> Option<BalloonHandle> {
        self.1.clone()
    }
    fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), String> {
        self.0.lock().unwrap().replaced.push((id.into(), path.into()));
        Ok(())
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({"vcpu": {"exit_mmio_read": 1}})
    }
}

/// A host that starts [`FakeVm`]s; its snapshots were all taken with `saved`.
pub(crate) struct FakeHost {
    pub(crate) seen: Arc<Mutex<Seen>>,
    pub(crate) saved: VmConfig,
}

impl FakeHost {
    /// A VM for `config`, with a balloon handle if it has a balloon.
    fn vm(&self, config: &VmConfig) -> Box<dyn Running> {
        let balloon = config.balloon.map(|o| devices::virtio::balloon::Balloon::new(o).1);
        Box::new(FakeVm(Arc::clone(&self.seen), balloon))
    }
}

impl Host for FakeHost {
    fn boot(&mut self, config: VmConfig) -> Result<Box<dyn Running>, String> {
        let vm = self.vm(&config);
        self.seen.lock().unwrap().booted = Some(config);
        Ok(vm)
    }
    fn restore(&mut self, config: VmConfig, files: SnapshotFiles, paused: bool) -> Result<Box<dyn Running>, String> {
        let vm = self.vm(&config);
        self.seen.lock().unwrap().paused.store(paused, Ordering::SeqCst);
        self.seen.lock().unwrap().restored = Some((config, files));
        Ok(vm)
    }
    fn saved_config(&mut self, _files: &SnapshotFiles) -> Result<VmConfig, String> {
        Ok(self.saved.clone())
    }
    fn logger(&mut self, logger: &Logger) -> Result<(), String> {
        self.seen.lock().unwrap().loggers.push(logger.clone());
        Ok(())
    }
    /// A tap called `missing` cannot be opened; any other can.
    fn check_net(&mut self, net: &NetConfig) -> Result<(), String> {
        match &net.backend {
            NetBackendConfig::Tap(name) if name == "missing" => Err("Could not open the tap device missing".into()),
            _ => Ok(()),
        }
    }
}

/// Files the configuration names, which must exist when they are put.
fn files() -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("hvrun-api-router-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, disk) = (dir.join("Image"), dir.join("disk.img"));
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&disk, vec![0; 4096]).unwrap();
    (kernel, disk)
}

/// An API over a fake host (also for the server's tests).
pub(crate) fn new_api() -> (Api, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut saved = VmConfig::new("/k");
    saved.nets = vec![crate::config::NetConfig {
        backend: NetBackendConfig::Tap("tap0".into()),
        mac: None,
        id: Some("eth0".into()),
    }];
    saved.vsock = Some(VsockConfig::new(3, "/old.sock"));
    (Api::new(Box::new(FakeHost { seen: Arc::clone(&seen), saved }), "vm1"), seen)
}

fn call(api: &mut Api, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let request = Request { method: method.into(), path: path.into(), body: body.map(|b| b.as_bytes().to_vec()) };
    let response = api.handle(&request);
    (response.status, response.body.unwrap_or_default())
}

fn configure(api: &mut Api) {
    let (kernel, disk) = files();
    let put = |api: &mut Api, path: &str, body: String| {
        let (status, text) = call(api, "PUT", path, Some(&body));
        assert_eq!(status, 204, "PUT {path}: {text}");
    };
    put(api, "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#.into());
    put(
        api,
        "/boot-source",
        format!(r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1"}}"#, kernel.display()),
    );
    put(
        api,
        "/drives/data",
        format!(r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#, disk.display()),
    );
    put(
        api,
        "/drives/rootfs",
        format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            disk.display()
        ),
    );
    put(
        api,
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap5", "guest_mac": "06:00:ac:10:00:02"}"#.into(),
    );
    put(api, "/vsock", r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#.into());
    put(api, "/entropy", "{}".into());
}

#[test]
fn a_configured_vm_starts_as_firecracker_would_build_it() {
    let (mut api, seen) = new_api();
    assert_eq!(
        call(&mut api, "GET", "/", None),
        (200, r#"{"app_name":"hvrun","id":"vm1","state":"Not started","vmm_version":"0.1.0"}"#.into())
    );
    configure(&mut api);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let config = seen.lock().unwrap().booted.clone().unwrap();
    assert_eq!((config.cpus, config.memory), (2, 256 << 20));
    // The root drive first, with root= and ro; Firecracker's console is hvrun's PL011.
    let ids: Vec<_> = config.disks.iter().map(|d| d.id.clone().unwrap()).collect();
    assert_eq!(ids, ["rootfs", "data"]);
    assert!(config.disks[0].read_only && !config.disks[1].read_only);
    assert_eq!(config.cmdline.as_deref(), Some("console=ttyAMA0 reboot=k panic=1 root=/dev/vda ro"));
    assert_eq!(config.nets[0].backend, NetBackendConfig::Tap("tap5".into()));
    assert_eq!(config.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
    assert_eq!(config.vsock, Some(VsockConfig::new(3, "/tmp/v.sock")));
    assert!(call(&mut api, "GET", "/", None).1.contains(r#""state":"Running""#));
    let (status, exported) = call(&mut api, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert!(exported.contains(r#""drive_id":"rootfs""#) && exported.contains(r#""boot-source""#), "{exported}");
}

#[test]
fn calls_in_the_wrong_phase_get_firecrackers_errors() {
    let (mut api, seen) = new_api();
    let pre = r#"{"fault_message":"The requested operation is not supported before starting the microVM."}"#;
    let post = r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#;
    assert_eq!(call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)), (400, pre.into()));
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)), (400, pre.into()));
    let create = r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#;
    assert_eq!(call(&mut api, "PUT", "/snapshot/create", Some(create)), (400, pre.into()));
    // Without a boot source the VM cannot start.
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 400);
    configure(&mut api);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), (400, post.into()));
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(r#"{"kernel_image_path": "/k"}"#)), (400, post.into()));
    assert_eq!(
        call(&mut api, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)),
        (400, post.into())
    );
    assert_eq!(
        call(&mut api, "PUT", "/snapshot/load", Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#)),
        (400, post.into())
    );
    // A snapshot wants a paused VM; pause, snapshot, resume and the power button work.
    assert_eq!(call(&mut api, "PUT", "/snapshot/create", Some(create)).0, 400);
    assert_eq!(call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert!(call(&mut api, "GET", "/", None).1.contains(r#""state":"Paused""#));
    assert_eq!(call(&mut api, "PUT", "/snapshot/create", Some(create)).0, 204);
    assert_eq!(call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    // A drive's image is replaced by id; an unknown drive and a rate limiter are refused.
    assert_eq!(
        call(&mut api, "PATCH", "/drives/data", Some(r#"{"drive_id": "data", "path_on_host": "/new.img"}"#)).0,
        204
    );
    assert!(call(&mut api, "PATCH", "/drives/nope", Some(r#"{"drive_id": "nope", "path_on_host": "/n"}"#))
        .1
        .contains("No drive"));
    let limited = r#"{"drive_id": "data", "rate_limiter": {}}"#;
    assert!(call(&mut api, "PATCH", "/drives/data", Some(limited)).1.contains("rate limiters"));
    assert!(call(&mut api, "GET", "/vm/config", None).1.contains(r#""path_on_host":"/new.img""#));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.replaced, [("data".to_string(), PathBuf::from("/new.img"))]);
    assert_eq!(seen.snapshots, [SnapshotFiles { state: "/s".into(), memory: "/m".into() }]);
    assert_eq!(seen.presses, 1);
}

#[test]
fn bad_requests_get_400_with_a_fault_message_and_change_nothing() {
    let (mut api, _) = new_api();
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("GET", "/", Some("{}"), "GET request cannot have a body."),
        ("PUT", "/machine-config", None, "Empty PUT request."),
        ("PATCH", "/vm", None, "Empty PATCH request."),
        ("PUT", "/machine-config", Some("{"), "An error occurred when deserializing the json body"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#), "unknown field `x`"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": "2", "mem_size_mib": 128}"#), "invalid type"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 33, "mem_size_mib": 128}"#), "The vCPU number is invalid"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#), "memory size"),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#),
            "does not support SMT",
        ),
        ("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/nonexistent/Image"}"#), "Invalid kernel path"),
        ("PUT", "/drives/a", Some(r#"{"drive_id": "b", "is_root_device": false}"#), "does not match"),
        ("PUT", "/drives/a-b", Some(r#"{"drive_id": "a-b", "is_root_device": false}"#), "alphanumeric"),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/nonexistent"}"#),
            "Unable to open",
        ),
        ("PUT", "/drives/a", Some(r#"{"drive_id": "a", "is_root_device": false, "socket": "/s"}"#), "vhost-user"),
        ("PUT", "/network-interfaces/e", Some(r#"{"iface_id": "e"}"#), "needs `host_dev_name`"),
        (
            "PUT",
            "/network-interfaces/e",
            Some(r#"{"iface_id": "e", "host_dev_name": "t", "guest_mac": "zz"}"#),
            "Invalid guest_mac",
        ),
        ("PUT", "/vsock", Some(r#"{"guest_cid": 2, "uds_path": "/v"}"#), "CID"),
        ("PUT", "/vsock", Some(r#"{"guest_cid": 3, "uds_path": "/hvrun-no-such-dir/v.sock"}"#), "is not a directory"),
        ("PUT", "/network-interfaces/e", Some(r#"{"iface_id": "e", "host_dev_name": "missing"}"#), "Could not open"),
        ("PUT", "/balloon", Some(r#"{"amount_mib": 129, "deflate_on_oom": true}"#), "too large"),
        ("PUT", "/balloon", Some(r#"{"amount_mib": 17592186044416, "deflate_on_oom": true}"#), "invalid value"),
        ("PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#), "before starting"),
        ("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#), "before starting"),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "clock_realtime": true}"#),
            "clock_realtime",
        ),
        ("PUT", "/balloon", Some(r#"{"amount_mib": 1, "deflate_on_oom": true, "free_page_hinting": true}"#), "hinting"),
        ("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#), "unknown variant `Reboot`"),
        ("PUT", "/metrics", Some(r#"{"metrics_path": "/nonexistent/m"}"#), "Cannot open the metrics file"),
        ("PUT", "/mmds", Some("{}"), "does not support /mmds"),
        ("DELETE", "/drives/a", None, "Invalid request method and/or path: DELETE /drives/a."),
        ("GET", "/nothing", None, "Invalid request method and/or path"),
        ("PUT", "/snapshot/load", Some(r#"{"snapshot_path": "/s"}"#), "exactly one of"),
    ];
    for (method, path, body, expected) in cases {
        let (status, text) = call(&mut api, method, path, *body);
        assert_eq!(status, 400, "{method} {path}: {text}");
        let fault: serde_json::Value = serde_json::from_str(&text).unwrap();
        let message = fault["fault_message"].as_str().unwrap();
        assert!(message.contains(expected), "{method} {path}: {message} (expected {expected})");
    }
    // Nothing was taken.
    let (_, config) = call(&mut api, "GET", "/vm/config", None);
    assert_eq!(
        config,
        r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false},"drives":[],"network-interfaces":[]}"#
    );
}

#[test]
fn a_snapshot_loads_only_first_with_its_overrides_and_stays_paused_unless_resumed() {
    let (mut api, seen) = new_api();
    let load = r#"{"snapshot_path": "/s/state", "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                   "vsock_override": {"uds_path": "/new.sock"}}"#;
    assert_eq!(call(&mut api, "PUT", "/snapshot/load", Some(load)).0, 204);
    let (config, files) = seen.lock().unwrap().restored.clone().unwrap();
    assert_eq!(files, SnapshotFiles { state: "/s/state".into(), memory: "/s/mem".into() });
    assert_eq!(config.nets[0].backend, NetBackendConfig::Tap("tap9".into()));
    assert_eq!(config.vsock, Some(VsockConfig::new(3, "/new.sock")));
    assert!(call(&mut api, "GET", "/", None).1.contains(r#""state":"Paused""#));

    // An override naming an interface the snapshot lacks is refused; so is a load
    // after anything was configured.
    let (mut api, _) = new_api();
    let bad = r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [{"iface_id": "eth7", "host_dev_name": "t"}]}"#;
    assert!(call(&mut api, "PUT", "/snapshot/load", Some(bad)).1.contains("no network interface `eth7`"));
    assert_eq!(call(&mut api, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)).0, 204);
    let ok = r#"{"snapshot_path": "/s", "mem_file_path": "/m", "resume_vm": true}"#;
    assert!(call(&mut api, "PUT", "/snapshot/load", Some(ok)).1.contains("not allowed after configuring"));

    let (mut api, _) = new_api();
    assert_eq!(call(&mut api, "PUT", "/snapshot/load", Some(ok)).0, 204);
    assert!(call(&mut api, "GET", "/", None).1.contains(r#""state":"Running""#));
}

#[test]
fn a_configuration_file_starts_the_vm_and_refuses_what_hvrun_lacks() {
    let (kernel, _) = files();
    let (mut api, seen) = new_api();
    let file: FullVmConfiguration = serde_json::from_str(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}},
            "logger": {{"level": "Info"}}}}"#,
        kernel.display()
    ))
    .unwrap();
    api.start_from(file).unwrap();
    assert!(api.started());
    assert_eq!(seen.lock().unwrap().booted.as_ref().unwrap().memory, 64 << 20);
    assert_eq!(seen.lock().unwrap().loggers.len(), 1);

    let (mut api, _) = new_api();
    let file: FullVmConfiguration = serde_json::from_str(r#"{"mmds-config": {"network_interfaces": []}}"#).unwrap();
    assert!(api.start_from(file).unwrap_err().contains("`mmds-config`"));
    assert!(
        serde_json::from_str::<FullVmConfiguration>(r#"{"boot_source": {}}"#).is_err(),
        "unknown sections are refused"
    );
}

#[test]
fn metrics_go_to_an_existing_file_once_configured_and_flush_on_demand() {
    let (mut api, _) = new_api();
    let (kernel, _) = files();
    let path = kernel.with_file_name("metrics.json");
    std::fs::write(&path, b"").unwrap();
    let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
    assert_eq!(call(&mut api, "PUT", "/metrics", Some(&body)).0, 204);
    assert!(call(&mut api, "PUT", "/metrics", Some(&body)).1.contains("Reinitialization of metrics not allowed."));
    let flush = Some(r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(call(&mut api, "PUT", "/actions", flush), (400, fault(PRE_BOOT)));
    assert!(api.next_tick().is_none(), "no periodic line before the start");
    configure(&mut api);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    assert!(api.next_tick().is_some());
    assert_eq!(call(&mut api, "PUT", "/actions", flush).0, 204);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["vcpu"]["exit_mmio_read"], 1);
    // Requests answered before the line (a request counts once answered): the two
    // PUT /metrics, the refused FlushMetrics, the configuration (7 PUTs) and InstanceStart.
    assert_eq!(lines[0]["api_server"]["requests"], 11);
    assert_eq!(lines[0]["api_server"]["errors"], 2);
    // Once started, metrics are configured no more, as in Firecracker.
    assert_eq!(call(&mut api, "PUT", "/metrics", Some(&body)), (400, fault(POST_BOOT)));
}

/// The JSON body of a refusal with `message`.
fn fault(message: &str) -> String {
    serde_json::json!({ "fault_message": message }).to_string()
}

#[test]
fn flush_metrics_without_metrics_configured_is_accepted_once_started() {
    let (mut api, _) = new_api();
    configure(&mut api);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#)), (204, String::new()));
}

#[test]
fn the_configuration_is_bounded_and_checked_when_it_is_put() {
    let (mut api, _) = new_api();
    let (_, disk) = files();
    let mut refused = None;
    for i in 0..=crate::slots::MAX_SLOTS {
        let body = format!(r#"{{"drive_id": "d{i}", "path_on_host": "{}", "is_root_device": false}}"#, disk.display());
        let (status, text) = call(&mut api, "PUT", &format!("/drives/d{i}"), Some(&body));
        if status != 204 {
            refused = Some((i, text));
            break;
        }
    }
    let (i, text) = refused.expect("drives without end were taken");
    assert_eq!(i, crate::slots::MAX_SLOTS);
    assert!(text.contains("Too many devices"), "{text}");
    // Putting one that exists again still works, and so does a network interface no more.
    let again = format!(r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false}}"#, disk.display());
    assert_eq!(call(&mut api, "PUT", "/drives/d0", Some(&again)).0, 204);
    let net = r#"{"iface_id": "e", "host_dev_name": "tap0"}"#;
    assert!(call(&mut api, "PUT", "/network-interfaces/e", Some(net)).1.contains("Too many devices"));
}

#[test]
fn a_balloon_above_the_memory_and_a_start_without_boot_args_are_handled_as_firecracker_does() {
    let (mut api, seen) = new_api();
    let (kernel, disk) = files();
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let root = format!(r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true}}"#, disk.display());
    assert_eq!(call(&mut api, "PUT", "/drives/root", Some(&root)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/balloon", Some(r#"{"amount_mib": 128, "deflate_on_oom": false}"#)).0, 204);
    // The memory cannot shrink below the balloon's target once it is put (Firecracker's
    // rule), by PUT or PATCH.
    let (status, text) = call(&mut api, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#));
    assert!(status == 400 && text.contains("larger than this memory size"), "{text}");
    let (status, text) = call(&mut api, "PATCH", "/machine-config", Some(r#"{"mem_size_mib": 127}"#));
    assert!(status == 400 && text.contains("larger than this memory size"), "{text}");
    assert_eq!(call(&mut api, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256}"#)).0, 204);
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    // No boot_args: Firecracker's default (what applies to hvrun's machine) with the root.
    let booted = seen.lock().unwrap().booted.clone().unwrap();
    assert_eq!(booted.cmdline.as_deref(), Some("reboot=k panic=1 root=/dev/vda rw"));
}

#[test]
fn the_root_words_go_before_the_inits_arguments() {
    let (mut api, seen) = new_api();
    let (kernel, disk) = files();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 panic=1 -- /init console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let root = format!(r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true}}"#, disk.display());
    assert_eq!(call(&mut api, "PUT", "/drives/root", Some(&root)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let booted = seen.lock().unwrap().booted.clone().unwrap();
    assert_eq!(booted.cmdline.as_deref(), Some("console=ttyAMA0 panic=1 root=/dev/vda rw -- /init console=ttyS0"));
}

#[test]
fn after_the_start_the_balloon_is_checked_and_the_logger_refused() {
    let (mut api, seen) = new_api();
    let (kernel, _) = files();
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/balloon", Some(r#"{"amount_mib": 128, "deflate_on_oom": false}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let booted = seen.lock().unwrap().booted.clone().unwrap();
    assert_eq!(booted.balloon.unwrap().initial_target, 128 << 20);
    // After the start the target is checked against the memory too.
    assert!(call(&mut api, "PATCH", "/balloon", Some(r#"{"amount_mib": 257}"#)).1.contains("too large"));
    assert_eq!(call(&mut api, "PATCH", "/balloon", Some(r#"{"amount_mib": 256}"#)).0, 204);
    assert_eq!(call(&mut api, "PUT", "/logger", Some(r#"{"level": "Info"}"#)).0, 400);
}
