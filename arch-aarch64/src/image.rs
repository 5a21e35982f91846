//! The arm64 Linux `Image` header (Documentation/arch/arm64/booting.rst) and where a
//! boot places the kernel, the initrd and the device tree in RAM.
//!
//! This module validates the header (so a wrong file gets a clear error on any host,
//! before anything is loaded) and plans the placement, including the kernel's BSS; the
//! VMM then copies the file to [`BootPlan::kernel_entry`] (`guest_memory::load`).

use crate::layout::{align_down, align_up, FDT_MAX_SIZE, KERNEL_ALIGN, PAGE_SIZE};

/// Size of the arm64 Image header.
pub const HEADER_SIZE: usize = 64;
/// How much of the file [`ImageHeader::parse`] wants to see: the Image header and, for
/// EFI-stub kernels, the PE/COFF headers and section table behind it.
pub const HEAD_SIZE: usize = 4096;
/// The header's magic, "ARM\x64", little-endian at offset 56.
pub const MAGIC: u32 = 0x644d_5241;
/// The text offset to assume when `image_size` is zero (kernels before 3.17).
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// Errors in a kernel image or its placement.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// The file is shorter than the header.
    #[error("is too short to be an arm64 Image ({0} bytes)")]
    Truncated(u64),
    /// The magic number is wrong.
    #[error("is not an arm64 Image (no \"ARM\\x64\" magic at offset 56)")]
    BadMagic,
    /// The header asks for a big-endian kernel.
    #[error("is a big-endian arm64 Image, which hvrun does not boot")]
    BigEndian,
    /// The file is shorter than its own PE/COFF section table says.
    #[error("is truncated: {file_size} bytes, but its PE/COFF header says {expected}")]
    ShorterThanHeader {
        /// Size of the file.
        file_size: u64,
        /// Size its sections need.
        expected: u64,
    },
    /// The header's text offset is absurd.
    #[error("has an implausible text offset {0:#x} in its arm64 Image header")]
    BadTextOffset(u64),
    /// The kernel, initrd and device tree do not fit in RAM.
    #[error(
        "does not fit in guest RAM with its initrd and device tree: {needed:#x} bytes needed, {available:#x} available"
    )]
    DoesNotFit {
        /// Bytes of RAM the boot needs.
        needed: u64,
        /// Bytes of RAM there are.
        available: u64,
    },
}

/// What the header says about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB-aligned base at which the image must be loaded.
    pub text_offset: u64,
    /// Bytes the loaded image occupies, BSS included (0 for pre-3.17 kernels).
    pub image_size: u64,
    /// Header flags (bit 0: big-endian; bits 2:1 page size; bit 3 placement).
    pub flags: u64,
}

impl ImageHeader {
    /// Parses and validates the header of a `file_size`-byte image from its first bytes
    /// (up to [`HEAD_SIZE`] of them; at least [`HEADER_SIZE`]).
    pub fn parse(head: &[u8], file_size: u64) -> Result<Self, ImageError> {
        let head_all = head;
        let head = head.get(..HEADER_SIZE).ok_or(ImageError::Truncated(file_size))?;
        let le64 = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
        let magic = u32::from_le_bytes(head[56..60].try_into().unwrap_or([0; 4]));
        if magic != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let (mut text_offset, image_size, flags) = (le64(8), le64(16), le64(24));
        if image_size == 0 {
            text_offset = LEGACY_TEXT_OFFSET;
        }
        if flags & 1 != 0 {
            return Err(ImageError::BigEndian);
        }
        if text_offset >= KERNEL_ALIGN * 512 {
            // No real kernel asks for a text offset of a gigabyte; refusing it keeps
            // every later sum far from overflow.
            return Err(ImageError::BadTextOffset(text_offset));
        }
        if let Some(expected) = pe_file_size(head_all, &head[60..64]) {
            if file_size < expected {
                return Err(ImageError::ShorterThanHeader { file_size, expected });
            }
        }
        Ok(ImageHeader { text_offset, image_size, flags })
    }

    /// Bytes the kernel occupies once loaded: its BSS or the file, whichever is larger.
    pub fn loaded_size(&self, file_size: u64) -> u64 {
        self.image_size.max(file_size)
    }
}

/// For an EFI-stub kernel, the file size its PE/COFF section table implies: the end of
/// the last section's raw data. `pe_offset` is the Image header's `res5` field (the
/// offset of the "PE\0\0" signature). `None` when there is no readable PE header.
fn pe_file_size(head: &[u8], pe_offset: &[u8]) -> Option<u64> {
    let le16 = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?) as usize);
    let le32 = |at: usize| Some(u64::from(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?)));
    let pe = u32::from_le_bytes(pe_offset.try_into().ok()?) as usize;
    if pe == 0 || head.get(pe..pe + 4)? != b"PE\0\0" {
        return None;
    }
    // COFF header: NumberOfSections at +6, SizeOfOptionalHeader at +20, 24 bytes in all
    // with the signature; the section table (40 bytes an entry) follows the optional header.
    let sections = le16(pe + 6)?;
    let table = pe + 24 + le16(pe + 20)?;
    (0..sections)
        .map(|i| {
            let entry = table + 40 * i;
            // SizeOfRawData at +16, PointerToRawData at +20.
            Some(le32(entry + 16)? + le32(entry + 20)?)
        })
        .try_fold(0, |end: u64, section| section.map(|s| end.max(s)))
}

/// Where a boot puts things in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPlan {
    /// The 2 MiB-aligned base handed to the loader; the kernel starts at `+ text_offset`.
    pub kernel_base: u64,
    /// The kernel's entry point (its first byte).
    pub kernel_entry: u64,
    /// First byte past the kernel's image, BSS included.
    pub kernel_end: u64,
    /// The initrd's guest-physical address, if there is one.
    pub initrd: Option<u64>,
    /// The device tree's guest-physical address.
    pub fdt: u64,
}

/// Plans a boot: the kernel at the start of RAM, the device tree in the last 2 MiB, the
/// initrd page-aligned just below it, and nothing overlapping.
pub fn plan(
    ram_base: u64,
    ram_size: u64,
    header: &ImageHeader,
    kernel_file_size: u64,
    initrd_size: Option<u64>,
) -> Result<BootPlan, ImageError> {
    let needed = header
        .text_offset
        .saturating_add(header.loaded_size(kernel_file_size))
        .saturating_add(initrd_size.map_or(0, |s| align_up(s, PAGE_SIZE).unwrap_or(u64::MAX)))
        .saturating_add(FDT_MAX_SIZE);
    let too_big = ImageError::DoesNotFit { needed, available: ram_size };
    if needed > ram_size || ram_base % KERNEL_ALIGN != 0 {
        return Err(too_big);
    }
    let kernel_entry = ram_base + header.text_offset;
    let kernel_end = kernel_entry + header.loaded_size(kernel_file_size);
    let fdt = ram_base + ram_size - FDT_MAX_SIZE;
    let initrd = match initrd_size {
        Some(size) => {
            let at = align_down(fdt - size, PAGE_SIZE);
            if at < kernel_end {
                return Err(too_big);
            }
            Some(at)
        }
        None => None,
    };
    Ok(BootPlan { kernel_base: ram_base, kernel_entry, kernel_end, initrd, fdt })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(&MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn parses_a_modern_header() {
        let h = ImageHeader::parse(&header(0, 0x200_0000, 0xa), 0x150_0000).unwrap();
        assert_eq!(h, ImageHeader { text_offset: 0, image_size: 0x200_0000, flags: 0xa });
        assert_eq!(h.loaded_size(0x150_0000), 0x200_0000);
    }

    #[test]
    fn legacy_header_gets_the_old_text_offset() {
        let h = ImageHeader::parse(&header(0x1234, 0, 0), 4096).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
        assert_eq!(h.loaded_size(4096), 4096);
    }

    #[test]
    fn rejects_bad_images() {
        assert_eq!(ImageHeader::parse(&[0; 10], 10), Err(ImageError::Truncated(10)));
        assert_eq!(ImageHeader::parse(&[0; 64], 64), Err(ImageError::BadMagic));
        assert_eq!(ImageHeader::parse(&header(0, 4096, 1), 4096), Err(ImageError::BigEndian));
        assert_eq!(ImageHeader::parse(&header(u64::MAX, 4096, 0), 4096), Err(ImageError::BadTextOffset(u64::MAX)));
    }

    /// An Image with a PE/COFF header at 0x40 and two sections, the last ending at `end`.
    fn efi_image(end: u32) -> Vec<u8> {
        let mut h = header(0, 0x10_0000, 0);
        h.resize(0x200, 0);
        h[60..64].copy_from_slice(&0x40u32.to_le_bytes());
        h[0x40..0x44].copy_from_slice(b"PE\0\0");
        h[0x46..0x48].copy_from_slice(&2u16.to_le_bytes()); // sections
        h[0x54..0x56].copy_from_slice(&0x20u16.to_le_bytes()); // optional header size
        let table = 0x40 + 24 + 0x20;
        for (i, (ptr, size)) in [(0x1000u32, 0x2000u32), (0x3000, end - 0x3000)].iter().enumerate() {
            let e = table + 40 * i;
            h[e + 16..e + 20].copy_from_slice(&size.to_le_bytes());
            h[e + 20..e + 24].copy_from_slice(&ptr.to_le_bytes());
        }
        h
    }

    #[test]
    fn efi_stub_kernels_are_checked_for_truncation() {
        let head = efi_image(0x8000);
        assert!(ImageHeader::parse(&head, 0x8000).is_ok());
        assert_eq!(
            ImageHeader::parse(&head, 0x7fff),
            Err(ImageError::ShorterThanHeader { file_size: 0x7fff, expected: 0x8000 })
        );
        // A PE offset pointing past what we read, or at garbage, is no evidence either way.
        let mut odd = head.clone();
        odd[60..64].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(ImageHeader::parse(&odd, 10).is_ok());
        let mut cut = head;
        cut.truncate(0x60);
        assert!(ImageHeader::parse(&cut, 10).is_ok());
    }

    #[test]
    fn plan_places_fdt_at_the_top_and_initrd_below_it() {
        let h = ImageHeader::parse(&header(0, 0x200_0000, 0), 0x100_0000).unwrap();
        let ram = 0x4000_0000;
        let p = plan(ram, 256 << 20, &h, 0x100_0000, Some(0x12345)).unwrap();
        assert_eq!(p.kernel_entry, ram);
        assert_eq!(p.kernel_end, ram + 0x200_0000);
        assert_eq!(p.fdt, ram + (256 << 20) - FDT_MAX_SIZE);
        let initrd = p.initrd.unwrap();
        assert_eq!(initrd % PAGE_SIZE, 0);
        assert!(initrd + 0x12345 <= p.fdt && initrd >= p.kernel_end);
    }

    #[test]
    fn plan_rejects_what_does_not_fit() {
        let h = ImageHeader::parse(&header(0, 0x300_0000, 0), 0x100_0000).unwrap();
        // The kernel's BSS alone overlaps the device tree in 48 MiB + 1 MiB of RAM.
        assert!(matches!(plan(0x4000_0000, 49 << 20, &h, 0x100_0000, None), Err(ImageError::DoesNotFit { .. })));
        // An initrd that would overlap the BSS.
        assert!(plan(0x4000_0000, 64 << 20, &h, 0x100_0000, Some(20 << 20)).is_err());
        assert!(plan(0x4000_0000, 64 << 20, &h, 0x100_0000, Some(u64::MAX)).is_err());
        assert!(plan(0x4000_0000, 64 << 20, &h, 0x100_0000, Some(8 << 20)).is_ok());
    }
}
