//! The PL031 real-time clock (ARM DDI 0224), from `vm-superio`.
//!
//! The guest reads the host's wall clock (UTC seconds) from RTCDR, so its `date` is right
//! from boot. The match interrupt is not implemented (`vm-superio` keeps the register
//! but never fires it), so the device tree gives the RTC no interrupt.

use vm_superio::Rtc;

use crate::bus::{write_le, MmioDeviceMut};
use crate::warn_ratelimited;

/// A PL031 RTC.
#[derive(Default)]
pub struct Pl031 {
    rtc: Rtc<vm_superio::rtc_pl031::NoEvents>,
}

impl std::fmt::Debug for Pl031 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl031").finish_non_exhaustive()
    }
}

impl Pl031 {
    /// An RTC reading the host's clock.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A PL031's state for snapshots: `vm-superio`'s registers. The offset is to the host's
/// clock, so a restored guest's clock reads the wall time, as after a suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPl031 {
    /// The load register.
    pub lr: u32,
    /// Seconds added to the host's clock.
    pub offset: i64,
    /// The match register.
    pub mr: u32,
    /// The interrupt mask.
    pub imsc: u32,
    /// The raw interrupt status.
    pub ris: u32,
}

impl Pl031 {
    /// The RTC's state.
    pub fn save(&self) -> SavedPl031 {
        let vm_superio::rtc_pl031::RtcState { lr, offset, mr, imsc, ris } = self.rtc.state();
        SavedPl031 { lr, offset, mr, imsc, ris }
    }

    /// Takes `saved` as the RTC's state (every value is one the guest could have set).
    pub fn restore(&mut self, saved: &SavedPl031) {
        let SavedPl031 { lr, offset, mr, imsc, ris } = *saved;
        let state = vm_superio::rtc_pl031::RtcState { lr, offset, mr, imsc, ris };
        self.rtc = Rtc::from_state(&state, vm_superio::rtc_pl031::NoEvents);
    }
}

/// The 4 KiB window's register offset as `vm-superio` takes it, when the access is one
/// aligned 32-bit register inside the window.
fn register(offset: u64, len: usize) -> Option<u16> {
    // vm-superio indexes its ID table with (offset - 0xfe0) / 4: only offsets below
    // 0x1000 are safe to hand it.
    (len == 4 && offset & 3 == 0 && offset < 0x1000).then_some(offset as u16)
}

impl MmioDeviceMut for Pl031 {
    fn read(&mut self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        let mut value = [0u8; 4];
        match register(offset, data.len()) {
            Some(reg) => self.rtc.read(reg, &mut value),
            None => warn_ratelimited!("pl031: {}-byte read at {offset:#x} ignored", data.len()),
        }
        write_le(data, u64::from(u32::from_le_bytes(value)));
    }

    fn write(&mut self, _vcpu: usize, offset: u64, data: &[u8]) {
        match (register(offset, data.len()), <[u8; 4]>::try_from(data)) {
            (Some(reg), Ok(value)) => self.rtc.write(reg, &value),
            _ => warn_ratelimited!("pl031: {}-byte write at {offset:#x} ignored", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn r32(rtc: &mut Pl031, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        rtc.read(0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn reads_the_host_clock_and_primecell_ids() {
        let mut rtc = Pl031::new();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as u32;
        let seen = r32(&mut rtc, 0);
        assert!(seen.abs_diff(now) <= 1, "{seen} vs {now}");
        let ids: Vec<u32> = (0..8).map(|i| r32(&mut rtc, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x31, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn the_guest_can_set_its_clock() {
        let mut rtc = Pl031::new();
        rtc.write(0, 0x8, &1_000_000u32.to_le_bytes());
        assert!(r32(&mut rtc, 0).abs_diff(1_000_000) <= 1);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut rtc = Pl031::new();
        for offset in 0..0x1000u64 {
            for len in [1usize, 2, 4, 8] {
                rtc.write(0, offset, &vec![0xff; len]);
                let mut b = vec![0u8; len];
                rtc.read(0, offset, &mut b);
            }
        }
    }

    #[test]
    fn a_restored_rtc_keeps_the_guests_setting() {
        let mut rtc = Pl031::new();
        rtc.write(0, 0x8, &1_000_000u32.to_le_bytes()); // RTCLR
        let saved = rtc.save();
        let mut again = Pl031::new();
        again.restore(&saved);
        assert!(r32(&mut again, 0).abs_diff(1_000_000) <= 1);
        assert_eq!(again.save(), saved);
    }
}
