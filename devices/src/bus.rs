//! The MMIO bus: guest-physical ranges mapped to devices.
//!
//! Ranges are kept in a sorted vector and looked up by binary search, so a lookup costs
//! a few comparisons; overlapping ranges are rejected when a device is inserted. An
//! access is checked to lie wholly inside the device's range before the device sees it,
//! with the offset from the range's base and the index of the vCPU making it (banked
//! registers, like the GIC's, depend on it).
//!
//! Devices take `&self` and own their locking: most are a [`Mutex`] around a
//! [`MmioDeviceMut`] (one lock per device, never one for the machine); the GIC shares one
//! state between its two register windows.

use std::sync::{Arc, Mutex};

/// A device that serves guest MMIO accesses. Called from any vCPU thread.
pub trait MmioDevice: Send + Sync {
    /// Serves a read of `data.len()` bytes at `offset` from the device's base, made by
    /// vCPU `vcpu`; fills `data`.
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]);
    /// Serves a write of `data` at `offset` from the device's base, made by vCPU `vcpu`.
    fn write(&self, vcpu: usize, offset: u64, data: &[u8]);
}

/// A device whose state one lock guards: put it on the bus as `Mutex<T>`.
pub trait MmioDeviceMut: Send {
    /// Serves a read; see [`MmioDevice::read`].
    fn read(&mut self, vcpu: usize, offset: u64, data: &mut [u8]);
    /// Serves a write; see [`MmioDevice::write`].
    fn write(&mut self, vcpu: usize, offset: u64, data: &[u8]);
}

impl<T: MmioDeviceMut> MmioDevice for Mutex<T> {
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]) {
        lock(self).read(vcpu, offset, data);
    }
    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        lock(self).write(vcpu, offset, data);
    }
}

/// Locks `mutex`, tolerating poison: a device whose lock was poisoned by a panic on
/// another thread keeps serving (its state is whatever the panicking access left).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device shared between the bus and whoever else drives it (an input thread, say).
pub type SharedDevice = Arc<dyn MmioDevice>;

/// Errors from the MMIO bus.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid MMIO range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("MMIO range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it overlaps.
        other_base: u64,
        /// Length of the range it overlaps.
        other_len: u64,
    },
    /// No device claims the access (or the access runs past the end of a device's range).
    #[error("no device at {addr:#x} for a {len}-byte access")]
    Unclaimed {
        /// Guest-physical address of the access.
        addr: u64,
        /// Size of the access in bytes.
        len: usize,
    },
}

#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Guest-physical ranges and the devices that serve them.
#[derive(Clone, Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|r| (r.base, r.len))).finish()
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`. Fails if the range is empty, wraps, or
    /// overlaps a range already on the bus.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        let at = self.ranges.partition_point(|r| r.base < base);
        let neighbours = [at.checked_sub(1).map(|i| &self.ranges[i]), self.ranges.get(at)];
        for other in neighbours.into_iter().flatten() {
            if base < other.base + other.len && other.base < end {
                return Err(BusError::Overlap { base, len, other_base: other.base, other_len: other.len });
            }
        }
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device whose range wholly contains `addr..addr + len`, with the offset into it.
    fn find(&self, addr: u64, len: usize) -> Result<(&SharedDevice, u64), BusError> {
        let unclaimed = BusError::Unclaimed { addr, len };
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = at.checked_sub(1).map(|i| &self.ranges[i]).ok_or_else(|| unclaimed.clone())?;
        let offset = addr - range.base;
        let fits = offset.checked_add(len as u64).is_some_and(|end| end <= range.len);
        if fits && len > 0 {
            Ok((&range.device, offset))
        } else {
            Err(unclaimed)
        }
    }

    /// Reads `data.len()` bytes at guest-physical `addr` from the device there, for vCPU `vcpu`.
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (device, offset) = self.find(addr, data.len())?;
        device.read(vcpu, offset, data);
        Ok(())
    }

    /// Writes `data` at guest-physical `addr` to the device there, for vCPU `vcpu`.
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (device, offset) = self.find(addr, data.len())?;
        device.write(vcpu, offset, data);
        Ok(())
    }
}

/// Reads a little-endian register value of up to 8 bytes from an access buffer.
pub fn read_le(data: &[u8]) -> u64 {
    data.iter().take(8).rev().fold(0, |acc, &b| acc << 8 | u64::from(b))
}

/// Writes `value` little-endian into an access buffer of up to 8 bytes (zero beyond that).
pub fn write_le(data: &mut [u8], value: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 8 { (value >> (8 * i)) as u8 } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access it sees.
    #[derive(Default)]
    struct Recorder {
        log: Vec<(usize, bool, u64, Vec<u8>)>,
    }

    impl MmioDeviceMut for Recorder {
        fn read(&mut self, vcpu: usize, offset: u64, data: &mut [u8]) {
            data.fill(0xab);
            self.log.push((vcpu, false, offset, data.to_vec()));
        }
        fn write(&mut self, vcpu: usize, offset: u64, data: &[u8]) {
            self.log.push((vcpu, true, offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn routes_accesses_with_offsets() {
        let mut bus = MmioBus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x2000, 0x100, b.clone()).unwrap();
        let mut buf = [0u8; 4];
        bus.read(0, 0x1010, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 4]);
        bus.write(3, 0x20fc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(a.lock().unwrap().log, vec![(0, false, 0x10, vec![0xab; 4])]);
        assert_eq!(b.lock().unwrap().log, vec![(3, true, 0xfc, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, recorder()).unwrap();
        for (base, len) in [(0x1000, 0x100), (0xf00, 0x101), (0x10ff, 1), (0x0, u64::MAX / 2)] {
            assert!(matches!(bus.insert(base, len, recorder()), Err(BusError::Overlap { .. })), "{base:#x}+{len:#x}");
        }
        // Adjacent ranges are fine.
        bus.insert(0xf00, 0x100, recorder()).unwrap();
        bus.insert(0x1100, 0x100, recorder()).unwrap();
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = MmioBus::new();
        assert!(matches!(bus.insert(0x1000, 0, recorder()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, recorder()), Err(BusError::InvalidRange { .. })));
    }

    #[test]
    fn accesses_beyond_a_device_are_rejected() {
        let mut bus = MmioBus::new();
        let dev = recorder();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut buf = [0u8; 8];
        // Straddles the end of the range.
        assert_eq!(bus.read(0, 0x10fc, &mut buf), Err(BusError::Unclaimed { addr: 0x10fc, len: 8 }));
        // Entirely outside.
        assert!(bus.write(0, 0x1100, &[0]).is_err());
        assert!(bus.write(0, 0xfff, &[0]).is_err());
        assert!(bus.read(0, u64::MAX, &mut buf).is_err());
        // Zero-length accesses never reach a device.
        assert!(bus.write(0, 0x1000, &[]).is_err());
        assert!(dev.lock().unwrap().log.is_empty());
    }

    #[test]
    fn little_endian_helpers() {
        let mut buf = [0u8; 4];
        write_le(&mut buf, 0x1122_3344_5566);
        assert_eq!(buf, [0x66, 0x55, 0x44, 0x33]);
        assert_eq!(read_le(&buf), 0x3344_5566);
        let mut wide = [0xffu8; 10];
        write_le(&mut wide, u64::MAX);
        assert_eq!(&wide[8..], &[0, 0]);
        assert_eq!(read_le(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), 0x0807_0605_0403_0201);
    }
}
