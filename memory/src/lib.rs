//! Guest RAM: anonymous host memory, aligned so hypervisors can map it in large blocks,
//! and the `vm-memory` types every crate of hvrun sees it through.
//!
//! KVM maps guest memory into stage 2 with 2 MiB blocks only where the host address and
//! the guest address agree modulo 2 MiB and the host backs the range with a transparent
//! huge page; otherwise every 4 KiB page costs its own stage-2 fault. A plain `mmap`
//! (what `vm-memory` does) returns a merely page-aligned address, so [`GuestRam`] maps
//! each region itself at a 2 MiB-aligned address, asks for huge pages on Linux, and
//! hands the mapping to `vm-memory`. It also covers Hypervisor.framework's 16 KiB rule.
//!
//! Who unmaps it: `vm-memory` 0.18 never unmaps a mapping it was handed as a raw pointer
//! (`MmapRegionBuilder::with_raw_mmap_pointer` makes it "not owned"), and its regions are
//! reference counted: any clone of a [`GuestMemoryMmap`] (it is `Clone`, and reachable
//! from safe code wherever guest memory is) keeps them alive. So the mapping must live
//! exactly as long as the region, and the one thing a region owns and drops with itself
//! that we choose is its dirty bitmap. [`Mapping`] is that "bitmap": it tracks nothing
//! and unmaps the memory when the region goes. Unmapping any earlier (as this crate once
//! did, when the `GuestRam` went) let a clone read unmapped memory from safe code.

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

pub mod file;
pub mod load;

/// Guest memory as devices, loaders and backends see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Mapping>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<Mapping>;

/// Alignment of every host mapping: a PMD-sized block (2 MiB with 4 KiB pages), which is
/// also a multiple of Apple Silicon's 16 KiB pages.
pub const HOST_ALIGN: usize = 2 << 20;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
#[error("guest memory region at {addr:#x} (+{size:#x}) cannot be mapped: {why}")]
pub struct Error {
    /// Guest-physical address of the region.
    pub addr: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// Why it cannot be mapped.
    pub why: &'static str,
}

/// The host mapping behind a region, unmapped when the region is dropped: the slot of
/// the region's dirty bitmap, which tracks nothing here (see the crate documentation).
/// Regions that `vm-memory` maps itself (`GuestMemoryMmap::from_ranges`, in tests) get
/// one that owns nothing.
#[derive(Debug, Default)]
pub struct Mapping {
    /// Host address and length, when this owns the mapping.
    owned: Option<(usize, usize)>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some((addr, len)) = self.owned {
            // SAFETY: `addr..addr + len` is a mapping `GuestRam::new` made and gave to this
            // value alone. It is dropped with the `MmapRegion` it belongs to, after the
            // last reference to that region (every clone of the guest memory included),
            // so nothing can reach the memory any more.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl WithBitmapSlice<'_> for Mapping {
    type S = ();
}

impl Bitmap for Mapping {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

impl NewBitmap for Mapping {
    fn with_len(_len: usize) -> Self {
        Mapping::default()
    }
}

/// Guest RAM regions and the host memory behind them.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Maps `len` bytes of zeroed anonymous memory at a [`HOST_ALIGN`]-aligned address.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let padded = len.checked_add(HOST_ALIGN).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing touches no
    // existing memory.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), padded, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = (start + HOST_ALIGN - 1) & !(HOST_ALIGN - 1);
    let head = aligned - start;
    let tail = padded - head - len;
    // SAFETY: the head and tail are parts of the mapping just made, outside the aligned
    // range we keep; nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    #[cfg(target_os = "linux")]
    // SAFETY: advice on a range we own; failure (THP disabled) is harmless.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// A region of `len` bytes of fresh host memory at guest address `addr`, owning its
/// mapping.
fn region(addr: GuestAddress, len: usize) -> Result<GuestRegionMmap, Error> {
    region_with(addr, len, |_| Ok(()))
}

/// A region as [`region`] makes it, with `fill` given the fresh mapping's host address
/// before the region exists (to map a file over it); the mapping is unmapped if it fails.
fn region_with(
    addr: GuestAddress,
    len: usize,
    fill: impl FnOnce(*mut u8) -> Result<(), &'static str>,
) -> Result<GuestRegionMmap, Error> {
    let fail = |why| Error { addr: addr.0, size: len as u64, why };
    if len == 0 || len % (16 << 10) != 0 {
        return Err(fail("size is not a positive multiple of 16 KiB"));
    }
    let ptr = map_aligned(len).map_err(|_| fail("the host has no memory for it"))?;
    // From here the mapping belongs to `owner`: dropped on any failure below, or with the
    // region once it exists.
    let owner = Mapping { owned: Some((ptr as usize, len)) };
    fill(ptr).map_err(fail)?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: `ptr..ptr + len` is the mapping just made; `owner`, which the region
    // takes as its bitmap, keeps it mapped for as long as the region exists.
    let mapping = unsafe { MmapRegionBuilder::new_with_bitmap(len, owner).with_raw_mmap_pointer(ptr) }
        .with_mmap_prot(prot)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|_| fail("vm-memory refused the mapping"))?;
    GuestRegionMmap::new(mapping, addr).ok_or_else(|| fail("region wraps the address space"))
}

impl GuestRam {
    /// RAM at each `(guest address, length)`; lengths must be multiples of [`HOST_ALIGN`]'s
    /// divisor 16 KiB and regions must not overlap.
    pub fn new(ranges: &[(GuestAddress, usize)]) -> Result<Arc<Self>, Error> {
        let regions = ranges.iter().map(|&(addr, len)| region(addr, len)).collect::<Result<Vec<_>, _>>()?;
        Self::from_regions(regions, ranges)
    }

    fn from_regions(regions: Vec<GuestRegionMmap>, ranges: &[(GuestAddress, usize)]) -> Result<Arc<Self>, Error> {
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|_| Error {
            addr: ranges.first().map_or(0, |r| r.0 .0),
            size: 0,
            why: "regions overlap",
        })?;
        Ok(Arc::new(GuestRam { memory }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

    #[test]
    fn regions_are_aligned_usable_and_zeroed() {
        let ram =
            GuestRam::new(&[(GuestAddress(0x4000_0000), 6 << 20), (GuestAddress(0x8000_0000), 16 << 10)]).unwrap();
        assert_eq!(ram.num_regions(), 2);
        for region in ram.iter() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HOST_ALIGN, 0);
        }
        let mut buf = [0xffu8; 16];
        ram.read_slice(&mut buf, GuestAddress(0x4000_0000 + (6 << 20) - 16)).unwrap();
        assert_eq!(buf, [0; 16]);
        ram.write_slice(&[1, 2, 3], GuestAddress(0x8000_0000)).unwrap();
        let v: [u8; 3] = ram.read_obj(GuestAddress(0x8000_0000)).unwrap();
        assert_eq!(v, [1, 2, 3]);
        assert!(ram.write_slice(&[1], GuestAddress(0x8000_0000 + (16 << 10))).is_err());
    }

    #[test]
    fn bad_regions_are_refused() {
        assert!(GuestRam::new(&[(GuestAddress(0), 4096)]).is_err());
        assert!(GuestRam::new(&[(GuestAddress(0), 0)]).is_err());
        let overlap = [(GuestAddress(0), 32 << 10), (GuestAddress(16 << 10), 32 << 10)];
        assert!(GuestRam::new(&overlap).is_err());
    }

    #[test]
    fn dropping_the_last_reference_unmaps() {
        let ram = GuestRam::new(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let clone = Arc::clone(&ram);
        drop(ram);
        clone.write_slice(&[7], GuestAddress(0)).unwrap();
        drop(clone);
    }

    /// Issue 12, hole 7: the mapping went with the `GuestRam`, while a clone of its
    /// `GuestMemoryMmap` (a `Clone` type, reachable through `Deref`) could still read it:
    /// a segfault from safe code. The mapping now lives as long as any clone.
    #[test]
    fn a_clone_of_the_memory_outlives_the_guest_ram_safely() {
        let ram = GuestRam::new(&[(GuestAddress(0x4000_0000), 2 << 20)]).unwrap();
        ram.write_slice(&[0x5a; 64], GuestAddress(0x4000_0000)).unwrap();
        let clone: GuestMemoryMmap = (**ram).clone();
        drop(ram);
        let mut back = [0u8; 64];
        clone.read_slice(&mut back, GuestAddress(0x4000_0000)).unwrap();
        assert_eq!(back, [0x5a; 64]);
        clone.write_slice(&[1; 64], GuestAddress(0x4000_0000 + (2 << 20) - 64)).unwrap();
    }
}
