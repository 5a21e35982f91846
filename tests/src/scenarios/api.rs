//! A client not written here: Debian's arm64 `curl`, which the rig carries for the
//! scenarios that list [`CURL_ARCHIVE`] and runs as [`CURL_IN_RIG`].

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_runs_from_its_directory() {
        let lib = format!("/{CURL_DIR}/lib");
        assert_eq!(CURL_IN_RIG, format!("{lib}/ld-linux-aarch64.so.1 --library-path {lib} /{CURL_DIR}/curl"));
        assert!(CURL_RUNS.artifacts.contains(&CURL_ARCHIVE));
        assert!(CURL_RUNS.script.starts_with(&format!("curl() {{ {CURL_IN_RIG} \"$@\"; }}\n")));
    }
}
