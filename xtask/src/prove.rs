//! Proves that each tool `setup` installs works, by using it the way the project does,
//! and names the Debian package to install when one does not. A package list that misses
//! something (a recommended package `--no-install-recommends` leaves out, say) then fails
//! here, on the machine that lacks it, with the package's name, instead of in the middle
//! of a test run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvrun_e2e::scenario::OuterGic;

use crate::{cross, paths, sh};

/// One proof: what it shows, the packages that provide it, and how.
struct Proof {
    what: &'static str,
    packages: &'static str,
    run: fn(&Path) -> Result<String, String>,
}

const PROOFS: &[Proof] = &[
    Proof {
        what: "a static arm64 C program, cross-built and run under qemu-user",
        packages: "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static",
        run: c_program,
    },
    Proof {
        what: "a static arm64 Rust program, built with -Zbuild-std and run under qemu-user",
        packages: "rustc-web cargo-web rust-web-src libc6-dev-arm64-cross qemu-user-static",
        run: rust_program,
    },
    Proof {
        what: "the macOS check target and clippy for Debian's Rust",
        packages: "rustc-web rust-web-src rust-web-clippy",
        run: macos_target,
    },
    Proof {
        what: "the rig's QEMU with the rig's exact machine and devices",
        packages: "qemu-system-arm",
        run: rig_qemu,
    },
    Proof {
        what: "arm64 programs' libraries found (readelf) and the arm64 packages peers.rs fetches (compare, the I/O guest, the rig's curl) known to apt",
        packages: "gcc-aarch64-linux-gnu (its binutils-aarch64-linux-gnu) libc6-dev-arm64-cross, and arm64 as a foreign architecture",
        run: peers,
    },
    Proof { what: "dtc decodes a device tree", packages: "device-tree-compiler", run: dtc },
    Proof { what: "an ext4 image made and read back", packages: "e2fsprogs", run: ext4 },
    Proof {
        what: "cpio, make, flex, bison, bc, g++ and mmdebstrap answer",
        packages: "cpio make flex bison bc g++ mmdebstrap",
        run: small_tools,
    },
    Proof {
        what: "the guest kernel's sources",
        packages: "linux-source-6.1",
        run: |_| exists(Path::new("/usr/src/linux-source-6.1.tar.xz")).map(|()| "tarball present".into()),
    },
    Proof {
        what: "cargo fuzz answers",
        packages: "(cargo install --locked cargo-fuzz, which setup does)",
        run: |_| sh::output(sh::cmd(sh::host_cargo()).args(["fuzz", "--version"])).map(|v| v.trim().to_string()),
    },
];

/// Runs every proof; the error names each that failed and the packages behind it.
pub fn all() -> Result<(), String> {
    let dir = paths::root().join("target/setup-proofs");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut failed = Vec::new();
    for proof in PROOFS {
        let started = Instant::now();
        match (proof.run)(&dir) {
            Ok(detail) => println!("setup: proved {} ({detail}; {:.1} s)", proof.what, started.elapsed().as_secs_f64()),
            Err(e) => {
                println!("setup: FAILED {}: {e}", proof.what);
                failed.push(format!("{} (install {})", proof.what, proof.packages));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("setup: these tools do not work: {}", failed.join("; ")))
    }
}

fn exists(path: &Path) -> Result<(), String> {
    if path.exists() {
        Ok(())
    } else {
        Err(format!("{} is missing", path.display()))
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs an arm64 program under qemu-user; its output must be `expected`.
fn run_arm64(program: &Path, expected: &str) -> Result<String, String> {
    let out = sh::output(sh::cmd("qemu-aarch64-static").arg(program))?;
    if out.trim() == expected {
        Ok(format!("it printed `{expected}`"))
    } else {
        Err(format!("{} printed {out:?}, not {expected:?}", program.display()))
    }
}

fn c_program(dir: &Path) -> Result<String, String> {
    let source = dir.join("hello.c");
    let program = dir.join("hello-c");
    // <stdio.h> needs libc6-dev-arm64-cross's headers (bits/wordsize.h), -static its libc.a.
    write(&source, "#include <stdio.h>\nint main(void) { puts(\"hello from arm64 C\"); return 0; }\n")?;
    sh::output(sh::cmd("aarch64-linux-gnu-gcc").arg("-static").arg("-o").arg(&program).arg(&source))?;
    run_arm64(&program, "hello from arm64 C")
}

fn rust_program(dir: &Path) -> Result<String, String> {
    let krate = dir.join("hello-rust");
    std::fs::create_dir_all(krate.join("src")).map_err(|e| format!("{}: {e}", krate.display()))?;
    write(
        &krate.join("Cargo.toml"),
        "[package]\nname = \"hello-rust\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )?;
    write(&krate.join("src/main.rs"), "fn main() {\n    println!(\"hello from arm64 Rust\");\n}\n")?;
    let target_dir = dir.join("rust-target");
    sh::output(
        cross::debian_cargo(&target_dir).current_dir(&krate).env("RUSTFLAGS", "-C target-feature=+crt-static").args([
            "build",
            "--release",
            "-Zbuild-std=std,panic_abort",
            "--target",
            cross::LINUX,
        ]),
    )?;
    run_arm64(&target_dir.join(cross::LINUX).join("release/hello-rust"), "hello from arm64 Rust")
}

fn macos_target(_: &Path) -> Result<String, String> {
    let sysroot = sh::output(sh::cmd("/usr/bin/rustc").args(["--print", "sysroot"]))?;
    exists(&PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/Cargo.lock"))?;
    let cfg = sh::output(sh::cmd("/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1").args([
        "--print",
        "cfg",
        "--target",
        cross::MACOS,
    ]))?;
    if !cfg.contains("target_os=\"macos\"") {
        return Err(format!("rustc does not know {}", cross::MACOS));
    }
    let clippy = sh::output(sh::cmd("/usr/bin/cargo").env("RUSTC", "/usr/bin/rustc").args(["clippy", "--version"]))?;
    Ok(format!("{} known, std sources present, {}", cross::MACOS, clippy.trim()))
}

/// Starts the rig's machine, stopped before its first instruction (`-S`), with an
/// exchange disk as the rig attaches one; it must still be up after a moment (a missing
/// option ROM or an unknown option ends it at once).
fn rig_qemu(dir: &Path) -> Result<String, String> {
    let disk = dir.join("exchange.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| format!("{}: {e}", disk.display()))?;
    let mut drive = std::ffi::OsString::from("file=");
    drive.push(&disk);
    drive.push(",if=none,format=raw,id=exchange");
    let mut child = Command::new("qemu-system-aarch64")
        .args(hvrun_e2e::rig::machine_args(OuterGic::V2))
        .arg("-drive")
        .arg(drive)
        .args(["-device", "virtio-blk-device,drive=exchange", "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-aarch64: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Err(format!("qemu-system-aarch64 ended at once ({status}): {}", stderr.trim()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok("it started and waited".into())
}

/// What `cargo xtask peers` does, short of downloading: reads the libraries a dynamic
/// arm64 program names with the cross readelf, and resolves the arm64 packages it fetches.
fn peers(dir: &Path) -> Result<String, String> {
    let source = dir.join("dynamic.c");
    let program = dir.join("dynamic-c");
    write(&source, "int main(void) { return 0; }\n")?;
    sh::output(sh::cmd("aarch64-linux-gnu-gcc").arg("-o").arg(&program).arg(&source))?;
    let libs = crate::peers::needed_libs(&program)?;
    if !libs.iter().any(|l| l == "libc.so.6") {
        return Err(format!("readelf found {libs:?} in a dynamic arm64 program, not libc.so.6"));
    }
    let packages: Vec<&str> = crate::peers::BUNDLES.iter().flat_map(|b| b.packages.iter().copied()).collect();
    let versions = crate::guest::candidate_versions(&packages)?;
    let known: Vec<String> = packages.iter().zip(versions).map(|(p, v)| format!("{p} {v}")).collect();
    Ok(format!("libc.so.6 found; arm64 {}", known.join(", ")))
}

fn dtc(dir: &Path) -> Result<String, String> {
    let source = dir.join("proof.dts");
    let blob = dir.join("proof.dtb");
    write(&source, "/dts-v1/;\n/ { compatible = \"hvrun,proof\"; };\n")?;
    sh::output(sh::cmd("dtc").args(["-I", "dts", "-O", "dtb", "-o"]).arg(&blob).arg(&source))?;
    let back = sh::output(sh::cmd("dtc").args(["-I", "dtb", "-O", "dts"]).arg(&blob))?;
    if back.contains("hvrun,proof") {
        Ok("round trip".into())
    } else {
        Err("dtc did not read back what it wrote".into())
    }
}

fn ext4(dir: &Path) -> Result<String, String> {
    let image = dir.join("proof.ext4");
    let _ = std::fs::remove_file(&image);
    sh::output(sh::cmd("mkfs.ext4").args(["-q", "-F", "-L", "hvrun-proof"]).arg(&image).arg("4M"))?;
    let stats = sh::output(sh::cmd("debugfs").args(["-R", "stats"]).arg(&image))?;
    if stats.contains("hvrun-proof") {
        Ok("mkfs.ext4 and debugfs".into())
    } else {
        Err("debugfs did not see the label mkfs.ext4 wrote".into())
    }
}

fn small_tools(_: &Path) -> Result<String, String> {
    for (tool, flag) in [
        ("cpio", "--version"),
        ("make", "--version"),
        ("flex", "--version"),
        ("bison", "--version"),
        ("bc", "--version"),
    ] {
        sh::output(sh::cmd(tool).arg(flag))?;
    }
    sh::output(sh::cmd("g++").arg("--version"))?;
    sh::output(sh::cmd("mmdebstrap").arg("--version"))?;
    Ok("all answered".into())
}
