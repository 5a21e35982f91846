//! Files passed between the host and a scenario through a disk of the outer machine,
//! for checks that need host tools (e.g. `debugfs` on an image the guest wrote).
//!
//! Scenario number `i` owns the slot at [`SLOT_MB`]` * i` MiB of `exchange.img`, which
//! the rig attaches as a virtio-blk disk (the outer machine's `/dev/vda`, once the
//! scenario has loaded `virtio_mmio.ko` and `virtio_blk.ko`). The harness writes the
//! scenario's input file into its slot before the boot; the scenario finds its slot's
//! offset in `$E2E_SLOT_MB`, reads the input from there and writes its result back; after
//! the boot the harness reads the slot and runs the scenario's host check on it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Each scenario's share of the exchange disk.
pub const SLOT_MB: u64 = 256;

/// Where slot `slot` starts, in bytes.
fn slot_offset(slot: u64) -> u64 {
    (slot * SLOT_MB) << 20
}

/// A check run on the host with the slot's contents (as a file of
/// [`Exchange::output_len`] bytes) and the scenario's console output; returns lines to
/// add to the output, or a failure.
pub type HostCheck = fn(image: &Path, output: &[String]) -> Result<Vec<String>, String>;

/// A scenario's use of the exchange disk.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// The guest artifact written into the slot before the boot.
    pub input: &'static str,
    /// How many bytes of the slot the check gets back: `None` for the input's size (the
    /// scenario wrote its result over its input), `Some(n)` when it wrote more.
    pub output_len: Option<u64>,
    /// What the host checks afterwards.
    pub check: HostCheck,
}

/// Exchanges are the same when they carry the same input and bring back as much
/// (function addresses are not comparable).
impl PartialEq for Exchange {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.output_len == other.output_len
    }
}

impl Eq for Exchange {}

/// Creates `disk` with room for `slots` slots and writes `inputs` (slot, file) into it.
pub fn prepare(disk: &Path, slots: u64, inputs: &[(u64, &Path)]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(disk)?;
    file.set_len(slot_offset(slots))?;
    for (slot, input) in inputs {
        let bytes = std::fs::read(input)?;
        if bytes.len() as u64 > slot_offset(1) {
            return Err(std::io::Error::other(format!("{} is larger than a slot", input.display())));
        }
        file.seek(SeekFrom::Start(slot_offset(*slot)))?;
        file.write_all(&bytes)?;
    }
    file.sync_all()
}

/// Copies `len` bytes of slot `slot` of `disk` into `out`; more than a slot is an error.
pub fn extract(disk: &Path, slot: u64, len: u64, out: &Path) -> std::io::Result<()> {
    if len > slot_offset(1) {
        return Err(std::io::Error::other(format!("{len} bytes are more than a slot")));
    }
    let mut file = std::fs::File::open(disk)?;
    file.seek(SeekFrom::Start(slot_offset(slot)))?;
    let mut bytes = Vec::new();
    file.take(len).read_to_end(&mut bytes)?;
    std::fs::write(out, bytes)
}

/// Deterministic pseudo-random bytes (xorshift64*), the same on every machine: the data
/// the host puts on a disk for the guest to read back.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_the_pattern_is_stable() {
        let dir = std::env::temp_dir();
        let (disk, input, out) = (
            dir.join(format!("hvrun-xchg-{}.img", std::process::id())),
            dir.join(format!("hvrun-xchg-{}.in", std::process::id())),
            dir.join(format!("hvrun-xchg-{}.out", std::process::id())),
        );
        std::fs::write(&input, pattern(1000, 7)).unwrap();
        prepare(&disk, 2, &[(1, &input)]).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), slot_offset(2));
        extract(&disk, 1, 1000, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), pattern(1000, 7));
        extract(&disk, 1, 2000, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap()[1000..], [0; 1000], "the rest of the slot");
        assert!(extract(&disk, 0, slot_offset(1) + 1, &out).is_err());
        assert_eq!(pattern(16, 7)[..8], pattern(8, 7)[..], "a prefix of the same stream");
        assert_ne!(pattern(8, 7), pattern(8, 8));
        for f in [disk, input, out] {
            let _ = std::fs::remove_file(f);
        }
    }
}
