//! Firecracker's API (`hvrun --api-sock`) from a hostile client: raw bytes through the
//! HTTP connection (`hvrun::api::http::Connection`), each request it takes handed to the
//! router (`hvrun::api::router::Api`) over a fake host whose VM starts; and structured
//! requests (Firecracker's methods and paths, bodies that are raw bytes or JSON objects
//! built from its field names with arbitrary values) straight to the router, before and
//! after `InstanceStart`.
//!
//! Oracles: no panic, no hang, bounded memory; every status is one the API sends; every
//! error body is `{"fault_message": "..."}`; a refused request changes nothing
//! (`GET /vm/config` is the same before and after it).

#![no_main]

use std::io::{Cursor, Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::{arbitrary, fuzz_target};

use devices::virtio::balloon::BalloonHandle;
use hvrun::api::http::{Connection, Limits, Request, Response, Stream};
use hvrun::api::model::Logger;
use hvrun::api::router::{Api, Host, Running};
use hvrun::snapshot::machine::SnapshotFiles;
use hvrun::VmConfig;

struct FakeVm;

impl Running for FakeVm {
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) {}
    fn paused(&self) -> bool {
        true
    }
    fn ctrl_alt_del(&self) -> bool {
        true
    }
    fn snapshot(&self, _files: &SnapshotFiles) -> Result<(), String> {
        Ok(())
    }
    fn balloon(&self) -> Option<BalloonHandle> {
        None
    }
    fn replace_disk(&self, _id: &str, _path: &std::path::Path) -> Result<(), String> {
        Ok(())
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({"vcpu": {"exit_mmio_read": 1}})
    }
}

struct FakeHost;

impl Host for FakeHost {
    fn boot(&mut self, config: VmConfig) -> Result<Box<dyn Running>, String> {
        config.validate().map_err(|e| e.to_string())?;
        Ok(Box::new(FakeVm))
    }
    fn restore(&mut self, _config: VmConfig, _files: SnapshotFiles, _paused: bool) -> Result<Box<dyn Running>, String> {
        Ok(Box::new(FakeVm))
    }
    fn saved_config(&mut self, _files: &SnapshotFiles) -> Result<VmConfig, String> {
        Ok(VmConfig::new("/k"))
    }
    fn logger(&mut self, _logger: &Logger) -> Result<(), String> {
        Ok(())
    }
}

/// A client's bytes in, the server's out (kept small: only its length is bounded).
struct Pipe {
    input: Cursor<Vec<u8>>,
    written: usize,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// In memory: never waits, so no time limit applies.
impl Stream for Pipe {
    fn set_read_limit(&self, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_limit(&self, _: std::time::Duration) -> std::io::Result<()> {
        Ok(())
    }
}

const METHODS: [&str; 5] = ["GET", "PUT", "PATCH", "DELETE", "POST"];
const PATHS: [&str; 20] = [
    "/",
    "/version",
    "/machine-config",
    "/boot-source",
    "/drives/rootfs",
    "/drives/a_b",
    "/network-interfaces/eth0",
    "/vsock",
    "/balloon",
    "/balloon/statistics",
    "/entropy",
    "/logger",
    "/metrics",
    "/actions",
    "/vm",
    "/vm/config",
    "/snapshot/create",
    "/snapshot/load",
    "/mmds",
    "/drives/",
];
const FIELDS: [&str; 24] = [
    "vcpu_count",
    "mem_size_mib",
    "smt",
    "kernel_image_path",
    "boot_args",
    "initrd_path",
    "drive_id",
    "path_on_host",
    "is_root_device",
    "is_read_only",
    "iface_id",
    "host_dev_name",
    "guest_mac",
    "guest_cid",
    "uds_path",
    "amount_mib",
    "deflate_on_oom",
    "action_type",
    "state",
    "snapshot_path",
    "mem_file_path",
    "mem_backend",
    "resume_vm",
    "stats_polling_interval_s",
];

#[derive(Arbitrary, Debug)]
enum Value {
    Int(i64),
    Big(u64),
    Bool(bool),
    Text(String),
    Known(u8),
    Null,
    Object(Vec<(u8, u8)>),
}

#[derive(Arbitrary, Debug)]
enum Body {
    None,
    Raw(Vec<u8>),
    Fields(Vec<(u8, Value)>),
}

#[derive(Arbitrary, Debug)]
struct Call {
    method: u8,
    path: u8,
    suffix: Option<String>,
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Wire(Vec<u8>),
    Calls(Vec<Call>),
}

/// Strings worth reaching with: paths that exist, ids, the enums' values.
const KNOWN: [&str; 12] = [
    "/proc/self/exe",
    "/dev/null",
    "rootfs",
    "eth0",
    "InstanceStart",
    "SendCtrlAltDel",
    "FlushMetrics",
    "Paused",
    "Resumed",
    "Full",
    "console=ttyS0 reboot=k",
    "06:00:ac:10:00:02",
];

fn json(value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Big(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Text(t) => format!("{t:?}"),
        Value::Known(k) => format!("{:?}", KNOWN[usize::from(*k) % KNOWN.len()]),
        Value::Null => "null".into(),
        Value::Object(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|(f, k)| {
                    format!("{:?}: {:?}", FIELDS[usize::from(*f) % FIELDS.len()], KNOWN[usize::from(*k) % KNOWN.len()])
                })
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

fn check(response: &Response) {
    assert!(matches!(response.status, 200 | 204 | 400 | 413 | 431 | 500 | 501 | 503), "{response:?}");
    if response.status >= 400 {
        let body = response.body.as_deref().expect("an error has a body");
        assert!(body.starts_with("{\"fault_message\":\"") && body.ends_with("\"}"), "{body}");
    }
    if response.status == 204 {
        assert!(response.body.is_none());
    }
}

/// `PUT /metrics` appends to whatever existing file it names: not from a fuzzer running
/// as root.
fn writes_files(request: &Request) -> bool {
    request.path.starts_with("/metrics")
}

fn config(api: &mut Api) -> Option<String> {
    api.handle(&Request { method: "GET".into(), path: "/vm/config".into(), body: None }).body
}

fuzz_target!(|input: Input| {
    let mut api = Api::new(Box::new(FakeHost), "fuzz");
    match input {
        Input::Wire(bytes) => {
            let pipe = Pipe { input: Cursor::new(bytes), written: 0 };
            let mut connection = Connection::new(pipe, Limits::default());
            for _ in 0..256 {
                match connection.next_request() {
                    Ok(request) if writes_files(&request) => continue,
                    Ok(request) => {
                        let response = api.handle(&request);
                        check(&response);
                        if !connection.respond(&response) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        Input::Calls(calls) => {
            for call in calls.iter().take(64) {
                let mut path = PATHS[usize::from(call.path) % PATHS.len()].to_string();
                if let Some(suffix) = &call.suffix {
                    path.push_str(suffix);
                }
                let body = match &call.body {
                    Body::None => None,
                    Body::Raw(bytes) => Some(bytes.clone()),
                    Body::Fields(fields) => {
                        let inner: Vec<String> = fields
                            .iter()
                            .map(|(f, v)| format!("{:?}: {}", FIELDS[usize::from(*f) % FIELDS.len()], json(v)))
                            .collect();
                        Some(format!("{{{}}}", inner.join(", ")).into_bytes())
                    }
                };
                let method = METHODS[usize::from(call.method) % METHODS.len()];
                let request = Request { method: method.into(), path, body };
                if writes_files(&request) {
                    continue;
                }
                let before = config(&mut api);
                let response = api.handle(&request);
                check(&response);
                if response.status >= 400 {
                    assert_eq!(config(&mut api), before, "a refused {method} changed the configuration");
                }
            }
        }
    }
});
