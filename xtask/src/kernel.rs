//! hvrun's own guest kernel: Debian's `linux-source-6.1` built for arm64 with the cross
//! gcc from `make allnoconfig` plus `guests/kernel/hvrun.config`, which builds in
//! everything `hvrun --kernel Image --disk rootfs.img` needs (virtio-mmio, blk, net,
//! console, rng, input, vsock, ext4), and what Virtualization.framework's guests need,
//! so that one Image boots on every backend: PCI with MSI (the generic ECAM host,
//! virtio-pci, the GICv3 ITS and GICv2m), virtio-fs (FUSE) for `--share` and `--rosetta`,
//! and binfmt_misc to register Rosetta. The source tree and the Image are cached outside
//! the work tree, keyed by the source package's version and the fragment's hash.

use std::path::Path;

use crate::{paths, sh};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

fn make(tree: &Path) -> std::process::Command {
    let mut c = sh::cmd("make");
    c.current_dir(tree).args(["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]);
    c
}

/// Builds `dir/Image` unless it is up to date.
pub fn build(dir: &Path) -> Result<(), String> {
    let fragment_path = paths::root().join("guests/kernel/hvrun.config");
    let fragment = std::fs::read_to_string(&fragment_path).map_err(|e| format!("{}: {e}", fragment_path.display()))?;
    let version = sh::output(sh::cmd("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
        .map_err(|_| format!("{SOURCE_PACKAGE} is not installed: run `cargo xtask setup`"))?;
    let output = dir.join("Image");
    let key = format!("{SOURCE_PACKAGE}={version} fragment={:016x}", crate::guest::fnv1a(fragment.as_bytes()));
    if crate::guest::fresh(&output, &key) {
        println!("guest: Image is up to date ({key})");
        return Ok(());
    }

    let build = paths::cache().join("kernel-build");
    let tree = build.join(SOURCE_PACKAGE);
    let unpacked = build.join("unpacked.stamp");
    if std::fs::read_to_string(&unpacked).ok().as_deref() != Some(version.as_str()) {
        let _ = std::fs::remove_dir_all(&build);
        std::fs::create_dir_all(&build).map_err(|e| format!("{}: {e}", build.display()))?;
        sh::run(sh::cmd("tar").arg("-C").arg(&build).args(["-xf", TARBALL]))?;
        std::fs::write(&unpacked, &version).map_err(|e| format!("{}: {e}", unpacked.display()))?;
    }
    sh::run(make(&tree).arg("allnoconfig"))?;
    sh::run(
        sh::cmd(tree.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&tree)
            .args(["-m", ".config"])
            .arg(&fragment_path),
    )?;
    sh::run(make(&tree).arg("olddefconfig"))?;
    let config = std::fs::read_to_string(tree.join(".config")).map_err(|e| format!("reading .config: {e}"))?;
    let missing: Vec<&str> = fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|l| !config.lines().any(|c| c.trim() == *l))
        .collect();
    if !missing.is_empty() {
        return Err(format!("the kernel config lost options from the fragment (dependencies?): {}", missing.join(" ")));
    }
    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    sh::run(make(&tree).arg(format!("-j{jobs}")).arg("Image"))?;
    let image = tree.join("arch/arm64/boot/Image");
    std::fs::copy(&image, &output).map_err(|e| format!("copying {}: {e}", image.display()))?;
    crate::guest::mark(&output, &key)?;
    println!("guest: built {} ({key})", output.display());
    Ok(())
}
