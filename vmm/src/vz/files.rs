//! The files a Linux machine on Virtualization.framework is given, made ready before the
//! framework sees them:
//! - every path is resolved (`canonicalize`): the framework is reported to fail on paths
//!   through symbolic links (`/tmp` on macOS is one), and a missing file is one clear
//!   error here instead of a framework error later;
//! - the kernel gets the same checks as on the other backends (the arm64 Image header),
//!   and a compressed kernel is unpacked into a temporary file: the framework's Linux
//!   boot loader on Apple Silicon needs an uncompressed Image and hangs silently on
//!   anything else.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::plan::LinuxPlan;
use crate::boot_files::{Blob, BootFiles, Images};
use crate::{Error, VmConfig};

/// The resolved path of an existing file or directory, or an error naming it.
pub fn canonical(what: &'static str, path: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(path).map_err(|source| Error::File { what, path: path.to_path_buf(), source })
}

/// An unpacked kernel in a temporary file, removed when dropped (after the machine ran).
#[derive(Debug)]
pub struct TempKernel {
    path: PathBuf,
}

impl TempKernel {
    /// Writes `image` to a new private file in `dir`.
    fn write(dir: &Path, image: &[u8]) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("hvrun-{}-{n}.Image", std::process::id()));
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        let temp = TempKernel { path };
        file.write_all(image)?;
        file.sync_all()?;
        Ok(temp)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `plan` with its paths resolved and its kernel checked, unpacked into a temporary file
/// in `temp_dir` when compressed (the file lives as long as the [`TempKernel`]).
pub fn prepare(plan: &LinuxPlan, temp_dir: &Path) -> Result<(LinuxPlan, Option<TempKernel>), Error> {
    let mut plan = plan.clone();
    plan.kernel = canonical("kernel", &plan.kernel)?;
    let kernel = BootFiles::open_with(&VmConfig::new(&plan.kernel), &Images::default())?.kernel;
    let temp = match kernel {
        Blob::File(_) => None,
        Blob::Bytes(unpacked) => {
            // Resolved too: macOS's temporary directory is under /var, a symbolic link.
            let temp_dir = canonical("temporary directory", temp_dir)?;
            let temp = TempKernel::write(&temp_dir, &unpacked.get_ref()[..]).map_err(|source| Error::File {
                what: "unpacked kernel",
                path: temp_dir.clone(),
                source,
            })?;
            plan.kernel = temp.path.clone();
            Some(temp)
        }
    };
    if let Some(initrd) = &plan.initrd {
        plan.initrd = Some(canonical("initrd", initrd)?);
    }
    for disk in &mut plan.disks {
        disk.path = canonical("disk", &disk.path)?;
    }
    for share in &mut plan.shares {
        share.host = canonical("shared directory", &share.host)?;
        if !share.host.is_dir() {
            return Err(Error::File {
                what: "shared directory",
                path: share.host.clone(),
                source: std::io::Error::other("not a directory"),
            });
        }
    }
    Ok((plan, temp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_disk, Backend, ConsoleConfig, ShareConfig};
    use crate::kernel_file::tests::{gzip, image};
    use crate::vz::plan::linux;
    use crate::vz::plan::tests::LIMITS;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hvrun-vzfiles-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn plan(kernel: &Path, f: impl FnOnce(&mut VmConfig)) -> LinuxPlan {
        let mut config = VmConfig {
            backend: Some(Backend::Vz),
            cmdline: Some("console=hvc0".into()),
            console: Some(ConsoleConfig::Terminal),
            ..VmConfig::new(kernel)
        };
        f(&mut config);
        linux(&config, &LIMITS).unwrap()
    }

    /// Issue 15, item 13: paths through symbolic links reach the framework resolved.
    #[test]
    fn paths_reach_the_framework_resolved() {
        let d = dir("links");
        std::fs::write(d.join("Image"), image(4096)).unwrap();
        std::fs::write(d.join("root.img"), vec![0u8; 4096]).unwrap();
        std::fs::create_dir(d.join("src")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("via")).unwrap();
        let via = d.join("via");
        let p = plan(&via.join("Image"), |c| {
            c.disks = vec![parse_disk(&format!("{}", via.join("root.img").display())).unwrap()];
            c.shares = vec![ShareConfig::parse(&format!("{}:src", via.join("src").display())).unwrap()];
        });
        let (ready, temp) = prepare(&p, &d).unwrap();
        let real = std::fs::canonicalize(&d).unwrap();
        assert!(temp.is_none(), "an Image is used where it is");
        assert_eq!(ready.kernel, real.join("Image"));
        assert_eq!(ready.disks[0].path, real.join("root.img"));
        assert_eq!(ready.shares[0].host, real.join("src"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn missing_files_and_bad_kernels_are_clear_errors_before_the_framework() {
        let d = dir("missing");
        std::fs::write(d.join("Image"), image(4096)).unwrap();
        let p = plan(&d.join("Image"), |c| c.disks = vec![parse_disk("/nonexistent/root.img").unwrap()]);
        let err = prepare(&p, &d).unwrap_err().to_string();
        assert!(err.starts_with("cannot read disk /nonexistent/root.img"), "{err}");
        std::fs::write(d.join("junk"), [0x55u8; 4096]).unwrap();
        let err = prepare(&plan(&d.join("junk"), |_| {}), &d).unwrap_err().to_string();
        assert!(err.contains("is not an arm64 Image"), "{err}");
        let p = plan(&d.join("Image"), |c| {
            c.shares = vec![ShareConfig::parse(&format!("{}:t", d.join("Image").display())).unwrap()]
        });
        assert!(prepare(&p, &d).unwrap_err().to_string().contains("not a directory"));
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Issue 15, item 2: a compressed kernel hung the framework's boot loader silently;
    /// the framework now gets the Image inside, from a private temporary file.
    #[test]
    fn a_compressed_kernel_reaches_the_framework_unpacked() {
        let d = dir("gzip");
        let plain = image(100_000);
        std::fs::write(d.join("vmlinuz"), gzip(&plain)).unwrap();
        std::os::unix::fs::symlink(&d, d.join("tmp")).unwrap();
        let (ready, temp) = prepare(&plan(&d.join("vmlinuz"), |_| {}), &d.join("tmp")).unwrap();
        let temp = temp.expect("unpacked");
        assert_eq!(ready.kernel, temp.path());
        assert_eq!(temp.path().parent(), Some(std::fs::canonicalize(&d).unwrap().as_path()), "resolved");
        assert!(std::fs::read(temp.path()).unwrap() == plain);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(temp.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let path = temp.path().to_path_buf();
        drop(temp);
        assert!(!path.exists(), "removed after the run");
        std::fs::remove_dir_all(d).unwrap();
    }
}
