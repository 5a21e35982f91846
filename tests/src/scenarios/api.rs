//! Firecracker's API, driven by a client not written here: Debian's arm64 `curl`, which
//! the rig carries for the scenarios that list [`CURL_ARCHIVE`] and runs as
//! [`CURL_IN_RIG`].

use crate::scenario::{OuterGic, Scenario};

/// The curl archive (built by `cargo xtask` into the guest cache): Debian's arm64 `curl`
/// as `curl/curl` and the libraries it loads, its dynamic loader included, in
/// `curl/lib/`. A scenario that lists it among its artifacts finds them in the rig under
/// `/curl` (the rig unpacks it into its root: see [`super::RIG_ARCHIVES`]).
pub const CURL_ARCHIVE: &str = "curl.cpio";

/// curl's directory in the rig (and in [`CURL_ARCHIVE`]).
pub const CURL_DIR: &str = "curl";

/// [`CURL_IN_RIG`] as a literal, for `concat!`.
macro_rules! curl_in_rig {
    () => {
        "/curl/lib/ld-linux-aarch64.so.1 --library-path /curl/lib /curl/curl"
    };
}

/// The command that runs curl in the rig (which has no libc): through its own loader.
pub const CURL_IN_RIG: &str = curl_in_rig!();

/// The shell function `curl ARGS…` in the rig; a script using curl starts with it.
macro_rules! curl_function {
    () => {
        concat!("curl() { ", curl_in_rig!(), " \"$@\"; }\n")
    };
}

pub const CURL_RUNS: Scenario = Scenario {
    name: "curl-runs",
    about: "Debian's arm64 curl runs in the rig through its own loader (no libc there) and speaks HTTP/1.1 over a unix socket: the client the fc-api scenario drives hvrun's API with",
    artifacts: &[CURL_ARCHIVE],
    script: concat!(curl_function!(), include_str!("../../scenarios/curl-runs.sh")),
    exit_code: 0,
    markers: &[
        // Debian 12's curl is 7.88.1.
        "curl-runs: curl 7.",
        "UnixSockets",
        "curl-runs: curl --version exit 0",
        "curl-runs: PUT /probe -> 200 {\"probe\":\"ok\"}",
        "curl-runs: the server got: PUT /probe HTTP/1.1",
        "curl-runs: the request body arrived whole",
    ],
    forbidden: &["error while loading shared libraries", "not found", "No such file"],
    timeout_secs: 60,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const FC_API: Scenario = Scenario {
    name: "fc-api",
    about: "Firecracker's getting-started sequence (docs/getting-started.md), its requests sent as the guide's curl sends them and with its bodies, against `hvrun --api-sock`: PUT /logger (log_path, level Debug: hvrun's log lines go there, with their level), PUT /boot-source with the guide's aarch64 boot_args (the guest sees console=ttyAMA0 for console=ttyS0, and root=/dev/vda and rw for the root drive), PUT /drives/rootfs as the root device, PUT /network-interfaces/net1 with guest_mac (the guest's MAC, in its eth0 and the host's ARP table) and a tap, InstanceStart; a 2-vCPU guest counting to its serial port, disk and a TCP connection; its drive gets a new image while it runs (PATCH /drives: the count goes on in the new image, the old one is no longer written), it is paused (the count stops), resumed (it goes on), paused and snapshotted; a snapshot loaded with resume_vm false runs nothing (no count, its disk untouched) until PATCH /vm Resumed, then goes on at the next count; a second hvrun loads the snapshot (which names the new image) through its own socket and the count continues there; SendCtrlAltDel shuts the guest down and hvrun exits 0; a bad JSON body, an unknown field, a second InstanceStart, a boot source after the start, a PATCH of an unknown drive or to a missing file and a snapshot load on a running machine are refused with 400 and a fault_message",
    artifacts: &["Image", "initramfs.cpio", "tun.ko", CURL_ARCHIVE],
    script: concat!(curl_function!(), include_str!("../../scenarios/fc-api.sh")),
    exit_code: 0,
    markers: &[
        "fc-api: /tmp/fc.sock is up",
        "fc-api: GET / -> 200 Not started",
        "fc-api: the guide's PUT /logger -> 204",
        "fc-api: PUT /machine-config -> 204",
        "fc-api: PUT /machine-config with a bad JSON body -> 400 with a fault_message",
        "fc-api: PUT /drives/rootfs with an unknown field -> 400 with a fault_message",
        "fc-api: the guide's PUT /boot-source -> 204",
        "fc-api: the guide's PUT /drives/rootfs -> 204",
        "fc-api: the guide's PUT /network-interfaces/net1 -> 204",
        "fc-api: the guide's PUT /actions InstanceStart -> 204",
        "fc-api: the guest counts (count 30)",
        "fc-api: the guest's command line has console=ttyAMA0 (not ttyS0), root=/dev/vda and rw",
        "fc-api: root=/dev/vda and rw are the kernel's arguments (before --)",
        "fc-api: the guest's MAC is guest_mac 06:00:0A:00:06:0F: 06:00:0a:00:06:0f (its eth0 and the host's ARP table)",
        "fc-api: GET / -> 200 Running",
        "fc-api: a second InstanceStart -> 400 with a fault_message",
        "fc-api: PUT /boot-source after the start -> 400 with a fault_message",
        "fc-api: PATCH /drives/nope -> 400 with a fault_message",
        "fc-api: PATCH /drives/rootfs with a missing file -> 400 with a fault_message",
        "fc-api: PATCH /drives/rootfs -> 204",
        "fc-api: the new image holds count",
        "fc-api: the old image stays at count",
        "fc-api: hvrun logged the swap to log_path: disk rootfs: now /tmp/disk2.img (4194304 bytes)",
        "fc-api: log_path /tmp/fc1.log has",
        "fc-api: PATCH /vm Paused -> 204",
        "fc-api: GET / -> 200 Paused",
        "fc-api: paused: the count stays at",
        "fc-api: PATCH /vm Resumed -> 204",
        "fc-api: GET / -> 200 Running",
        "fc-api: resumed: the count goes on past",
        "fc-api: PATCH /vm Paused -> 204",
        "fc-api: PUT /snapshot/create -> 204",
        "fc-api: snapshot taken at count",
        "fc-api: the first hvrun killed",
        "fc-api: /tmp/fc3.sock is up",
        "fc-api: PUT /snapshot/load -> 204",
        "fc-api: GET / -> 200 Paused",
        "fc-api: the paused load's network is tap9 (network_overrides)",
        "fc-api: loaded paused: for 3 s the guest runs nothing",
        "fc-api: PATCH /vm Resumed -> 204",
        "fc-api: resumed after a paused load: count",
        "fc-api: the paused load's hvrun killed, the disk put back",
        "fc-api: /tmp/fc2.sock is up",
        "fc-api: GET / -> 200 Not started",
        "fc-api: PUT /snapshot/load -> 204",
        "fc-api: the second hvrun continues at count",
        "fc-api: GET / -> 200 Running",
        "fc-api: dmesg checked after the load",
        "fc-api: the guest's TCP connection carries count",
        "fc-api: PUT /snapshot/load on a running machine -> 400 with a fault_message",
        "fc-api: PUT /actions SendCtrlAltDel -> 204",
        "fc-api: the guest took its shutdown path",
        "fc-api: the guest powered down (hvrun exit 0: its PSCI SYSTEM_OFF)",
        "fc-api: the second hvrun exit 0",
        "fc-api: after the load the new image holds count",
    ],
    forbidden: &["FAIL", "DMESG-BAD", "detected stall", "panicked", "Kernel panic", "hvrun: error"],
    timeout_secs: 900,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const FC_CONFIG_FILE: Scenario = Scenario {
    name: "fc-config-file",
    about: "`hvrun --config-file FILE --no-api` (no API socket) boots fc-api's guest from Firecracker's JSON configuration (boot-source with the getting-started guide's aarch64 boot_args, machine-config, a root drive, a tap with its MAC, entropy, metrics): the guest counts, sees console=ttyAMA0, root=/dev/vda and rw on its command line and its MAC; SIGTERM presses its power button and hvrun exits 0; a second boot of the file with --api-sock beside it: a FlushMetrics line counts the vCPUs' exits (totals, and each vCPU's in `vcpus`), the devices' interrupts, and the disk's, the network's and the entropy device's requests, bytes and errors; an invalid file and a missing one are one line and exit status 1",
    artifacts: &["Image", "initramfs.cpio", "tun.ko", CURL_ARCHIVE],
    script: concat!(curl_function!(), include_str!("../../scenarios/fc-config-file.sh")),
    exit_code: 0,
    markers: &[
        "fc-config-file: the guest counts (count 20)",
        "fc-config-file: the guest waits for its power button",
        "fc-config-file: counts arrive over TCP",
        "fc-config-file: the guest's command line has console=ttyAMA0 (not ttyS0), root=/dev/vda and rw",
        "fc-config-file: the guest's MAC: 06:00:0a:00:07:0f (its eth0), 06:00:0a:00:07:0f (the host's ARP table)",
        "fc-config-file: after SIGTERM hvrun exit 0",
        "power-button: pressed; the guest runs its shutdown path",
        "fc-config-file: with --api-sock: PUT /actions FlushMetrics -> 204",
        "fc-config-file: metrics line: 1 line(s)",
        "fc-config-file: the metrics count the guest's work",
        "fc-config-file: the metrics count each device's requests and bytes",
        "fc-config-file: the metrics count the entropy the guest read",
        "fc-config-file: the metrics count each vCPU's exits (vcpus: 2 entries, adding up to the totals)",
        "fc-config-file: with --api-sock: after SIGTERM hvrun exit 0",
        "fc-config-file: an invalid file: exit 1, 1 line(s): hvrun: error: --config-file /tmp/bad.json: missing field `mem_size_mib`",
        "fc-config-file: a missing file: exit 1, 1 line(s): hvrun: error: --config-file /tmp/nonexistent.json: No such file",
    ],
    forbidden: &["FAIL", "DMESG-BAD", "panicked", "Kernel panic"],
    timeout_secs: 420,
    exchange: None,
    outer_gic: OuterGic::V2,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_runs_from_its_directory() {
        let lib = format!("/{CURL_DIR}/lib");
        assert_eq!(CURL_IN_RIG, format!("{lib}/ld-linux-aarch64.so.1 --library-path {lib} /{CURL_DIR}/curl"));
        for sc in [&CURL_RUNS, &FC_API, &FC_CONFIG_FILE] {
            assert!(sc.artifacts.contains(&CURL_ARCHIVE), "{}", sc.name);
            assert!(sc.script.starts_with(&format!("curl() {{ {CURL_IN_RIG} \"$@\"; }}\n")), "{}", sc.name);
        }
    }

    /// Whether `script` makes the getting-started guide's request `call` ("PUT /actions
    /// InstanceStart": the method, the path, and the action its body names, if any) with
    /// its `guide METHOD PATH "BODY"` function.
    fn guide_call_in(script: &str, call: &str) -> bool {
        let mut words = call.split(' ');
        let (method, path) = (words.next().unwrap(), words.next().unwrap());
        let request = format!("guide {method} {path} \"");
        match words.next() {
            // The body, up to its closing `}"`, names the value (its quotes escaped).
            Some(value) => script.match_indices(&request).any(|(at, _)| {
                let body = &script[at..];
                body[..body.find("}\"").unwrap()].contains(&format!("\\\"{value}\\\""))
            }),
            None => script.contains(&request),
        }
    }

    /// Every marker of fc-api is a line its script prints: the fixed ones as they are,
    /// those of its `guide`, `ok`, `refused` and `state` functions from the calls.
    #[test]
    fn fc_api_markers_come_from_its_script() {
        let script = FC_API.script;
        for marker in FC_API.markers {
            let text = marker.strip_prefix("fc-api: ").unwrap();
            let guide = text.strip_prefix("the guide's ").and_then(|t| t.strip_suffix(" -> 204"));
            let printed = if let Some(call) = guide {
                guide_call_in(script, call)
            } else if let Some(call) = text.strip_suffix(" -> 400 with a fault_message") {
                script.contains(&format!("refused '{call}' "))
            } else if let Some(state) = text.strip_prefix("GET / -> 200 ") {
                script.contains(&format!("state /tmp/fc.sock {state}\n"))
                    || script.contains(&format!("state /tmp/fc.sock '{state}'\n"))
                    || script.contains(&format!("state /tmp/fc2.sock {state}\n"))
                    || script.contains(&format!("state /tmp/fc2.sock '{state}'\n"))
            } else if let Some((call, code)) = text.split_once(" -> ") {
                let mut words = call.split(' ');
                let (method, path) = (words.next().unwrap(), words.next().unwrap());
                let request = format!(" {code} {method} {path} '");
                match words.next() {
                    Some(value) => script
                        .match_indices(&request)
                        .any(|(at, _)| script[at..].lines().next().unwrap().contains(&format!("\"{value}\""))),
                    None => script.contains(&request),
                }
            } else if let Some(sock) = text.strip_suffix(" is up") {
                script.contains(&format!("wait_sock {sock} $pid"))
            } else {
                // An `echo "fc-api: …"` whose text before its first expansion fits.
                script.split("echo \"fc-api: ").skip(1).any(|echo| {
                    let fixed = echo.split(['$', '"']).next().unwrap();
                    text.starts_with(fixed) || fixed.starts_with(text)
                })
            };
            assert!(printed, "fc-api's script prints no `{marker}`");
        }
    }
}
