//! Loading a large blob (a kernel, an initrd) into guest RAM on several threads.
//!
//! Each byte loaded costs twice: the host kernel zeroes every fresh page of guest RAM on
//! its first touch, then the byte is copied. For Debian's 33 MB arm64 kernel that is most
//! of a VMM's own start (measured in the rig: 100 to 260 ms for the zeroing and as much
//! for the copy, `cargo xtask compare`'s timeline). Both scale with the bytes and with the
//! cores doing them, so [`load`] splits the range into pieces of whole huge pages
//! ([`HOST_ALIGN`]: each thread faults its own) and loads them at once, from a file with
//! `pread` (no shared file offset) or from bytes in memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::{GuestMemoryMmap, HOST_ALIGN};

/// The least a thread is given: below this, starting it costs more than it saves.
const MIN_PIECE: usize = 4 << 20;
/// The most threads one load uses.
const MAX_THREADS: usize = 4;

/// Where the bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A file, from this offset on.
    File(&'a File, u64),
    /// Bytes in memory.
    Bytes(&'a [u8]),
}

/// Loads `len` bytes from `source` into guest memory at `addr`, on up to
/// `min(available cores, 4)` threads. The range must lie in one region of `memory`; a
/// file shorter than `offset + len` is an `UnexpectedEof` error, as are `Bytes` shorter
/// than `len`. On error, part of the range may have been written.
pub fn load(memory: &GuestMemoryMmap, addr: GuestAddress, source: Source<'_>, len: usize) -> io::Result<()> {
    if let Source::Bytes(bytes) = source {
        if bytes.len() < len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The whole range first, so no thread meets a range that is not RAM.
    memory.get_slice(addr, len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pieces = pieces(addr.0, len, cores.min(MAX_THREADS));
    if pieces.len() <= 1 {
        return load_piece(memory, addr, source, 0, len);
    }
    std::thread::scope(|scope| {
        let mut results = Vec::with_capacity(pieces.len());
        let mut workers = Vec::with_capacity(pieces.len());
        for &(at, n) in &pieces {
            let piece = move || load_piece(memory, addr, source, at, n);
            // A thread the host cannot start (a process limit, memory): this one loads
            // the piece itself.
            match std::thread::Builder::new().name("hvrun-load".into()).spawn_scoped(scope, piece) {
                Ok(worker) => workers.push(worker),
                Err(_) => results.push(load_piece(memory, addr, source, at, n)),
            }
        }
        // Every thread is joined before the first error is returned.
        results.extend(
            workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(io::Error::other("a loader thread panicked")))),
        );
        results.into_iter().collect()
    })
}

/// Splits `len` bytes at guest address `addr` into at most `threads` pieces, no more than
/// one per [`MIN_PIECE`] bytes (all of it in one piece if it is smaller), cut at
/// [`HOST_ALIGN`] boundaries of the guest address (so a piece may be up to 2 MiB shorter
/// than an even share): `(offset into the range, length)`.
fn pieces(addr: u64, len: usize, threads: usize) -> Vec<(usize, usize)> {
    let count = threads.clamp(1, (len / MIN_PIECE).max(1));
    let align = HOST_ALIGN as u64;
    let each = (len / count) as u64;
    let mut out = Vec::with_capacity(count);
    let mut start = 0usize;
    for i in 1..=count {
        let end = if i == count {
            len
        } else {
            // The cut, moved up to the next huge-page boundary of the guest address.
            let cut = addr + each * i as u64;
            let aligned = cut.div_ceil(align) * align;
            usize::try_from(aligned - addr).map_or(len, |c| c.min(len))
        };
        if end > start {
            out.push((start, end - start));
            start = end;
        }
    }
    out
}

/// Loads the piece `at..at + n` of the range at `addr`.
fn load_piece(memory: &GuestMemoryMmap, addr: GuestAddress, source: Source<'_>, at: usize, n: usize) -> io::Result<()> {
    let dest = addr.0.checked_add(at as u64).ok_or(io::ErrorKind::InvalidInput)?;
    let slice = memory.get_slice(GuestAddress(dest), n).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match source {
        Source::Bytes(bytes) => {
            slice.copy_from(&bytes[at..at + n]);
            Ok(())
        }
        Source::File(file, offset) => {
            let guard = slice.ptr_guard_mut();
            let base = guard.as_ptr();
            let mut done = 0usize;
            while done < n {
                let pos = offset
                    .checked_add((at + done) as u64)
                    .and_then(|p| libc::off_t::try_from(p).ok())
                    .ok_or(io::ErrorKind::InvalidInput)?;
                // SAFETY: `base..base + n` is the host memory of `slice`, a range of guest
                // RAM that `get_slice` checked and that `memory` keeps mapped for this
                // call; `pread` writes at most `n - done` bytes from `base + done`.
                let got = unsafe { libc::pread(file.as_raw_fd(), base.add(done).cast(), n - done, pos) };
                match got {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    // A positive `ssize_t` fits in `usize`.
                    got if got > 0 => done += got as usize,
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;
    use crate::GuestRam;

    const BASE: u64 = 0x4000_0000;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    fn temp_file(bytes: &[u8]) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("guest-memory-load-{}-{}", std::process::id(), bytes.len()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    #[test]
    fn pieces_cover_the_range_once_at_huge_page_cuts() {
        for (addr, len, threads) in [
            (BASE, 33 << 20, 4),
            (BASE + 0x1000, (33 << 20) + 123, 4),
            (BASE, 3 << 20, 4),
            (BASE, 9 << 20, 2),
            (BASE + 0x20_0000 - 1, 17 << 20, 3),
            (BASE, 1, 4),
        ] {
            let p = pieces(addr, len, threads);
            assert!(!p.is_empty() && p.len() <= threads, "{addr:#x} {len} {p:?}");
            let mut next = 0;
            for (i, &(at, n)) in p.iter().enumerate() {
                assert_eq!(at, next, "{p:?}");
                assert!(n > 0);
                if i > 0 {
                    assert_eq!((addr + at as u64) % HOST_ALIGN as u64, 0, "{p:?}");
                }
                next = at + n;
            }
            assert_eq!(next, len);
        }
        assert_eq!(pieces(BASE, 3 << 20, 4).len(), 1, "a small range is one piece");
        assert_eq!(pieces(BASE, 33 << 20, 4).len(), 4);
    }

    #[test]
    fn a_file_and_bytes_load_exactly_their_range() {
        let ram = GuestRam::new(&[(GuestAddress(BASE), 64 << 20)]).unwrap();
        let data = pattern((21 << 20) + 777);
        let (file, path) = temp_file(&[b"skip".as_slice(), &data].concat());
        let at = GuestAddress(BASE + 0x1000);
        ram.write_slice(&[0xee; 16], GuestAddress(at.0 + data.len() as u64)).unwrap();
        load(&ram, at, Source::File(&file, 4), data.len()).unwrap();
        let mut back = vec![0u8; data.len()];
        ram.read_slice(&mut back, at).unwrap();
        assert!(back == data, "the file's bytes");
        let mut after = [0u8; 16];
        ram.read_slice(&mut after, GuestAddress(at.0 + data.len() as u64)).unwrap();
        assert_eq!(after, [0xee; 16], "nothing written past the range");

        let other = GuestAddress(BASE + (32 << 20));
        load(&ram, other, Source::Bytes(&data), data.len()).unwrap();
        ram.read_slice(&mut back, other).unwrap();
        assert!(back == data, "the bytes");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn short_sources_and_ranges_outside_ram_are_errors() {
        let ram = GuestRam::new(&[(GuestAddress(BASE), 16 << 20)]).unwrap();
        let data = pattern(10 << 20);
        let (file, path) = temp_file(&data);
        let err = load(&ram, GuestAddress(BASE), Source::File(&file, 1), data.len()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = load(&ram, GuestAddress(BASE), Source::Bytes(&data[1..]), data.len()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = load(&ram, GuestAddress(BASE + (8 << 20)), Source::Bytes(&data), data.len()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "past the end of RAM");
        let err = load(&ram, GuestAddress(0), Source::Bytes(&data), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "not RAM");
        std::fs::remove_file(path).unwrap();
    }
}
