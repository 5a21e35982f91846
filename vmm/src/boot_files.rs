//! Opening and validating the files a boot needs, before anything else happens.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arch_aarch64::image::{ImageHeader, HEAD_SIZE};
use devices::virtio::block::disk::FileDisk;

use crate::{Error, VmConfig};

/// A boot file's contents: an open file, or bytes an embedder handed over
/// ([`crate::VmBuilder::kernel_image`]).
#[derive(Debug)]
pub enum Blob {
    /// A file.
    File(File),
    /// Bytes in memory.
    Bytes(Cursor<Arc<[u8]>>),
}

#[cfg(target_arch = "aarch64")] // for the machine, which only arm64 hosts build
impl Blob {
    /// Where a loader takes its bytes from (the whole file, or the bytes).
    pub fn source(&self) -> guest_memory::load::Source<'_> {
        match self {
            Blob::File(file) => guest_memory::load::Source::File(file, 0),
            Blob::Bytes(bytes) => guest_memory::load::Source::Bytes(bytes.get_ref()),
        }
    }
}

impl Read for Blob {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Blob::File(f) => f.read(buf),
            Blob::Bytes(b) => b.read(buf),
        }
    }
}

impl Seek for Blob {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Blob::File(f) => f.seek(pos),
            Blob::Bytes(b) => b.seek(pos),
        }
    }
}

impl vm_memory::ReadVolatile for Blob {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Blob::File(f) => f.read_volatile(buf),
            Blob::Bytes(b) => b.read_volatile(buf),
        }
    }
}

/// Boot files an embedder gives as bytes, in place of the configuration's paths.
#[derive(Debug, Clone, Default)]
pub struct Images {
    /// The kernel image.
    pub kernel: Option<Arc<[u8]>>,
    /// The initrd.
    pub initrd: Option<Arc<[u8]>>,
}

/// The kernel and initrd, open, with the kernel's header validated.
// On hosts that cannot run guests the files are only validated, never loaded.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
#[derive(Debug)]
pub struct BootFiles {
    /// The kernel image, positioned anywhere.
    pub kernel: Blob,
    /// Size of the kernel file in bytes.
    pub kernel_size: u64,
    /// The kernel's parsed header.
    pub header: ImageHeader,
    /// The initrd and its size, if there is one.
    pub initrd: Option<(Blob, u64)>,
    /// The disks, open and locked, in order.
    pub disks: Vec<FileDisk>,
}

fn open(what: &'static str, path: &Path, bytes: Option<&Arc<[u8]>>) -> Result<(Blob, u64), Error> {
    if let Some(bytes) = bytes {
        return Ok((Blob::Bytes(Cursor::new(Arc::clone(bytes))), bytes.len() as u64));
    }
    let err = |source| Error::File { what, path: path.to_path_buf(), source };
    let file = devices::host_file::open_regular(path, false).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    Ok((Blob::File(file), meta.len()))
}

/// The first [`HEAD_SIZE`] bytes of `kernel` (fewer if it is shorter).
fn read_head(kernel: &mut Blob, path: &Path) -> Result<Vec<u8>, Error> {
    let mut head = Vec::with_capacity(HEAD_SIZE);
    kernel.seek(SeekFrom::Start(0)).map_err(|source| Error::File {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    })?;
    Read::take(&mut *kernel, HEAD_SIZE as u64).read_to_end(&mut head).map_err(|source| Error::File {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(head)
}

impl BootFiles {
    /// Opens the files `config` names and validates the kernel's header.
    #[cfg(test)]
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        Self::open_with(config, &Images::default())
    }

    /// Opens the files `config` names, taking the kernel and initrd from `images` where it
    /// has them (the configuration's paths then only name them in messages), and
    /// validates the kernel's header.
    pub fn open_with(config: &VmConfig, images: &Images) -> Result<Self, Error> {
        let (mut kernel, kernel_size) = open("kernel", &config.kernel, images.kernel.as_ref())?;
        // Judge the size before reading: a "regular" file whose reads block (/proc/kmsg,
        // tracefs pipes) reports 0, and is refused here rather than read.
        if kernel_size < arch_aarch64::image::HEADER_SIZE as u64 {
            return Err(Error::Kernel {
                path: config.kernel.clone(),
                source: arch_aarch64::image::ImageError::Truncated(kernel_size),
            });
        }
        let mut head = read_head(&mut kernel, &config.kernel)?;
        let mut kernel_size = kernel_size;
        let format = crate::kernel_file::detect(&head);
        if let Some(unpacked) = crate::kernel_file::unpack(&mut kernel, kernel_size, &format)
            .map_err(|source| Error::KernelFormat { path: config.kernel.clone(), source })?
        {
            log::info!("kernel {}: {format:?}, unpacked to {} bytes", config.kernel.display(), unpacked.len());
            kernel_size = unpacked.len() as u64;
            kernel = Blob::Bytes(Cursor::new(Arc::from(unpacked)));
            head = read_head(&mut kernel, &config.kernel)?;
        }
        let header = ImageHeader::parse(&head, kernel_size)
            .map_err(|source| Error::Kernel { path: config.kernel.clone(), source })?;
        let initrd = match (&images.initrd, &config.initrd) {
            (Some(bytes), path) => Some(open("initrd", path.as_deref().unwrap_or(Path::new("(memory)")), Some(bytes))?),
            (None, Some(path)) => Some(open("initrd", path, None)?),
            (None, None) => None,
        };
        let disks = open_disks(config)?;
        Ok(BootFiles { kernel, kernel_size, header, initrd, disks })
    }
}

/// The disks `config` names, open and locked, in order.
pub fn open_disks(config: &VmConfig) -> Result<Vec<FileDisk>, Error> {
    config
        .disks
        .iter()
        .map(|d| {
            FileDisk::open(&d.path, d.read_only).map_err(|source| Error::File {
                what: "disk",
                path: d.path.clone(),
                source,
            })
        })
        .collect()
}

/// Opens the image at `path` to take the place of `current`, a disk's image now
/// ([`crate::VmHandle::replace_disk`]), as [`open_disks`] opens disks at boot: locked,
/// read-only as the drive was configured (`read_only`). When `path` is the file `current`
/// has open (the same image, resized since: Firecracker's way to have the guest see a
/// new size), it is opened again through `current`, which holds its lock.
pub fn open_replacement(current: &FileDisk, path: &Path, read_only: bool) -> std::io::Result<FileDisk> {
    if current.is_at(path) {
        current.reopen()
    } else {
        FileDisk::open(path, read_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_file as temp;

    #[test]
    fn missing_and_bad_files_get_clear_errors() {
        let err = BootFiles::open(&VmConfig::new("/nonexistent/Image")).unwrap_err();
        assert_eq!(err.to_string(), "cannot read kernel /nonexistent/Image: No such file or directory (os error 2)");

        let err = BootFiles::open(&VmConfig::new("/")).unwrap_err();
        assert_eq!(err.to_string(), "cannot read kernel /: a directory, not a regular file");

        let empty = temp("empty", b"");
        let err = BootFiles::open(&VmConfig::new(&empty)).unwrap_err();
        assert!(err.to_string().ends_with("is too short to be an arm64 Image (0 bytes)"), "{err}");
        std::fs::remove_file(empty).unwrap();
        let short = temp("short", b"MZ");
        let err = BootFiles::open(&VmConfig::new(&short)).unwrap_err();
        assert!(err.to_string().ends_with("is too short to be an arm64 Image (2 bytes)"), "{err}");

        let junk = temp("junk", &[0x55; 4096]);
        let err = BootFiles::open(&VmConfig::new(&junk)).unwrap_err();
        assert!(err.to_string().contains("is not an arm64 Image"), "{err}");

        let mut image = vec![0u8; 4096];
        image[16] = 0x10; // image_size = 4096
        image[56..60].copy_from_slice(b"ARMd");
        let good = temp("good", &image);
        let files = BootFiles::open(&VmConfig::new(&good)).unwrap();
        assert_eq!(files.kernel_size, 4096);
        let config = VmConfig { initrd: Some("/nonexistent/initrd".into()), ..VmConfig::new(&good) };
        let err = BootFiles::open(&config).unwrap_err();
        assert!(err.to_string().starts_with("cannot read initrd /nonexistent/initrd"), "{err}");
        for p in [short, junk, good] {
            std::fs::remove_file(p).unwrap();
        }
    }

    /// Issue 15: distributions ship arm64 kernels gzip'd (`vmlinuz`); they boot as the
    /// Image inside, and a compression hvrun does not unpack is one clear error.
    #[test]
    fn a_compressed_kernel_is_unpacked_or_refused_clearly() {
        use crate::kernel_file::tests::{gzip, image};
        let plain = image(200_000);
        let packed = temp("vmlinuz.gz", &gzip(&plain));
        let files = BootFiles::open(&VmConfig::new(&packed)).unwrap();
        assert_eq!(files.kernel_size, plain.len() as u64);
        let mut kernel = files.kernel;
        let mut read = Vec::new();
        kernel.seek(SeekFrom::Start(0)).unwrap();
        kernel.read_to_end(&mut read).unwrap();
        assert!(read == plain, "the unpacked Image is what boots");
        let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
        zstd.resize(4096, 0);
        let zstd = temp("vmlinuz.zst", &zstd);
        let err = BootFiles::open(&VmConfig::new(&zstd)).unwrap_err().to_string();
        assert!(err.starts_with("kernel ") && err.contains("compressed with zstd"), "{err}");
        // An embedder's bytes are unpacked the same way.
        let images = Images { kernel: Some(Arc::from(gzip(&plain))), initrd: None };
        assert_eq!(BootFiles::open_with(&VmConfig::new("(memory)"), &images).unwrap().kernel_size, plain.len() as u64);
        for p in [packed, zstd] {
            std::fs::remove_file(p).unwrap();
        }
    }

    /// Issue 12, hole 8: a FIFO given as the kernel, the initrd or a read-only disk made
    /// start-up wait for a writer for ever; each is now one clear error, at once.
    #[test]
    fn fifos_where_files_belong_are_refused_at_once() {
        let fifo = std::env::temp_dir().join(format!("hvrun-test-{}-boot-fifo", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut image = vec![0u8; 4096];
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("fifo-test-Image", &image);
        let configs = [
            VmConfig::new(&fifo),
            VmConfig { initrd: Some(fifo.clone()), ..VmConfig::new(&kernel) },
            VmConfig {
                disks: vec![crate::config::parse_disk(&format!("{},readonly", fifo.display())).unwrap()],
                ..VmConfig::new(&kernel)
            },
        ];
        for config in configs {
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || done.send(BootFiles::open(&config).map(drop).map_err(|e| e.to_string())));
            let err = finished.recv_timeout(std::time::Duration::from_secs(10)).expect("open returned").unwrap_err();
            assert!(err.ends_with("a FIFO, not a regular file"), "{err}");
        }
        std::fs::remove_file(fifo).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    /// A drive's new image is opened as disks are at boot (locked, read-only as the drive
    /// was), and the drive's own file, resized, through the disk that holds its lock.
    #[test]
    fn a_replacement_image_is_opened_as_at_boot_or_through_the_disk_that_has_it() {
        use devices::virtio::block::disk::Disk;
        let (old, new) = (temp("replace-old.img", &[1; 4096]), temp("replace-new.img", &[2; 8192]));
        let current = FileDisk::open(&old, false).unwrap();
        let other = open_replacement(&current, &new, false).unwrap();
        assert_eq!((other.capacity(), other.read_only()), (8192, false));
        assert!(FileDisk::open(&new, true).is_err(), "locked like a disk opened at boot");
        drop(other);
        assert!(open_replacement(&current, &new, true).unwrap().read_only(), "the drive's read-only setting");
        std::fs::OpenOptions::new().write(true).open(&old).unwrap().set_len(16384).unwrap();
        assert_eq!(open_replacement(&current, &old, false).unwrap().capacity(), 16384, "the same file, resized");
        let missing = open_replacement(&current, Path::new("/nonexistent/disk2.img"), false).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        drop(current);
        std::fs::remove_file(old).unwrap();
        std::fs::remove_file(new).unwrap();
    }
}
