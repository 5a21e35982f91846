//! `cargo xtask e2e` and `cargo xtask demo`: scenarios in the arm64 KVM rig.

use hvrun_e2e::report::Outcome;
use hvrun_e2e::rig::Rig;
use hvrun_e2e::scenario::OuterGic;
use hvrun_e2e::scenarios;

use crate::{cross, guest, paths, setup};

/// How many console lines a failure shows.
const TAIL_LINES: usize = 40;

/// `HVRUN_E2E_HVRUN`: run the scenarios with this static arm64 `hvrun` instead of the
/// one built from the tree (e.g. an older build, to show that a scenario fails there).
const OTHER_HVRUN: &str = "HVRUN_E2E_HVRUN";

fn rig(verbose: bool) -> Rig {
    let guest = paths::guest_dir();
    Rig {
        qemu: "qemu-system-aarch64".into(),
        kernel: guest.join("vmlinuz"),
        busybox: guest.join("busybox"),
        hvrun: std::env::var_os(OTHER_HVRUN).map_or_else(paths::cross_hvrun, std::path::PathBuf::from),
        tools: vec![paths::cross_bin("net-forwarder"), paths::cross_bin("examples/embed")],
        guest_dir: guest,
        work_dir: paths::root().join("target/e2e"),
        verbose,
    }
}

/// Runs the named scenarios (all when `args` names none); `-v` echoes the console.
pub fn run(args: &[String]) -> Result<(), String> {
    let verbose = args.iter().any(|a| a == "-v" || a == "--verbose");
    let names: Vec<String> = args.iter().filter(|a| !a.starts_with('-')).cloned().collect();
    let selected = scenarios::select(&names)?;
    setup::run()?;
    guest::run()?;
    cross::build_hvrun()?;
    let rig = rig(verbose);
    println!("e2e: booting the rig with {} scenario(s)", selected.len());
    let outcomes = rig.run(&selected).map_err(|e| e.to_string())?;
    report(&outcomes, &rig)
}

fn report(outcomes: &[Outcome], rig: &Rig) -> Result<(), String> {
    // What the host checks found, which the table below only sums up as PASS or FAIL.
    for o in outcomes.iter().filter(|o| o.passed()) {
        let found: Vec<&String> = o.output.iter().filter(|l| l.starts_with("host check: ")).collect();
        if !found.is_empty() {
            println!("\n{}:", o.name);
            for line in found {
                println!("  {line}");
            }
        }
    }
    println!("\n{:<20} {:<6} {:>9} {:>10}", "scenario", "result", "rig time", "host time");
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.2} s"));
    for o in outcomes {
        let result = if o.passed() { "PASS" } else { "FAIL" };
        println!("{:<20} {:<6} {:>9} {:>10}", o.name, result, secs(o.rig_secs), secs(o.host_secs));
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    if failed.is_empty() {
        println!("e2e: {} passed, 0 failed", outcomes.len());
        return Ok(());
    }
    let log_of = |name: &str| {
        let gic = scenarios::ALL.iter().find(|s| s.name == name).map_or(OuterGic::V2, |s| s.outer_gic);
        rig.work_dir.join(gic.console_log())
    };
    for o in &failed {
        let log = log_of(&o.name);
        println!("\n--- {} FAILED:", o.name);
        for f in &o.failures {
            println!("  - {f}");
        }
        if o.output.is_empty() {
            // It never started: show the end of the whole console.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            println!("  last {TAIL_LINES} console lines:");
            for line in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
                println!("  | {line}");
            }
        } else {
            println!("  last {TAIL_LINES} lines of its output:");
            for line in &o.output[o.output.len().saturating_sub(TAIL_LINES)..] {
                println!("  | {line}");
            }
        }
    }
    Err(format!(
        "{} of {} scenario(s) failed; full consoles in {}",
        failed.len(),
        outcomes.len(),
        rig.work_dir.join("console*.log").display()
    ))
}

/// Boots the demo guest in the rig and shows its console.
pub fn demo() -> Result<(), String> {
    run(&["-v".to_string(), "hello".to_string()])
}

/// `cargo xtask boottime [N]`: boots hvrun's own kernel N times (default 10) in the rig
/// and prints the boot-timer figures (hvrun start → the initramfs's first line) as
/// min/median/max, and hvrun's resident memory after a boot, next to the resident part
/// of its largest mapping, guest RAM.
pub fn boottime(args: &[String]) -> Result<(), String> {
    let runs: u32 = match args.first() {
        Some(n) => n.parse().map_err(|_| format!("boottime: `{n}` is not a number of boots"))?,
        None => 10,
    };
    setup::run()?;
    guest::run()?;
    cross::build_hvrun()?;
    let script = format!(
        "for i in $(seq {runs}); do\n\
         RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M \\\n\
         --cmdline 'console=ttyAMA0 quiet -- true' 2>&1 | grep -o 'boot-timer: [0-9]* ms after hvrun started'\n\
         done\n\
         /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M \\\n\
         --cmdline 'console=ttyAMA0 quiet -- sleep 3' >/dev/null 2>&1 & pid=$!\n\
         sleep 3\n\
         total=$(awk '/^VmRSS:/ {{ print $2 }}' /proc/$pid/status)\n\
         guest=$(awk '/^Size:/ {{ s = $2 }} /^Rss:/ {{ if (s > max) {{ max = s; r = $2 }} }} END {{ print r }}' /proc/$pid/smaps)\n\
         echo \"rss: total $total kB, guest RAM ${{guest:-0}} kB\"\n\
         wait $pid"
    );
    let scenario = hvrun_e2e::scenario::Scenario {
        name: "boottime",
        about: "boot-time measurement",
        artifacts: &["Image", "initramfs.cpio"],
        script: Box::leak(script.into_boxed_str()),
        exit_code: 0,
        markers: &["boot-timer:", "rss: total"],
        forbidden: &["panicked"],
        timeout_secs: 60 + 30 * runs,
        exchange: None,
        outer_gic: OuterGic::V2,
    };
    let outcome = rig(false).run(std::slice::from_ref(&scenario)).map_err(|e| e.to_string())?.remove(0);
    let mut ms: Vec<u64> = outcome
        .output
        .iter()
        .filter_map(|l| l.split("boot-timer: ").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    ms.sort_unstable();
    if ms.is_empty() || !outcome.passed() {
        return Err(format!("boottime: the boots did not report (failures: {:?})", outcome.failures));
    }
    println!(
        "boottime: {} boots of hvrun's kernel in the rig, hvrun start → init: min {} ms, median {} ms, max {} ms",
        ms.len(),
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    if let Some(rss) = outcome.output.iter().find(|l| l.starts_with("rss:")) {
        let kb: Vec<u64> = rss.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        match kb.as_slice() {
            [total, guest] => println!(
                "boottime: hvrun resident {total} kB after boot, {guest} kB of it guest RAM: {} kB beyond guest RAM",
                total.saturating_sub(*guest)
            ),
            _ => println!("boottime: {rss}"),
        }
    }
    Ok(())
}
