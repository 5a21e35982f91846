//! `cargo xtask guest`: guest artifacts, built into the cache outside the work tree and
//! rebuilt only when their inputs change (a Debian package version, a source's hash).
//!
//! - `vmlinuz`: Debian's stock arm64 kernel (an uncompressed Image): the rig's outer
//!   kernel, and a guest kernel; `virtio_mmio.ko`, `virtio-rng.ko`, `evdev.ko` and
//!   `virtio_input.ko` from the same package.
//! - `vmlinuz.gz`: the same kernel gzip'd, as most distributions ship arm64 kernels, for
//!   `compressed-kernel` (hvrun unpacks it).
//! - `busybox`: Debian's static arm64 busybox, for the rig's init.
//! - `NAME.bin`: each test program `guests/NAME.S`, assembled with the cross binutils.
//! - `NAME`: each guest tool `guests/tools/NAME.c`, a static arm64 Linux program.
//! - `rootfs.ext4`: an ext4 root filesystem with busybox and the same init, for `--disk`.
//! - `data.ext4`: an ext4 filesystem holding a known pattern, for `disk-integrity`.
//! - `durability.ext4`: an empty ext4 filesystem with a journal, for `kill-durability`.
//! - `Image`: hvrun's own kernel with virtio built in (see [`crate::kernel`]).
//! - `initramfs.cpio`: busybox, `guests/initramfs/init`, the helper scripts in
//!   `guests/initramfs/t/`, the guest tools and the modules (in `/lib/modules`); boots
//!   Debian's kernel to a shell, or runs the command after `--` on the kernel command line.

use std::path::{Path, PathBuf};

use hvrun_e2e::cpio::Archive;

use crate::{paths, sh};

/// What the guest cache takes from Debian's kernel package: the kernel, and the modules a
/// guest of the stock kernel needs for virtio (virtio and virtio_ring are built in).
const KERNEL_FILES: [(&str, &str); 7] = [
    ("boot/vmlinuz-", "vmlinuz"),
    // For the rig's side of scenarios: taps, and the exchange disk.
    ("*/kernel/drivers/net/tun.ko", "tun.ko"),
    ("*/kernel/drivers/block/virtio_blk.ko", "virtio_blk.ko"),
    ("*/kernel/drivers/virtio/virtio_mmio.ko", "virtio_mmio.ko"),
    ("*/kernel/drivers/char/hw_random/virtio-rng.ko", "virtio-rng.ko"),
    // The power button (hvrun's virtio-input device) and its /dev/input/event* node.
    ("*/kernel/drivers/input/evdev.ko", "evdev.ko"),
    ("*/kernel/drivers/virtio/virtio_input.ko", "virtio_input.ko"),
];

/// Builds every artifact that is missing or stale.
pub fn run() -> Result<(), String> {
    let dir = paths::guest_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let kernel = resolve_kernel_package()?;
    debian_files(&dir, &kernel, &KERNEL_FILES)?;
    build_compressed_kernel(&dir)?;
    debian_files(&dir, "busybox-static", &[("bin/busybox", "busybox")])?;
    assemble_programs(&dir)?;
    let tools = build_tools(&dir)?;
    build_initramfs(&dir, &tools)?;
    build_rootfs(&dir)?;
    build_data_disk(&dir)?;
    build_durability_disk(&dir)?;
    crate::kernel::build(&dir)?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The files of `dir` with extension `ext` (any when empty), sorted.
fn files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && (ext.is_empty() || p.extension().is_some_and(|x| x == ext)))
        .collect();
    found.sort();
    Ok(found)
}

/// Builds each `guests/tools/NAME.c` into the static arm64 program `NAME`; returns their paths.
fn build_tools(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut built = Vec::new();
    for source in files(&paths::root().join("guests/tools"), "c")? {
        let name = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let output = dir.join(&name);
        let key = format!("{:016x}", fnv1a(&read(&source)?));
        if !fresh(&output, &key) {
            sh::run(
                sh::cmd("aarch64-linux-gnu-gcc")
                    .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
                    .arg(&output)
                    .arg(&source),
            )?;
            mark(&output, &key)?;
        }
        built.push(output);
    }
    Ok(built)
}

/// Builds `rootfs.ext4`: busybox with the test init as `/sbin/init`, made by
/// `mkfs.ext4 -d` (no root privileges or loop devices needed).
fn build_rootfs(dir: &Path) -> Result<(), String> {
    let init = read(&paths::root().join("guests/initramfs/init"))?;
    let busybox = read(&dir.join("busybox"))?;
    let output = dir.join("rootfs.ext4");
    let key = format!("{:016x}", fnv1a(&[init.as_slice(), &busybox].concat()));
    if fresh(&output, &key) {
        println!("guest: rootfs.ext4 is up to date");
        return Ok(());
    }
    let staging = paths::cache().join("rootfs-staging");
    let _ = std::fs::remove_dir_all(&staging);
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "root", "t"] {
        std::fs::create_dir_all(staging.join(d)).map_err(|e| format!("{}: {e}", staging.display()))?;
    }
    let write = |path: &str, bytes: &[u8], mode: u32| -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let p = staging.join(path);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(|e| format!("{}: {e}", p.display()))
    };
    write("bin/busybox", &busybox, 0o755)?;
    write("sbin/init", &init, 0o755)?;
    std::os::unix::fs::symlink("busybox", staging.join("bin/sh")).map_err(|e| format!("symlink: {e}"))?;
    let _ = std::fs::remove_file(&output);
    sh::run(sh::cmd("mkfs.ext4").args(["-q", "-F", "-L", "rootfs", "-d"]).arg(&staging).arg(&output).arg("32M"))?;
    mark(&output, &key)?;
    let _ = std::fs::remove_dir_all(&staging);
    println!("guest: built {}", output.display());
    Ok(())
}

/// Builds `data.ext4` for the integrity scenario: an ext4 filesystem holding `/in.bin`,
/// the host's known pattern (`hvrun_e2e::checks`).
fn build_data_disk(dir: &Path) -> Result<(), String> {
    use hvrun_e2e::checks::{DATA_DISK_MB, DATA_IN_LEN, DATA_IN_SEED};
    let output = dir.join("data.ext4");
    let key = format!("in={DATA_IN_LEN}/{DATA_IN_SEED:x} size={DATA_DISK_MB}M");
    if fresh(&output, &key) {
        println!("guest: data.ext4 is up to date");
        return Ok(());
    }
    let staging = paths::cache().join("data-staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let pattern = hvrun_e2e::exchange::pattern(DATA_IN_LEN, DATA_IN_SEED);
    std::fs::write(staging.join("in.bin"), pattern).map_err(|e| format!("{}: {e}", staging.display()))?;
    let _ = std::fs::remove_file(&output);
    let size = format!("{DATA_DISK_MB}M");
    sh::run(sh::cmd("mkfs.ext4").args(["-q", "-F", "-L", "data", "-d"]).arg(&staging).arg(&output).arg(&size))?;
    mark(&output, &key)?;
    let _ = std::fs::remove_dir_all(&staging);
    println!("guest: built {}", output.display());
    Ok(())
}

/// Builds `durability.ext4` for the kill-durability scenario: an empty ext4 filesystem
/// with a journal, small enough that every round's copy fits the scenario's exchange slot.
fn build_durability_disk(dir: &Path) -> Result<(), String> {
    use hvrun_e2e::checks::DURABILITY_IMAGE_MB;
    let output = dir.join("durability.ext4");
    let key = format!("empty ext4 with a journal, size={DURABILITY_IMAGE_MB}M");
    if fresh(&output, &key) {
        println!("guest: durability.ext4 is up to date");
        return Ok(());
    }
    let _ = std::fs::remove_file(&output);
    let size = format!("{DURABILITY_IMAGE_MB}M");
    // At this size mke2fs picks 1 KiB blocks and a 1 MiB journal.
    sh::run(sh::cmd("mkfs.ext4").args(["-q", "-F", "-L", "durability", "-O", "has_journal"]).arg(&output).arg(&size))?;
    mark(&output, &key)?;
    println!("guest: built {}", output.display());
    Ok(())
}

/// Gzips `vmlinuz` into `vmlinuz.gz`.
fn build_compressed_kernel(dir: &Path) -> Result<(), String> {
    let (input, output) = (dir.join("vmlinuz"), dir.join("vmlinuz.gz"));
    let source = std::fs::read_to_string(stamp(&input)).map_err(|e| format!("{}: {e}", stamp(&input).display()))?;
    let key = format!("gzip -9 of vmlinuz ({source})");
    if fresh(&output, &key) {
        println!("guest: vmlinuz.gz is up to date");
        return Ok(());
    }
    let file = std::fs::File::create(&output).map_err(|e| format!("creating {}: {e}", output.display()))?;
    sh::run(sh::cmd("gzip").args(["-9", "-n", "-c"]).arg(&input).stdout(file))?;
    mark(&output, &key)?;
    println!("guest: built {}", output.display());
    Ok(())
}

/// Packs the guest initramfs.
fn build_initramfs(dir: &Path, tools: &[PathBuf]) -> Result<(), String> {
    let src = paths::root().join("guests/initramfs");
    let init = read(&src.join("init"))?;
    let scripts = files(&src.join("t"), "")?;
    let busybox = read(&dir.join("busybox"))?;
    let mut inputs = vec![init.clone(), busybox.clone()];
    // tun.ko and virtio_blk.ko are for the rig's side, not the guest.
    let rig_only = ["tun.ko", "virtio_blk.ko"];
    let modules: Vec<PathBuf> =
        KERNEL_FILES[1..].iter().filter(|(_, name)| !rig_only.contains(name)).map(|(_, name)| dir.join(name)).collect();
    for path in scripts.iter().chain(tools).chain(&modules) {
        inputs.push(path.to_string_lossy().into_owned().into_bytes());
        inputs.push(read(path)?);
    }
    let output = dir.join("initramfs.cpio");
    let key = format!("{:016x}", fnv1a(&inputs.concat()));
    if fresh(&output, &key) {
        println!("guest: initramfs.cpio is up to date");
        return Ok(());
    }
    let mut a = Archive::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "t", "lib", "lib/modules"] {
        a.dir(d);
    }
    for path in &modules {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        a.file(&format!("lib/modules/{name}"), 0o644, &read(path)?);
    }
    a.char_dev("dev/console", 5, 1);
    a.file("bin/busybox", 0o755, &busybox);
    a.symlink("bin/sh", "busybox");
    a.file("init", 0o755, &init);
    for path in &scripts {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        a.file(&format!("t/{name}"), 0o755, &read(path)?);
    }
    for path in tools {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        a.file(&format!("bin/{name}"), 0o755, &read(path)?);
    }
    let mut file = std::fs::File::create(&output).map_err(|e| format!("{}: {e}", output.display()))?;
    a.finish(&mut file).map_err(|e| format!("{}: {e}", output.display()))?;
    mark(&output, &key)?;
    println!("guest: built {}", output.display());
    Ok(())
}

/// FNV-1a, for cache keys that are stable across Rust versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Whether `output` exists and was made from `key`.
pub fn fresh(output: &Path, key: &str) -> bool {
    output.exists() && std::fs::read_to_string(stamp(output)).is_ok_and(|k| k == key)
}

fn stamp(output: &Path) -> PathBuf {
    output.with_extension(format!(
        "{}stamp",
        output.extension().map_or(String::new(), |e| format!("{}.", e.to_string_lossy()))
    ))
}

pub fn mark(output: &Path, key: &str) -> Result<(), String> {
    std::fs::write(stamp(output), key).map_err(|e| format!("writing {}: {e}", stamp(output).display()))
}

pub(crate) fn apt_cache(args: &[&str]) -> Result<String, String> {
    sh::output(sh::cmd("apt-cache").args(args))
}

/// The versioned package behind `linux-image-arm64` (e.g. `linux-image-6.1.0-57-arm64`).
pub(crate) fn resolve_kernel_package() -> Result<String, String> {
    let find = || -> Option<String> {
        let deps = apt_cache(&["depends", "linux-image-arm64:arm64"]).ok()?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|p| p.trim_end_matches(":arm64").to_string())
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-arm64"))
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // The package lists may predate `dpkg --add-architecture arm64`.
    sh::run(sh::cmd("apt-get").args(["update", "-q"]))?;
    find().ok_or_else(|| {
        "cannot resolve linux-image-arm64:arm64 (is arm64 a foreign architecture? run `cargo xtask setup`)".into()
    })
}

/// The candidate arm64 versions of those of `packages` that have one (one `apt-cache
/// policy` for all), by package.
pub(crate) fn arm64_candidates(packages: &[&str]) -> Result<std::collections::BTreeMap<String, String>, String> {
    let specs: Vec<String> = packages.iter().map(|p| format!("{p}:arm64")).collect();
    let args: Vec<&str> = std::iter::once("policy").chain(specs.iter().map(String::as_str)).collect();
    Ok(policy_candidates(&apt_cache(&args)?))
}

/// Reads `apt-cache policy NAME:arm64…`: each package's candidate, unless `(none)`.
fn policy_candidates(policy: &str) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let mut current = None;
    for line in policy.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(":arm64:");
        } else if let (Some(name), Some(v)) = (current, line.trim().strip_prefix("Candidate: ")) {
            if v != "(none)" {
                found.insert(name.to_string(), v.to_string());
            }
        }
    }
    found
}

/// The candidate arm64 versions of `packages`, in order.
pub(crate) fn candidate_versions(packages: &[&str]) -> Result<Vec<String>, String> {
    let mut found = arm64_candidates(packages)?;
    packages.iter().map(|p| found.remove(*p).ok_or_else(|| format!("no installable version of {p}:arm64"))).collect()
}

pub(crate) fn candidate_version(package: &str) -> Result<String, String> {
    candidate_versions(&[package]).map(|mut v| v.remove(0))
}

/// Every file below `dir`, recursively.
pub(crate) fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Extracts files from Debian's arm64 package `package` into `dir`: for each
/// `(pattern, name)`, the file whose path inside the package starts with `pattern` (or,
/// for a pattern starting with `*`, ends with the rest) becomes `dir/name`.
pub(crate) fn debian_files(dir: &Path, package: &str, wanted: &[(&str, &str)]) -> Result<(), String> {
    let key = format!("{package}={}", candidate_version(package)?);
    if wanted.iter().all(|(_, name)| fresh(&dir.join(name), &key)) {
        println!("guest: {} up to date ({key})", wanted.iter().map(|w| w.1).collect::<Vec<_>>().join(", "));
        return Ok(());
    }
    let work = paths::cache().join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let spec = format!("{package}:arm64");
    sh::run(sh::cmd("apt-get").current_dir(&work).args(["-q", "-o", "APT::Sandbox::User=root", "download", &spec]))?;
    let deb = std::fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
    let tree = work.join("tree");
    sh::run(sh::cmd("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let mut contents = Vec::new();
    walk(&tree, &mut contents);
    for (pattern, name) in wanted {
        let matches = |p: &&PathBuf| {
            let inner = p.strip_prefix(&tree).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default();
            match pattern.strip_prefix('*') {
                Some(suffix) => inner.ends_with(suffix),
                None => inner.starts_with(pattern),
            }
        };
        let found = contents.iter().find(matches).ok_or_else(|| format!("{package} has no {pattern}"))?;
        let output = dir.join(name);
        std::fs::copy(found, &output).map_err(|e| format!("copying {}: {e}", found.display()))?;
        mark(&output, &key)?;
        println!("guest: {name} from {key}");
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Where `hvrun selftest`'s guests are embedded from (copies of what is assembled here).
const EMBEDDED: &str = "vmm/src/selftest/guests";

/// Assembles each `guests/NAME.S` (other than included headers) into `NAME.bin`, then
/// checks that the copies `hvrun selftest` embeds are up to date.
fn assemble_programs(dir: &Path) -> Result<(), String> {
    let src = paths::root().join("guests");
    // What every program may include: the Image header and the `.inc` files.
    let mut shared = read(&src.join("image-header.S"))?;
    for inc in files(&src, "inc")? {
        shared.extend(read(&inc)?);
    }
    let sources = files(&src, "S")?;
    for source in sources.into_iter().filter(|p| !p.ends_with("image-header.S")) {
        let text = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        let name = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let output = dir.join(format!("{name}.bin"));
        let key = format!("{:016x}", fnv1a(&[shared.as_slice(), b"\0", &text].concat()));
        if fresh(&output, &key) {
            continue;
        }
        let elf = dir.join(format!("{name}.elf"));
        sh::run(
            sh::cmd("aarch64-linux-gnu-gcc")
                .args(["-nostdlib", "-static", "-Wl,-Ttext=0", "-Wl,--build-id=none", "-I"])
                .arg(&src)
                .arg("-o")
                .arg(&elf)
                .arg(&source),
        )?;
        sh::run(sh::cmd("aarch64-linux-gnu-objcopy").args(["-O", "binary"]).arg(&elf).arg(&output))?;
        let _ = std::fs::remove_file(&elf);
        mark(&output, &key)?;
    }
    println!("guest: test programs up to date in {}", dir.display());
    check_embedded(dir)
}

/// Each `vmm/src/selftest/guests/NAME.bin` must be what `guests/NAME.S` assembles to now;
/// `HVRUN_UPDATE_EMBEDDED=1` copies the fresh ones there instead (then commit them).
fn check_embedded(dir: &Path) -> Result<(), String> {
    let embedded = paths::root().join(EMBEDDED);
    let update = std::env::var_os("HVRUN_UPDATE_EMBEDDED").is_some();
    for copy in files(&embedded, "bin")? {
        let name = copy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let fresh = read(&dir.join(&name))?;
        if read(&copy)? == fresh {
            continue;
        }
        if update {
            std::fs::write(&copy, &fresh).map_err(|e| format!("{}: {e}", copy.display()))?;
            println!("guest: updated {EMBEDDED}/{name}; commit it");
        } else {
            return Err(format!(
                "{EMBEDDED}/{name} is not what guests/{} assembles to now: run \
                 `HVRUN_UPDATE_EMBEDDED=1 cargo xtask guest` and commit it",
                name.replace(".bin", ".S")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sit_beside_their_outputs() {
        assert_eq!(stamp(Path::new("/c/hello.bin")), Path::new("/c/hello.bin.stamp"));
        assert_eq!(stamp(Path::new("/c/vmlinuz")), Path::new("/c/vmlinuz.stamp"));
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn candidates_are_read_from_apt_cache_policy() {
        let policy = "fio:arm64:\n  Installed: (none)\n  Candidate: 3.33-3\n  Version table:\n     3.33-3 500\n\
                      mime-support:arm64:\n  Installed: (none)\n  Candidate: (none)\n";
        let found = policy_candidates(policy);
        assert_eq!(found.get("fio").map(String::as_str), Some("3.33-3"));
        assert_eq!(found.len(), 1, "a package without an arm64 build has no candidate");
    }
}
