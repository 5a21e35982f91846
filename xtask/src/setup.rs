//! `cargo xtask setup`: the Debian packages the toolchains and the rig need.

use std::path::Path;

use crate::sh;

/// Packages for the cross toolchain, the macOS type-check, the rig and the tests.
pub const PACKAGES: &[&str] = &[
    "qemu-system-arm",       // the rig: qemu-system-aarch64
    "qemu-user-static",      // unit tests compiled for arm64, run under emulation
    "gcc-aarch64-linux-gnu", // cross linker and assembler
    // Only recommended by gcc-aarch64-linux-gnu, so `--no-install-recommends` leaves it
    // out: arm64 libc headers and static libc, for the guest tools and static Rust links.
    "libc6-dev-arm64-cross",
    "rustc-web", // a Rust whose std sources ship (for -Zbuild-std)
    "cargo-web",
    "rust-web-src",
    "rust-web-clippy",
    "device-tree-compiler", // dtc, to decode device trees in tests
    "e2fsprogs",            // mkfs.ext4 and debugfs for disk images
    "cpio",                 // cross-checks the initramfs writer
    "linux-source-6.1",     // hvrun's own guest kernel (cargo xtask guest builds it)
    "make",                 // ... with make (a fresh root has none: found by cargo xtask fresh)
    "flex",
    "bison",
    "bc",
    "g++",        // libFuzzer's C++ sources (the fuzz targets' libfuzzer-sys)
    "mmdebstrap", // cargo xtask fresh: a fresh Debian root to run setup in
];

/// cargo-fuzz, installed with rustup's cargo when missing (it runs the fuzz targets).
const CARGO_FUZZ: &str = "cargo-fuzz";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn installed(package: &str) -> bool {
    sh::output(sh::cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.trim() == "install ok installed")
}

fn is_root() -> bool {
    sh::output(sh::cmd("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// A command run as root: directly when we are root, else through non-interactive sudo.
fn as_root(args: &[&str]) -> std::process::Command {
    let mut c = if is_root() {
        sh::cmd(args[0])
    } else {
        let mut c = sh::cmd("sudo");
        c.arg("-n").arg(args[0]);
        c
    };
    c.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Installs cargo-fuzz unless `cargo fuzz` already answers.
fn cargo_fuzz() -> Result<(), String> {
    let cargo = sh::host_cargo();
    if sh::output(sh::cmd(&cargo).args(["fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    sh::run(sh::cmd(&cargo).args(["install", "--locked", CARGO_FUZZ, "--version", CARGO_FUZZ_VERSION]))
}

/// Installs what is missing; prints what is needed and fails on a non-Debian host.
pub fn run() -> Result<(), String> {
    debian_packages()?;
    cargo_fuzz()
}

fn debian_packages() -> Result<(), String> {
    if !Path::new("/etc/debian_version").exists() {
        return Err(format!(
            "this is not a Debian host; install the equivalents of these Debian packages, \
             and enable arm64 as a foreign architecture: {}",
            PACKAGES.join(" ")
        ));
    }
    let foreign = sh::output(sh::cmd("dpkg").arg("--print-foreign-architectures"))?;
    let mut update = false;
    if !foreign.split_whitespace().any(|a| a == "arm64") {
        sh::run(&mut as_root(&["dpkg", "--add-architecture", "arm64"]))?;
        update = true;
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() && !update {
        println!("setup: all {} packages present", PACKAGES.len());
        return Ok(());
    }
    sh::run(&mut as_root(&["apt-get", "update", "-q"]))?;
    if !missing.is_empty() {
        let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        sh::run(&mut as_root(&args))?;
    }
    Ok(())
}
