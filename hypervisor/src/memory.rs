//! Guest RAM: anonymous host memory, aligned so hypervisors can map it in large blocks.
//!
//! KVM maps guest memory into stage 2 with 2 MiB blocks only where the host address and
//! the guest address agree modulo 2 MiB and the host backs the range with a transparent
//! huge page; otherwise every 4 KiB page costs its own stage-2 fault. A plain `mmap`
//! (what `vm-memory` does) returns a merely page-aligned address, so [`GuestRam`] maps
//! each region itself at a 2 MiB-aligned address, asks for huge pages on Linux, and
//! hands the mapping to `vm-memory`. It also covers Hypervisor.framework's 16 KiB rule.
//!
//! `vm-memory` does not unmap memory it did not map, so `GuestRam` does, when the last
//! reference goes: backends keep an `Arc<GuestRam>` for as long as they map it.

use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::{Error, Result};

/// Alignment of every host mapping: a PMD-sized block (2 MiB with 4 KiB pages), which is
/// also a multiple of Apple Silicon's 16 KiB pages.
pub const HOST_ALIGN: usize = 2 << 20;

/// Host mappings to unmap on drop.
#[derive(Debug, Default)]
struct Mappings(Vec<(usize, usize)>);

impl Drop for Mappings {
    fn drop(&mut self) {
        for &(addr, len) in &self.0 {
            // SAFETY: `addr..addr + len` is a mapping this struct made and owns; the
            // `GuestMemoryMmap` over it (which never unmaps raw-pointer regions) has
            // already been dropped, as it is declared first in `GuestRam`.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Guest RAM regions and the host memory behind them.
#[derive(Debug)]
pub struct GuestRam {
    // Field order matters: the memory is dropped before the mappings it points into.
    memory: GuestMemoryMmap,
    _mappings: Mappings,
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

impl GuestRam {
    /// RAM at each `(guest address, length)`; lengths must be multiples of [`HOST_ALIGN`]'s
    /// divisor 16 KiB and regions must not overlap.
    pub fn new(ranges: &[(GuestAddress, usize)]) -> Result<Arc<Self>> {
        let mut mappings = Mappings::default();
        let mut regions = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            let fail = |why| Error::Memory { addr: addr.0, size: len as u64, why };
            if len == 0 || len % (16 << 10) != 0 {
                return Err(fail("size is not a positive multiple of 16 KiB"));
            }
            let ptr = map_aligned(len).map_err(|_| fail("the host has no memory for it"))?;
            mappings.0.push((ptr as usize, len));
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: `ptr..ptr + len` is the mapping just made, owned by `mappings`, which
            // outlives the region (see `GuestRam`'s field order).
            let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(ptr) }
                .with_mmap_prot(prot)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|_| fail("vm-memory refused the mapping"))?;
            regions.push(GuestRegionMmap::new(region, addr).ok_or_else(|| fail("region wraps the address space"))?);
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|_| Error::Memory {
            addr: ranges.first().map_or(0, |r| r.0 .0),
            size: 0,
            why: "regions overlap",
        })?;
        Ok(Arc::new(GuestRam { memory, _mappings: mappings }))
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
}
