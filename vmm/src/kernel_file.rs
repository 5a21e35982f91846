//! Kernel files as distributions ship them. Every backend boots an uncompressed arm64
//! `Image`; many distributions ship it gzip'd as `vmlinuz` (Ubuntu, Alpine, Arch ARM),
//! and newer kernels built with `CONFIG_EFI_ZBOOT` wrap the compressed Image in a small
//! EFI program (`MZ`, then `zimg` and the payload's place and compression). This module
//! tells them apart from the first bytes and unpacks the gzip kinds, bounded, so
//! `--kernel vmlinuz` works on every backend; other compressions get a one-line error
//! naming the tool that unpacks them. (Virtualization.framework's Linux boot loader on
//! Apple Silicon hangs silently on a compressed kernel, so that backend needs this most.)

use std::io::{Read, Seek, SeekFrom};

/// The most an unpacked kernel may occupy: arm64 Images are tens of MiB, so anything
/// near this is no kernel (and a gzip bomb costs no more than this).
pub const MAX_UNPACKED: u64 = 512 << 20;

/// What a kernel file is, judged from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// An arm64 `Image`, or something that is none of the formats below (the Image
    /// header check then says what is wrong with it).
    Image,
    /// A gzip stream (a gzip'd `Image`).
    Gzip,
    /// An EFI zboot image whose payload, `size` bytes at `offset`, is a gzip stream.
    ZbootGzip {
        /// Where the payload starts in the file.
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// Compressed in a way hvrun does not unpack.
    Unsupported {
        /// The compression (`"xz"`, `"zstd"`, …).
        compression: String,
        /// The command line that unpacks it (`"xz -dc FILE > Image"`).
        how: String,
    },
}

/// Why a compressed kernel cannot be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A compression hvrun does not unpack.
    #[error("is compressed with {compression}, which hvrun does not unpack: boot the uncompressed Image (`{how}`)")]
    Unsupported {
        /// The compression.
        compression: String,
        /// The command line that unpacks it.
        how: String,
    },
    /// The compressed stream is damaged or cut short.
    #[error("is a damaged {what} stream: {source}")]
    Damaged {
        /// `"gzip"` or `"EFI zboot"`.
        what: &'static str,
        /// What the decoder said.
        source: std::io::Error,
    },
    /// The stream unpacks to more than [`MAX_UNPACKED`] bytes.
    #[error("unpacks to more than {} MiB, which is no arm64 kernel", MAX_UNPACKED >> 20)]
    TooLarge,
    /// The zboot header places its payload outside the file.
    #[error(
        "is an EFI zboot image whose payload ({size} bytes at {offset}) lies outside the file ({file_size} bytes)"
    )]
    BadZboot {
        /// The header's payload offset.
        offset: u64,
        /// The header's payload size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
}

fn le32(head: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?)))
}

/// Tells the format from the file's first bytes (64 or more).
pub fn detect(head: &[u8]) -> Format {
    if head.get(56..60) == Some(b"ARM\x64") {
        return Format::Image;
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Format::Gzip;
    }
    if head.starts_with(b"MZ") && head.get(4..8) == Some(b"zimg") {
        // drivers/firmware/efi/libstub/zboot-header.S: payload offset and size at 8 and
        // 12, the compression's name (NUL-padded) from 24.
        let (Some(offset), Some(size)) = (le32(head, 8), le32(head, 12)) else {
            return Format::Image;
        };
        let name: String = head
            .get(24..56)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect();
        if name == "gzip" {
            return Format::ZbootGzip { offset, size };
        }
        // The payload sits inside the EFI program: cut it out, then unpack it.
        let tool = tool_for(&name).unwrap_or("the matching decompressor");
        return Format::Unsupported {
            compression: format!("{name} (an EFI zboot image)"),
            how: format!("tail -c +{} FILE | head -c {size} | {tool} > Image", offset + 1),
        };
    }
    const MAGICS: [(&[u8], &str); 5] = [
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (b"BZh", "bzip2"),
        (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    ];
    for (magic, name) in MAGICS {
        if head.starts_with(magic) {
            let tool = tool_for(name).unwrap_or("the matching decompressor");
            return Format::Unsupported { compression: name.into(), how: format!("{tool} FILE > Image") };
        }
    }
    Format::Image
}

/// The command that unpacks `name` (zboot names carry a level: `zstd22`, `xzkern`).
fn tool_for(name: &str) -> Option<&'static str> {
    const TOOLS: [(&str, &str); 6] = [
        ("zstd", "zstd -dc"),
        ("xz", "xz -dc"),
        ("bzip2", "bzip2 -dc"),
        ("lz4", "lz4 -dc"),
        ("lzma", "xz --format=lzma -dc"),
        ("lzo", "lzop -dc"),
    ];
    TOOLS.iter().find(|(prefix, _)| name.starts_with(prefix)).map(|(_, tool)| *tool)
}

/// Unpacks `file` (`file_size` bytes, in `format`) into memory: `Ok(None)` for an
/// Image, which needs no unpacking.
pub fn unpack<R: Read + Seek>(file: &mut R, file_size: u64, format: &Format) -> Result<Option<Vec<u8>>, FormatError> {
    unpack_at_most(file, file_size, format, MAX_UNPACKED)
}

fn unpack_at_most<R: Read + Seek>(
    file: &mut R,
    file_size: u64,
    format: &Format,
    max: u64,
) -> Result<Option<Vec<u8>>, FormatError> {
    let (what, offset, size) = match *format {
        Format::Image => return Ok(None),
        Format::Unsupported { ref compression, ref how } => {
            return Err(FormatError::Unsupported { compression: compression.clone(), how: how.clone() })
        }
        Format::Gzip => ("gzip", 0, file_size),
        Format::ZbootGzip { offset, size } => {
            if offset.checked_add(size).is_none_or(|end| end > file_size) {
                return Err(FormatError::BadZboot { offset, size, file_size });
            }
            ("EFI zboot", offset, size)
        }
    };
    let damaged = |source| FormatError::Damaged { what, source };
    file.seek(SeekFrom::Start(offset)).map_err(damaged)?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file.take(size)).take(max + 1).read_to_end(&mut out).map_err(damaged)?;
    if out.len() as u64 > max {
        return Err(FormatError::TooLarge);
    }
    Ok(Some(out))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    /// A minimal arm64 Image of `len` bytes (at least 64).
    pub(crate) fn image(len: usize) -> Vec<u8> {
        let mut image: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        image[..64].fill(0);
        image[16] = 0x10; // image_size
        image[56..60].copy_from_slice(b"ARM\x64");
        image
    }

    pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn zboot(payload: &[u8], compression: &str) -> Vec<u8> {
        let mut file = vec![0u8; 512];
        file[..2].copy_from_slice(b"MZ");
        file[4..8].copy_from_slice(b"zimg");
        file[8..12].copy_from_slice(&512u32.to_le_bytes());
        file[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        file[24..24 + compression.len()].copy_from_slice(compression.as_bytes());
        file.extend_from_slice(payload);
        file.extend_from_slice(&[0xee; 100]); // the EFI program's tail
        file
    }

    fn unpacked(file: &[u8]) -> Result<Option<Vec<u8>>, FormatError> {
        unpack(&mut Cursor::new(file), file.len() as u64, &detect(&file[..file.len().min(4096)]))
    }

    #[test]
    fn an_image_needs_no_unpacking() {
        let image = image(8192);
        assert_eq!(detect(&image), Format::Image);
        assert!(unpacked(&image).unwrap().is_none());
    }

    #[test]
    fn a_gzipped_image_unpacks_to_the_image() {
        let image = image(300_000);
        let packed = gzip(&image);
        assert_eq!(detect(&packed), Format::Gzip);
        assert_eq!(unpacked(&packed).unwrap().unwrap(), image);
    }

    #[test]
    fn an_efi_zboot_image_with_a_gzip_payload_unpacks_to_the_image() {
        let image = image(100_000);
        let file = zboot(&gzip(&image), "gzip");
        assert_eq!(detect(&file), Format::ZbootGzip { offset: 512, size: (file.len() - 612) as u64 });
        assert_eq!(unpacked(&file).unwrap().unwrap(), image);
    }

    #[test]
    fn other_compressions_are_named_with_the_tool_that_unpacks_them() {
        let err = unpacked(&zboot(&[1, 2, 3], "zstd22")).unwrap_err().to_string();
        assert!(err.contains("zstd22 (an EFI zboot image)"), "{err}");
        assert!(err.contains("`tail -c +513 FILE | head -c 3 | zstd -dc > Image`"), "{err}");
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.resize(64, 0);
        assert!(unpacked(&xz).unwrap_err().to_string().contains("`xz -dc FILE > Image`"));
        let mut bz = b"BZh9".to_vec();
        bz.resize(64, 0);
        assert!(unpacked(&bz).unwrap_err().to_string().contains("bzip2"));
    }

    #[test]
    fn damaged_truncated_and_lying_files_are_errors_not_panics() {
        let packed = gzip(&image(200_000));
        let cut = &packed[..packed.len() / 2];
        assert!(matches!(unpacked(cut), Err(FormatError::Damaged { what: "gzip", .. })));
        let mut garbage = packed.clone();
        garbage[20..200].fill(0x55);
        assert!(matches!(unpacked(&garbage), Err(FormatError::Damaged { .. })));
        // A zboot header whose payload runs past the end of the file.
        let mut lying = zboot(&gzip(&image(1000)), "gzip");
        lying[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpacked(&lying), Err(FormatError::BadZboot { .. })));
        // Short heads never index out of bounds.
        for len in 0..70 {
            let _ = detect(&lying[..len]);
        }
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_bound() {
        // 8 MiB of zeros compress to a few KiB; the bound (here 1 MiB) stops the output.
        let bomb = gzip(&vec![0u8; 8 << 20]);
        assert!(bomb.len() < 64 << 10);
        let got = unpack_at_most(&mut Cursor::new(&bomb), bomb.len() as u64, &Format::Gzip, 1 << 20);
        assert!(matches!(got, Err(FormatError::TooLarge)), "{got:?}");
        assert_eq!(
            unpack_at_most(&mut Cursor::new(&bomb), bomb.len() as u64, &Format::Gzip, 8 << 20).unwrap().unwrap().len(),
            8 << 20
        );
    }
}
