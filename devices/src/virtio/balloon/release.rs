//! Giving guest memory back to the host: which host pages a guest's range covers, and
//! the one call that drops them.
//!
//! The decisions are portable and tested here: page frame numbers are sorted, deduplicated
//! and merged into ranges ([`coalesce`]); a range must lie wholly inside one region of
//! guest RAM ([`host_range`]); only whole host pages inside it are released
//! ([`inner_pages`]: 4 KiB pages on Linux, 16 KiB on Apple Silicon, whatever the guest's
//! page size), and a deflate asks for the pages touching it back ([`outer_pages`]). The
//! call itself (`advise`, under [`apply`]) is thin: `madvise(MADV_DONTNEED)` on Linux (guest RAM is
//! private memory: anonymous, which reads back as zeros and costs nothing until touched
//! again, or after a snapshot's restore a private mapping of its memory file, which
//! reads back as the file's bytes; the balloon offers no page poisoning, so the guest
//! expects nothing of a reported page's contents), `MADV_FREE_REUSABLE` on macOS (which drops the process's footprint at once,
//! where `MADV_DONTNEED` does not) and `MADV_FREE_REUSE` when the guest takes pages back.

use guest_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// The unit of the balloon's page frame numbers: 4 KiB, whatever the guest's or the host's
/// page size (virtio 1.2, 5.5.6).
pub const PFN_SHIFT: u32 = 12;

/// A guest-physical range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The first byte's guest-physical address.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What to tell the host about a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// The guest gave the memory up (inflate, free page reporting): release it.
    Release,
    /// The guest takes the memory back (deflate): on macOS, account it to hvrun again.
    Reuse,
}

/// Errors releasing memory.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The range is not wholly inside one region of guest RAM.
    #[error("{:#x} (+{:#x}) is not inside guest RAM", .0.start, .0.len)]
    OutsideRam(Range),
    /// The host refused the advice.
    #[error("madvise on {len:#x} bytes failed: {source}")]
    Advice {
        /// How many bytes were advised.
        len: usize,
        /// The host's error.
        source: std::io::Error,
    },
}

/// The host's page size, in bytes.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; it touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

/// Sorts and deduplicates `pfns` (4 KiB frame numbers), and replaces `ranges` with the
/// runs of consecutive frames, as byte ranges.
pub fn coalesce(pfns: &mut [u32], ranges: &mut Vec<Range>) {
    ranges.clear();
    pfns.sort_unstable();
    let page = 1u64 << PFN_SHIFT;
    let mut run: Option<(u64, u64)> = None;
    for &pfn in pfns.iter() {
        let pfn = u64::from(pfn);
        run = match run {
            Some((first, last)) if pfn == last || pfn == last + 1 => Some((first, pfn)),
            Some((first, last)) => {
                ranges.push(Range { start: first << PFN_SHIFT, len: (last - first + 1) * page });
                Some((pfn, pfn))
            }
            None => Some((pfn, pfn)),
        };
    }
    if let Some((first, last)) = run {
        ranges.push(Range { start: first << PFN_SHIFT, len: (last - first + 1) * page });
    }
}

/// The whole `page`-sized pages inside `start..start + len` (host addresses): start
/// rounded up, end rounded down, as `(start, len)`; `None` when no whole page is inside.
/// `page` is a power of two.
pub fn inner_pages(start: u64, len: u64, page: u64) -> Option<(u64, u64)> {
    let end = start.checked_add(len)? & !(page - 1);
    let first = start.checked_add(page - 1)? & !(page - 1);
    (end > first).then(|| (first, end - first))
}

/// The `page`-sized pages touching `start..start + len` (host addresses), rounded out but
/// clipped to `lo..hi` (the region's host mapping), as `(start, len)`; `None` for an
/// empty range. `page` is a power of two.
pub fn outer_pages(start: u64, len: u64, page: u64, (lo, hi): (u64, u64)) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let end = start.checked_add(len)?.checked_add(page - 1)? & !(page - 1);
    let first = (start & !(page - 1)).max(lo);
    let end = end.min(hi);
    (end > first).then(|| (first, end - first))
}

/// Where `range` lives in the host: the host address of its first byte and the host
/// mapping of its region (`lo..hi`). `None` unless the range is non-empty and wholly
/// inside one region.
pub fn host_range(memory: &GuestMemoryMmap, range: Range) -> Option<(u64, (u64, u64))> {
    let last = range.start.checked_add(range.len.checked_sub(1)?)?;
    let region = memory.find_region(GuestAddress(range.start))?;
    let region_start = region.start_addr().0;
    if last - region_start >= region.len() {
        return None;
    }
    let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
    let hi = base.checked_add(region.len())?;
    Some((base + (range.start - region_start), (base, hi)))
}

/// The host pages to advise for `range`, or why none: `Ok(None)` when it holds no whole
/// host page to release (a 4 KiB guest page on a 16 KiB host) or is empty.
pub fn plan(
    memory: &GuestMemoryMmap,
    range: Range,
    advice: Advice,
    page: u64,
) -> Result<Option<(u64, u64)>, ReleaseError> {
    if range.len == 0 {
        return Ok(None);
    }
    let (host, region) = host_range(memory, range).ok_or(ReleaseError::OutsideRam(range))?;
    Ok(match advice {
        Advice::Release => inner_pages(host, range.len, page),
        Advice::Reuse => outer_pages(host, range.len, page, region),
    })
}

/// Releases (or takes back) the host pages of `range`; returns how many bytes were
/// advised. The range is checked against `memory` first ([`plan`]).
pub fn apply(memory: &GuestMemoryMmap, range: Range, advice: Advice, page: u64) -> Result<u64, ReleaseError> {
    let Some((addr, len)) = plan(memory, range, advice, page)? else { return Ok(0) };
    let len = usize::try_from(len).map_err(|_| ReleaseError::OutsideRam(range))?;
    // SAFETY: `addr..addr + len` lies inside a region of `memory` (checked by `plan`), a
    // private anonymous mapping that stays mapped while `memory` is borrowed. Guest
    // memory is only ever reached through raw pointers and volatile accesses (never a
    // Rust reference that assumes its contents), so dropping the pages — they read back
    // as zeros — breaks no invariant of ours; the guest gave them up.
    unsafe { advise(addr as *mut libc::c_void, len, advice) }.map_err(|source| ReleaseError::Advice { len, source })?;
    Ok(len as u64)
}

/// The host call for `advice` on `addr..addr + len`.
///
/// # Safety
/// The range must be page-aligned host memory of a private anonymous mapping whose
/// contents nobody relies on (released pages may read back as zeros).
unsafe fn advise(addr: *mut libc::c_void, len: usize, advice: Advice) -> std::io::Result<()> {
    #[cfg(target_os = "macos")]
    let flag = match advice {
        Advice::Release => libc::MADV_FREE_REUSABLE,
        Advice::Reuse => libc::MADV_FREE_REUSE,
    };
    #[cfg(not(target_os = "macos"))]
    let flag = match advice {
        Advice::Release => libc::MADV_DONTNEED,
        // Linux accounts a page when the guest touches it again: nothing to say.
        Advice::Reuse => return Ok(()),
    };
    // SAFETY: the caller's promise.
    if unsafe { libc::madvise(addr, len, flag) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn ranges(mut pfns: Vec<u32>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        coalesce(&mut pfns, &mut out);
        out.into_iter().map(|r| (r.start, r.len)).collect()
    }

    #[test]
    fn frames_are_sorted_deduplicated_and_merged() {
        assert_eq!(ranges(vec![]), vec![]);
        assert_eq!(
            ranges(vec![5, 3, 4, 4, 10, u32::MAX, 11]),
            vec![(3 << 12, 3 << 12), (10 << 12, 2 << 12), (u64::from(u32::MAX) << 12, 1 << 12)]
        );
        assert_eq!(ranges(vec![7; 100]), vec![(7 << 12, 4096)]);
    }

    #[test]
    fn only_whole_host_pages_inside_are_released() {
        let k16 = 16 << 10;
        assert_eq!(inner_pages(0x1_0000, 0x4000, k16), Some((0x1_0000, 0x4000)));
        assert_eq!(inner_pages(0x1_1000, 0x4000, k16), None, "straddles two 16 KiB pages");
        assert_eq!(inner_pages(0x1_1000, 0x8000, k16), Some((0x1_4000, 0x4000)));
        assert_eq!(inner_pages(0x1_0000, 0x1000, k16), None, "a 4 KiB page on a 16 KiB host");
        assert_eq!(inner_pages(0x1_0000, 0x1000, 4096), Some((0x1_0000, 0x1000)));
        assert_eq!(inner_pages(0x1_0001, 0x1ffe, 4096), None, "unaligned");
        assert_eq!(inner_pages(0, 0, 4096), None);
        assert_eq!(inner_pages(u64::MAX - 10, 100, 4096), None, "no overflow");
    }

    #[test]
    fn reuse_rounds_out_within_the_region() {
        let k16 = 16 << 10;
        let region = (0x10_0000, 0x20_0000);
        assert_eq!(outer_pages(0x10_1000, 0x1000, k16, region), Some((0x10_0000, 0x4000)));
        assert_eq!(outer_pages(0x1f_f000, 0x1000, k16, region), Some((0x1f_c000, 0x4000)));
        assert_eq!(outer_pages(0x10_0000, 0, k16, region), None);
        assert_eq!(outer_pages(u64::MAX - 10, 5, k16, (0, u64::MAX)), None, "no overflow");
    }

    #[test]
    fn ranges_must_lie_inside_one_region() {
        let m =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x4000_0000), 1 << 20), (GuestAddress(0x5000_0000), 1 << 20)])
                .unwrap();
        let inside = Range { start: 0x4000_1000, len: 0x2000 };
        assert!(host_range(&m, inside).is_some());
        let page = 4096;
        for bad in [
            Range { start: 0x400f_f000, len: 0x2000 },   // straddles RAM's end
            Range { start: 0x3fff_f000, len: 0x2000 },   // starts below RAM
            Range { start: 0x4000_0000, len: u64::MAX }, // wraps
            Range { start: u64::from(u32::MAX) << 12, len: 4096 },
            Range { start: 0x400f_f000, len: 0x1000_2000 }, // spans the gap into the next region
        ] {
            assert!(matches!(plan(&m, bad, Advice::Release, page), Err(ReleaseError::OutsideRam(_))), "{bad:?}");
        }
        assert_eq!(host_range(&m, Range { start: 0x4000_0000, len: 0 }), None);
        assert_eq!(plan(&m, Range { start: 0x4000_0000, len: 0 }, Advice::Release, page).unwrap(), None, "empty");
        let (host, (lo, hi)) = host_range(&m, Range { start: 0x5000_0000, len: 1 << 20 }).unwrap();
        assert_eq!((host, hi - lo), (lo, 1 << 20));
    }

    #[test]
    fn released_memory_reads_as_zeros_and_leaves_the_process() {
        let ram = guest_memory::GuestRam::new(&[(GuestAddress(0x4000_0000), 8 << 20)]).unwrap();
        let page = host_page_size();
        ram.write_slice(&vec![0xa5; 8 << 20], GuestAddress(0x4000_0000)).unwrap();
        let whole = Range { start: 0x4000_0000, len: 8 << 20 };
        // Release 4 MiB in the middle, with a ragged start and end.
        let ragged = Range { start: 0x4010_0800, len: (4 << 20) - 0x1000 };
        let released = apply(&ram, ragged, Advice::Release, page).unwrap();
        assert_eq!(released, (4 << 20) - 2 * page);
        // Linux drops the pages at once (they read back as zeros); macOS's reusable pages
        // keep their bytes until the system takes them.
        #[cfg(target_os = "linux")]
        {
            let mut back = vec![0u8; 8 << 20];
            ram.read_slice(&mut back, GuestAddress(0x4000_0000)).unwrap();
            let zeroed = back.iter().filter(|&&b| b == 0).count() as u64;
            assert_eq!(zeroed, released, "exactly the released bytes read back as zeros");
            assert!(back[..0x10_1000].iter().all(|&b| b == 0xa5), "the ragged head is kept");
            let (host, _) = host_range(&ram, whole).unwrap();
            ram.write_slice(&vec![0xa5; 8 << 20], GuestAddress(0x4000_0000)).unwrap();
            assert_eq!(resident(host, 8 << 20, page), (8 << 20) / page, "every page was touched");
            apply(&ram, whole, Advice::Release, page).unwrap();
            assert_eq!(resident(host, 8 << 20, page), 0, "the pages left the process");
        }
        assert_eq!(apply(&ram, whole, Advice::Reuse, page).unwrap() % page, 0);
        ram.write_slice(&[1, 2, 3], GuestAddress(0x4000_0000)).unwrap();
        let mut three = [0u8; 3];
        ram.read_slice(&mut three, GuestAddress(0x4000_0000)).unwrap();
        assert_eq!(three, [1, 2, 3], "released memory is usable again");
    }

    /// How many of the pages at `addr..addr + len` are resident (`mincore`).
    #[cfg(target_os = "linux")]
    fn resident(addr: u64, len: u64, page: u64) -> u64 {
        let mut vec = vec![0u8; (len / page) as usize];
        // SAFETY: `addr..addr + len` is a live mapping (guest RAM held by the caller) and
        // `vec` has a byte for each of its pages.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64
    }
}
