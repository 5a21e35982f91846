//! Guest RAM as a file, for snapshots: [`save`] writes every region into one file, one
//! after another, with holes where a page holds only zeros; [`GuestRam::from_file`] maps
//! such a file back copy-on-write (`MAP_PRIVATE`), so a restore reads no page before the
//! guest touches it, its writes never reach the file, and any number of restored VMs
//! can share one file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{region_with, Error, GuestMemoryMmap, GuestRam};

/// The unit checked for zeros: the smallest host page (a hole is at least one).
const PAGE: usize = 4096;
/// Bytes read from guest memory at a time.
const CHUNK: usize = 2 << 20;

/// Writes every region of `memory` into `file`, from offset 0, in address order, and sets
/// its length to their total; pages of zeros are left as holes. Returns the bytes
/// written (the rest are holes). The guest must not run meanwhile.
pub fn save(memory: &GuestMemoryMmap, file: &File) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut written = 0u64;
    file.set_len(0)?;
    for region in memory.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..n];
            memory
                .read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            written += write_nonzero(file, chunk, offset + done)?;
            done += n as u64;
        }
        offset += len;
    }
    file.set_len(offset)?;
    Ok(written)
}

/// Writes the runs of pages of `chunk` that are not all zeros at `at` + their place.
fn write_nonzero(file: &File, chunk: &[u8], at: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    for (i, page) in chunk.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        match (run, zero) {
            (None, false) => run = Some(i * PAGE),
            (Some(start), true) => {
                file.write_all_at(&chunk[start..i * PAGE], at + start as u64)?;
                written += (i * PAGE - start) as u64;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&chunk[start..], at + start as u64)?;
        written += (chunk.len() - start) as u64;
    }
    Ok(written)
}

impl GuestRam {
    /// RAM at each `(guest address, length)` (as [`GuestRam::new`] takes them), its bytes
    /// those of `file` as [`save`] wrote it, mapped copy-on-write: nothing is read until
    /// the guest touches a page. A file shorter than the regions is refused.
    pub fn from_file(ranges: &[(GuestAddress, usize)], file: &File) -> Result<Arc<Self>, Error> {
        let total: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size < total {
            let addr = ranges.first().map_or(0, |r| r.0 .0);
            return Err(Error { addr, size: total, why: "the memory file is shorter than guest RAM" });
        }
        let mut offset = 0u64;
        let mut regions = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            let at = offset;
            regions.push(region_with(addr, len, |ptr| map_file(ptr, len, file, at))?);
            offset += len as u64;
        }
        Self::from_regions(regions, ranges)
    }
}

/// Maps `len` bytes of `file` from `offset` over the mapping at `ptr`, copy-on-write.
fn map_file(ptr: *mut u8, len: usize, file: &File, offset: u64) -> Result<(), &'static str> {
    let offset = libc::off_t::try_from(offset).map_err(|_| "the memory file is too large")?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE;
    // SAFETY: `ptr..ptr + len` is a mapping this crate just made and owns (no reference
    // into it exists yet); MAP_FIXED replaces it with the file's pages.
    let mapped = unsafe { libc::mmap(ptr.cast(), len, prot, flags, file.as_raw_fd(), offset) };
    if mapped == libc::MAP_FAILED {
        return Err("the memory file cannot be mapped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("hvrun-memfile-{}-{name}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn saved_memory_comes_back_copy_on_write_with_holes_for_zeros() {
        let ranges = [(GuestAddress(0x4000_0000), 4 << 20), (GuestAddress(0x8000_0000), 2 << 20)];
        let ram = GuestRam::new(&ranges).unwrap();
        ram.write_slice(&[0x11; 10], GuestAddress(0x4000_1000)).unwrap();
        ram.write_slice(&[0x22; 5000], GuestAddress(0x4000_0000 + (4 << 20) - 5000)).unwrap();
        ram.write_slice(&[0x33; 3], GuestAddress(0x8000_0000 + (2 << 20) - 3)).unwrap();
        let file = temp("cow");
        let written = save(&ram, &file).unwrap();
        assert_eq!(written, 4 * 4096, "one page, two pages across a boundary, one page");
        assert_eq!(file.metadata().unwrap().len(), 6 << 20);
        assert!(file.metadata().unwrap().blocks() * 512 < 1 << 20, "the zeros are holes");

        let back = GuestRam::from_file(&ranges, &file).unwrap();
        let read = |at: u64, n: usize| {
            let mut buf = vec![0u8; n];
            back.read_slice(&mut buf, GuestAddress(at)).unwrap();
            buf
        };
        assert_eq!(read(0x4000_1000, 11), [[0x11; 10].as_slice(), &[0]].concat());
        assert_eq!(read(0x4000_0000 + (4 << 20) - 5000, 5000), vec![0x22; 5000]);
        assert_eq!(read(0x8000_0000 + (2 << 20) - 4, 4), [0, 0x33, 0x33, 0x33]);
        // The restored guest's writes stay its own.
        back.write_slice(&[0x44; 8], GuestAddress(0x4000_1000)).unwrap();
        let again = GuestRam::from_file(&ranges, &file).unwrap();
        let mut first = [0u8; 8];
        again.read_slice(&mut first, GuestAddress(0x4000_1000)).unwrap();
        assert_eq!(first, [0x11; 8]);
    }

    #[test]
    fn a_memory_file_shorter_than_ram_is_refused() {
        let file = temp("short");
        file.set_len(2 << 20).unwrap();
        let e = GuestRam::from_file(&[(GuestAddress(0), 4 << 20)], &file).unwrap_err();
        assert!(e.to_string().contains("shorter than guest RAM"), "{e}");
    }
}
