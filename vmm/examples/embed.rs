//! Embedding hvrun: boot a guest from code, its kernel and initramfs handed over as bytes
//! and its consoles (hvc0 and the serial port) on in-memory pipes; pause and resume it
//! from another thread, read its events, and wait for it to power off.
//!
//! ```text
//! cargo run --example embed -- Image initramfs.cpio
//! ```
//! The guest is hvrun's test initramfs (`cargo xtask guest`), whose init starts a shell on
//! the console. The example types into that shell, checks that a pause really stops the
//! guest (a loop printing "tick" goes quiet), and exits non-zero if anything is off. The
//! rig runs it as the `embed` scenario.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{keyboard, wait_for, Captured, Failure};
use hvrun::{Event, ExitReason, Vm, VmConfig};

fn run(kernel: &str, initrd: &str) -> Result<(), Failure> {
    // The kernel and initramfs come from memory: the configuration's paths only name
    // them (and exist nowhere).
    let kernel = std::fs::read(kernel).map_err(|e| format!("{kernel}: {e}"))?;
    let initrd = std::fs::read(initrd).map_err(|e| format!("{initrd}: {e}"))?;
    let mut config = VmConfig::new("/in-memory/Image");
    config.initrd = Some("/in-memory/initramfs".into());
    config.cmdline = Some("console=hvc0 quiet".into());
    config.memory = 256 << 20;
    let output = Captured::default();
    let serial_output = Captured::default();
    let (keyboard, typed) = keyboard();
    let (serial_keyboard, serial_typed) = common::keyboard();
    let vm = Vm::builder(config)
        .kernel_image(kernel)
        .initrd_image(initrd)
        .console(typed, output.clone())
        .serial_input(serial_typed)
        .serial(serial_output.clone())
        .start()
        .map_err(|e| format!("start: {e}"))?;
    let handle = vm.handle();

    let booted = vm
        .events()
        .recv_timeout(common::INIT_LIMIT)
        .map_err(|_| Failure::NoBoot(format!("no boot-timer event in {} s", common::INIT_LIMIT.as_secs())))?;
    println!("embed: first event {booted:?}");
    if !matches!(booted, Event::BootTimer { .. }) {
        return Err(format!("expected the boot timer first, got {booted:?}").into());
    }
    common::wait_for_init(&vm, &output)?;

    // The serial port (ttyAMA0, not the console here) reads what this program types on
    // it: the guest reads one line and answers on hvc0.
    // The port is opened before the guest says so (Linux empties its FIFO at the open).
    keyboard.line("{ echo reading-serial; echo serial-got=$(head -n1); } </dev/ttyAMA0")?;
    if !wait_for(Duration::from_secs(60), || output.count("reading-serial") >= 2) {
        return Err(format!("the guest did not start reading the serial port; console:\n{}", output.text()).into());
    }
    std::thread::sleep(Duration::from_millis(500));
    serial_keyboard.line("typed-on-the-serial-port")?;
    if !wait_for(Duration::from_secs(60), || output.count("serial-got=typed-on-the-serial-port") > 0) {
        return Err(format!("the guest did not read the serial port; console:\n{}", output.text()).into());
    }
    println!(
        "embed: the guest read typed-on-the-serial-port from ttyAMA0 (its echo: {:?})",
        serial_output.text().trim()
    );

    keyboard.line("(while :; do echo tick; sleep 0.2; done) &")?;
    if !wait_for(Duration::from_secs(60), || output.count("tick") >= 3) {
        return Err(format!("no ticks from the guest; console so far:\n{}", output.text()).into());
    }

    // From another thread, as an embedder's UI would.
    let pauser = handle.clone();
    std::thread::spawn(move || pauser.pause())
        .join()
        .map_err(|_| "pause panicked")?
        .map_err(|e| format!("pause failed: {e}"))?;
    let at_pause = output.count("tick");
    std::thread::sleep(Duration::from_secs(2));
    let during = output.count("tick") - at_pause;
    println!("embed: {at_pause} ticks before the pause, {during} while paused for 2 s");
    if during > 1 {
        return Err(format!("the guest kept running while paused ({during} ticks)").into());
    }
    handle.resume();
    let resumed = output.count("tick");
    if !wait_for(Duration::from_secs(60), || output.count("tick") >= resumed + 3) {
        return Err("the guest did not resume".into());
    }
    println!("embed: ticking again after resume ({} ticks)", output.count("tick"));

    keyboard.line("kill %1; echo embed-says-$((6 * 7)); poweroff -f")?;
    // The events after the boot timer, up to the exit (the last one).
    let mut events = Vec::new();
    while let Ok(event) = vm.events().recv_timeout(Duration::from_secs(120)) {
        events.push(event);
        if matches!(event, Event::Exited(_)) {
            break;
        }
    }
    let reason = vm.wait().map_err(|e| format!("wait: {e}"))?;
    println!("embed: later events {events:?}");
    println!("embed: exit {reason:?}");
    if reason != ExitReason::PowerOff || events != [Event::Paused, Event::Resumed, Event::Exited(ExitReason::PowerOff)]
    {
        return Err("unexpected exit or events".into());
    }
    if !output.text().contains("embed-says-42") {
        return Err(format!("the guest's answer is missing; console:\n{}", output.text()).into());
    }
    println!("embed: the guest answered embed-says-42 on hvc0");
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::main("embed", "KERNEL INITRD", |args| run(&args[0], &args[1]))
}
