//! `cargo xtask compare [ROUNDS]`: hvrun side by side with QEMU in one rig run. The same
//! guest (Debian's stock kernel and the busybox initramfs, 1 vCPU, 256 MiB, `quiet`) boots
//! with each VMM in turn, interleaved over ROUNDS rounds (default 3), once per kind of rig:
//! - GICv2 rig: hvrun's own GICv2 (`--gic v2`) against QEMU's userspace GICv2
//!   (`kernel-irqchip=off`), and QEMU with KVM's in-kernel vGICv2;
//! - GICv3 rig: hvrun on KVM's vGICv3 (`--gic v3`) against QEMU on it;
//! - in both, the smallest guest (`guests/poweroff.S`: powers off at once), for each VMM's
//!   own start and teardown cost.
//!
//! Times come from the rig's `/proc/uptime` (10 ms): start → the guest init's first line
//! (`hvrun-guest: init started`), and start → the VMM's exit. Before each run the rig
//! drops its caches and compacts its memory, so every VMM finds the same free memory
//! (huge pages above all: without this, a VMM run after another was up to 2.5× slower);
//! each round starts with the next VMM. The table goes to standard
//! output and into docs/BENCHMARKS.md ("Side by side with QEMU").

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hvrun_e2e::scenario::{OuterGic, Scenario};

use crate::peers::{self, QEMU_IN_RIG};
use crate::{cross, e2e, guest, io_guest, paths, setup};

mod io;
mod timeline;

/// The guest both VMMs boot.
const GUEST: &str = "-kernel /guest/vmlinuz -initrd /guest/initramfs.cpio";
/// Its command line: init runs `true`, then powers off.
const APPEND: &str = "console=ttyAMA0 quiet -- true";
/// QEMU's machine apart from the interrupt controller and the RAM: KVM, one vCPU, the
/// console on standard output, nothing else.
const QEMU_BASE: &str =
    "-accel kvm -cpu host -smp 1 -display none -nodefaults -no-user-config -serial stdio -monitor none -no-reboot";
/// hvrun's equivalent.
/// (`RUST_LOG=info`: its boot timer's and exit counts' lines, which the table reports.)
const HVRUN_BASE: &str = "env RUST_LOG=info /bin/hvrun --cpus 1 --memory 256M";

/// One VMM configuration in the comparison.
struct Variant {
    /// Its name in the table.
    name: &'static str,
    /// The command, after the shell's word splitting.
    command: String,
    /// Whether the guest is the Linux one (else the smallest guest, which has no init).
    linux: bool,
}

fn variants(gic: OuterGic) -> Vec<Variant> {
    let hvrun = |gic: &str, linux: bool| {
        if linux {
            format!(
                "{HVRUN_BASE} --gic {gic} --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --cmdline '{APPEND}'"
            )
        } else {
            format!("{HVRUN_BASE} --gic {gic} --kernel /guest/poweroff.bin")
        }
    };
    let qemu = |machine: &str, linux: bool| {
        let guest = if linux { format!("{GUEST} -append '{APPEND}'") } else { "-kernel /guest/poweroff.bin".into() };
        format!("{QEMU_IN_RIG} -M {machine} {QEMU_BASE} -m 256 {guest}")
    };
    match gic {
        OuterGic::V2 => vec![
            Variant { name: "hvrun --gic v2", command: hvrun("v2", true), linux: true },
            Variant {
                name: "qemu gic v2 userspace",
                command: qemu("virt,gic-version=2,kernel-irqchip=off", true),
                linux: true,
            },
            Variant { name: "qemu gic v2 in-kernel", command: qemu("virt,gic-version=2", true), linux: true },
            Variant { name: "hvrun smallest guest", command: hvrun("v2", false), linux: false },
            Variant {
                name: "qemu smallest guest",
                command: qemu("virt,gic-version=2,kernel-irqchip=off", false),
                linux: false,
            },
        ],
        OuterGic::V3 => vec![
            Variant { name: "hvrun --gic v3", command: hvrun("v3", true), linux: true },
            Variant { name: "qemu gic v3 in-kernel", command: qemu("virt,gic-version=3", true), linux: true },
            Variant { name: "hvrun smallest guest v3", command: hvrun("v3", false), linux: false },
            Variant { name: "qemu smallest guest v3", command: qemu("virt,gic-version=3", false), linux: false },
        ],
    }
}

/// The pairs whose ratio the table shows: (hvrun, QEMU, what the goal is).
const RATIOS: [(&str, &str, &str); 5] = [
    ("hvrun --gic v2", "qemu gic v2 userspace", "≤ 0.45"),
    ("hvrun --gic v2", "qemu gic v2 in-kernel", "–"),
    ("hvrun --gic v3", "qemu gic v3 in-kernel", "≤ 0.5"),
    ("hvrun smallest guest", "qemu smallest guest", "≤ 0.3"),
    ("hvrun smallest guest v3", "qemu smallest guest v3", "≤ 0.3"),
];

/// The rig script for `variants`, interleaved over `rounds`. Each run prints
/// `COMPARE-INIT N T` when the guest's init speaks and `COMPARE-RUN N start=S end=E rc=R`.
fn script(variants: &[Variant], rounds: u32) -> String {
    let mut s = String::from(
        "set -o pipefail\n\
         run() {\n\
         \x20   id=$1; shift\n\
         \x20   sync; echo 3 >/proc/sys/vm/drop_caches; echo 1 >/proc/sys/vm/compact_memory\n\
         \x20   s=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   \"$@\" </dev/null 2>&1 | awk -v id=\"$id\" '/hvrun-guest: init started/ { getline u < \"/proc/uptime\"; close(\"/proc/uptime\"); split(u, a, \" \"); print \"COMPARE-INIT \" id \" \" a[1] } { print }'\n\
         \x20   rc=$?\n\
         \x20   echo \"COMPARE-RUN $id start=$s end=$(cut -d' ' -f1 /proc/uptime) rc=$rc\"\n\
         }\n",
    );
    for round in 1..=rounds {
        let _ = writeln!(s, "echo 'COMPARE-ROUND {round}'");
        // Each round starts one VMM later, so no VMM always runs first or after another.
        let n = variants.len();
        for id in (0..n).map(|i| (i + round as usize - 1) % n) {
            let _ = writeln!(s, "run {id} {}", variants[id].command);
        }
    }
    s
}

/// Times of one variant: start → init (Linux guests) and start → exit, seconds; for
/// hvrun also its own start (build start → the first vCPU entry, from the boot timer's
/// line, ms) and its exits per run.
#[derive(Debug, Default, Clone, PartialEq)]
struct Times {
    init: Vec<f64>,
    exit: Vec<f64>,
    own_start_ms: Vec<f64>,
    exits: Vec<f64>,
    failed: u32,
}

/// What hvrun's log said during one run.
#[derive(Debug, Default)]
struct Log {
    own_start_ms: Option<f64>,
    exits: f64,
}

/// Reads hvrun's log lines: `guest boot-timer: N ms after hvrun started, M ms after the
/// first vCPU entry` and `vcpuK: X exits: …`.
fn read_log(line: &str, log: &mut Log) {
    if let Some(rest) = line.split("boot-timer: ").nth(1) {
        let numbers: Vec<f64> = rest.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
        if let [since_start, since_entry] = numbers.as_slice() {
            log.own_start_ms = Some(since_start - since_entry);
        }
    } else if let Some(count) = exits_in(line) {
        log.exits += count;
    }
}

/// The exits a `vcpuN: X exits: …` log line of hvrun counts.
fn exits_in(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once("] vcpu")?;
    rest.split_whitespace().nth(1).filter(|_| rest.contains(" exits: "))?.parse().ok()
}

/// Reads the runs out of the rig's output, by variant index.
fn parse(output: &[String]) -> BTreeMap<usize, Times> {
    let mut times: BTreeMap<usize, Times> = BTreeMap::new();
    let mut init: BTreeMap<usize, f64> = BTreeMap::new();
    let mut log = Log::default();
    for line in output {
        read_log(line, &mut log);
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["COMPARE-INIT", id, at] => {
                if let (Ok(id), Ok(at)) = (id.parse(), at.parse()) {
                    init.insert(id, at);
                }
            }
            ["COMPARE-RUN", id, fields @ ..] => {
                let Ok(id) = id.parse::<usize>() else { continue };
                let field = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key)?.parse::<f64>().ok());
                let ok = fields.contains(&"rc=0");
                let entry = times.entry(id).or_default();
                match (field("start="), field("end=")) {
                    (Some(start), Some(end)) if ok => {
                        entry.exit.push(end - start);
                        if let Some(at) = init.remove(&id) {
                            entry.init.push(at - start);
                        }
                        entry.own_start_ms.extend(log.own_start_ms);
                        if log.exits > 0.0 {
                            entry.exits.push(log.exits);
                        }
                    }
                    _ => entry.failed += 1,
                }
                init.remove(&id);
                log = Log::default();
            }
            _ => {}
        }
    }
    times
}

/// min / median / max.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some((*v.first()?, v[v.len() / 2], *v.last()?))
}

/// min / **median** / max, two decimals.
fn cell(values: &[f64]) -> String {
    spread(values).map_or("–".into(), |(lo, mid, hi)| format!("{lo:.2} / **{mid:.2}** / {hi:.2}"))
}

/// The markdown table of `results` (variant name → times).
fn table(results: &[(&str, Times)], machine: &str, rounds: u32) -> String {
    let mut out = String::from("## Side by side with QEMU\n\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask compare` ({rounds} interleaved rounds in one rig run per kind of rig). \
         The same guest, Debian's stock arm64 kernel with the busybox initramfs (1 vCPU, 256 MiB, \
         `quiet`, init runs `true` and powers off), booted by hvrun and by Debian's arm64 \
         `qemu-system-aarch64` ({machine}) inside the arm64 rig, both on its KVM. Seconds from the \
         VMM's start, min / **median** / max, read from the rig's `/proc/uptime` (10 ms). The \
         smallest guest (`guests/poweroff.S`) powers off at once: the VMM's own start and teardown.\n"
    );
    out.push_str("| VMM | runs | start → guest init (s) | start → exit (s) |\n|---|---|---|---|\n");
    for (name, t) in results {
        let runs =
            if t.failed > 0 { format!("{} ({} failed)", t.exit.len(), t.failed) } else { t.exit.len().to_string() };
        let _ = writeln!(out, "| {name} | {runs} | {} | {} |", cell(&t.init), cell(&t.exit));
    }
    out.push_str(
        "\n| hvrun | its own start: build → first vCPU entry (ms) | exits to hvrun per run |\n|---|---|---|\n",
    );
    for (name, t) in results.iter().filter(|(n, t)| n.starts_with("hvrun") && !t.exits.is_empty()) {
        let plain =
            |v: &[f64]| spread(v).map_or("–".into(), |(lo, mid, hi)| format!("{lo:.0} / **{mid:.0}** / {hi:.0}"));
        let _ = writeln!(out, "| {name} | {} | {} |", plain(&t.own_start_ms), plain(&t.exits));
    }
    out.push_str("\n| hvrun / QEMU (medians) | start → init | start → exit | goal (exit) |\n|---|---|---|---|\n");
    let median = |name: &str, init: bool| {
        let t = &results.iter().find(|(n, _)| *n == name)?.1;
        spread(if init { &t.init } else { &t.exit }).map(|s| s.1)
    };
    for (ours, theirs, goal) in RATIOS {
        let ratio = |init| match (median(ours, init), median(theirs, init)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(out, "| {ours} / {theirs} | {} | {} | {goal} |", ratio(true), ratio(false));
    }
    out
}

/// Puts `section` (starting `## Title`) into `doc` in place of the section of that title,
/// or at the end.
pub fn put_section(doc: &str, section: &str) -> String {
    let title = section.lines().next().unwrap_or_default();
    let Some(start) = doc.find(&format!("\n{title}\n")).map(|i| i + 1) else {
        return format!("{}\n\n{}", doc.trim_end(), section);
    };
    let end = doc[start + title.len()..].find("\n## ").map_or(doc.len(), |i| start + title.len() + i + 1);
    format!(
        "{}{}{}",
        &doc[..start],
        section.trim_end(),
        if end < doc.len() { format!("\n\n{}", &doc[end..]) } else { "\n".into() }
    )
}

/// What `cargo xtask compare` runs: the start rows, the I/O rows, or both (and only then
/// does it write docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parts {
    Both,
    Start,
    Io,
}

/// `cargo xtask compare [ROUNDS] [--start-only|--io-only]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut rounds = 3;
    let mut parts = Parts::Both;
    for arg in args {
        match arg.as_str() {
            "--start-only" => parts = Parts::Start,
            "--io-only" => parts = Parts::Io,
            n => {
                rounds =
                    n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("compare: `{n}` is neither a number of rounds nor --start-only/--io-only")
                    })?
            }
        }
    }
    setup::run()?;
    guest::run()?;
    if parts != Parts::Start {
        io_guest::build()?;
    }
    cross::build_hvrun()?;
    let (files, version) = peers::qemu()?;
    let mut rig = e2e::rig(false);
    rig.files = files;
    let mut results: Vec<(&str, Times)> = Vec::new();
    let mut io_results = None;
    let mut timelines = timeline::Timelines::new();
    for (gic, name) in [(OuterGic::V2, "compare-gicv2"), (OuterGic::V3, "compare-gicv3")] {
        let variants = variants(gic);
        let mut scenarios = Vec::new();
        if parts != Parts::Io {
            scenarios.push(Scenario {
                name,
                about: "hvrun and QEMU boot the same guest, interleaved",
                artifacts: &["vmlinuz", "initramfs.cpio", "poweroff.bin", "timeline.bin"],
                script: Box::leak(
                    format!("{}{}", script(&variants, rounds), timeline::script(gic, rounds)).into_boxed_str(),
                ),
                exit_code: 0,
                markers: &["COMPARE-RUN", "TIMELINE"],
                forbidden: &["panicked"],
                timeout_secs: 60 + 40 * rounds * (variants.len() as u32 + 2),
                exchange: None,
                outer_gic: gic,
            });
        }
        let io = parts != Parts::Start && gic == OuterGic::V3;
        if io {
            scenarios.push(io::scenario(rounds));
        }
        if scenarios.is_empty() {
            continue;
        }
        let mut what = Vec::new();
        if parts != Parts::Io {
            what.push(format!("{} VMM configurations", variants.len()));
        }
        if io {
            what.push("the I/O guest on hvrun and QEMU".to_string());
        }
        println!("compare: {} × {rounds} rounds in the GICv{} rig", what.join(" and "), gic.version());
        let mut outcomes = rig.run(&scenarios).map_err(|e| e.to_string())?.into_iter();
        if parts != Parts::Io {
            let outcome = outcomes.next().ok_or("compare: the rig returned no outcome")?;
            timeline::parse(&outcome.output, &mut timelines);
            let mut times = parse(&outcome.output);
            for (id, v) in variants.iter().enumerate() {
                let t = times.remove(&id).unwrap_or_default();
                if t.exit.is_empty() {
                    return Err(format!(
                        "compare: `{}` never ran to the end; the rig's last lines: {:#?}",
                        v.name,
                        tail(&outcome.output)
                    ));
                }
                if v.linux && t.init.len() != t.exit.len() {
                    return Err(format!("compare: `{}`: the guest's init did not speak in every run", v.name));
                }
                results.push((v.name, t));
            }
        }
        if io {
            let outcome = outcomes.next().ok_or("compare: the rig returned no I/O outcome")?;
            let parsed = io::parse(&outcome.output);
            if io::runs(&parsed).contains(&0) {
                return Err(format!(
                    "compare: a VMM never finished the I/O workload; the rig's last lines: {:#?}",
                    tail(&outcome.output)
                ));
            }
            io_results = Some(parsed);
        }
    }
    let machine = format!("QEMU {version}; rig: {}", crate::bench::machine());
    let mut section = if parts != Parts::Io { table(&results, &machine, rounds) } else { String::new() };
    section.push_str(&timeline::table(&timelines));
    if let Some(io) = &io_results {
        section.push_str(&io::table(io));
    }
    println!("\n{section}");
    if parts != Parts::Both {
        println!("compare: only part of the comparison ran; docs/BENCHMARKS.md is left as it was");
        return Ok(());
    }
    let path = paths::root().join("docs/BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, put_section(&doc, &section)).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("compare: wrote {}", path.display());
    Ok(())
}

/// The last 30 lines of a rig's output, newest first.
fn tail(output: &[String]) -> Vec<&String> {
    output.iter().rev().take(30).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_read_from_the_rigs_output() {
        let output: Vec<String> = [
            "COMPARE-ROUND 1",
            "COMPARE-INIT 0 12.50",
            "[2026-12-02T03:00:00Z INFO ] guest boot-timer: 1516 ms after hvrun started, 1495 ms after the first vCPU entry",
            "hvrun-guest: init started",
            "[2026-12-02T03:00:01Z INFO ] vcpu0: 25459 exits: 13604 MMIO reads, 8307 MMIO writes, 3548 interrupted; 9 timer level changes",
            "COMPARE-RUN 0 start=11.00 end=13.60 rc=0",
            "COMPARE-RUN 1 start=13.60 end=14.10 rc=0",
            "COMPARE-INIT 0 20.00",
            "COMPARE-RUN 0 start=19.00 end=21.00 rc=1",
            "COMPARE-RUN 0 start=21.00 end=23.00 rc=0",
        ]
        .map(String::from)
        .to_vec();
        let times = parse(&output);
        let hvrun = &times[&0];
        assert_eq!(hvrun.exit.len(), 2);
        assert!((hvrun.exit[0] - 2.6).abs() < 1e-9 && (hvrun.init[0] - 1.5).abs() < 1e-9);
        assert_eq!(hvrun.init.len(), 1, "a failed run's init is not kept, a run without one has none");
        assert_eq!(hvrun.failed, 1);
        assert_eq!(
            (hvrun.own_start_ms.as_slice(), hvrun.exits.as_slice()),
            (&[21.0][..], &[25459.0][..]),
            "the first run's log only"
        );
        assert_eq!(times[&1].init.len(), 0);
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
    }

    #[test]
    fn the_section_replaces_its_old_self_and_keeps_the_rest() {
        let doc = "# Benchmarks\n\ntable\n\n## Side by side with QEMU\n\nold\n\n## Other\n\nkept\n";
        let new = put_section(doc, "## Side by side with QEMU\n\nnew\n");
        assert_eq!(new, "# Benchmarks\n\ntable\n\n## Side by side with QEMU\n\nnew\n\n## Other\n\nkept\n");
        let appended = put_section("# Benchmarks\n\ntable\n", "## Side by side with QEMU\n\nnew\n");
        assert_eq!(appended, "# Benchmarks\n\ntable\n\n## Side by side with QEMU\n\nnew\n");
        let last = put_section("# B\n\n## Side by side with QEMU\n\nold\n", "## Side by side with QEMU\n\nnew\n");
        assert_eq!(last, "# B\n\n## Side by side with QEMU\n\nnew\n");
    }

    #[test]
    fn every_ratio_names_variants_that_run() {
        let names: Vec<&str> = [OuterGic::V2, OuterGic::V3].into_iter().flat_map(variants).map(|v| v.name).collect();
        for (ours, theirs, _) in RATIOS {
            assert!(names.contains(&ours) && names.contains(&theirs), "{ours} / {theirs}");
        }
        let s = script(&variants(OuterGic::V2), 2);
        assert_eq!(s.matches("\nrun ").count(), 10);
        assert!(s.contains("kernel-irqchip=off") && s.contains("--gic v2"));
    }
}
