//! `cargo xtask e2e` and `cargo xtask demo`: scenarios in the arm64 KVM rig.

use hvrun_e2e::report::Outcome;
use hvrun_e2e::rig::Rig;
use hvrun_e2e::scenarios;

use crate::{cross, guest, paths, setup};

/// How many console lines a failure shows.
const TAIL_LINES: usize = 40;

fn rig(verbose: bool) -> Rig {
    let guest = paths::guest_dir();
    Rig {
        qemu: "qemu-system-aarch64".into(),
        kernel: guest.join("vmlinuz"),
        busybox: guest.join("busybox"),
        hvrun: paths::cross_hvrun(),
        tools: vec![paths::cross_bin("net-forwarder")],
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
    let log = rig.work_dir.join("console.log");
    for o in &failed {
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
    Err(format!("{} of {} scenario(s) failed; full console in {}", failed.len(), outcomes.len(), log.display()))
}

/// Boots the demo guest in the rig and shows its console.
pub fn demo() -> Result<(), String> {
    run(&["-v".to_string(), "hello".to_string()])
}
