//! Builds for targets whose standard library is not installed, with Debian's Rust
//! (`rustc-web`, whose `rust-web-src` makes `-Zbuild-std` work): the static arm64 Linux
//! `hvrun` for the rig, unit tests for arm64 Linux under qemu-user, and the macOS
//! type-check. Each gets its own target directory so it never fights the host build.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{paths, sh};

/// The rig's target.
pub const LINUX: &str = "aarch64-unknown-linux-gnu";
/// The macOS target the workspace is checked for.
pub const MACOS: &str = "aarch64-apple-darwin";

/// Debian's cargo with an environment that keeps rustup's toolchain out of the way;
/// `target_dir` is relative to the workspace (or absolute).
pub fn debian_cargo(target_dir: impl AsRef<Path>) -> Command {
    let mut c = sh::cmd("/usr/bin/cargo");
    let path = std::env::var("PATH").unwrap_or_default();
    c.current_dir(paths::root())
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", "/usr/bin/rustc")
        .env("CARGO_TARGET_DIR", paths::root().join(target_dir))
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc");
    for var in ["RUSTUP_TOOLCHAIN", "RUSTDOC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO"] {
        c.env_remove(var);
    }
    c
}

/// `cargo xtask cross`: the static arm64 Linux `hvrun`; returns its path.
pub fn build_hvrun() -> Result<PathBuf, String> {
    sh::run(
        debian_cargo("target/cross")
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "-p", "hvrun", "--bin", "hvrun"])
            .args(["--example", "embed", "--example", "memdisk", "--example", "own_device", "--example", "balloon"])
            .arg("-Zbuild-std=std,panic_abort")
            .args(["-p", "hvrun-e2e", "--bin", "net-forwarder", "--bin", "vsock-peer", "--bin", "timeline"])
            .args(["--target", LINUX]),
    )?;
    let bin = paths::cross_hvrun();
    let size = std::fs::metadata(&bin).map_err(|e| format!("{}: {e}", bin.display()))?.len();
    println!("cross: {} ({} KiB)", bin.display(), size / 1024);
    Ok(bin)
}

/// `cargo xtask cross-test`: the unit tests of the crates with arm64-only code, compiled
/// for arm64 Linux and run under qemu-user (no KVM there: that is the rig's job).
pub fn test() -> Result<(), String> {
    sh::run(
        debian_cargo("target/cross-test")
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", "qemu-aarch64-static -L /usr/aarch64-linux-gnu")
            // Tests that measure CPU time skip themselves: emulation multiplies it.
            .env("HVRUN_UNDER_EMULATION", "1")
            .args(["test", "-Zbuild-std", "--target", LINUX])
            .args(["-p", "hvrun", "-p", "hypervisor", "-p", "arch-aarch64", "-p", "devices", "-p", "fdt"]),
    )
}

/// `cargo xtask check-macos`: type-check and lint the workspace for Apple Silicon macOS
/// against the real `applevisor` crate: libraries and binaries, and the tests and examples
/// too (a test that does not compile on a Mac is a failing test). The benchmarks stay out:
/// criterion's `alloca` needs a C compiler for the Apple target, which Debian lacks.
pub fn check_macos() -> Result<(), String> {
    let target = ["-Zbuild-std=std,panic_abort", "--target", MACOS];
    let all = ["--workspace"];
    let with_tests = ["--workspace", "--exclude", "hvrun-benches", "--tests", "--examples"];
    for args in [&all[..], &with_tests[..]] {
        sh::run(debian_cargo("target/macos").arg("check").args(args).args(target))?;
        sh::run(debian_cargo("target/macos").arg("clippy").args(args).args(target).args(["--", "-D", "warnings"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    /// Issue 15: `scripts/macos-run` hid codesign's errors, so an unsigned hvrun failed
    /// later with a vague framework error. Runs the script with a stand-in `codesign`.
    #[test]
    fn the_macos_runner_reports_a_signing_failure_and_runs_a_signed_binary() {
        let dir = std::env::temp_dir().join(format!("hvrun-macos-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let bin = script("hvrun", "echo ran \"$@\"");
        let runner = crate::paths::root().join("scripts/macos-run");
        let run = |codesign: &str| {
            script("codesign", codesign);
            let path = format!("{}:/usr/bin:/bin", dir.display());
            Command::new("sh").arg(&runner).arg(&bin).arg("--version").env("PATH", path).output().unwrap()
        };
        let signed = run("echo 'replacing existing signature' >&2");
        assert!(signed.status.success());
        assert_eq!(String::from_utf8_lossy(&signed.stdout), "ran --version\n");
        assert!(signed.stderr.is_empty(), "chatter stays quiet");
        let failed = run("echo 'errSecInternalComponent' >&2; exit 1");
        assert_eq!(failed.status.code(), Some(1));
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(err.contains("signing") && err.contains("errSecInternalComponent"), "{err}");
        assert!(failed.stdout.is_empty(), "the unsigned binary does not run");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
