//! Counters of a running machine, in the style of Firecracker's metrics: each vCPU's
//! exits by kind; each virtio device's starts, resets, interrupts and failures (by its
//! transport) and its own requests, bytes each way and errors, with any counters of its
//! own by name ([`devices::virtio::counters`]); and the UART's bytes. [`collect`] reads
//! them all as one JSON object of totals; the API's metrics writer turns successive
//! totals into the increments Firecracker reports ([`increments`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

/// One vCPU's exits, counted as its loop serves them.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// MMIO reads served.
    pub mmio_reads: AtomicU64,
    /// MMIO writes served.
    pub mmio_writes: AtomicU64,
    /// Runs that came back without an exit to serve (a kick, a signal, the timer).
    pub interrupted: AtomicU64,
    /// Accesses no device took, or that its device refused.
    pub bad_accesses: AtomicU64,
}

impl VcpuCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "exit_mmio_read": get(&self.mmio_reads),
            "exit_mmio_write": get(&self.mmio_writes),
            "exit_interrupted": get(&self.interrupted),
            "bad_mmio_accesses": get(&self.bad_accesses),
        })
    }
}

/// The machine's counters that are not read from its parts: the vCPUs'.
#[derive(Debug, Default)]
pub struct Registry {
    vcpus: Mutex<Vec<(u32, Arc<VcpuCounters>)>>,
}

impl Registry {
    /// The counters of vCPU `index` (made on first use).
    pub fn vcpu(&self, index: u32) -> Arc<VcpuCounters> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counters)) = vcpus.iter().find(|(i, _)| *i == index) {
            return Arc::clone(counters);
        }
        let counters = Arc::new(VcpuCounters::default());
        vcpus.push((index, Arc::clone(&counters)));
        vcpus.sort_by_key(|(i, _)| *i);
        counters
    }

    fn vcpus_json(&self) -> (Value, Value) {
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let each: Vec<Value> = vcpus.iter().map(|(_, c)| c.json()).collect();
        let mut total = Map::new();
        for one in &each {
            for (key, value) in one.as_object().into_iter().flatten() {
                let sum = total.get(key).and_then(Value::as_u64).unwrap_or(0) + value.as_u64().unwrap_or(0);
                total.insert(key.clone(), sum.into());
            }
        }
        (Value::Object(total), Value::Array(each))
    }
}

/// A virtio device's name in the metrics: its kind, numbered from 0 among its kind.
fn device_name(device_type: u32, nth: usize) -> String {
    let kind = match device_type {
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "entropy",
        5 => "balloon",
        18 => "input",
        19 => "vsock",
        _ => "virtio",
    };
    format!("{kind}{nth}")
}

/// What [`collect`] reads besides the registry: the transports' and the UART's counters.
#[derive(Debug, Default)]
pub struct PartStats {
    /// Each virtio transport's, in slot order.
    pub transports: Vec<devices::virtio::mmio::TransportStats>,
    /// The UART's.
    pub uart: Option<devices::pl011::UartStats>,
}

/// Every counter, as totals since the machine started: `{"vcpu": {...}, "vcpus":
/// [...], "uart": {...}, "net0": {...}, "block0": {...}, ...}`.
pub fn collect(registry: &Registry, parts: &PartStats) -> Value {
    let (total, each) = registry.vcpus_json();
    let mut out = Map::new();
    out.insert("vcpu".into(), total);
    out.insert("vcpus".into(), each);
    if let Some(uart) = parts.uart {
        out.insert("uart".into(), serde_json::to_value(uart).unwrap_or_default());
    }
    let mut seen: Vec<u32> = Vec::new();
    for stats in &parts.transports {
        let nth = seen.iter().filter(|&&t| t == stats.device_type).count();
        seen.push(stats.device_type);
        let mut value = serde_json::to_value(stats).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("device_type");
        }
        out.insert(device_name(stats.device_type, nth), value);
    }
    Value::Object(out)
}

/// `now` less `before`, counter by counter (objects and arrays matched by key and
/// position; a counter absent before counts from 0): what happened since `before`, as
/// Firecracker reports its counters at each write.
pub fn increments(now: &Value, before: Option<&Value>) -> Value {
    match now {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), increments(v, before.and_then(|b| b.get(k))))).collect())
        }
        Value::Array(items) => {
            Value::Array(items.iter().enumerate().map(|(i, v)| increments(v, before.and_then(|b| b.get(i)))).collect())
        }
        Value::Number(n) => match (n.as_u64(), before.and_then(Value::as_u64)) {
            (Some(now), Some(then)) => now.saturating_sub(then).into(),
            _ => now.clone(),
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::counters::{DeviceStats, Named};
    use devices::virtio::mmio::TransportStats;

    #[test]
    fn counters_are_collected_by_kind_and_reported_as_increments() {
        let registry = Registry::default();
        let v1 = registry.vcpu(1);
        let v0 = registry.vcpu(0);
        assert!(Arc::ptr_eq(&v0, &registry.vcpu(0)));
        VcpuCounters::bump(&v0.mmio_reads);
        VcpuCounters::bump(&v1.mmio_reads);
        VcpuCounters::bump(&v1.mmio_writes);
        let counted = DeviceStats { requests: 5, rx_bytes: 300, tx_bytes: 200, errors: 1, ..DeviceStats::default() };
        let net = TransportStats {
            device_type: 1,
            activations: 1,
            interrupts: 7,
            device: Some(counted),
            ..Default::default()
        };
        let block = TransportStats { device_type: 2, interrupts: 3, ..TransportStats::default() };
        let named = Named::default().with("inflate_count", 4);
        let balloon = TransportStats {
            device_type: 5,
            device: Some(DeviceStats { requests: 4, named, ..DeviceStats::default() }),
            ..Default::default()
        };
        let parts = PartStats { transports: vec![block, net, block, balloon], uart: Some(Default::default()) };
        let first = collect(&registry, &parts);
        assert_eq!(first["vcpu"]["exit_mmio_read"], 2);
        assert_eq!(first["vcpus"][1]["exit_mmio_write"], 1);
        assert_eq!(first["net0"]["interrupts"], 7);
        assert_eq!((first["net0"]["requests"].as_u64(), first["net0"]["rx_bytes"].as_u64()), (Some(5), Some(300)));
        assert!(first["block0"].get("requests").is_none(), "a device without counters has none");
        assert_eq!(first["block1"]["interrupts"], 3);
        assert!(first["block0"].get("device_type").is_none());
        assert_eq!(first["uart"]["tx_bytes"], 0);
        assert_eq!(
            (first["balloon0"]["requests"].as_u64(), first["balloon0"]["inflate_count"].as_u64()),
            (Some(4), Some(4))
        );

        VcpuCounters::bump(&v0.mmio_reads);
        let second = collect(&registry, &parts);
        let delta = increments(&second, Some(&first));
        assert_eq!(delta["vcpu"]["exit_mmio_read"], 1);
        assert_eq!(delta["vcpus"][0]["exit_mmio_read"], 1);
        assert_eq!(delta["net0"]["interrupts"], 0);
        assert_eq!(increments(&second, None), second);
    }
}
