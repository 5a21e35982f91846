//! `cargo xtask bench`: runs the criterion benchmarks and writes docs/BENCHMARKS.md, a
//! table of hvrun's device models against the host doing the same work in the same run.

use std::fmt::Write as _;
use std::path::Path;

use crate::{paths, sh};

/// A benchmark result: criterion's mean time per iteration, in nanoseconds.
fn mean_ns(estimates: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(estimates).ok()?;
    let mean = &text[text.find("\"mean\"")?..];
    let value = &mean[mean.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}']).unwrap_or(value.len());
    value[..end].trim().parse().ok()
}

/// The directories under `dir` holding a `new/estimates.json`, as paths relative to `dir`.
fn results(dir: &Path, prefix: &str, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name == "report" || name == "new" || name == "base" || name == "change" {
            continue;
        }
        let id = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if path.join("new/estimates.json").exists() {
            found.push(id.clone());
        }
        results(&path, &id, found);
    }
}

fn human_time(ns: f64) -> String {
    match ns {
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.1} ns"),
    }
}

/// This machine, for the reports: CPU, cores, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = sh::output(sh::cmd("uname").arg("-sr")).unwrap_or_default();
    format!("{cpu}, {cores} cores, {}", kernel.trim())
}

/// Runs `cargo bench` for the benchmark crate, then writes the report.
pub fn run(args: &[String]) -> Result<(), String> {
    let root = paths::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh::run(sh::cmd(&cargo).current_dir(&root).args(["bench", "-p", "hvrun-benches", "--benches", "--"]).args(args))?;
    let criterion = root.join("target/criterion");
    let mut ids = Vec::new();
    results(&criterion, "", &mut ids);
    let mut out = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (criterion; each row is the mean time per operation).\n\
         The device models run without a hypervisor: the benchmark is the guest driver, posting\n\
         requests in guest memory and notifying through the virtio-mmio transport, and waits for\n\
         the used ring. Each `hvrun` row has a `host` row measured in the same run: the host doing\n\
         the same work itself: `pread`/`pwrite` on the same file and `memcpy` for the RAM disk\n\
         (virtio-blk; the `-qdN` rows keep N requests in flight, the host twin runs as many\n\
         threads); `send` and `recv` of the same 32 frames on a unix datagram socketpair, from\n\
         or into 32 buffers as the guest's are (virtio-net, whose backend is one end of another\n\
         socketpair); one `writev` of the same 32 buffers to the same kind of file\n\
         (virtio-console output to a file: the device's own `writev`, and in the `(stream)` rows\n\
         the terminal's path through an output thread); a stream through a unix stream socketpair, one thread writing 64 KiB\n\
         at a time and another reading (virtio-vsock: a stream each way between the guest and a\n\
         host client of its hybrid unix socket, whose own socket is such a pair; the row's time\n\
         is per 64 KiB of a long stream, so 64 KiB / time is its throughput). The ratio is host time / hvrun time: 1.0 means hvrun's path is as fast\n\
         as the host's own. Rows without a host twin are single costs: an MMIO register access\n\
         through the bus, one chain through a virtqueue (taken, then added to the used ring:\n\
         hvrun's `drain_queue`, and `virtio-queue`'s own calls), and this machine's price for\n\
         waking a thread (`benches/benches/host.rs`).\n\n",
    );
    let _ = writeln!(out, "Machine: {}.\n", machine());
    out.push_str("| benchmark | operation | hvrun | host | hvrun/host |\n|---|---|---|---|---|\n");
    for id in &ids {
        let parts: Vec<&str> = id.rsplitn(3, '/').collect();
        // ids look like GROUP/hvrun/OP (or GROUP/hvrun-VARIANT/OP, another path of
        // hvrun's for the same work); the host twin is GROUP/host/OP.
        let [op, who, group] = parts.as_slice() else { continue };
        let Some(variant) = who.strip_prefix("hvrun") else { continue };
        let label = match variant.strip_prefix('-') {
            Some(variant) => format!("{group} ({variant})"),
            None if variant.is_empty() => group.to_string(),
            None => continue,
        };
        let hvrun = mean_ns(&criterion.join(id).join("new/estimates.json"));
        let host = mean_ns(&criterion.join(format!("{group}/host/{op}")).join("new/estimates.json"));
        let (Some(hvrun), host) = (hvrun, host) else { continue };
        let ratio = host.map_or("–".to_string(), |h| format!("{:.2}", h / hvrun));
        let host = host.map_or("–".to_string(), human_time);
        let _ = writeln!(out, "| {label} | {op} | {} | {host} | {ratio} |", human_time(hvrun));
    }
    for id in &ids {
        if !id.contains("/hvrun/") && !id.contains("/hvrun-") && !id.contains("/host/") {
            if let Some(ns) = mean_ns(&criterion.join(id).join("new/estimates.json")) {
                let _ = writeln!(out, "| {id} | – | {} | – | – |", human_time(ns));
            }
        }
    }
    let path = root.join("docs/BENCHMARKS.md");
    // Sections after the table (written by hand, or by `cargo xtask compare`) stay.
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if let Some(at) = old.find("\n## ") {
        out.push_str(&old[at..]);
    }
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("bench: wrote {}", path.display());
    Ok(())
}
