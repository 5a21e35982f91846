//! The guest's memory statistics (virtio 1.2, 5.5.6.3): a buffer of packed
//! `{ le16 tag; le64 val; }` entries that the driver fills and the device reads.

/// Bytes of one statistics entry.
pub const ENTRY_SIZE: usize = 10;
/// The most entries read from one buffer; the rest is ignored (Linux sends 10 to 16).
pub const MAX_ENTRIES: usize = 64;
/// Tags the device keeps (virtio 1.2 defines 0 to 9, Linux 6.12 up to 15); others are
/// ignored.
pub const TAGS: usize = 16;

/// Pages swapped in (`VIRTIO_BALLOON_S_SWAP_IN`).
pub const SWAP_IN: u16 = 0;
/// Pages swapped out.
pub const SWAP_OUT: u16 = 1;
/// Major page faults.
pub const MAJFLT: u16 = 2;
/// Minor page faults.
pub const MINFLT: u16 = 3;
/// Free memory, in bytes.
pub const MEMFREE: u16 = 4;
/// Total memory, in bytes.
pub const MEMTOT: u16 = 5;
/// Available memory (what the guest could use without swapping), in bytes.
pub const AVAIL: u16 = 6;
/// Disk caches, in bytes.
pub const CACHES: u16 = 7;

/// The last statistics the guest sent: a value per tag, for the tags it sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    values: [Option<u64>; TAGS],
}

impl Stats {
    /// The value the guest gave for `tag` (see the tag constants), if any.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// The guest's free memory in bytes ([`MEMFREE`]).
    pub fn free_memory(&self) -> Option<u64> {
        self.get(MEMFREE)
    }

    /// The guest's total memory in bytes ([`MEMTOT`]).
    pub fn total_memory(&self) -> Option<u64> {
        self.get(MEMTOT)
    }

    /// The guest's available memory in bytes ([`AVAIL`]).
    pub fn available_memory(&self) -> Option<u64> {
        self.get(AVAIL)
    }
}

/// Parses a statistics buffer: whole entries only (a trailing partial one is ignored),
/// at most [`MAX_ENTRIES`], tags past [`TAGS`] skipped; a tag sent twice keeps its last
/// value. Returns the statistics and whether the buffer was malformed (a partial entry,
/// unknown tags or too many entries), for the caller to log.
pub fn parse(bytes: &[u8]) -> (Stats, bool) {
    let mut stats = Stats::default();
    let mut malformed = bytes.len() % ENTRY_SIZE != 0 || bytes.len() > MAX_ENTRIES * ENTRY_SIZE;
    for entry in bytes.chunks_exact(ENTRY_SIZE).take(MAX_ENTRIES) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        match stats.values.get_mut(usize::from(tag)) {
            Some(slot) => *slot = Some(u64::from_le_bytes(value)),
            None => malformed = true,
        }
    }
    (stats, malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn entries_are_read_by_tag() {
        let buf = [entry(MEMFREE, 100 << 20), entry(MEMTOT, 512 << 20), entry(AVAIL, 200 << 20)].concat();
        let (stats, malformed) = parse(&buf);
        assert!(!malformed);
        assert_eq!(stats.free_memory(), Some(100 << 20));
        assert_eq!(stats.total_memory(), Some(512 << 20));
        assert_eq!(stats.available_memory(), Some(200 << 20));
        assert_eq!(stats.get(SWAP_IN), None);
        assert_eq!(stats.get(u16::MAX), None);
    }

    #[test]
    fn malformed_buffers_keep_what_is_whole_and_known() {
        assert_eq!(parse(&[]), (Stats::default(), false));
        let mut buf = [entry(MEMFREE, 1), entry(999, 2), entry(MEMFREE, 3)].concat();
        buf.extend_from_slice(&[1, 2, 3]);
        let (stats, malformed) = parse(&buf);
        assert!(malformed);
        assert_eq!(stats.free_memory(), Some(3), "the last value of a repeated tag");
        let many: Vec<u8> = (0..MAX_ENTRIES as u64 + 10).flat_map(|i| entry(MINFLT, i)).collect();
        let (stats, malformed) = parse(&many);
        assert!(malformed);
        assert_eq!(stats.get(MINFLT), Some(MAX_ENTRIES as u64 - 1), "entries past the limit are not read");
    }
}
