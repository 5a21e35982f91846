//! virtio-vsock (`hvrun --vsock`): streams between the rig host and the guest over
//! hvrun's hybrid unix sockets (Firecracker's protocol), both ways.

use crate::scenario::{OuterGic, Scenario};

/// The rig's side of `vsock`. The guest's initrd is hvrun's guest initramfs with
/// `/guest/vsock-peer.cpio` appended (`bin/vsock-peer`, cross-built with the rig's tools;
/// the kernel unpacks concatenated archives). hvrun boots with `--vsock`; the guest
/// (`t/vsock-check`) listens on its ports and prints `vsock-check: ready`; then the rig
/// host, with `vsock-peer`'s hybrid client, checks an echo, 64 MiB each way (sha256 at
/// both ends, timed), 100 connections, hvrun's RSS with a client that never reads, a
/// connection the guest opens to `PATH_6000`, and a CONNECT to a port nobody listens on;
/// a connection to port 5009 tells the guest to power off.
///
/// The host's clients never half-close (see `vsock-peer`): a host stream's end ends the
/// connection both ways for the guest, so the echo client (`--echo`) closes once its
/// bytes came back, and the others once the guest ended its side.
const SCRIPT: &str = include_str!("../../scenarios/vsock.sh");

/// Streams between the rig host and the guest over hvrun's hybrid vsock.
pub const VSOCK: Scenario = Scenario {
    name: "vsock",
    about: "virtio-vsock over hybrid unix sockets: an echo, 64 MiB each way intact (timed), 100 connections, bounded RSS under a client that never reads, a guest-initiated connection, a refused CONNECT",
    artifacts: &["Image", "initramfs.cpio"],
    script: SCRIPT,
    exit_code: 0,
    markers: &[
        "vsock-check: the virtio-vsock device has its driver",
        "vsock-check: ready",
        "vsock: echo round trip ok",
        "vsock: host-to-guest 64 MiB intact",
        "vsock: guest-to-host 64 MiB intact",
        "vsock: 100 of 100 connections echoed",
        "vsock: RSS stayed bounded",
        "vsock: the guest's connection to port 6000 said hello-from-guest",
        "vsock: a connect to a closed port was refused",
        "vsock-check: the host is done",
        "hvrun exit 0",
    ],
    forbidden: &["hvrun: error", "panicked", "FAIL", "Kernel panic"],
    timeout_secs: 600,
    exchange: None,
    outer_gic: OuterGic::V2,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The script parses (`sh -n`), with the host's shell standing in for busybox's.
    #[test]
    fn the_script_is_valid_shell() {
        let out = std::process::Command::new("sh").args(["-n", "-c", SCRIPT]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Every `vsock:` marker is a line the script prints, and every port the host uses is
    /// one the guest's script listens on.
    #[test]
    fn markers_and_ports_match_the_scripts() {
        for marker in VSOCK.markers.iter().filter(|m| m.starts_with("vsock: ")) {
            let fixed = marker.trim_start_matches("vsock: ").replace("100 of 100", "$ok of 100");
            assert!(SCRIPT.contains(&fixed), "{marker}");
        }
        let guest = include_str!("../../../guests/initramfs/t/vsock-check");
        for port in ["5000", "5001", "5002", "5003", "5004", "5009"] {
            assert!(SCRIPT.contains(&format!("/tmp/v.sock {port}")), "the host uses {port}");
            assert!(guest.contains(&format!(" {port} <")), "the guest listens on {port}");
        }
        for marker in VSOCK.markers.iter().filter(|m| m.starts_with("vsock-check: ")) {
            let said = marker.trim_start_matches("vsock-check: ");
            assert!(guest.contains(&format!("say \"{}", said.split(" (").next().unwrap())), "{marker}");
        }
        assert!(guest.contains("connect 2 6000") && SCRIPT.contains("/tmp/v.sock_6000"));
    }
}
