//! A writer for `cpio -H newc` archives, the format the Linux kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Written here rather than by running `cpio` so the archive can hold device nodes
//! (`/dev/console`, which the kernel opens for init before anything is mounted) without
//! root privileges or a staging directory.

use std::io::{self, Write};

/// Builds a newc archive in memory.
#[derive(Debug, Default)]
pub struct Archive {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Archive { out: Vec::new(), next_ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so archives are reproducible
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data);
        self
    }

    /// Adds a symbolic link `name` pointing to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
        self
    }

    /// Appends the trailer and writes the archive to `w`.
    pub fn finish(mut self, w: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        w.write_all(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_well_formed() {
        let mut a = Archive::new();
        a.dir("/dev").char_dev("dev/console", 5, 1).file("init", 0o755, b"#!/bin/sh\n").symlink("sh", "busybox");
        let mut out = Vec::new();
        a.finish(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // The header of /dev/console carries rdev 5:1.
        let at = out.windows(11).position(|w| w == b"dev/console").unwrap();
        let header = std::str::from_utf8(&out[at - 110..at]).unwrap();
        assert_eq!(&header[0..6], "070701");
        assert_eq!(&header[6 + 9 * 8..6 + 10 * 8], "00000005");
        assert_eq!(&header[6 + 10 * 8..6 + 11 * 8], "00000001");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    /// Cross-checks with the real `cpio` tool when it is installed (it is, after
    /// `cargo xtask setup`): it must list exactly our entries.
    #[test]
    fn gnu_cpio_reads_it() {
        let mut a = Archive::new();
        a.dir("bin").file("bin/x", 0o644, b"hello").symlink("y", "bin/x");
        let mut out = Vec::new();
        a.finish(&mut out).unwrap();
        let mut child = match std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("cpio is needed for this test (cargo xtask setup installs it): {e}"),
        };
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listing = child.wait_with_output().unwrap();
        assert!(listing.status.success());
        assert_eq!(String::from_utf8(listing.stdout).unwrap(), "bin\nbin/x\ny\n");
    }
}
