//! Opening the files the host names (a kernel, an initrd, a disk image, a console log)
//! without ever blocking. An `open` of a FIFO waits until a peer opens the other end, so
//! a FIFO given where a file belongs would hang hvrun before any vCPU runs, with no
//! error. What a path names is looked at before it is opened (so a device node where a
//! file belongs is never opened: opening some has effects, `/dev/watchdog` arms), then it
//! is opened with `O_NONBLOCK` and looked at again through the descriptor (the path may
//! have changed in between), and only then is the descriptor made blocking.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a file type is called in messages.
fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Clears `O_NONBLOCK`, for the reads and writes that follow.
fn make_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own; only its status flags change.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Refuses `kind` unless it is a regular file.
fn regular(kind: std::fs::FileType) -> io::Result<()> {
    if kind.is_file() {
        return Ok(());
    }
    let what = describe(kind);
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, not a regular file")))
}

/// Opens `path`, which must be a regular file, for reading (and writing with `write`).
pub fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    regular(std::fs::metadata(path)?.file_type())?;
    let file = OpenOptions::new().read(true).write(write).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    regular(file.metadata()?.file_type())?;
    make_blocking(&file)?;
    Ok(file)
}

/// Opens `path` to write output to: a regular file (created or truncated), a character
/// device (a terminal, `/dev/null`) or a FIFO that a reader already holds open.
pub fn open_output(path: &Path) -> io::Result<File> {
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
        if fifo && e.raw_os_error() == Some(libc::ENXIO) {
            io::Error::new(io::ErrorKind::NotConnected, "a FIFO that nobody reads")
        } else {
            e
        }
    })?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        file.set_len(0)?;
    } else if !(kind.is_char_device() || kind.is_fifo()) {
        let what = describe(kind);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: cannot write output there")));
    }
    make_blocking(&file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    }

    /// Issue 12, hole 8: a FIFO given as a kernel, initrd or read-only disk made `open`
    /// wait for a writer for ever. It is refused at once.
    #[test]
    fn a_fifo_where_a_file_belongs_is_refused_at_once() {
        let path = fifo("fifo-input");
        let checked = path.clone();
        let e = crate::virtio::testing::within_deadline("opening a FIFO", move || open_regular(&checked, false))
            .unwrap_err();
        assert_eq!(e.to_string(), "a FIFO, not a regular file");
        let e = open_regular(Path::new("/"), false).unwrap_err();
        assert_eq!(e.to_string(), "a directory, not a regular file");
        // A device node is refused before it is opened (opening some has effects).
        let e = open_regular(Path::new("/dev/null"), true).unwrap_err();
        assert_eq!(e.to_string(), "a character device, not a regular file");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn output_goes_to_files_devices_and_fifos_with_a_reader() {
        let file = std::env::temp_dir().join(format!("hvrun-test-{}-output.log", std::process::id()));
        std::fs::write(&file, b"old contents").unwrap();
        open_output(&file).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new", "truncated");
        open_output(Path::new("/dev/null")).unwrap().write_all(b"gone").unwrap();
        let path = fifo("fifo-output");
        let e = open_output(&path).unwrap_err();
        assert_eq!(e.to_string(), "a FIFO that nobody reads");
        let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).unwrap();
        open_output(&path).unwrap().write_all(b"through").unwrap();
        let mut got = [0u8; 7];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through");
        for p in [file, path] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
