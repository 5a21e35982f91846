//! The snapshot's state file: a versioned container of named sections, each with its own
//! checksum, and a trailer with a checksum over the whole file, so a snapshot that was
//! truncated (at a section boundary too) or corrupted is refused before any of it is
//! used.
//!
//! ```text
//! magic "HVRUNSNP" | format version (u32 LE) | section count (u32 LE)
//! per section: name length (u8) | name (UTF-8) | payload length (u64 LE)
//!              | CRC-32 of name and payload (u32 LE) | payload
//! trailer: "HVRUNEND" | CRC-32 of every byte before the trailer (u32 LE)
//! ```
//!
//! Payloads are `serde` values encoded with `postcard`. The version is checked first, so
//! a snapshot from another hvrun format is refused with both versions named, not
//! misread.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"HVRUNSNP";
/// The trailer's first bytes.
const END: [u8; 8] = *b"HVRUNEND";
/// The format this hvrun writes and the only one it reads.
pub const VERSION: u32 = 2;
/// The largest state file read (guest RAM is a file of its own): a bound on what a
/// damaged or hostile file can make hvrun allocate.
pub const MAX_STATE: u64 = 64 << 20;
/// The most sections a state file has (a machine's vCPUs, interrupt controller and
/// devices are a few hundred at most): a bound on the work a hostile file can cause.
pub const MAX_SECTIONS: u32 = 4096;
/// Bytes of the trailer.
const TRAILER: usize = END.len() + 4;
/// Bytes of the header.
const HEADER: usize = MAGIC.len() + 4 + 4;

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot at all.
    #[error("not an hvrun snapshot (no HVRUNSNP header)")]
    NotASnapshot,
    /// Written by an hvrun with another format.
    #[error("snapshot format version {found}, this hvrun reads version {VERSION} only")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// Bigger than [`MAX_STATE`].
    #[error("the state file is {0} bytes, more than a snapshot's state can be ({MAX_STATE})")]
    TooBig(u64),
    /// Cut short or damaged.
    #[error("the snapshot is truncated or corrupted ({0})")]
    Damaged(String),
    /// A section the restore needs is not there.
    #[error("the snapshot has no `{0}` section")]
    Missing(String),
    /// A section's bytes do not decode as what it should hold.
    #[error("the snapshot's `{section}` section does not decode: {why}")]
    Decode {
        /// Which section.
        section: String,
        /// What the decoder said.
        why: String,
    },
    /// A value could not be encoded, or a section name is too long.
    #[error("cannot encode the `{section}` section: {why}")]
    Encode {
        /// Which section.
        section: String,
        /// What went wrong.
        why: String,
    },
}

/// A state file being put together: sections in the order they are added.
#[derive(Debug, Default)]
pub struct Writer {
    sections: Vec<(String, Vec<u8>)>,
}

impl Writer {
    /// An empty state file.
    pub fn new() -> Self {
        Writer::default()
    }

    /// Adds the section `name` holding `value`. Names are at most 255 bytes and unique,
    /// and there are at most [`MAX_SECTIONS`].
    pub fn add<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), FormatError> {
        let payload =
            postcard::to_stdvec(value).map_err(|e| FormatError::Encode { section: name.into(), why: e.to_string() })?;
        self.add_encoded(name, payload)
    }

    /// Adds the section `name` holding `payload` as it is (already encoded; the fuzz
    /// target uses it to reach the decoders with valid containers).
    pub fn add_encoded(&mut self, name: &str, payload: Vec<u8>) -> Result<(), FormatError> {
        let encode = |why: String| FormatError::Encode { section: name.into(), why };
        if name.len() > usize::from(u8::MAX) || self.sections.iter().any(|(n, _)| n == name) {
            return Err(encode("the name is too long or used twice".into()));
        }
        if self.sections.len() >= MAX_SECTIONS as usize {
            return Err(encode(format!("more than {MAX_SECTIONS} sections")));
        }
        self.sections.push((name.into(), payload));
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER + TRAILER + self.sections.iter().map(|(_, p)| p.len() + 300).sum::<usize>());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        for (name, payload) in &self.sections {
            let mut crc = crc32fast::Hasher::new();
            crc.update(name.as_bytes());
            crc.update(payload);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc.finalize().to_le_bytes());
            out.extend_from_slice(payload);
        }
        let whole = crc32fast::hash(&out);
        out.extend_from_slice(&END);
        out.extend_from_slice(&whole.to_le_bytes());
        out
    }

    /// Writes the file at `path` durably: to a temporary file beside it, synced, then
    /// renamed over `path` (a crash leaves the old file or the new one, never half).
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        let bytes = self.to_bytes();
        if bytes.len() as u64 > MAX_STATE {
            return Err(FormatError::TooBig(bytes.len() as u64));
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = path.with_file_name(name);
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        // The rename is durable once the directory is.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// A state file read and checked: every section's checksum and the whole file's held.
#[derive(Debug)]
pub struct StateFile {
    sections: Vec<(String, Vec<u8>)>,
}

impl StateFile {
    /// Reads and checks the file at `path`: a regular file (a FIFO or a device would
    /// never end), read no further than [`MAX_STATE`] bytes even if it grows meanwhile.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        // Opened without blocking: a FIFO at `path` is refused, never waited on.
        let file = match devices::host_file::open_regular(path, false) {
            Ok(file) => file,
            Err(_) if path.exists() && !path.is_file() => {
                return Err(FormatError::Damaged("the state file is not a regular file".into()))
            }
            Err(e) => return Err(FormatError::Io(e)),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(FormatError::Damaged("the state file is not a regular file".into()));
        }
        if meta.len() > MAX_STATE {
            return Err(FormatError::TooBig(meta.len()));
        }
        let mut bytes = Vec::new();
        file.take(MAX_STATE + 1).read_to_end(&mut bytes)?;
        Self::parse(&bytes)
    }

    /// Checks `bytes` as a state file and splits it into its sections.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let damaged = |why: &str| FormatError::Damaged(why.into());
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::NotASnapshot);
        }
        let mut at = Cursor { bytes, at: MAGIC.len() };
        let found = at.u32().ok_or_else(|| damaged("no version"))?;
        // The version before the checksums: a later format may lay out the rest
        // differently, and must be named as such, not as a damaged file.
        if found != VERSION {
            return Err(FormatError::Version { found });
        }
        if bytes.len() as u64 > MAX_STATE {
            return Err(FormatError::TooBig(bytes.len() as u64));
        }
        // The trailer, then the whole file's checksum: a file cut anywhere, or with any
        // byte changed, stops here.
        let body = bytes.len().checked_sub(TRAILER).filter(|&b| b >= HEADER).ok_or_else(|| damaged("no trailer"))?;
        let (content, trailer) = bytes.split_at(body);
        if trailer[..END.len()] != END {
            return Err(damaged("no trailer"));
        }
        let stored = u32::from_le_bytes(trailer[END.len()..].try_into().map_err(|_| damaged("no trailer"))?);
        if crc32fast::hash(content) != stored {
            return Err(damaged("the file's checksum does not match"));
        }
        let mut at = Cursor { bytes: content, at: MAGIC.len() + 4 };
        let count = at.u32().ok_or_else(|| damaged("no section count"))?;
        if count > MAX_SECTIONS {
            return Err(FormatError::Damaged(format!("{count} sections, more than {MAX_SECTIONS}")));
        }
        let mut sections: Vec<(String, Vec<u8>)> = Vec::new();
        let mut names = HashSet::new();
        for _ in 0..count {
            let name_len = usize::from(at.take(1).ok_or_else(|| damaged("a section is cut short"))?[0]);
            let name = at.take(name_len).ok_or_else(|| damaged("a section is cut short"))?;
            let name = std::str::from_utf8(name).map_err(|_| damaged("a section's name is not UTF-8"))?;
            let len = at.u64().ok_or_else(|| damaged("a section is cut short"))?;
            let crc = at.u32().ok_or_else(|| damaged("a section is cut short"))?;
            let payload = usize::try_from(len)
                .ok()
                .and_then(|len| at.take(len))
                .ok_or_else(|| damaged("a section is cut short"))?;
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(name.as_bytes());
            hasher.update(payload);
            if hasher.finalize() != crc {
                return Err(FormatError::Damaged(format!("the `{name}` section's checksum does not match")));
            }
            if !names.insert(name) {
                return Err(FormatError::Damaged(format!("two `{name}` sections")));
            }
            sections.push((name.into(), payload.to_vec()));
        }
        if at.at != content.len() {
            return Err(damaged("bytes after the last section"));
        }
        Ok(StateFile { sections })
    }

    /// The names of the sections, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|(name, _)| name.as_str())
    }

    /// The value in the section `name`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, FormatError> {
        let (_, payload) =
            self.sections.iter().find(|(n, _)| n == name).ok_or_else(|| FormatError::Missing(name.into()))?;
        let (value, rest) = postcard::take_from_bytes(payload)
            .map_err(|e| FormatError::Decode { section: name.into(), why: e.to_string() })?;
        if !rest.is_empty() {
            let why = format!("{} bytes left over", rest.len());
            return Err(FormatError::Decode { section: name.into(), why });
        }
        Ok(value)
    }
}

/// Reads little-endian fields from a byte slice, `None` past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len())?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Some(taken)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests;
