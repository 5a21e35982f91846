//! The balloon driven from the embedding API: the guest touches 300 MiB and frees it
//! (free page reporting is off, so the host keeps those pages), the example sets a
//! balloon target of 256 MiB ([`hvrun::VmHandle::set_balloon_target`]) and waits until the
//! guest's balloon holds it, then sets the target back to 0 and waits until the guest has
//! it all back; the guest then fills 350 MiB (more than it could with the balloon
//! inflated) and checks the data. It prints this process's resident memory at each step.
//!
//! ```text
//! cargo run --example balloon -- Image initramfs.cpio
//! ```
//! The guest is hvrun's test initramfs with hvrun's kernel (`cargo xtask guest`), which
//! has the balloon driver. The rig runs it as the `balloon-target` scenario.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{keyboard, powered_off, test_guest, wait_for, wait_for_init, Captured, Failure, Keyboard};
use hvrun::config::BalloonOptions;
use hvrun::Vm;

const MIB: u64 = 1 << 20;
/// The balloon's target while inflated.
const TARGET: u64 = 256 * MIB;
/// How long the guest may take to inflate or deflate the balloon.
const LIMIT: Duration = Duration::from_secs(120);

/// This process's resident memory in MiB (`VmRSS`), where the system says it.
fn rss_mib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or_else(|| "unknown".into(), |kib| (kib / 1024).to_string())
}

/// Types `command` and waits until the guest has run it: it then says `TAG-42` (typed as
/// `$((6*7))`, so the echo of the typed line does not match).
fn guest_does(keyboard: &Keyboard, output: &Captured, command: &str, tag: &str) -> Result<(), String> {
    keyboard.line(&format!("{command}; echo {tag}-$((6*7))"))?;
    if wait_for(LIMIT, || output.count(&format!("{tag}-42")) > 0) {
        Ok(())
    } else {
        Err(format!("the guest did not finish `{command}`; console:\n{}", output.text()))
    }
}

fn run(kernel: &str, initrd: &str) -> Result<(), Failure> {
    let mut config = test_guest(kernel, initrd);
    config.memory = 512 * MIB;
    let options =
        BalloonOptions { free_page_reporting: false, deflate_on_oom: false, stats_interval: None, initial_target: 0 };
    let output = Captured::default();
    let (keyboard, typed) = keyboard();
    let vm = Vm::builder(config)
        .console(typed, output.clone())
        .balloon(options)
        .start()
        .map_err(|e| format!("start: {e}"))?;
    let handle = vm.handle();
    let balloon = handle.balloon().ok_or("the VM has no balloon")?;
    wait_for_init(&vm, &output)?;
    let touch = "mount -o remount,size=460M /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count=300 2>/dev/null \
                 && rm /tmp/fill";
    guest_does(&keyboard, &output, touch, "touched")?;
    println!("balloon: the guest touched 300 MiB and freed it; this process's RSS: {} MiB", rss_mib());

    let started = Instant::now();
    if !handle.set_balloon_target(TARGET) {
        return Err("set_balloon_target: no balloon".into());
    }
    if !wait_for(LIMIT, || balloon.actual() == TARGET) {
        return Err(format!("the balloon holds {} MiB after {LIMIT:?}, not 256", balloon.actual() / MIB).into());
    }
    println!(
        "balloon: inflated to {} MiB in {} ms; released {} MiB; this process's RSS: {} MiB",
        balloon.actual() / MIB,
        started.elapsed().as_millis(),
        balloon.released() / MIB,
        rss_mib()
    );
    if balloon.released() < TARGET {
        return Err(format!("only {} MiB were released for a 256 MiB balloon", balloon.released() / MIB).into());
    }
    guest_does(&keyboard, &output, "grep MemFree /proc/meminfo", "inflated")?;

    let started = Instant::now();
    handle.set_balloon_target(0);
    if !wait_for(LIMIT, || balloon.actual() == 0) {
        return Err(format!("the balloon still holds {} MiB after {LIMIT:?}", balloon.actual() / MIB).into());
    }
    println!("balloon: deflated to 0 MiB in {} ms", started.elapsed().as_millis());

    // 350 MiB of tmpfs data fit only with the balloon's 256 MiB back in the guest.
    let fill = "dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null; \
                sum=$( (i=0; while [ $i -lt 350 ]; do cat /tmp/chunk; i=$((i+1)); done) | md5sum); \
                (i=0; while [ $i -lt 350 ]; do cat /tmp/chunk; i=$((i+1)); done) >/tmp/big \
                && [ \"$(md5sum </tmp/big)\" = \"$sum\" ] && echo filled-\"\"350-intact; rm -f /tmp/big";
    guest_does(&keyboard, &output, fill, "filled")?;
    if output.count("filled-350-intact") == 0 {
        return Err(format!("the guest could not fill 350 MiB after the deflate; console:\n{}", output.text()).into());
    }
    println!("balloon: the guest filled 350 MiB after the deflate, intact");
    keyboard.line("poweroff -f")?;
    powered_off("balloon", vm, &output)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::main("balloon", "KERNEL INITRD", |args| run(&args[0], &args[1]))
}
