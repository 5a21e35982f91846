//! `cargo xtask compare`'s I/O rows: the same guest does the same I/O under hvrun and
//! under QEMU, interleaved over the rounds, in the GICv3 rig (KVM's vGICv3 on both).
//!
//! The guest is Debian's stock kernel with the I/O guest's initramfs
//! ([`crate::io_guest`]; 1 vCPU, 512 MiB: the initramfs carries fio's 65 libraries), and
//! runs `guests/io/bench`: fio's jobs (`guests/io/bench.fio`) on its disk, then iperf3
//! against the rig host in both directions. Both VMMs get the same raw image file in the
//! rig's tmpfs as a virtio-blk disk and the same tap as a virtio-net NIC, over
//! virtio-mmio on both (QEMU: `virtio-blk-device`, `virtio-net-device`), so the guest
//! runs the same drivers. The rig host runs `iperf3 -s` on the tap's other end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hvrun_e2e::scenario::{OuterGic, Scenario};
use hvrun_e2e::scenarios::{IO_INITRAMFS, IO_IN_RIG};

use super::{cell, spread, QEMU_BASE};
use crate::peers::QEMU_IN_RIG;

/// The tap's subnet: the rig host is `.1`, the guest `.15`.
const SUBNET: &str = "10.0.5";
/// Seconds of each fio job and each iperf3 direction (after iperf3's first second,
/// which it leaves out: TCP's slow start).
const SECS: u32 = 2;
/// The disk image's size.
const DISK_MB: u32 = 256;
/// The guest's RAM, the same on both.
pub const MEMORY_MB: u32 = 512;
/// The guest's command line: the workload, then power off.
const APPEND: &str = "console=ttyAMA0 quiet -- /io/bench";

/// What the table shows: `(key, row, unit)`. A key is a fio job's name
/// (`guests/io/bench.fio`) or `iperf3 DIRECTION`.
const METRICS: [(&str, &str, &str); 8] = [
    ("seq-read-1m", "fio sequential read, 1 MiB, depth 8", "MiB/s"),
    ("seq-write-1m", "fio sequential write, 1 MiB, depth 8", "MiB/s"),
    ("rand-read-4k-qd1", "fio random read, 4 KiB, depth 1", "IOPS"),
    ("rand-read-4k-qd32", "fio random read, 4 KiB, depth 32", "IOPS"),
    ("rand-write-4k-qd1", "fio random write, 4 KiB, depth 1", "IOPS"),
    ("rand-write-4k-qd32", "fio random write, 4 KiB, depth 32", "IOPS"),
    ("iperf3 guest-to-host", "iperf3 guest → rig host", "Gbit/s"),
    ("iperf3 host-to-guest", "iperf3 rig host → guest", "Gbit/s"),
];

/// The two VMMs: `(name, command)`.
fn variants() -> [(&'static str, String); 2] {
    let args = format!("{APPEND} {SUBNET} {SECS}");
    [
        (
            "hvrun",
            format!(
                "env RUST_LOG=info /bin/hvrun --cpus 1 --memory {MEMORY_MB}M --gic v3 --kernel /guest/vmlinuz --initrd /guest/{IO_INITRAMFS} \
                 --disk /tmp/io.img --net tap=tap0 --cmdline '{args}'"
            ),
        ),
        (
            "QEMU",
            format!(
                "{QEMU_IN_RIG} -M virt,gic-version=3 {QEMU_BASE} -m {MEMORY_MB} -kernel /guest/vmlinuz -initrd /guest/{IO_INITRAMFS} \
                 -append '{args}' -drive file=/tmp/io.img,if=none,format=raw,id=disk \
                 -device virtio-blk-device,drive=disk -netdev tap,id=net,ifname=tap0,script=no,downscript=no \
                 -device virtio-net-device,netdev=net"
            ),
        ),
    ]
}

/// The rig script: the tap, the rig host's iperf3 server and the disk image once, then
/// each VMM in turn, `rounds` times (each round starts with the other VMM). A run's output
/// lies between `COMPARE-IO-BEGIN N` and `COMPARE-IO-END N rc=R`.
fn script(rounds: u32) -> String {
    let mut s = format!(
        "{IO_IN_RIG}set -o pipefail\n\
         insmod /guest/tun.ko 2>/dev/null; ip link set lo up\n\
         tunctl -t tap0 >/dev/null && ip link set tap0 up && ip addr add {SUBNET}.1/24 dev tap0\n\
         io iperf3 -s -D -I /tmp/iperf3.pid --logfile /tmp/iperf3-server.log\n\
         dd if=/dev/zero of=/tmp/io.img bs=1M count={DISK_MB} 2>/dev/null\n\
         run() {{\n\
         \x20   id=$1; shift\n\
         \x20   sync; echo 3 >/proc/sys/vm/drop_caches; echo 1 >/proc/sys/vm/compact_memory\n\
         \x20   echo \"COMPARE-IO-BEGIN $id\"\n\
         \x20   timeout 300 \"$@\" </dev/null 2>&1 | tr -d '\\r'\n\
         \x20   echo \"COMPARE-IO-END $id rc=$?\"\n\
         }}\n"
    );
    let variants = variants();
    for round in 0..rounds as usize {
        for id in (0..variants.len()).map(|i| (i + round) % variants.len()) {
            let _ = writeln!(s, "run {id} {}", variants[id].1);
        }
    }
    s.push_str("kill $(cat /tmp/iperf3.pid) 2>/dev/null; rm -rf /tmp/io /tmp/io.img; true\n");
    s
}

/// The rig scenario of the I/O rows.
pub fn scenario(rounds: u32) -> Scenario {
    Scenario {
        name: "compare-io",
        about: "hvrun and QEMU run fio and iperf3 in the same guest, interleaved",
        artifacts: &["vmlinuz", IO_INITRAMFS, "tun.ko"],
        script: Box::leak(script(rounds).into_boxed_str()),
        exit_code: 0,
        markers: &["COMPARE-IO-END"],
        forbidden: &["panicked"],
        timeout_secs: 120 + 300 * rounds * 2,
        exchange: None,
        outer_gic: OuterGic::V3,
    }
}

/// The measured values: by VMM index and metric key, one per run that ended well.
#[derive(Debug, Default, PartialEq)]
pub struct Results {
    values: BTreeMap<(usize, &'static str), Vec<f64>>,
    /// Runs that ended with an error, by VMM index.
    failed: BTreeMap<usize, u32>,
    /// hvrun's exits per run (its `vcpuN: … exits` log lines, summed).
    exits: Vec<f64>,
}

/// The metric and value a fio terse (version 3) line gives: reads' bandwidth (KiB/s) and
/// IOPS are fields 7 and 8, writes' 48 and 49 (1-based); field 5 is the job's error.
fn fio_value(terse: &str) -> Option<(&'static str, f64)> {
    let fields: Vec<&str> = terse.split(';').collect();
    let field = |n: usize| fields.get(n - 1)?.parse::<f64>().ok();
    if fields.first() != Some(&"3") || fields.get(4) != Some(&"0") {
        return None;
    }
    let (key, _, unit) = METRICS.iter().find(|(key, _, _)| fields.get(2) == Some(key))?;
    let write = key.contains("write");
    let value = match (*unit, write) {
        ("MiB/s", false) => field(7)? / 1024.0,
        ("MiB/s", true) => field(48)? / 1024.0,
        (_, false) => field(8)?,
        (_, true) => field(49)?,
    };
    Some((key, value))
}

/// The metric and value of an iperf3 receiver line (`-f m`): the number before `Mbits/sec`.
fn iperf_value(direction: &str, line: &str) -> Option<(&'static str, f64)> {
    let key = format!("iperf3 {direction}");
    let (key, _, _) = METRICS.iter().find(|(k, _, _)| *k == key)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    Some((key, words.get(at.checked_sub(1)?)?.parse::<f64>().ok()? / 1000.0))
}

/// Reads the runs out of the scenario's output.
pub fn parse(output: &[String]) -> Results {
    let mut results = Results::default();
    let mut run: Vec<(&'static str, f64)> = Vec::new();
    let mut exits = 0.0;
    for line in output {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(count) = super::exits_in(line) {
            exits += count;
        }
        match words.as_slice() {
            ["COMPARE-IO-BEGIN", _] => {
                run.clear();
                exits = 0.0;
            }
            ["COMPARE-IO-END", id, rc] => {
                let Ok(id) = id.parse::<usize>() else { continue };
                if *rc == "rc=0" {
                    for (key, value) in run.drain(..) {
                        results.values.entry((id, key)).or_default().push(value);
                    }
                    if exits > 0.0 {
                        results.exits.push(exits);
                    }
                } else {
                    *results.failed.entry(id).or_default() += 1;
                    run.clear();
                }
            }
            ["FIO", terse] => run.extend(fio_value(terse)),
            ["IPERF", direction, ..] if line.contains("receiver") => run.extend(iperf_value(direction, line)),
            _ => {}
        }
    }
    results
}

/// The markdown table of `results`.
pub fn table(results: &Results) -> String {
    let names = variants().map(|(name, _)| name);
    let mut out = format!(
        "\nI/O in the guest, in the GICv3 rig (KVM's vGICv3 on both): Debian's stock kernel with \
         `io-initramfs.cpio` (1 vCPU, {MEMORY_MB} MiB), Debian's arm64 fio (libaio, O_DIRECT, \
         {SECS} s a job; `guests/io/bench.fio`) on a {DISK_MB} MiB raw image in the rig's tmpfs, \
         and iperf3 ({SECS} s after a first second left out) to and from `iperf3 -s` on the rig \
         host over a tap. The same image file and the same tap on both, virtio-mmio on both \
         (QEMU: `virtio-blk-device` with its default `cache=writeback,aio=threads`, \
         `virtio-net-device` on `-netdev tap` without vhost). Min / **median** / max over the runs.\n\n\
         | I/O | unit | {} | {} | {} / {} (medians) | goal |\n|---|---|---|---|---|---|\n",
        names[0], names[1], names[0], names[1]
    );
    for (key, row, unit) in METRICS {
        let values = |id: usize| results.values.get(&(id, key)).map_or(&[][..], Vec::as_slice);
        let (ours, theirs) = (values(0), values(1));
        let ratio = match (spread(ours), spread(theirs)) {
            (Some(a), Some(b)) if b.1 > 0.0 => format!("{:.2}", a.1 / b.1),
            _ => "–".into(),
        };
        // The rig's network moves tens of Mbit/s: Gbit/s get three decimals.
        let show = |v: &[f64]| match unit {
            "IOPS" => cell_plain(v),
            "Gbit/s" => spread(v).map_or("–".into(), |(lo, mid, hi)| format!("{lo:.3} / **{mid:.3}** / {hi:.3}")),
            _ => cell(v),
        };
        let _ = writeln!(out, "| {row} | {unit} | {} | {} | {ratio} | ≥ 1.0 |", show(ours), show(theirs));
    }
    if !results.exits.is_empty() {
        let _ = writeln!(out, "\nExits to hvrun per run (boot, fio and iperf3): {}.", cell_plain(&results.exits));
    }
    for (id, failed) in &results.failed {
        let _ = writeln!(out, "\n{} run(s) of {} failed.", failed, names.get(*id).copied().unwrap_or("?"));
    }
    out
}

/// min / **median** / max without decimals.
fn cell_plain(values: &[f64]) -> String {
    spread(values).map_or("–".into(), |(lo, mid, hi)| format!("{lo:.0} / **{mid:.0}** / {hi:.0}"))
}

/// How many runs of each VMM ended well (the smallest count over the metrics).
pub fn runs(results: &Results) -> [usize; 2] {
    [0, 1].map(|id| {
        METRICS.iter().map(|(key, _, _)| results.values.get(&(id, *key)).map_or(0, Vec::len)).min().unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A terse line of fio 3.33 (`--terse-version=3`), from a run under qemu-user, with
    /// the job's name, error and the fields read here set.
    fn terse(job: &str, error: u32, read: (u64, u64), write: (u64, u64)) -> String {
        let mut fields: Vec<String> = vec!["0".into(); 130];
        fields[0] = "3".into();
        fields[1] = "fio-3.33".into();
        fields[2] = job.into();
        fields[4] = error.to_string();
        (fields[6], fields[7]) = (read.0.to_string(), read.1.to_string());
        (fields[47], fields[48]) = (write.0.to_string(), write.1.to_string());
        fields.join(";")
    }

    #[test]
    fn fio_and_iperf3_lines_are_read() {
        assert_eq!(
            fio_value(&terse("rand-read-4k-qd32", 0, (24221, 6055), (0, 0))),
            Some(("rand-read-4k-qd32", 6055.0))
        );
        assert_eq!(fio_value(&terse("seq-write-1m", 0, (0, 0), (2048, 2))), Some(("seq-write-1m", 2.0)));
        assert_eq!(fio_value(&terse("rand-write-4k-qd1", 0, (0, 0), (400, 100))), Some(("rand-write-4k-qd1", 100.0)));
        assert_eq!(fio_value(&terse("rand-read-4k-qd1", 5, (1, 1), (0, 0))), None, "a job that failed");
        assert_eq!(fio_value(&terse("other-job", 0, (1, 1), (0, 0))), None);
        // From fio 3.33 itself: read 32772 KiB at 24221 KiB/s, 6055 IOPS.
        let real = "3;fio-3.33;rand-read-4k-qd1;0;0;32772;24221;6055;1353;0;0;0.000000;0.000000";
        assert_eq!(fio_value(real), Some(("rand-read-4k-qd1", 6055.0)));
        let line = "IPERF guest-to-host [  5]   0.00-3.00   sec   337 MBytes   943 Mbits/sec                  receiver";
        assert_eq!(iperf_value("guest-to-host", line), Some(("iperf3 guest-to-host", 0.943)));
        assert_eq!(iperf_value("sideways", line), None);
    }

    #[test]
    fn runs_count_only_when_the_vmm_ended_well() {
        let output: Vec<String> = [
            "COMPARE-IO-BEGIN 0".to_string(),
            format!("FIO {}", terse("rand-read-4k-qd1", 0, (4000, 1000), (0, 0))),
            "IPERF host-to-guest [  5]   0.00-3.00   sec   100 MBytes   1500 Mbits/sec   receiver".into(),
            "[2026-12-02T05:00:00Z INFO ] vcpu0: 25459 exits: 13604 MMIO reads, 8307 MMIO writes, 3548 interrupted"
                .into(),
            "COMPARE-IO-END 0 rc=0".into(),
            "COMPARE-IO-BEGIN 1".into(),
            format!("FIO {}", terse("rand-read-4k-qd1", 0, (8000, 2000), (0, 0))),
            "COMPARE-IO-END 1 rc=143".into(),
            "COMPARE-IO-BEGIN 1".into(),
            format!("FIO {}", terse("rand-read-4k-qd1", 0, (2000, 500), (0, 0))),
            "COMPARE-IO-END 1 rc=0".into(),
        ]
        .to_vec();
        let results = parse(&output);
        assert_eq!(results.values[&(0, "rand-read-4k-qd1")], [1000.0]);
        assert_eq!(results.values[&(0, "iperf3 host-to-guest")], [1.5]);
        assert_eq!(results.values[&(1, "rand-read-4k-qd1")], [500.0], "the failed run's value is dropped");
        assert_eq!(results.failed[&1], 1);
        let table = table(&results);
        assert!(table.contains("| fio random read, 4 KiB, depth 1 | IOPS | 1000 / **1000** / 1000 | 500 / **500** / 500 | 2.00 | ≥ 1.0 |"), "{table}");
        assert!(table.contains("1 run(s) of QEMU failed"), "{table}");
        assert!(table.contains("Exits to hvrun per run (boot, fio and iperf3): 25459 / **25459** / 25459."), "{table}");
        assert_eq!(runs(&results), [0, 0], "no run has every metric");
    }

    #[test]
    fn the_script_alternates_the_vmms_on_one_disk_and_tap() {
        let s = script(2);
        assert_eq!(s.matches("\nrun 0 ").count(), 2);
        let first: Vec<&str> = s.lines().filter(|l| l.starts_with("run ")).map(|l| &l[..5]).collect();
        assert_eq!(first, ["run 0", "run 1", "run 1", "run 0"]);
        assert!(s.contains("--disk /tmp/io.img --net tap=tap0"));
        assert!(s.contains("file=/tmp/io.img,") && s.contains("ifname=tap0,"));
    }
}
