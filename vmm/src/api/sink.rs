//! `PUT /metrics`: where metrics go (a file that exists, appended to, or a FIFO, never
//! waited on),
//! and the lines written there: one JSON object per line with the time, the API's own
//! counters and the machine's ([`crate::metrics::collect`]), each counter the increment
//! since the previous line, as Firecracker writes them. A line is written at
//! `FlushMetrics` and every [`PERIOD`] once the VM runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::model::Metrics;

/// How often a line is written while the VM runs (Firecracker's period).
pub const PERIOD: Duration = Duration::from_secs(60);

/// The API's own counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiCounters {
    /// Requests answered.
    pub requests: u64,
    /// Of those, refused (4xx or 5xx).
    pub errors: u64,
}

/// An open metrics destination.
#[derive(Debug)]
pub struct Sink {
    file: File,
    id: Option<String>,
    properties: Option<BTreeMap<String, String>>,
    /// The totals the previous line was written from.
    previous: Option<Value>,
    /// When the next periodic line is due.
    due: Instant,
    /// Lines the destination did not take (a FIFO nobody reads, say).
    missed: u64,
}

impl Sink {
    /// Opens `metrics.metrics_path`, which must exist, as in Firecracker (a file is
    /// appended to; a FIFO is opened without waiting for a reader), for instance `id`.
    pub fn open(metrics: &Metrics, id: &str) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&metrics.metrics_path)
            .map_err(|e| format!("Cannot open the metrics file {}: {e}", metrics.metrics_path))?;
        Ok(Sink {
            file,
            id: metrics.emit_id.unwrap_or(false).then(|| id.to_string()),
            properties: metrics.properties.clone(),
            previous: None,
            due: Instant::now() + PERIOD,
            missed: 0,
        })
    }

    /// Whether a periodic line is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.due
    }

    /// How long until the next periodic line.
    pub fn until_due(&self) -> Duration {
        self.due.saturating_duration_since(Instant::now())
    }

    /// Writes one line from the machine's totals `machine` (an empty object before it
    /// starts) and the API's counters.
    pub fn write(&mut self, machine: Value, api: ApiCounters) -> Result<(), String> {
        self.due = Instant::now() + PERIOD;
        let mut totals = machine;
        if let Some(object) = totals.as_object_mut() {
            object.insert("api_server".into(), json!({ "requests": api.requests, "errors": api.errors }));
            object.insert("metrics".into(), json!({ "missed_lines": self.missed }));
        }
        let mut line = super::super::metrics::increments(&totals, self.previous.as_ref());
        if let Some(object) = line.as_object_mut() {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            object.insert("utc_timestamp_ms".into(), ms.into());
            if let Some(id) = &self.id {
                object.insert("id".into(), id.clone().into());
            }
            if let Some(properties) = &self.properties {
                object.insert("properties".into(), json!(properties));
            }
        }
        self.previous = Some(totals);
        let mut text = line.to_string();
        text.push('\n');
        // One write: a FIFO's reader gets whole lines, or none.
        match self.file.write(text.as_bytes()) {
            Ok(n) if n == text.len() => Ok(()),
            Ok(_) | Err(_) => {
                self.missed += 1;
                Err("the metrics file did not take the whole line".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_increments_with_the_time_id_and_properties() {
        let path = std::env::temp_dir().join(format!("hvrun-metrics-{}.json", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let metrics = Metrics {
            metrics_path: path.display().to_string(),
            emit_id: Some(true),
            properties: Some([("team".to_string(), "a".to_string())].into()),
        };
        let mut sink = Sink::open(&metrics, "vm7").unwrap();
        assert!(!sink.due() && sink.until_due() <= PERIOD);
        sink.write(json!({"vcpu": {"exit_mmio_read": 5}}), ApiCounters { requests: 3, errors: 1 }).unwrap();
        sink.write(json!({"vcpu": {"exit_mmio_read": 9}}), ApiCounters { requests: 4, errors: 1 }).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["vcpu"]["exit_mmio_read"], 5);
        assert_eq!(lines[1]["vcpu"]["exit_mmio_read"], 4);
        assert_eq!(lines[1]["api_server"]["requests"], 1);
        assert_eq!(lines[1]["api_server"]["errors"], 0);
        assert_eq!(lines[1]["id"], "vm7");
        assert_eq!(lines[1]["properties"]["team"], "a");
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        std::fs::remove_file(&path).unwrap();
    }
}
