//! The I/O guest's initramfs, `io-initramfs.cpio` in the guest cache: the test init and
//! busybox of `initramfs.cpio`, Debian's arm64 `fio` and `iperf3` with the libraries they
//! load (fetched by [`crate::peers`]), the stock kernel's modules for virtio-mmio,
//! virtio-blk and virtio-net (in `/lib/modules`, loaded by `/io/modules`), and
//! `guests/io/` (the workloads' scripts and fio job files) in `/io`. Every VMM boots the
//! same one with Debian's stock kernel (`vmlinuz`): `cargo xtask compare`'s I/O rows and
//! the `fio-verify` scenario. (Not hvrun's own kernel: fio needs System V shared memory,
//! which that kernel leaves out.)
//!
//! The programs sit where Debian puts them (`/usr/bin`, the libraries in
//! `/lib/aarch64-linux-gnu`, the loader `/lib/ld-linux-aarch64.so.1` their ELF headers
//! name), so the guest runs them as they are. The rig has no libc: it unpacks this
//! archive and runs them through the loader
//! ([`hvrun_e2e::scenarios::IO_IN_RIG`]).

use std::path::{Path, PathBuf};

use hvrun_e2e::cpio::Archive;

use crate::guest::{fnv1a, fresh, mark};
use crate::paths;
use crate::peers::{self, Bundle};

/// The guest's I/O tools.
pub const TOOLS: Bundle =
    Bundle { name: "io", packages: &["fio", "iperf3"], programs: &["usr/bin/fio", "usr/bin/iperf3"] };

/// The archive's name in the guest cache (and under `/guest` in the rig).
pub use hvrun_e2e::scenarios::IO_INITRAMFS as ARTIFACT;

/// The stock kernel's modules the guest loads, in `/io/modules`' order (a module's
/// dependencies first): `(pattern in the kernel package, name)`, as
/// [`crate::guest::debian_files`] takes them. virtio_mmio.ko and virtio_blk.ko are among
/// the guest cache's kernel files already.
const NET_MODULES: [(&str, &str); 3] = [
    ("*/kernel/net/core/failover.ko", "failover.ko"),
    ("*/kernel/drivers/net/net_failover.ko", "net_failover.ko"),
    ("*/kernel/drivers/net/virtio_net.ko", "virtio_net.ko"),
];
const MODULES: [&str; 5] = ["virtio_mmio.ko", "virtio_blk.ko", "failover.ko", "net_failover.ko", "virtio_net.ko"];

/// The libraries' directory in the archive.
const LIB_DIR: &str = "lib/aarch64-linux-gnu";

/// Builds the archive unless it is up to date; returns the packages' versions.
pub fn build() -> Result<String, String> {
    let tools = peers::fetch(&TOOLS)?;
    let dir = paths::guest_dir();
    crate::guest::debian_files(&dir, &crate::guest::resolve_kernel_package()?, &NET_MODULES)?;
    let root = paths::root();
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let init = read(&root.join("guests/initramfs/init"))?;
    let busybox = read(&dir.join("busybox"))?;
    let mut workloads: Vec<PathBuf> = std::fs::read_dir(root.join("guests/io"))
        .map_err(|e| format!("guests/io: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    workloads.sort();
    let modules: Vec<PathBuf> = MODULES.iter().map(|m| dir.join(m)).collect();
    let mut inputs = vec![init.clone(), busybox.clone()];
    for path in workloads.iter().chain(&modules) {
        inputs.push(path.to_string_lossy().into_owned().into_bytes());
        inputs.push(read(path)?);
    }
    let libs: Vec<String> = tools.libs.iter().map(|l| peers::file_name(l)).collect();
    let key = format!("{} (libraries: {}) {:016x}", tools.versions, libs.join(" "), fnv1a(&inputs.concat()));
    let output = dir.join(ARTIFACT);
    if fresh(&output, &key) {
        println!("guest: {ARTIFACT} is up to date ({})", tools.versions);
        return Ok(tools.versions);
    }
    let mut a = Archive::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", LIB_DIR, "lib/modules", "usr", "usr/bin", "io"] {
        a.dir(d);
    }
    for (path, name) in modules.iter().zip(MODULES) {
        a.file(&format!("lib/modules/{name}"), 0o644, &read(path)?);
    }
    a.char_dev("dev/console", 5, 1);
    a.file("bin/busybox", 0o755, &busybox);
    a.symlink("bin/sh", "busybox");
    a.file("init", 0o755, &init);
    for program in &tools.programs {
        a.file(&format!("usr/bin/{}", peers::file_name(program)), 0o755, &read(program)?);
    }
    for (lib, name) in tools.libs.iter().zip(&libs) {
        a.file(&format!("{LIB_DIR}/{name}"), 0o755, &read(lib)?);
    }
    a.symlink("lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu/ld-linux-aarch64.so.1");
    for path in &workloads {
        let mode = if is_executable(path) { 0o755 } else { 0o644 };
        a.file(&format!("io/{}", peers::file_name(path)), mode, &read(path)?);
    }
    let mut file = std::fs::File::create(&output).map_err(|e| format!("{}: {e}", output.display()))?;
    a.finish(&mut file).map_err(|e| format!("{}: {e}", output.display()))?;
    mark(&output, &key)?;
    let size = std::fs::metadata(&output).map(|m| m.len() >> 20).unwrap_or(0);
    println!("guest: built {} ({size} MiB: {}, {} libraries)", output.display(), tools.versions, libs.len());
    Ok(tools.versions)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}
