//! The self-test probe: a device only `hvrun selftest` puts in its machines, for the small
//! guests that check one class of exit each. It answers accesses of every size, so a
//! guest can prove that loads and stores of 1, 2, 4 and 8 bytes, and their sign or zero
//! extension, arrive and return exactly; it tells the guest what it cannot easily find
//! out itself (which GIC, where its redistributors are); and it takes the guest's
//! verdict.
//!
//! | offset | access | what |
//! |---|---|---|
//! | `0x00..0x08` | read/write, any size | 8 bytes of scratch memory, little-endian |
//! | `0x08` | read | the GIC: 2 or 3 |
//! | `0x10` | read | the GICv3 redistributor region's base (0 with a GICv2) |
//! | `0x18` | write | a result: 0 for pass, else the number of the check that failed |
//! | `0x20` | write | a value the guest wants in the report (the last one is kept) |

use std::sync::{Arc, Mutex};

use crate::bus::MmioDeviceMut;
use crate::warn_ratelimited;

/// Offsets of the registers.
pub const SCRATCH: u64 = 0x00;
/// The GIC version.
pub const GIC: u64 = 0x08;
/// The redistributor base.
pub const REDISTRIBUTORS: u64 = 0x10;
/// The verdict.
pub const RESULT: u64 = 0x18;
/// A value for the report.
pub const VALUE: u64 = 0x20;

/// What the guest reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The last result written: `Some(0)` passed, `Some(n)` check `n` failed.
    pub result: Option<u64>,
    /// The last value written for the report.
    pub value: Option<u64>,
}

/// The probe.
#[derive(Debug)]
pub struct Probe {
    scratch: [u8; 8],
    gic: u64,
    redistributors: u64,
    verdict: Arc<Mutex<Verdict>>,
}

impl Probe {
    /// A probe that tells the guest `gic` (2 or 3) and the redistributor base, and records
    /// its verdict in `verdict`.
    pub fn new(gic: u64, redistributors: u64, verdict: Arc<Mutex<Verdict>>) -> Self {
        Probe { scratch: [0; 8], gic, redistributors, verdict }
    }

    fn verdict(&self) -> std::sync::MutexGuard<'_, Verdict> {
        self.verdict.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The value of a little-endian access of up to 8 bytes.
fn value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl MmioDeviceMut for Probe {
    fn read(&mut self, vcpu: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let register = match offset {
            0..8 => {
                let start = offset as usize;
                let end = (start + data.len()).min(8);
                data[..end - start].copy_from_slice(&self.scratch[start..end]);
                return;
            }
            GIC => self.gic,
            REDISTRIBUTORS => self.redistributors,
            _ => {
                warn_ratelimited!("selftest probe: vcpu{vcpu} read {offset:#x}, which is not a register");
                return;
            }
        };
        let n = data.len().min(8);
        data[..n].copy_from_slice(&register.to_le_bytes()[..n]);
    }

    fn write(&mut self, vcpu: usize, offset: u64, data: &[u8]) {
        match offset {
            0..8 => {
                let start = offset as usize;
                let end = (start + data.len()).min(8);
                self.scratch[start..end].copy_from_slice(&data[..end - start]);
            }
            RESULT => self.verdict().result = Some(value(data)),
            VALUE => self.verdict().value = Some(value(data)),
            _ => warn_ratelimited!("selftest probe: vcpu{vcpu} wrote {data:x?} at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_keeps_every_size_and_registers_answer() {
        let verdict = Arc::new(Mutex::new(Verdict::default()));
        let mut probe = Probe::new(3, 0x080a_0000, verdict.clone());
        probe.write(0, 0, &0x8877_6655_4433_2211u64.to_le_bytes());
        let mut b = [0u8; 1];
        probe.read(0, 7, &mut b);
        assert_eq!(b, [0x88]);
        probe.write(0, 2, &[0xf0, 0xff]);
        let mut h = [0u8; 2];
        probe.read(0, 2, &mut h);
        assert_eq!(h, [0xf0, 0xff]);
        let mut w = [0u8; 8];
        probe.read(0, 0, &mut w);
        assert_eq!(u64::from_le_bytes(w), 0x8877_6655_fff0_2211);
        // An access running past the scratch keeps to it.
        probe.write(0, 6, &[1, 2, 3, 4]);
        let mut tail = [9u8; 4];
        probe.read(0, 6, &mut tail);
        assert_eq!(tail, [1, 2, 0, 0]);
        probe.read(0, GIC, &mut w);
        assert_eq!(u64::from_le_bytes(w), 3);
        let mut low = [0u8; 4];
        probe.read(0, REDISTRIBUTORS, &mut low);
        assert_eq!(u32::from_le_bytes(low), 0x080a_0000);
        probe.write(0, VALUE, &[0x27, 0, 0, 0]);
        probe.write(0, RESULT, &0u64.to_le_bytes());
        assert_eq!(*verdict.lock().unwrap(), Verdict { result: Some(0), value: Some(0x27) });
        probe.read(0, 0x100, &mut w);
        assert_eq!(w, [0; 8], "not a register: zero");
    }
}
