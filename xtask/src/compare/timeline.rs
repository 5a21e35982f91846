//! `cargo xtask compare`'s timeline of hvrun's own start and teardown, measured from
//! outside: hvrun runs under the rig's `timeline` tool (`tests/src/bin/timeline.rs`),
//! which stamps each line of its output as it arrives, and hvrun's log (`RUST_LOG=info`)
//! marks the points between:
//! - `booting on …`: the machine is built (kernel and initrd loaded, guest RAM mapped, the
//!   VM, its GIC and devices made, the device tree written), just before the vCPU threads;
//! - `guest boot-timer: …`: the guest wrote the boot timer. `guests/timeline.S` does so
//!   with its first store, so for that guest this is its first instructions (plus one
//!   exit); the line also gives hvrun's own count from the build's start to the first
//!   vCPU entry;
//! - `reboot: Power down` (Linux's last console line) or, for the smallest guest, the
//!   boot timer again (it powers off with its next instruction): the guest powers off;
//! - `vcpuN: … exits`: that vCPU's thread is done;
//! - the process's end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hvrun_e2e::scenario::OuterGic;

use super::spread;

/// The phases the table shows, in order.
const PHASES: [&str; 6] = [
    "process start → machine built",
    "machine built → guest's first instruction",
    "hvrun's own count: build → first vCPU entry",
    "guest power-off → vCPU threads done",
    "vCPU threads done → process exit",
    "process start → process exit",
];

/// The two guests: `(name, the hvrun arguments after the GIC)`.
const GUESTS: [(&str, &str); 2] = [
    ("smallest", "--kernel /guest/timeline.bin"),
    ("Linux", "--kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --cmdline 'console=ttyAMA0 quiet -- true'"),
];

/// The run's tag: which rig, which guest.
fn tag(gic: OuterGic, guest: &str) -> String {
    format!("hvrun-v{}-{guest}", gic.version())
}

/// The lines of the rig script that run hvrun under `timeline`, `rounds` times, with
/// each guest in turn; each after the caches are dropped, as for the other runs.
pub fn script(gic: OuterGic, rounds: u32) -> String {
    let mut s = String::new();
    for _ in 0..rounds {
        for (guest, args) in GUESTS {
            let _ = writeln!(
                s,
                "sync; echo 3 >/proc/sys/vm/drop_caches; echo 1 >/proc/sys/vm/compact_memory\n\
                 /bin/timeline {} env RUST_LOG=info /bin/hvrun --cpus 1 --memory 256M --gic v{} {args} </dev/null",
                tag(gic, guest),
                gic.version()
            );
        }
    }
    s
}

/// The points of one run, in milliseconds since the process started.
#[derive(Debug, Default, Clone, PartialEq)]
struct Run {
    built: Option<f64>,
    timer: Option<f64>,
    /// hvrun's own count from the build's start to the first vCPU entry.
    own_entry: Option<f64>,
    power_down: Option<f64>,
    vcpus_done: Option<f64>,
    exit: Option<(f64, i32)>,
}

impl Run {
    /// The phases' durations (ms), in [`PHASES`]' order; `None` where a point is missing
    /// or does not apply (the guest's first instruction is only seen for the smallest).
    fn phases(&self, smallest: bool) -> [Option<f64>; 6] {
        let between = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let exit = self.exit.map(|(at, _)| at);
        let off = if smallest { self.timer } else { self.power_down };
        [
            self.built,
            if smallest { between(self.built, self.timer) } else { None },
            self.own_entry,
            between(off, self.vcpus_done),
            between(self.vcpus_done, exit),
            exit,
        ]
    }
}

/// The durations of each phase, by run tag, over the runs that exited 0.
pub type Timelines = BTreeMap<String, Vec<[Option<f64>; 6]>>;

/// Reads the `TIMELINE TAG +MS STREAM TEXT` lines out of the rig's output into `into`.
pub fn parse(output: &[String], into: &mut Timelines) {
    let mut runs: BTreeMap<String, Run> = BTreeMap::new();
    for line in output {
        let mut words = line.splitn(5, ' ');
        let (Some("TIMELINE"), Some(tag), Some(at), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(at) = at.strip_prefix('+').and_then(|a| a.parse::<f64>().ok()) else { continue };
        let text = words.next().unwrap_or_default();
        let run = runs.entry(tag.to_string()).or_default();
        if kind == "exit" {
            run.exit = Some((at, text.trim().parse().unwrap_or(-1)));
            let run = runs.remove(tag).unwrap_or_default();
            if run.exit.is_some_and(|(_, code)| code == 0) {
                let smallest = tag.ends_with(GUESTS[0].0);
                into.entry(tag.to_string()).or_default().push(run.phases(smallest));
            }
        } else if text.contains("booting on ") {
            run.built.get_or_insert(at);
        } else if let Some(rest) = text.split("boot-timer: ").nth(1) {
            run.timer.get_or_insert(at);
            let numbers: Vec<f64> =
                rest.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
            if let [since_start, since_entry] = numbers.as_slice() {
                run.own_entry.get_or_insert(since_start - since_entry);
            }
        } else if text.contains("reboot: Power down") {
            run.power_down.get_or_insert(at);
        } else if super::exits_in(text).is_some() {
            run.vcpus_done = Some(at);
        }
    }
}

/// The markdown table of `timelines`.
pub fn table(timelines: &Timelines) -> String {
    let columns: Vec<(String, String)> = [OuterGic::V2, OuterGic::V3]
        .into_iter()
        .flat_map(|gic| GUESTS.map(|(guest, _)| (tag(gic, guest), format!("--gic v{}, {guest}", gic.version()))))
        .filter(|(tag, _)| timelines.contains_key(tag))
        .collect();
    if columns.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nhvrun's own start and teardown, from outside: hvrun run by the rig's `timeline` tool, \
         which stamps each line of hvrun's output (`RUST_LOG=info`) as it arrives \
         (`xtask/src/compare/timeline.rs` says which line marks what). The smallest guest here is \
         `guests/timeline.S`, which writes the boot timer with its first store, then powers off; \
         the Linux guest is the one above. Milliseconds, min / **median** / max.\n\n| phase |",
    );
    for (_, name) in &columns {
        let _ = write!(out, " {name} |");
    }
    out.push_str(&format!("\n|---|{}\n", "---|".repeat(columns.len())));
    for (i, phase) in PHASES.iter().enumerate() {
        let _ = write!(out, "| {phase} |");
        for (tag, _) in &columns {
            let values: Vec<f64> = timelines[tag].iter().filter_map(|p| p[i]).collect();
            let cell =
                spread(&values).map_or("–".into(), |(lo, mid, hi)| format!("{lo:.1} / **{mid:.1}** / {hi:.1}"));
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_points_become_phases() {
        let output: Vec<String> = [
            "TIMELINE hvrun-v3-smallest +41.500 err [2026-12-02T05:00:00Z INFO ] booting on KVM with 1 vCPU(s), 256 MiB and the hypervisor's GICv3",
            "TIMELINE hvrun-v3-smallest +45.000 err [2026-12-02T05:00:00Z INFO ] guest boot-timer: 40 ms after hvrun started, 1 ms after the first vCPU entry",
            "TIMELINE hvrun-v3-smallest +47.200 err [2026-12-02T05:00:00Z INFO ] vcpu0: 2 exits: 0 MMIO reads, 1 MMIO writes, 0 interrupted; 0 timer level changes",
            "TIMELINE hvrun-v3-smallest +60.000 exit 0",
            "TIMELINE hvrun-v3-Linux +30.000 err [2026-12-02T05:00:00Z INFO ] booting on KVM with 1 vCPU(s), 256 MiB and the hypervisor's GICv3",
            "TIMELINE hvrun-v3-Linux +1500.000 err [2026-12-02T05:00:00Z INFO ] guest boot-timer: 1480 ms after hvrun started, 1455 ms after the first vCPU entry",
            "TIMELINE hvrun-v3-Linux +1600.000 out [    1.600000] reboot: Power down",
            "TIMELINE hvrun-v3-Linux +1610.000 err [2026-12-02T05:00:00Z INFO ] vcpu0: 900 exits: 1 MMIO reads",
            "TIMELINE hvrun-v3-Linux +1650.000 exit 0",
            "TIMELINE hvrun-v3-Linux +10.000 err [2026-12-02T05:00:00Z INFO ] booting on KVM",
            "TIMELINE hvrun-v3-Linux +99.000 exit 1",
        ]
        .map(String::from)
        .to_vec();
        let mut timelines = Timelines::new();
        parse(&output, &mut timelines);
        assert_eq!(
            timelines["hvrun-v3-smallest"],
            [[Some(41.5), Some(3.5), Some(39.0), Some(2.200000000000003), Some(12.799999999999997), Some(60.0)]]
        );
        assert_eq!(
            timelines["hvrun-v3-Linux"],
            [[Some(30.0), None, Some(25.0), Some(10.0), Some(40.0), Some(1650.0)]],
            "the run that failed is left out"
        );
        let table = table(&timelines);
        assert!(table.contains("| phase | --gic v3, smallest | --gic v3, Linux |"), "{table}");
        assert!(
            table.contains("| vCPU threads done → process exit | 12.8 / **12.8** / 12.8 | 40.0 / **40.0** / 40.0 |"),
            "{table}"
        );
        assert!(
            script(OuterGic::V2, 2).matches("/bin/timeline hvrun-v2-smallest env RUST_LOG=info /bin/hvrun").count()
                == 2
        );
    }
}
