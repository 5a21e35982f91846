//! Per-device counters for metrics: how many requests a device served, the bytes it
//! moved each way and how many requests went wrong. The device's threads add to them as
//! they work (relaxed atomic adds: nobody orders anything by them); the VMM reads a
//! [`DeviceStats`] copy through [`super::VirtioDevice::counters`] whenever it reports.
//!
//! The directions are the guest's, as Firecracker names them: `rx` is what the guest
//! received (a disk's reads, frames and stream data delivered to it, entropy, console
//! input), `tx` what it sent (a disk's writes, frames and stream data it sent, console
//! output). The balloon moves memory rather than data: `tx` is the guest memory it gave
//! back to the host (inflated or reported), `rx` what the guest took back (deflated).
//!
//! A device may add a few counters of its own, by name ([`Named`]: the balloon's
//! inflates, deflates, statistics updates and reports); they are reported next to the
//! common four, in the device's object.

use std::sync::atomic::{AtomicU64, Ordering};

/// A device's counters, shared by its threads (see the module).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    requests: AtomicU64,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    errors: AtomicU64,
}

/// A copy of a device's counters, as totals since the device was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStats {
    /// Requests served, whatever became of them: a disk's requests, the frames (net) and
    /// packets (vsock) each way, console buffers, entropy requests, the balloon's page
    /// arrays, statistics buffers and free page reports.
    pub requests: u64,
    /// Bytes the device wrote into the guest's buffers as data (the balloon: guest memory
    /// taken back).
    pub rx_bytes: u64,
    /// Bytes of data the device took from the guest's buffers (the balloon: guest memory
    /// given back to the host).
    pub tx_bytes: u64,
    /// Requests that failed or were refused: malformed chains, requests answered with an
    /// error status, host I/O that failed, ranges outside guest RAM.
    pub errors: u64,
    /// The device's own counters, by name (none for most devices).
    #[serde(flatten)]
    pub named: Named,
}

/// The most counters of its own a device reports ([`Named`]).
pub const MAX_NAMED: usize = 4;

/// A device's own counters beyond the common four, each with its name in the metrics
/// (`"inflate_count": 3`), at most [`MAX_NAMED`]. A fixed array, so that [`DeviceStats`]
/// stays a plain copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Named {
    entries: [(&'static str, u64); MAX_NAMED],
    len: usize,
}

impl Named {
    /// These counters and `name` = `value`; a counter past [`MAX_NAMED`] is left out
    /// (the device's list is fixed: its tests see it).
    pub fn with(mut self, name: &'static str, value: u64) -> Self {
        if let Some(entry) = self.entries.get_mut(self.len) {
            *entry = (name, value);
            self.len += 1;
        }
        self
    }

    /// The counter called `name`, if the device keeps one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The counters, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.entries.iter().take(self.len).copied()
    }
}

impl serde::Serialize for Named {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.len))?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

fn add(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl DeviceCounters {
    /// Counts one request that moved `rx` bytes into the guest and `tx` bytes out of it.
    pub fn request(&self, rx: u64, tx: u64) {
        add(&self.requests, 1);
        add(&self.rx_bytes, rx);
        add(&self.tx_bytes, tx);
    }

    /// Counts `n` requests at once, with their bytes (a device that counts per pass).
    pub fn requests(&self, n: u64, rx: u64, tx: u64) {
        add(&self.requests, n);
        add(&self.rx_bytes, rx);
        add(&self.tx_bytes, tx);
    }

    /// Counts a request that failed or was refused (also counted by [`Self::request`]
    /// when it was taken from the driver).
    pub fn error(&self) {
        add(&self.errors, 1);
    }

    /// The counters' values now.
    pub fn snapshot(&self) -> DeviceStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceStats {
            requests: get(&self.requests),
            rx_bytes: get(&self.rx_bytes),
            tx_bytes: get(&self.tx_bytes),
            errors: get(&self.errors),
            named: Named::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up() {
        let c = DeviceCounters::default();
        c.request(10, 0);
        c.request(0, 7);
        c.requests(3, 1, 2);
        c.error();
        let counted = DeviceStats { requests: 5, rx_bytes: 11, tx_bytes: 9, errors: 1, ..DeviceStats::default() };
        assert_eq!(c.snapshot(), counted);
    }

    #[test]
    fn named_counters_are_reported_beside_the_common_ones() {
        let mut named = Named::default();
        for (i, name) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            named = named.with(name, i as u64 + 10);
        }
        assert_eq!((named.get("a"), named.get("d"), named.get("e")), (Some(10), Some(13), None), "at most four");
        let stats =
            DeviceStats { requests: 2, named: Named::default().with("inflate_count", 7), ..DeviceStats::default() };
        let json = serde_json::to_value(stats).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"requests": 2, "rx_bytes": 0, "tx_bytes": 0, "errors": 0, "inflate_count": 7})
        );
    }
}
