//! `cargo xtask fresh [--force] [--full]`: proves that a fresh Debian 12 machine with
//! only rustup's Rust gets everything it needs from `cargo xtask setup`.
//!
//! It builds a minimal Debian 12 root with `mmdebstrap` (no recommended packages, as a
//! new machine or container has; gcc and libc6-dev, the C linker rustup's Rust needs to
//! link anything), clones this repository into it, gives it rustup's
//! toolchains (read-only, and an empty `CARGO_HOME`, so cargo-fuzz must be installed by
//! setup too), and runs there: `cargo xtask setup` (which installs the packages and
//! proves each tool), then `cargo xtask demo` (guest artifacts, the cross build, the
//! rig); with `--full`, `cargo xtask test` as well. What can only work on this machine
//! because someone installed it by hand fails there.
//!
//! A run that passes is remembered under the hash of what it depends on (setup's package
//! list and the rig's QEMU command line), so `cargo xtask test` calls [`check`], which
//! runs it only when those changed and otherwise checks the package list against the
//! archive (every package must exist for amd64, or arm64 where it is a cross package).

use std::path::{Path, PathBuf};

use crate::{paths, setup, sh};

/// Debian's release the fresh root is.
const SUITE: &str = "bookworm";
/// Set inside the fresh root, whose `cargo xtask test` must not start a fresh run of its own.
const INSIDE: &str = "HVRUN_FRESH_ROOT";

/// What a fresh run depends on: the packages and the rig's machine.
fn key() -> String {
    let mut text = setup::PACKAGES.join("\n");
    text.push('\n');
    for gic in [hvrun_e2e::scenario::OuterGic::V2, hvrun_e2e::scenario::OuterGic::V3] {
        text.push_str(&hvrun_e2e::rig::machine_args(gic).join(" "));
        text.push('\n');
    }
    format!("{:016x}", crate::guest::fnv1a(text.as_bytes()))
}

fn stamp() -> PathBuf {
    paths::cache().join("fresh").join(format!("{}.passed", key()))
}

/// `cargo xtask test`'s step: a fresh run when the package list or the rig's machine
/// changed since the last one that passed, else the package list against the archive.
pub fn check() -> Result<(), String> {
    if std::env::var_os(INSIDE).is_some() {
        println!("fresh: this is the fresh root; its packages are checked against the archive");
        return packages_exist();
    }
    if stamp().exists() {
        println!("fresh: setup's packages and the rig's machine passed on a fresh root before ({})", key());
        return packages_exist();
    }
    run(&[])
}

/// Every package of setup's list is in the archive apt knows.
fn packages_exist() -> Result<(), String> {
    let mut missing = Vec::new();
    for package in setup::PACKAGES {
        if sh::output(sh::cmd("apt-cache").args(["show", "--no-all-versions", package])).is_err() {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        println!("fresh: all {} packages of setup's list are in the archive", setup::PACKAGES.len());
        Ok(())
    } else {
        Err(format!("fresh: setup names packages the archive does not have: {}", missing.join(" ")))
    }
}

/// `cargo xtask fresh [--force] [--full]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let force = args.iter().any(|a| a == "--force");
    let full = args.iter().any(|a| a == "--full");
    if let Some(other) = args.iter().find(|a| !matches!(a.as_str(), "--force" | "--full")) {
        return Err(format!("fresh: unknown argument `{other}`; use --force and/or --full"));
    }
    if stamp().exists() && !force {
        println!("fresh: passed before for this package list and rig ({}); --force runs it again", key());
        return Ok(());
    }
    setup::run()?;
    let root = paths::root().join("target/fresh/root");
    let _ = unmount_all(&root);
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    sh::run(
        sh::cmd("mmdebstrap")
            // rustup's Rust needs the system's C linker (`cc`) to link anything, xtask
            // included: a machine with rustup's Rust has gcc and libc6-dev.
            .args(["--mode=root", "--variant=minbase", "--include=ca-certificates,gcc,libc6-dev"])
            .args(["--aptopt=APT::Install-Recommends \"false\""])
            .arg(SUITE)
            .arg(&root)
            .arg("deb http://deb.debian.org/debian bookworm main")
            .arg("deb http://deb.debian.org/debian bookworm-updates main")
            .arg("deb http://deb.debian.org/debian-security bookworm-security main"),
    )?;
    let result = inside(&root, full);
    let unmounted = unmount_all(&root);
    result?;
    unmounted?;
    let stamp = stamp();
    if let Some(dir) = stamp.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&stamp, b"passed\n").map_err(|e| format!("{}: {e}", stamp.display()))?;
    println!("fresh: a fresh Debian 12 root with only rustup's Rust passed ({})", key());
    Ok(())
}

/// Where rustup keeps its toolchains on this machine.
fn rustup_home() -> PathBuf {
    std::env::var_os("RUSTUP_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".rustup")
    })
}

/// The fresh root's mounts, in the order they are made.
const MOUNTS: &[&str] = &["proc", "sys", "dev", "dev/pts", "opt/rustup"];

/// Certificate authorities added on this host (a proxy's, say): the network's, not the
/// project's, so the fresh root gets them too.
const LOCAL_CAS: &str = "usr/local/share/ca-certificates";

fn inside(root: &Path, full: bool) -> Result<(), String> {
    sh::run(sh::cmd("git").args(["clone", "--quiet"]).arg(paths::root()).arg(root.join("src")))?;
    let host_cas = Path::new("/").join(LOCAL_CAS);
    if host_cas.is_dir() {
        sh::run(sh::cmd("cp").arg("-rT").arg(&host_cas).arg(root.join(LOCAL_CAS)))?;
    }
    for dir in MOUNTS {
        std::fs::create_dir_all(root.join(dir)).map_err(|e| format!("{}: {e}", root.join(dir).display()))?;
    }
    sh::run(sh::cmd("mount").args(["-t", "proc", "proc"]).arg(root.join("proc")))?;
    sh::run(sh::cmd("mount").args(["--rbind", "/sys"]).arg(root.join("sys")))?;
    sh::run(sh::cmd("mount").args(["--rbind", "/dev"]).arg(root.join("dev")))?;
    sh::run(sh::cmd("mount").args(["--bind", "-o", "ro"]).arg(rustup_home()).arg(root.join("opt/rustup")))?;
    let toolchain = sh::output(sh::cmd("rustup").args(["show", "active-toolchain"]))?;
    let toolchain = toolchain.split_whitespace().next().unwrap_or("stable").to_string();
    let steps = if full {
        "cargo xtask setup && cargo xtask demo && cargo xtask test"
    } else {
        "cargo xtask setup && cargo xtask demo"
    };
    let script = format!(
        "set -e\n\
         update-ca-certificates >/dev/null\n\
         export RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo HOME=/root\n\
         export PATH=/opt/rustup/toolchains/{toolchain}/bin:/root/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export RUSTUP_TOOLCHAIN={toolchain} {INSIDE}=1\n\
         cd /src\n\
         {steps}\n"
    );
    sh::run(sh::cmd("/usr/sbin/chroot").arg(root).args(["/bin/sh", "-c", &script]).env_clear().env("TERM", "dumb"))
}

/// Unmounts whatever is mounted below `root`, deepest first.
fn unmount_all(root: &Path) -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| format!("/proc/self/mounts: {e}"))?;
    let prefix = root.to_string_lossy().into_owned();
    let mut below: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&prefix)).collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in below {
        sh::run(sh::cmd("umount").arg("-l").arg(mount))?;
    }
    Ok(())
}
