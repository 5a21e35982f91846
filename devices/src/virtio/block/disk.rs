//! What a virtio-blk device reads and writes: a [`Disk`]. [`FileDisk`] is a raw image
//! file, which also serves many requests at once ([`SharedDisk`]); [`MemDisk`] lives in
//! memory (tests and benchmarks).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

pub use super::buffers::GuestBuffers;

/// Storage behind a block device, addressed in bytes.
pub trait Disk: Send {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills the guest's buffers `bufs` from `offset` directly, with no copy through the
    /// device; `None` when this disk cannot (the device then copies through a buffer).
    fn read_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        let _ = (bufs, offset);
        None
    }
    /// Writes the guest's buffers `bufs` at `offset` directly; `None` as for `read_guest`.
    fn write_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        let _ = (bufs, offset);
        None
    }
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// A hint that `len` bytes at `offset` are no longer needed (DISCARD): what they read
    /// back as is unspecified. Deallocates them where the disk can, and otherwise does
    /// nothing (it never writes zeros in their place, which could take a while).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }
    /// The same disk as a [`SharedDisk`], when it can serve requests from several threads
    /// at once: the device then serves a queue's requests in parallel and offers a queue
    /// per vCPU (`VIRTIO_BLK_F_MQ`). `None` (the default): one request at a time, on one
    /// queue, through this trait's `&mut self` methods.
    fn shared(&self) -> Option<Arc<dyn SharedDisk>> {
        None
    }
}

/// A disk that serves requests from any number of threads at once (positional reads and
/// writes need no lock). Its capacity and whether it is read-only are the [`Disk`]'s
/// that offered it.
pub trait SharedDisk: Send + Sync {
    /// Fills `bufs` from `offset`.
    fn read_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()>;
    /// Writes `bufs` at `offset`.
    fn write_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()>;
    /// Makes durable every write that completed before the call (whichever thread made
    /// it).
    fn flush(&self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// A hint that `len` bytes at `offset` are no longer needed (see [`Disk::discard`]).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A raw disk image file, locked against other writers. Its requests can be served from
/// many threads at once ([`Disk::shared`]).
#[derive(Debug, Clone)]
pub struct FileDisk {
    image: Arc<FileImage>,
}

/// The open image behind a [`FileDisk`] and its shared handles; the lock goes with the
/// last of them.
#[derive(Debug)]
struct FileImage {
    file: File,
    capacity: u64,
    read_only: bool,
}

impl FileDisk {
    /// Opens `path`; read-only or read-write. Takes an advisory lock (`flock`): shared
    /// for read-only, exclusive otherwise, so two VMs cannot both write one image.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = crate::host_file::open_regular(path, !read_only)?;
        let meta = file.metadata()?;
        let mode = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::WouldBlock, "another process has it open for writing (locked)")
            } else {
                e
            });
        }
        Ok(FileDisk { image: Arc::new(FileImage { file, capacity: meta.len(), read_only }) })
    }

    /// Whether `path` names the file this disk has open (the same device and inode),
    /// which [`FileDisk::open`] would find locked by this very disk.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.image.file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
            _ => false,
        }
    }

    /// The same image again, with its size as it is now (the file grew or shrank since it
    /// was opened): a new descriptor for the same open file, so it shares the lock.
    pub fn reopen(&self) -> io::Result<FileDisk> {
        let file = self.image.file.try_clone()?;
        let capacity = file.metadata()?.len();
        Ok(FileDisk { image: Arc::new(FileImage { file, capacity, read_only: self.image.read_only }) })
    }
}

impl Disk for FileDisk {
    fn capacity(&self) -> u64 {
        self.image.capacity
    }

    fn read_only(&self) -> bool {
        self.image.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image.file.write_all_at(buf, offset)
    }

    fn read_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        Some(self.image.read_guest(bufs, offset))
    }

    fn write_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        Some(self.image.write_guest(bufs, offset))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len)
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.image.punch_hole(offset, len)
    }

    fn shared(&self) -> Option<Arc<dyn SharedDisk>> {
        Some(self.image.clone())
    }
}

impl SharedDisk for FileImage {
    fn read_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: the pieces lie in guest memory that stays mapped while `bufs` exists;
        // preadv writes at most their lengths into them.
        vectored_at(bufs, offset, io::ErrorKind::UnexpectedEof, |v, at| unsafe {
            libc::preadv(fd, v.as_ptr(), v.len() as libc::c_int, at)
        })
    }

    fn write_guest(&self, bufs: &mut GuestBuffers<'_>, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: as above; pwritev only reads the pieces.
        vectored_at(bufs, offset, io::ErrorKind::WriteZero, |v, at| unsafe {
            libc::pwritev(fd, v.as_ptr(), v.len() as libc::c_int, at)
        })
    }

    fn flush(&self) -> io::Result<()> {
        // fdatasync on Linux; on macOS std uses F_FULLFSYNC, which reaches the medium.
        // Either covers every write to the file that returned before it, on any thread.
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Err(e) = punch_hole(&self.file, offset, len) {
            log::debug!("virtio-blk: discard not passed on to the image file: {e}");
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_hole(&self.file, offset, len).or_else(|_| {
            // The filesystem cannot punch holes: write the zeros instead.
            static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        })
    }
}

/// Repeats a positional vectored call until every byte of `bufs` is done (short reads and
/// writes happen); `short` is the error when the call makes no progress.
fn vectored_at(
    iov: &mut GuestBuffers<'_>,
    mut offset: u64,
    short: io::ErrorKind,
    call: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<()> {
    while !iov.is_empty() {
        let at = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let n = call(iov.iovecs(), at);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(short));
        }
        iov.advance(n as usize);
        offset += n as u64;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (offset as libc::off_t, len as libc::off_t);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own, with a range inside the file.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(target_os = "macos")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let args = libc::fpunchhole_t {
        fp_flags: 0,
        reserved: 0,
        fp_offset: offset as libc::off_t,
        fp_length: len as libc::off_t,
    };
    // SAFETY: F_PUNCHHOLE takes a pointer to an fpunchhole_t that lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_PUNCHHOLE, &args) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// A disk in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemDisk {
    /// The contents.
    pub bytes: Vec<u8>,
    /// Whether writes are refused.
    pub read_only: bool,
    /// How many flushes it has seen.
    pub flushes: u64,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let end = start.checked_add(len).filter(|&e| e <= self.bytes.len());
        end.map(|end| start..end).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }
}

impl Disk for MemDisk {
    fn capacity(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        self.bytes[range].copy_from_slice(buf);
        Ok(())
    }
    fn read_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        Some(self.range(offset, bufs.len()).map(|range| {
            bufs.fill_from(&self.bytes[range]);
        }))
    }
    fn write_guest(&mut self, bufs: &mut GuestBuffers<'_>, offset: u64) -> Option<io::Result<()>> {
        Some(self.range(offset, bufs.len()).map(|range| {
            bufs.drain_into(&mut self.bytes[range]);
        }))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let range = self.range(offset, len)?;
        self.bytes[range].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("hvrun-disk-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn file_disk_reads_writes_flushes_and_punches() {
        let path = image("rw", &[7u8; 8192]);
        let mut disk = FileDisk::open(&path, false).unwrap();
        assert_eq!(disk.capacity(), 8192);
        disk.write_at(&[1, 2, 3], 4096).unwrap();
        disk.flush().unwrap();
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 4095).unwrap();
        assert_eq!(buf, [7, 1, 2, 3]);
        disk.punch_hole(4096, 4096).unwrap();
        disk.read_at(&mut buf, 4095).unwrap();
        assert_eq!(buf, [7, 0, 0, 0]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192, "punching keeps the size");
        assert!(disk.read_at(&mut buf, 8190).is_err(), "reads past the end fail");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_writer_locks_others_out() {
        let path = image("lock", &[0u8; 512]);
        let first = FileDisk::open(&path, false).unwrap();
        let err = FileDisk::open(&path, false).unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
        assert!(FileDisk::open(&path, true).is_err(), "no reader while a writer holds it");
        drop(first);
        let _a = FileDisk::open(&path, true).unwrap();
        let _b = FileDisk::open(&path, true).expect("readers share");
        std::fs::remove_file(path).unwrap();
    }

    /// PATCH /drives with the drive's own path (its file resized): the file is open and
    /// locked by the disk, so it is opened again through the disk, sharing its lock.
    #[test]
    fn a_disk_reopened_sees_its_new_size_and_keeps_the_lock() {
        let path = image("reopen", &[3u8; 4096]);
        let disk = FileDisk::open(&path, false).unwrap();
        assert!(disk.is_at(&path));
        assert!(!disk.is_at(&std::env::temp_dir()), "another file");
        assert!(!disk.is_at(Path::new("/nonexistent/hvrun")), "no file");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8192).unwrap();
        assert!(FileDisk::open(&path, false).is_err(), "locked by the disk");
        let mut again = disk.reopen().unwrap();
        assert_eq!((disk.capacity(), again.capacity()), (4096, 8192));
        assert!(!again.read_only());
        drop(disk);
        again.write_at(&[9], 8191).unwrap();
        assert!(FileDisk::open(&path, true).is_err(), "the lock stays with the disk reopened");
        drop(again);
        FileDisk::open(&path, false).expect("the lock goes with the last descriptor");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_files_open_without_write_access() {
        let path = image("ro", &[0u8; 512]);
        let mut disk = FileDisk::open(&path, true).unwrap();
        assert!(disk.read_only());
        assert!(disk.write_at(&[1], 0).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
