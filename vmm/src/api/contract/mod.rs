//! Contract tests: hvrun's API checked against Firecracker's own OpenAPI description
//! (`firecracker-swagger.json`, see `README.md` here).
//!
//! - [`schema`]: the swagger's operations, a validator for its schema subset, samples.
//! - Here: the models of [`super::model`] against the swagger's definitions (every
//!   property Firecracker defines is a field hvrun knows; every field hvrun has is one
//!   Firecracker defines, or a documented extension), and [`super::router::Api`] driven
//!   through a fake host, each exchange checked against its path and method.
//! - [`props`]: arbitrary JSON at every path.

mod props;
mod schema;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use self::schema::{definition, operation, operations, properties, reference, sample, validate, Fill};
use super::http::{Request, Response};
use super::model::*;
use super::router::tests::{FakeHost, Seen};
use super::router::Api;
use crate::config::{DiskConfig, NetBackendConfig, NetConfig, VsockConfig};
use crate::VmConfig;

/// Properties hvrun adds to Firecracker's objects in what it answers.
const EXTENSIONS: &[&str] = &["hvrun_backend"];

/// Fields hvrun's models accept that the swagger does not define, and why.
const ACCEPTED_EXTRAS: &[(&str, &str, &str)] = &[
    ("NetworkInterface", "hvrun_backend", "hvrun's extension: a --net backend instead of a tap"),
    ("FullVmConfiguration", "serial", "parsed only to be refused by name (Firecracker's has no such section)"),
];

/// Operations the swagger has that hvrun does not do: never a success, and a 400
/// saying so.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("PUT", "/cpu-config"),
    ("PUT", "/pmem/{id}"),
    ("PATCH", "/pmem/{id}"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("GET", "/mmds"),
    ("PUT", "/mmds/config"),
    ("PUT", "/serial"),
    ("PUT", "/hotplug/memory"),
    ("PATCH", "/hotplug/memory"),
    ("GET", "/hotplug/memory"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/balloon/hinting/start"),
    ("GET", "/balloon/hinting/status"),
    ("PATCH", "/balloon/hinting/stop"),
    ("PATCH", "/network-interfaces/{iface_id}"),
];

/// Firecracker's phase errors (the operation exists, but not in this phase).
const PHASE_ERRORS: &[&str] = &[
    "The requested operation is not supported before starting the microVM.",
    "The requested operation is not supported after starting the microVM.",
];

// The fake host and VM are the router tests' (`router::tests::{FakeHost, Seen}`).

/// Files the configuration names (they must exist when put): kernel, initrd, disk.
struct Files {
    dir: PathBuf,
    kernel: String,
    initrd: String,
    disk: String,
}

/// The fixture's files, written once per test process.
fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hvrun-api-contract-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(dir.join(name), bytes).unwrap();
            dir.join(name).display().to_string()
        };
        let (kernel, initrd, disk) =
            (write("Image", b"kernel"), write("initrd", b"initrd"), write("disk.img", &[0; 4096]));
        // Metrics go to a file that exists, as Firecracker wants.
        write("metrics.json", b"");
        Files { dir, kernel, initrd, disk }
    })
}

/// An API on a fake host, whose exchanges are checked against the swagger.
struct Harness {
    api: Api,
    seen: Arc<Mutex<Seen>>,
}

impl Harness {
    /// A fresh API, nothing configured.
    fn new() -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut saved = VmConfig::new(&files().kernel);
        saved.disks =
            vec![DiskConfig { path: files().disk.clone().into(), read_only: false, id: Some("rootfs".into()) }];
        saved.nets =
            vec![NetConfig { backend: NetBackendConfig::Tap("tap0".into()), mac: None, id: Some("eth0".into()) }];
        saved.vsock = Some(VsockConfig::new(3, "/old.sock"));
        let host = FakeHost { seen: Arc::clone(&seen), saved };
        Harness { api: Api::new(Box::new(host), "vm1"), seen }
    }

    /// An API with every device hvrun has configured, and the VM started.
    fn started() -> Self {
        let mut h = Harness::new();
        for (method, path, body) in configuration() {
            h.expect(method, &path, Some(body), 204);
        }
        h.expect("PUT", "/actions", Some(json!({"action_type": "InstanceStart"})), 204);
        h
    }

    /// The answer to a request, unchecked.
    fn raw(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.api.handle(&Request { method: method.into(), path: path.into(), body: body.map(<[u8]>::to_vec) })
    }

    /// Sends `body` (checked against the request schema) and checks the answer against
    /// the swagger; returns its status and body.
    fn exchange(&mut self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Option<Value>), String> {
        let op = operation(method, path).ok_or_else(|| format!("the swagger has no {method} {path}"))?;
        if let Some(body) = &body {
            let (schema, _) = op.body.as_ref().ok_or_else(|| format!("{method} {path} takes no body"))?;
            validate(schema, body, &[]).map_err(|e| format!("{method} {path}: the request body: {e}"))?;
        }
        let text = body.map(|b| b.to_string());
        let response = self.raw(method, path, text.as_deref().map(str::as_bytes));
        checked_response(method, path, &response).map(|body| (response.status, body))
    }

    /// [`Harness::exchange`], which must succeed with `status`.
    fn expect(&mut self, method: &str, path: &str, body: Option<Value>, status: u16) -> Option<Value> {
        let (got, answer) = self.exchange(method, path, body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, status, "{method} {path}: {answer:?}");
        answer
    }
}

/// The response's body, checked against the swagger's schema for its status.
fn checked_response(method: &str, path: &str, response: &Response) -> Result<Option<Value>, String> {
    let op = operation(method, path).ok_or_else(|| format!("the swagger has no {method} {path}"))?;
    let schema = op.response(response.status)?;
    let what = format!("{method} {path} -> {}", response.status);
    match (schema, &response.body) {
        (None, None) => Ok(None),
        (None, Some(text)) => Err(format!("{what}: a body ({text}) where the swagger has none")),
        (Some(_), None) => Err(format!("{what}: no body where the swagger has one")),
        (Some(schema), Some(text)) => {
            let value: Value = serde_json::from_str(text).map_err(|e| format!("{what}: not JSON ({e}): {text}"))?;
            validate(schema, &value, EXTENSIONS).map_err(|e| format!("{what}: {e}"))?;
            Ok(Some(value))
        }
    }
}

/// PUTs configuring every device hvrun has, each object with all the properties it
/// honours.
fn configuration() -> Vec<(&'static str, String, Value)> {
    let f = files();
    let socket = f.dir.join("v.sock").display().to_string();
    vec![
        ("PUT", "/logger".into(), json!({"level": "Info", "show_level": true, "show_log_origin": false})),
        ("PUT", "/metrics".into(), json!({"metrics_path": f.dir.join("metrics.json")})),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false,
                   "cpu_template": "None", "huge_pages": "None"}),
        ),
        ("PATCH", "/machine-config".into(), json!({"vcpu_count": 2, "mem_size_mib": 512})),
        (
            "PUT",
            "/boot-source".into(),
            json!({"kernel_image_path": f.kernel, "initrd_path": f.initrd, "boot_args": "console=ttyS0 panic=1"}),
        ),
        (
            "PUT",
            "/drives/rootfs".into(),
            json!({"drive_id": "rootfs", "path_on_host": f.disk, "is_root_device": true, "is_read_only": true,
                   "partuuid": "0eaa91a0-01", "cache_type": "Writeback", "io_engine": "Sync"}),
        ),
        (
            "PUT",
            "/drives/data".into(),
            json!({"drive_id": "data", "path_on_host": f.disk, "is_root_device": false, "cache_type": "Unsafe"}),
        ),
        (
            "PUT",
            "/network-interfaces/eth0".into(),
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
        ),
        ("PUT", "/vsock".into(), json!({"guest_cid": 3, "uds_path": socket})),
        (
            "PUT",
            "/balloon".into(),
            json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                   "free_page_reporting": true, "free_page_hinting": false}),
        ),
        ("PUT", "/entropy".into(), json!({})),
    ]
}

// ---- The models against the swagger's definitions ----

/// Decodes a sample; for models hvrun also answers with, encodes it again.
type Parse = fn(&Value) -> Result<Option<Value>, String>;

/// [`Parse`] for a model hvrun only takes.
fn parse<T: DeserializeOwned>(value: &Value) -> Result<Option<Value>, String> {
    serde_json::from_value::<T>(value.clone()).map(|_| None).map_err(|e| e.to_string())
}

/// [`Parse`] for a model hvrun also answers with: the sample, decoded and encoded again.
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Option<Value>, String> {
    let model = serde_json::from_value::<T>(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&model).map(Some).map_err(|e| e.to_string())
}

/// The fields a model takes, from serde's "unknown field" message (which lists them).
fn fields<T: DeserializeOwned>() -> Result<Vec<String>, String> {
    let message = match serde_json::from_value::<T>(json!({"zz_contract_probe": 0})) {
        Ok(_) => return Err("it takes a field it does not define".into()),
        Err(e) => e.to_string(),
    };
    let listed = message
        .strip_prefix("unknown field `zz_contract_probe`, ")
        .ok_or_else(|| format!("it does not refuse unknown fields: {message}"))?;
    Ok(listed.split('`').skip(1).step_by(2).map(str::to_string).collect())
}

/// One of hvrun's models, and the swagger definition it stands for.
struct Model {
    definition: &'static str,
    rust: &'static str,
    parse: Parse,
    fields: fn() -> Result<Vec<String>, String>,
}

/// A [`Model`] entry: definition name, Rust type, how to check a sample.
macro_rules! model {
    ($definition:literal, $rust:ident, $parse:ident) => {
        Model { definition: $definition, rust: stringify!($rust), parse: $parse::<$rust>, fields: fields::<$rust> }
    };
}

/// Every model of the swagger's definitions hvrun has.
const MODELS: &[Model] = &[
    model!("PartialDrive", PartialDrive, parse),
    model!("MachineConfiguration", MachineConfiguration, round_trip),
    model!("MachineConfiguration", MachineConfigurationUpdate, parse),
    model!("BootSource", BootSource, round_trip),
    model!("Drive", Drive, round_trip),
    model!("NetworkInterface", NetworkInterface, round_trip),
    model!("Vsock", Vsock, round_trip),
    model!("Balloon", Balloon, round_trip),
    model!("BalloonUpdate", BalloonUpdate, parse),
    model!("EntropyDevice", EntropyDevice, round_trip),
    model!("Logger", Logger, round_trip),
    model!("Metrics", Metrics, round_trip),
    model!("InstanceActionInfo", InstanceActionInfo, parse),
    model!("Vm", VmState, parse),
    model!("SnapshotCreateParams", SnapshotCreateParams, parse),
    model!("SnapshotLoadParams", SnapshotLoadParams, parse),
    model!("MemoryBackend", MemoryBackend, parse),
    model!("NetworkOverride", NetworkOverride, parse),
    model!("VsockOverride", VsockOverride, parse),
    model!("FullVmConfiguration", FullVmConfiguration, round_trip),
];

#[test]
fn the_validator_knows_every_keyword_and_samples_validate() {
    let doc = schema::swagger();
    assert_eq!(doc["swagger"], "2.0");
    let mut unknown = Vec::new();
    for (name, def) in doc["definitions"].as_object().unwrap() {
        unknown.extend(schema::unknown_keywords(def, name));
        for fill in [Fill::Required, Fill::Every] {
            let value = sample(def, fill);
            validate(def, &value, &[]).unwrap_or_else(|e| panic!("{name} {fill:?} sample {value}: {e}"));
        }
    }
    for op in operations() {
        let at = format!("{} {}", op.method, op.template);
        unknown.extend(op.body.iter().flat_map(|(s, _)| schema::unknown_keywords(s, &at)));
        unknown.extend(op.responses.values().flatten().flat_map(|s| schema::unknown_keywords(s, &at)));
    }
    assert!(unknown.is_empty(), "keywords the validator does not know: {unknown:?}");
}

#[test]
fn the_validator_refuses_what_the_swagger_forbids() {
    let vsock = reference("Vsock");
    assert!(validate(&vsock, &json!({"guest_cid": 3, "uds_path": "/v"}), &[]).is_ok());
    let bad = [
        json!({"uds_path": "/v"}),
        json!({"guest_cid": 2, "uds_path": "/v"}),
        json!({"guest_cid": "3", "uds_path": "/v"}),
        json!({"guest_cid": 3.5, "uds_path": "/v"}),
        json!({"guest_cid": 3, "uds_path": "/v", "other": 1}),
        json!([]),
    ];
    for value in bad {
        assert!(validate(&vsock, &value, &[]).is_err(), "{value}");
    }
    let vm = reference("Vm");
    assert!(validate(&vm, &json!({"state": "Paused"}), &[]).is_ok());
    assert!(validate(&vm, &json!({"state": "Stopped"}), &[]).is_err());
    let net = json!({"iface_id": "e", "host_dev_name": "t", "hvrun_backend": "tap=t"});
    assert!(validate(&reference("NetworkInterface"), &net, &[]).is_err());
    assert!(validate(&reference("NetworkInterface"), &net, EXTENSIONS).is_ok());
    let metrics = reference("Metrics");
    assert!(validate(&metrics, &json!({"metrics_path": "/m", "properties": {"a": "b"}}), &[]).is_ok());
    assert!(validate(&metrics, &json!({"metrics_path": "/m", "properties": {"a": 1}}), &[]).is_err());
    let full = reference("FullVmConfiguration");
    assert!(validate(&full, &json!({"drives": [{"drive_id": "a", "is_root_device": "no"}]}), &[]).is_err());
    let bucket = json!({"size": 1, "refill_time": -1});
    assert!(validate(&reference("TokenBucket"), &bucket, &[]).is_err());
}

#[test]
fn every_property_firecracker_defines_is_a_field_hvrun_knows() {
    let mut failures = Vec::new();
    for m in MODELS {
        for fill in [Fill::Every, Fill::Required] {
            let value = sample(definition(m.definition), fill);
            if let Err(e) = (m.parse)(&value) {
                failures.push(format!("{} ({fill:?} {} sample {value}): {e}", m.rust, m.definition));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_enum_value_firecracker_defines_parses() {
    let mut failures = Vec::new();
    for m in MODELS {
        let def = definition(m.definition);
        for (at, choices) in schema::enums(def) {
            for choice in choices {
                let mut value = sample(def, Fill::Every);
                *value.pointer_mut(&at).unwrap() = choice.clone();
                if let Err(e) = (m.parse)(&value) {
                    failures.push(format!("{}{at} = {choice}: {e}", m.rust));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_field_hvrun_answers_with_is_in_the_swagger() {
    let mut failures = Vec::new();
    let mut check = |name: &str, value: &Value| {
        if let Err(e) = validate(&reference(name), value, EXTENSIONS) {
            failures.push(format!("{name}: {e}"));
        }
    };
    for m in MODELS {
        let value = sample(definition(m.definition), Fill::Every);
        if let Ok(Some(encoded)) = (m.parse)(&value) {
            check(m.definition, &encoded);
        }
    }
    check("MachineConfiguration", &serde_json::to_value(MachineConfiguration::default()).unwrap());
    check("FullVmConfiguration", &serde_json::to_value(FullVmConfiguration::default()).unwrap());
    let info =
        InstanceInfo { app_name: "hvrun".into(), id: "vm1".into(), state: "Paused".into(), vmm_version: "0".into() };
    check("InstanceInfo", &serde_json::to_value(info).unwrap());
    let mut stats = BalloonStats::default();
    for name in [
        "swap_in",
        "swap_out",
        "major_faults",
        "minor_faults",
        "free_memory",
        "total_memory",
        "available_memory",
        "disk_caches",
    ] {
        stats.guest.insert(name.into(), json!(1));
    }
    check("BalloonStats", &serde_json::to_value(stats).unwrap());
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_field_hvrun_accepts_is_in_the_swagger_or_a_documented_extra() {
    let mut failures = Vec::new();
    let mut extras_seen = Vec::new();
    for m in MODELS {
        let defined = properties(definition(m.definition)).unwrap();
        match (m.fields)() {
            Err(e) => failures.push(format!("{}: {e}", m.rust)),
            Ok(fields) => {
                assert!(!fields.is_empty() || defined.is_empty(), "{}: no fields read", m.rust);
                for field in fields {
                    extras_seen.push((m.definition, field.clone()));
                    let extra = ACCEPTED_EXTRAS.iter().any(|(d, f, _)| *d == m.definition && *f == field);
                    if !defined.contains_key(&field) && !extra {
                        failures.push(format!("{}.{field}: not in the swagger's {}", m.rust, m.definition));
                    }
                }
            }
        }
    }
    for (d, f, why) in ACCEPTED_EXTRAS {
        if !extras_seen.iter().any(|(sd, sf)| sd == d && sf == f) {
            failures.push(format!("{d}.{f} ({why}) is no longer accepted: drop it from ACCEPTED_EXTRAS"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---- The router against the swagger's paths ----

#[test]
fn the_supported_subset_answers_as_the_swagger_says() {
    let mut h = Harness::new();
    let info = h.expect("GET", "/", None, 200).unwrap();
    assert_eq!(
        (&info["app_name"], &info["id"], &info["state"]),
        (&json!("hvrun"), &json!("vm1"), &json!("Not started"))
    );
    let version = h.expect("GET", "/version", None, 200).unwrap();
    assert_eq!(version["firecracker_version"], super::router::FIRECRACKER_API_VERSION);
    let machine = h.expect("GET", "/machine-config", None, 200).unwrap();
    assert_eq!((&machine["vcpu_count"], &machine["mem_size_mib"]), (&json!(1), &json!(128)));
    h.expect("GET", "/balloon", None, 400);
    h.expect("GET", "/vm/config", None, 200);

    for (method, path, body) in configuration() {
        h.expect(method, &path, Some(body), 204);
    }
    let machine = h.expect("GET", "/machine-config", None, 200).unwrap();
    assert_eq!((&machine["vcpu_count"], &machine["mem_size_mib"]), (&json!(2), &json!(512)));
    let balloon = h.expect("GET", "/balloon", None, 200).unwrap();
    assert_eq!((&balloon["amount_mib"], &balloon["stats_polling_interval_s"]), (&json!(16), &json!(1)));
    let config = h.expect("GET", "/vm/config", None, 200).unwrap();
    let put = |path: &str| configuration().into_iter().find(|(m, p, _)| *m == "PUT" && p == path).unwrap().2;
    assert_eq!(config["boot-source"], put("/boot-source"));
    assert_eq!(config["drives"][0], put("/drives/rootfs"));
    assert_eq!(config["network-interfaces"][0], put("/network-interfaces/eth0"));
    assert_eq!(config["vsock"], put("/vsock"));
    assert_eq!(config["logger"], put("/logger"));
    assert_eq!(config["entropy"], json!({}));

    h.expect("PUT", "/actions", Some(json!({"action_type": "InstanceStart"})), 204);
    let booted = h.seen.lock().unwrap().booted.clone().unwrap();
    assert_eq!((booted.cpus, booted.memory, booted.disks.len()), (2, 512 << 20, 2));
    assert_eq!(h.expect("GET", "/", None, 200).unwrap()["state"], "Running");
    let stats = h.expect("GET", "/balloon/statistics", None, 200).unwrap();
    assert_eq!(stats["target_mib"], 16);
    h.expect("PATCH", "/balloon", Some(json!({"amount_mib": 32})), 204);
    assert_eq!(h.expect("GET", "/balloon/statistics", None, 200).unwrap()["target_mib"], 32);
    assert_eq!(h.expect("GET", "/balloon", None, 200).unwrap()["amount_mib"], 32);
    h.expect("PATCH", "/balloon", Some(json!({"amount_mib": 513})), 400);
    h.expect("PUT", "/actions", Some(json!({"action_type": "SendCtrlAltDel"})), 204);
    assert_eq!(h.seen.lock().unwrap().presses, 1);
    h.expect("PUT", "/actions", Some(json!({"action_type": "FlushMetrics"})), 204);
    let line = std::fs::read_to_string(files().dir.join("metrics.json")).unwrap();
    assert!(line.ends_with('\n') && line.contains("\"api_server\""), "{line}");
    h.expect("PATCH", "/drives/rootfs", Some(json!({"drive_id": "rootfs", "path_on_host": files().disk})), 204);
    assert_eq!(h.seen.lock().unwrap().replaced.len(), 1);
    h.expect("PUT", "/boot-source", Some(json!({"kernel_image_path": files().kernel})), 400);
    h.expect("PUT", "/logger", Some(json!({"level": "Debug"})), 400);
    h.expect("PUT", "/metrics", Some(json!({"metrics_path": files().dir.join("metrics.json")})), 400);

    let create = json!({"snapshot_path": "/s/state", "mem_file_path": "/s/mem", "snapshot_type": "Full"});
    h.expect("PUT", "/snapshot/create", Some(create.clone()), 400);
    h.expect("PATCH", "/vm", Some(json!({"state": "Paused"})), 204);
    assert_eq!(h.expect("GET", "/", None, 200).unwrap()["state"], "Paused");
    h.expect("PUT", "/snapshot/create", Some(create), 204);
    assert_eq!(h.seen.lock().unwrap().snapshots.len(), 1);
    h.expect("PATCH", "/vm", Some(json!({"state": "Resumed"})), 204);
    assert_eq!(h.expect("GET", "/", None, 200).unwrap()["state"], "Running");
    let mut expected = config;
    expected["balloon"]["amount_mib"] = json!(32);
    assert_eq!(h.expect("GET", "/vm/config", None, 200).unwrap(), expected);
    h.expect("GET", "/machine-config", None, 200);
    h.expect("GET", "/version", None, 200);
}

#[test]
fn a_restored_vm_answers_as_the_swagger_says() {
    let mut h = Harness::new();
    h.expect("PUT", "/logger", Some(json!({"level": "Debug"})), 204);
    let load = json!({
        "snapshot_path": "/s/state",
        "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
        "vsock_override": {"uds_path": "/new.sock"},
        "resume_vm": false, "track_dirty_pages": false, "enable_diff_snapshots": false,
        "clock_realtime": false, "huge_pages": "Snapshot"
    });
    h.expect("PUT", "/snapshot/load", Some(load.clone()), 204);
    assert_eq!(h.expect("GET", "/", None, 200).unwrap()["state"], "Paused");
    let config = h.expect("GET", "/vm/config", None, 200).unwrap();
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap9");
    assert_eq!(config["vsock"]["uds_path"], "/new.sock");
    h.expect("PUT", "/snapshot/load", Some(load), 400);
    h.expect("PATCH", "/vm", Some(json!({"state": "Resumed"})), 204);

    let mut h = Harness::new();
    let load = json!({"snapshot_path": "/s/state", "mem_file_path": "/s/mem", "resume_vm": true});
    h.expect("PUT", "/snapshot/load", Some(load), 204);
    assert_eq!(h.expect("GET", "/", None, 200).unwrap()["state"], "Running");
    h.expect("GET", "/machine-config", None, 200);
    h.expect("GET", "/vm/config", None, 200);
}

/// Sends every operation of the swagger, with a sample body of each fill, to a fresh
/// API in each phase; returns what breaks the contract.
fn every_operation() -> Vec<String> {
    let mut failures = Vec::new();
    for op in operations() {
        let key = (op.method.as_str(), op.template.as_str());
        let unsupported = UNSUPPORTED.contains(&key);
        for started in [false, true] {
            for fill in [Fill::Required, Fill::Every] {
                let mut h = if started { Harness::started() } else { Harness::new() };
                let path = op.path(schema::SAMPLE_STRING);
                let mut body = op.body.as_ref().map(|(s, _)| sample(s, fill));
                // A metrics file goes where the fixtures are, not into the working directory.
                if let Some(path) = body.as_mut().and_then(|b| b.get_mut("metrics_path")) {
                    *path = json!(files().dir.join("metrics.json"));
                }
                let what = format!(
                    "{} {path} ({}, {fill:?} body {body:?})",
                    op.method,
                    ["pre-boot", "started"][started as usize]
                );
                let (status, answer) = match h.exchange(&op.method, &path, body) {
                    Ok(exchange) => exchange,
                    Err(e) => {
                        failures.push(format!("{what}: {e}"));
                        continue;
                    }
                };
                let message = answer.as_ref().and_then(|a| a["fault_message"].as_str()).unwrap_or_default();
                let refused = message.contains("does not support") || PHASE_ERRORS.contains(&message);
                if (200..300).contains(&status) && unsupported {
                    failures.push(format!("{what}: {status}, but hvrun does not do this"));
                } else if status >= 300 && status != 400 {
                    failures.push(format!("{what}: {status} {message}"));
                } else if message.starts_with("Invalid request method and/or path") || message.starts_with("Empty ") {
                    failures.push(format!("{what}: hvrun does not know it: {message}"));
                } else if unsupported && status == 400 && !refused {
                    failures.push(format!("{what}: refused without saying hvrun does not support it: {message}"));
                }
            }
        }
    }
    failures
}

#[test]
fn every_swagger_operation_is_answered_as_the_swagger_says() {
    let failures = every_operation();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(operations().len() >= 38, "the swagger lost operations: {}", operations().len());
}

/// `GET /vm/config` with an interface hvrun's extension configured stays a valid
/// Firecracker `FullVmConfiguration`.
#[test]
fn vm_config_with_an_hvrun_backend_matches_the_swagger() {
    let mut h = Harness::new();
    let socket = files().dir.join("net.sock").display().to_string();
    let body = json!({"iface_id": "eth1", "hvrun_backend": format!("unixgram={socket}")}).to_string();
    let response = h.raw("PUT", "/network-interfaces/eth1", Some(body.as_bytes()));
    assert_eq!(response.status, 204, "{:?}", response.body);
    checked_response("GET", "/vm/config", &h.raw("GET", "/vm/config", None)).unwrap();
}
