//! `cargo xtask e2e` and `cargo xtask demo`: scenarios in the arm64 KVM rig.

use hvrun_e2e::report::{to_run_again, Outcome};
use hvrun_e2e::rig::Rig;
use hvrun_e2e::scenario::{OuterGic, Scenario};
use hvrun_e2e::scenarios;

use crate::{cross, guest, paths, setup};

/// How many console lines a failure shows.
const TAIL_LINES: usize = 40;

/// `HVRUN_E2E_HVRUN`: run the scenarios with this static arm64 `hvrun` instead of the
/// one built from the tree (e.g. an older build, to show that a scenario fails there).
const OTHER_HVRUN: &str = "HVRUN_E2E_HVRUN";

/// The rig the scenarios run in (`-v`: echo its console).
pub fn rig(verbose: bool) -> Rig {
    let guest = paths::guest_dir();
    Rig {
        qemu: "qemu-system-aarch64".into(),
        kernel: guest.join("vmlinuz"),
        busybox: guest.join("busybox"),
        hvrun: std::env::var_os(OTHER_HVRUN).map_or_else(paths::cross_hvrun, std::path::PathBuf::from),
        tools: [
            "net-forwarder",
            "timeline",
            "vsock-peer",
            "examples/embed",
            "examples/memdisk",
            "examples/own_device",
            "examples/balloon",
        ]
        .into_iter()
        .map(paths::cross_bin)
        .collect(),
        guest_tools: vec!["vsock-peer".into()],
        files: Vec::new(),
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
    if selected.iter().any(|s| s.artifacts.contains(&crate::io_guest::ARTIFACT)) {
        crate::io_guest::build()?;
    }
    if selected.iter().any(|s| s.artifacts.contains(&scenarios::CURL_ARCHIVE)) {
        crate::peers::curl()?;
    }
    cross::build_hvrun()?;
    let rig = rig(verbose);
    println!("e2e: booting the rig with {} scenario(s)", selected.len());
    let mut outcomes = rig.run(&selected).map_err(|e| e.to_string())?;
    let again = run_again(&rig, &selected, &mut outcomes)?;
    report(&outcomes, &again, &rig)
}

/// Runs once more, in a fresh rig, the scenarios that failed after their guest crashed
/// ([`to_run_again`]: the rare crash of a guest in this nested rig). Their first run's
/// failure is printed first, and that rig's console logs are kept as `first-console*.log`.
/// Returns their names; their outcomes are the second run's.
fn run_again(rig: &Rig, selected: &[Scenario], outcomes: &mut [Outcome]) -> Result<Vec<String>, String> {
    let crashed: Vec<(String, &str)> =
        to_run_again(outcomes).into_iter().map(|(name, sign)| (name.to_string(), sign)).collect();
    if crashed.is_empty() {
        return Ok(Vec::new());
    }
    for (name, sign) in &crashed {
        if let Some(o) = outcomes.iter().find(|o| o.name == *name) {
            let heading = format!("{name} FAILED in its first run, where its guest crashed (`{sign}`)");
            print_failure(o, &heading, &log_of(rig, name));
        }
    }
    for gic in [OuterGic::V2, OuterGic::V3] {
        let log = rig.work_dir.join(gic.console_log());
        if log.exists() {
            let kept = rig.work_dir.join(format!("first-{}", gic.console_log()));
            std::fs::copy(&log, &kept).map_err(|e| format!("keeping {}: {e}", log.display()))?;
        }
    }
    let names: Vec<String> = crashed.into_iter().map(|(name, _)| name).collect();
    println!("\ne2e: running {} once more in a fresh rig", names.join(", "));
    let again: Vec<Scenario> = selected.iter().filter(|s| names.iter().any(|n| n == s.name)).cloned().collect();
    for second in rig.run(&again).map_err(|e| e.to_string())? {
        if let Some(first) = outcomes.iter_mut().find(|o| o.name == second.name) {
            *first = second;
        }
    }
    Ok(names)
}

/// The console log of the rig that ran scenario `name`.
fn log_of(rig: &Rig, name: &str) -> std::path::PathBuf {
    let gic = scenarios::ALL.iter().find(|s| s.name == name).map_or(OuterGic::V2, |s| s.outer_gic);
    rig.work_dir.join(gic.console_log())
}

/// Prints a failed scenario's failures and the end of its output (of the whole console
/// `log` when it printed nothing), under `heading`.
fn print_failure(o: &Outcome, heading: &str, log: &std::path::Path) {
    println!("\n--- {heading}:");
    for f in &o.failures {
        println!("  - {f}");
    }
    if o.output.is_empty() {
        // It never started: show the end of the whole console.
        let text = std::fs::read_to_string(log).unwrap_or_default();
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

/// Prints the outcomes' table, then each failure; `again` names the scenarios that ran
/// twice ([`run_again`]).
fn report(outcomes: &[Outcome], again: &[String], rig: &Rig) -> Result<(), String> {
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
        let twice = if again.contains(&o.name) { "  (its second run: its guest crashed in the first)" } else { "" };
        println!("{:<20} {:<6} {:>9} {:>10}{twice}", o.name, result, secs(o.rig_secs), secs(o.host_secs));
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    if failed.is_empty() {
        let twice = if again.is_empty() { String::new() } else { format!(" ({} of them run twice)", again.len()) };
        println!("e2e: {} passed, 0 failed{twice}", outcomes.len());
        return Ok(());
    }
    for o in &failed {
        print_failure(o, &format!("{} FAILED", o.name), &log_of(rig, &o.name));
    }
    Err(format!(
        "{} of {} scenario(s) failed; full consoles in {}",
        failed.len(),
        outcomes.len(),
        rig.work_dir.join("console*.log").display()
    ))
}

/// Boots the demo guest in the rig and shows its console.
/// `cargo xtask demo [--shell]`: hvrun's main job in the rig. `hvrun --kernel Image
/// --disk rootfs.img` boots hvrun's own kernel on the ext4 root disk with 2 vCPUs, its
/// console shown; a scripted session runs there (the machine, the disk, a file written
/// and read back), then a one-line summary: boot time, exits, the session's result.
/// With `--shell` (a terminal needed) the guest's shell is yours instead: Ctrl-A X quits.
pub fn demo(args: &[String]) -> Result<(), String> {
    let shell = match args {
        [] => false,
        [flag] if flag == "--shell" => true,
        _ => return Err(format!("demo: unknown arguments {args:?}; use `cargo xtask demo [--shell]`")),
    };
    if shell && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err("demo --shell needs a terminal: run it from one (plain `cargo xtask demo` needs none)".into());
    }
    setup::run()?;
    guest::run()?;
    cross::build_hvrun()?;
    if shell {
        let scenario = demo_scenario(
            "cp /guest/rootfs.ext4 /tmp/rootfs.img\n\
             echo 'demo: the guest shell is yours (hvrun --kernel Image --disk rootfs.img --cpus 2); Ctrl-A X quits'\n\
             /bin/hvrun --kernel /guest/Image --disk /tmp/rootfs.img --cpus 2",
        );
        let status = rig(true).interactive(&scenario).map_err(|e| e.to_string())?;
        return if status.success() { Ok(()) } else { Err(format!("demo: the rig ended with {status}")) };
    }
    let scenario = demo_scenario(DEMO_SESSION);
    let outcome = rig(true).run(std::slice::from_ref(&scenario)).map_err(|e| e.to_string())?.remove(0);
    println!("\n{}", demo_summary(&outcome.output, outcome.passed()));
    if outcome.passed() {
        Ok(())
    } else {
        Err(format!("demo: {}", outcome.failures.join("; ")))
    }
}

/// `cargo xtask test`'s check of `demo --shell`: runs it on a pseudo-terminal (script(1)),
/// waits for the guest's shell, types a command whose answer only a shell gives, then
/// `poweroff -f`, and expects the answer and a clean end.
pub fn demo_shell_through_a_pty() -> Result<(), String> {
    use std::io::{BufRead, Write};
    let xtask = std::env::current_exe().map_err(|e| format!("demo --shell check: {e}"))?;
    let mut child = std::process::Command::new("script")
        .args(["-qfec", &format!("{} demo --shell", xtask.display()), "/dev/null"])
        .current_dir(paths::root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("demo --shell check: cannot run script(1) (util-linux): {e}"))?;
    let mut input = child.stdin.take().ok_or("demo --shell check: no stdin")?;
    let output = child.stdout.take().ok_or("demo --shell check: no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).replace('\r', "");
            println!("  | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str, secs: u64| -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(format!("demo --shell check: no `{what}` within {secs} s")),
            }
        }
    };
    let result = wait_for("hvrun-guest: init started", 600)
        .and_then(|()| {
            // The shell starts right after init's line; give it a moment to print its prompt.
            std::thread::sleep(std::time::Duration::from_secs(3));
            input.write_all(b"echo shell-$((6*7))\r").map_err(|e| e.to_string())?;
            wait_for("shell-42", 120)
        })
        .and_then(|()| {
            input.write_all(b"poweroff -f\r").map_err(|e| e.to_string())?;
            wait_for("reboot: Power down", 120)
        });
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    result?;
    if status.success() {
        println!("demo --shell: a command typed on the terminal ran in the guest's shell");
        Ok(())
    } else {
        Err(format!("demo --shell check: it ended with {status}"))
    }
}

/// The demo's scripted session, typed into the guest's shell on hvc0.
const DEMO_SESSION: &str = "cp /guest/rootfs.ext4 /tmp/rootfs.img\n\
     set -o pipefail\n\
     printf '%s\\n' 'uname -a' 'head -n 8 /proc/cpuinfo' 'df -h /' \\\n\
       'dd if=/dev/urandom of=/root/demo.bin bs=1M count=16 2>&1 | tail -n 1' 'sha256sum /root/demo.bin' \\\n\
       'sync; echo 3 > /proc/sys/vm/drop_caches' 'dd if=/root/demo.bin of=/dev/null bs=1M 2>&1 | tail -n 1' \\\n\
       'sha256sum /root/demo.bin' 'echo demo-session-done' 'poweroff -f' \\\n\
     | RUST_LOG=info /bin/hvrun --kernel /guest/Image --disk /tmp/rootfs.img --cpus 2 2>&1 | tr -d '\\r'\n\
     echo \"hvrun exit $?\"";

fn demo_scenario(script: &'static str) -> hvrun_e2e::scenario::Scenario {
    hvrun_e2e::scenario::Scenario {
        name: "demo",
        about: "hvrun --kernel Image --disk rootfs.img with 2 vCPUs",
        artifacts: &["Image", "rootfs.ext4"],
        script,
        exit_code: 0,
        markers: &["demo-session-done", "hvrun exit 0"],
        forbidden: &["hvrun: error", "panicked", "Kernel panic"],
        timeout_secs: 180,
        exchange: None,
        outer_gic: OuterGic::V2,
    }
}

/// One line from the demo's console: boot time, exits, whether the file read back.
fn demo_summary(lines: &[String], passed: bool) -> String {
    let boot =
        lines.iter().find_map(|l| l.split("boot-timer: ").nth(1)?.split(" ms").next()?.trim().parse::<u64>().ok());
    let exits: u64 =
        lines.iter().filter_map(|l| l.split_once(" exits: ")?.0.rsplit(' ').next()?.parse::<u64>().ok()).sum();
    let sums: Vec<&str> = lines.iter().filter_map(|l| l.split_whitespace().next().filter(|w| w.len() == 64)).collect();
    let file = match sums.as_slice() {
        [written, read] if written == read => "a 16 MiB file written, read back from disk, same sha256",
        _ => "the file did not read back the same",
    };
    format!(
        "demo: {}: hvrun booted its kernel on an ext4 disk with 2 vCPUs to init in {} ms; {exits} exits to the VMM; {file}",
        if passed { "PASS" } else { "FAIL" },
        boot.map_or("?".into(), |ms| ms.to_string())
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_summary_reads_the_console() {
        let lines: Vec<String> = [
            "[2026-12-01T20:33:33Z INFO ] guest boot-timer: 1516 ms after hvrun started, 1495 ms after the first vCPU entry",
            "/ # sha256sum /root/demo.bin",
            "d2bdf6b774b43fe534d50adbc3212a2137da1f354a8ea2bccce3c2029d69b8f7  /root/demo.bin",
            "[   27.746063] something ending in a number 131072",
            "d2bdf6b774b43fe534d50adbc3212a2137da1f354a8ea2bccce3c2029d69b8f7  /root/demo.bin",
            "[2026-12-01T20:33:42Z INFO ] vcpu0: 25459 exits: 13604 MMIO reads, 8307 MMIO writes, 3548 interrupted",
            "[2026-12-01T20:33:42Z INFO ] vcpu1: 16638 exits: 8525 MMIO reads, 5189 MMIO writes, 2924 interrupted",
        ]
        .map(String::from)
        .to_vec();
        let line = demo_summary(&lines, true);
        assert!(line.starts_with("demo: PASS"), "{line}");
        assert!(line.contains("init in 1516 ms") && line.contains("42097 exits"), "{line}");
        assert!(line.contains("same sha256"), "{line}");
        let changed = [&lines[..2], &lines[3..]].concat();
        assert!(demo_summary(&changed, false).contains("did not read back"));
    }
}
