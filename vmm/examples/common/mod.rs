//! What the examples share: the guest's console on in-memory pipes, and waiting.

#![allow(dead_code)] // each example uses a part

use std::io::{Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's console output, shared with the example.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

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
    /// Everything the guest wrote so far.
    pub fn text(&self) -> String {
        self.0.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
    /// How often `needle` appears in it.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// What the guest reads: lines the example types, as it types them.
pub struct Typed {
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

/// A keyboard for the guest's console: what is typed on it, the guest reads from
/// [`Typed`].
pub fn keyboard() -> (Keyboard, Typed) {
    let (sender, lines) = channel();
    (Keyboard(sender), Typed { lines, pending: Vec::new() })
}

/// Types lines into the guest's console.
pub struct Keyboard(Sender<Vec<u8>>);

impl Keyboard {
    /// Types `line` and Enter.
    pub fn line(&self, line: &str) -> Result<(), String> {
        self.0.send(format!("{line}\n").into_bytes()).map_err(|_| "the console input is gone".to_string())
    }
}

/// Waits until `check` holds, up to `limit`.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// The examples' guest: `kernel` with hvrun's test initramfs, its console on hvc0.
pub fn test_guest(kernel: &str, initrd: &str) -> hvrun::VmConfig {
    let mut config = hvrun::VmConfig::new(kernel);
    config.initrd = Some(initrd.into());
    config.cmdline = Some("console=hvc0 quiet".into());
    config.memory = 256 << 20;
    config
}

/// How long the test initramfs's init has to say it started (a boot takes seconds).
pub const INIT_LIMIT: Duration = Duration::from_secs(120);

/// Waits until the test initramfs's init says it started on hvc0. If it never does, the
/// error carries what the machine did meanwhile (its vCPUs' exits, its devices'
/// requests and interrupts), taken twice a second apart, so a failure shows whether the
/// guest still ran, where it waited, and what the console got.
pub fn wait_for_init(vm: &hvrun::Vm, output: &Captured) -> Result<(), Failure> {
    if wait_for(INIT_LIMIT, || output.count("hvrun-guest: init started") > 0) {
        return Ok(());
    }
    let handle = vm.handle();
    let first = handle.metrics();
    std::thread::sleep(Duration::from_secs(1));
    Err(Failure::NoBoot(format!(
        "its init never spoke on hvc0 in {} s; the machine's counters: {first}; a second later: {}; console:\n{}",
        INIT_LIMIT.as_secs(),
        handle.metrics(),
        output.text()
    )))
}

/// Waits for the VM to stop, which must be by the guest's power-off; returns the console.
pub fn powered_off(name: &str, vm: hvrun::Vm, output: &Captured) -> Result<String, String> {
    let reason = vm.wait().map_err(|e| format!("wait: {e}"))?;
    let text = output.text();
    println!("{name}: exit {reason:?}");
    if reason != hvrun::ExitReason::PowerOff {
        return Err(format!("the guest did not power off; console:\n{text}"));
    }
    Ok(text)
}

/// Why an example failed.
#[derive(Debug)]
pub enum Failure {
    /// The guest never reached its init: the boot failed before anything the example
    /// shows could run. The example exits with [`NO_BOOT`], which the rig's scenarios
    /// retry once (`example_script!` in `tests/src/scenarios/mod.rs`), the first
    /// attempt's account kept.
    NoBoot(String),
    /// What the example shows did not work.
    Failed(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Failure::Failed(why)
    }
}

impl From<&str> for Failure {
    fn from(why: &str) -> Self {
        Failure::Failed(why.into())
    }
}

/// The exit status of an example whose guest never reached its init.
pub const NO_BOOT: u8 = 3;

/// Runs an example's body and turns its outcome into an exit status and a last line
/// (`NAME: ok`, `NAME: the guest did not boot: why` or `NAME: FAILED: why`).
pub fn main(name: &str, usage: &str, run: impl FnOnce(&[String]) -> Result<(), Failure>) -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != usage.split_whitespace().count() {
        eprintln!("usage: {name} {usage}");
        return std::process::ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => {
            println!("{name}: ok");
            std::process::ExitCode::SUCCESS
        }
        Err(Failure::NoBoot(why)) => {
            eprintln!("{name}: the guest did not boot: {why}");
            std::process::ExitCode::from(NO_BOOT)
        }
        Err(Failure::Failed(why)) => {
            eprintln!("{name}: FAILED: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}
