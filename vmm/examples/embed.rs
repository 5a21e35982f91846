//! Embedding hvrun: boot a guest from code with its console on in-memory pipes, pause
//! and resume it from another thread, read its events, and wait for it to power off.
//!
//! ```text
//! cargo run --example embed -- Image initramfs.cpio
//! ```
//! The guest is hvrun's test initramfs (`cargo xtask guest`), whose init starts a shell on
//! the console. The example types into that shell, checks that a pause really stops the
//! guest (a loop printing "tick" goes quiet), and exits non-zero if anything is off. The
//! rig runs it as the `embed` scenario.

use std::io::{Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvrun::{Event, ExitReason, Vm, VmConfig};

/// The guest's console output, shared with this program.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// What the guest reads: lines this program sends, as it sends them.
struct Typed {
    lines: Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl Read for Typed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            match self.lines.recv() {
                Ok(bytes) => self.pending = bytes,
                Err(_) => return Ok(0), // no more input
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

fn type_line(keyboard: &Sender<Vec<u8>>, line: &str) -> Result<(), String> {
    keyboard.send(format!("{line}\n").into_bytes()).map_err(|_| "the console input is gone".to_string())
}

/// Waits until `check` holds, up to `limit`.
fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

fn run(kernel: &str, initrd: &str) -> Result<(), String> {
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd.into());
    config.cmdline = "console=hvc0 quiet".into();
    config.memory = 256 << 20;
    let output = Captured::default();
    let (keyboard, lines) = channel();
    let vm = Vm::builder(config)
        .console(Typed { lines, pending: Vec::new() }, output.clone())
        .start()
        .map_err(|e| format!("start: {e}"))?;
    let handle = vm.handle();

    let booted = vm.events().recv_timeout(Duration::from_secs(120)).map_err(|_| "no boot-timer event")?;
    println!("embed: first event {booted:?}");
    if !matches!(booted, Event::BootTimer { .. }) {
        return Err(format!("expected the boot timer first, got {booted:?}"));
    }
    if !wait_for(Duration::from_secs(60), || output.count("hvrun-guest: init started") > 0) {
        return Err("the guest's init never spoke on hvc0".into());
    }

    type_line(&keyboard, "(while :; do echo tick; sleep 0.2; done) &")?;
    if !wait_for(Duration::from_secs(60), || output.count("tick") >= 3) {
        return Err(format!("no ticks from the guest; console so far:\n{}", output.text()));
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
        return Err(format!("the guest kept running while paused ({during} ticks)"));
    }
    handle.resume();
    let resumed = output.count("tick");
    if !wait_for(Duration::from_secs(60), || output.count("tick") >= resumed + 3) {
        return Err("the guest did not resume".into());
    }
    println!("embed: ticking again after resume ({} ticks)", output.count("tick"));

    type_line(&keyboard, "kill %1; echo embed-says-$((6 * 7)); poweroff -f")?;
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
        return Err(format!("the guest's answer is missing; console:\n{}", output.text()));
    }
    println!("embed: the guest answered embed-says-42 on hvc0");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, kernel, initrd] = args.as_slice() else {
        eprintln!("usage: embed KERNEL INITRD");
        return std::process::ExitCode::from(2);
    };
    match run(kernel, initrd) {
        Ok(()) => {
            println!("embed: ok");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embed: FAILED: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
