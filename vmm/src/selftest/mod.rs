//! `hvrun selftest`: a fixed sequence of small guests, each checking one class of exit
//! the backend must handle, so that the first run on a new host (the first Mac) either
//! passes or produces a bug report.
//!
//! The guests are assembled from `guests/selftest-*.S` (and `guests/mmio-aborts.S`) and
//! embedded here, so the command needs no other file; `cargo xtask guest` checks that the
//! embedded copies match their sources. Each runs in a machine of its own with the
//! self-test probe (`devices::probe`), which answers MMIO of every size, tells the guest
//! which GIC it has, and takes its verdict. A test passes when the guest prints its
//! marker, reports 0 to the probe (if it uses it) and powers off, within the time limit.
//! A few results are the host's own known bugs, which hvrun cannot work around and
//! recognises exactly (Linux's KVM drops the sign extension of MMIO loads): those rows
//! say "host" and do not fail the run. On failure a report file says what the host is,
//! which test failed and how, with the guest's console and the VMM's error, for attaching
//! to a bug report.

mod report;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::probe::Verdict;

use crate::config::{Backend, GicChoice};
use crate::embed::Vm;
use crate::{ExitReason, VmConfig};

pub use report::host_description;

/// One test: a guest and what it must print.
#[derive(Debug)]
pub struct Test {
    /// Short name, for the table and `HVRUN_SELFTEST_BREAK`.
    pub name: &'static str,
    /// What it checks.
    pub what: &'static str,
    /// The guest: a flat arm64 binary with a Linux Image header.
    pub guest: &'static [u8],
    /// vCPUs the machine gets.
    pub cpus: u32,
    /// The console line that says it passed.
    pub marker: &'static str,
    /// Whether the guest reports its verdict to the probe (which must then be 0).
    pub uses_probe: bool,
}

/// The tests, in the order they run.
pub const TESTS: &[Test] = &[
    Test {
        name: "mmio",
        what: "MMIO loads and stores of 1, 2, 4 and 8 bytes, zero extension, XZR",
        guest: include_bytes!("guests/selftest-mmio.bin"),
        cpus: 1,
        marker: "selftest: mmio ok",
        uses_probe: true,
    },
    Test {
        name: "mmio-sign",
        what: "MMIO loads sign-extended from 1, 2 and 4 bytes into W and X registers",
        guest: include_bytes!("guests/selftest-mmio-sign.bin"),
        cpus: 1,
        marker: "selftest: mmio-sign done",
        uses_probe: true,
    },
    Test {
        name: "aborts",
        what: "accesses without a syndrome (ldp, stp, writeback) and a fetch from MMIO: aborts for the guest",
        guest: include_bytes!("guests/mmio-aborts.bin"),
        cpus: 1,
        marker: "the VMM kept running",
        uses_probe: false,
    },
    Test {
        name: "psci",
        what: "PSCI VERSION over HVC and SMC, CPU_ON and CPU_OFF of a second vCPU twice, SYSTEM_OFF",
        guest: include_bytes!("guests/selftest-psci.bin"),
        cpus: 2,
        marker: "selftest: psci ok",
        uses_probe: true,
    },
    Test {
        name: "sysregs",
        what: "ID registers read (never UNDEF), SME hidden, an IMPLEMENTATION DEFINED register UNDEFs",
        guest: include_bytes!("guests/selftest-sysregs.bin"),
        cpus: 1,
        marker: "selftest: sysregs ok",
        uses_probe: true,
    },
    Test {
        name: "timer",
        what: "WFI woken by the virtual timer, its interrupt taken through the GIC",
        guest: include_bytes!("guests/selftest-timer.bin"),
        cpus: 1,
        marker: "selftest: timer ok",
        uses_probe: true,
    },
];

/// How a self-test run goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The interrupt controller of every machine.
    pub gic: GicChoice,
    /// The hypervisor the machines run on (what a host's known bug is judged against).
    pub backend: Backend,
    /// Where the report goes when a test fails.
    pub report: PathBuf,
    /// The longest a test may run.
    pub timeout: Duration,
    /// A test to fail on purpose, to show what a failure looks like (the CLI takes it
    /// from `HVRUN_SELFTEST_BREAK`).
    pub broken: Option<String>,
    /// The log filter in force, for the report (the CLI's `RUST_LOG`).
    pub log_filter: Option<String>,
}

impl Options {
    /// The defaults: the GIC `auto` picks, the report in the current directory, 30 s a
    /// test, nothing failed on purpose.
    pub fn new() -> Self {
        Options {
            gic: GicChoice::Auto,
            backend: Backend::for_host(None, std::env::consts::OS).unwrap_or(Backend::Kvm),
            report: PathBuf::from("hvrun-selftest-report.txt"),
            timeout: Duration::from_secs(30),
            broken: None,
            log_filter: None,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

/// What one test did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The test's name.
    pub name: &'static str,
    /// Whether it passed (a host's known bug passes, with `host_issue`).
    pub passed: bool,
    /// The result is a known bug of the host's hypervisor, not hvrun's.
    pub host_issue: bool,
    /// One line: why it passed or failed.
    pub detail: String,
    /// The guest's console output.
    pub console: String,
    /// Each vCPU's last exits, where the backend keeps them (for the report).
    pub exits: Vec<(u32, Vec<String>)>,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a whole run found.
#[derive(Debug)]
pub struct Summary {
    /// Each test's outcome, in order.
    pub outcomes: Vec<Outcome>,
    /// The report file, when a test failed.
    pub report: Option<PathBuf>,
}

impl Summary {
    /// Whether every test passed.
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.passed)
    }
}

/// Runs every test on this host's hypervisor, printing a table to `out`; writes the
/// report when one fails.
pub fn run(options: &Options, out: &mut dyn Write) -> std::io::Result<Summary> {
    let dir = std::env::temp_dir().join(format!("hvrun-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let summary = run_with(options, out, |test| run_guest(test, options, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    summary
}

/// [`run`] with `run_one` running each test (a fake in the tests).
pub fn run_with(
    options: &Options,
    out: &mut dyn Write,
    mut run_one: impl FnMut(&Test) -> Outcome,
) -> std::io::Result<Summary> {
    writeln!(out, "hvrun selftest on {}", host_description())?;
    writeln!(out, "{:<9} {:<6} {:>7}  detail", "test", "result", "time")?;
    let mut outcomes = Vec::new();
    for test in TESTS {
        let mut outcome = run_one(test);
        if options.broken.as_deref() == Some(test.name) && outcome.passed {
            outcome.passed = false;
            outcome.detail = format!("failed on purpose (HVRUN_SELFTEST_BREAK={})", test.name);
        }
        let result = match (outcome.passed, outcome.host_issue) {
            (true, false) => "ok",
            (true, true) => "host",
            (false, _) => "FAIL",
        };
        let secs = outcome.elapsed.as_secs_f64();
        writeln!(out, "{:<9} {result:<6} {secs:>6.2}s  {}", test.name, outcome.detail)?;
        outcomes.push(outcome);
    }
    let mut summary = Summary { outcomes, report: None };
    if !summary.passed() {
        report::write(&options.report, options, &summary.outcomes)?;
        writeln!(
            out,
            "\nA test failed. Please attach {} to a bug report: it says what this host is and what each test saw.",
            options.report.display()
        )?;
        summary.report = Some(options.report.clone());
    }
    Ok(summary)
}

/// A writer into a shared buffer: the guest's console.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}

/// Runs `test`'s guest in a machine of its own and judges what it did.
fn run_guest(test: &Test, options: &Options, dir: &Path) -> Outcome {
    let started = Instant::now();
    let console = Capture::default();
    let verdict = Arc::new(Mutex::new(Verdict::default()));
    let finished = |(passed, host_issue): (bool, bool), detail: String, exits| Outcome {
        name: test.name,
        passed,
        host_issue,
        detail,
        console: console.text(),
        exits,
        elapsed: started.elapsed(),
    };
    let kernel = dir.join(format!("{}.bin", test.name));
    if let Err(e) = std::fs::write(&kernel, test.guest) {
        return finished((false, false), format!("cannot write the guest to {}: {e}", kernel.display()), Vec::new());
    }
    let config = VmConfig { cpus: test.cpus, memory: 64 << 20, gic: options.gic, ..VmConfig::new(&kernel) };
    let vm = match Vm::builder(config).serial(console.clone()).probe(Arc::clone(&verdict)).start() {
        Ok(vm) => vm,
        Err(e) => return finished((false, false), format!("the machine did not start: {e}"), Vec::new()),
    };
    let handle = vm.handle();
    let traces = vm.handle();
    let (done, waited) = std::sync::mpsc::channel::<()>();
    let timeout = options.timeout;
    let watchdog = std::thread::spawn(move || {
        if waited.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            handle.stop();
        }
    });
    let exit = vm.wait();
    let _ = done.send(());
    let _ = watchdog.join();
    let verdict = *verdict.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (passed, detail) = judge(test, exit, &console.text(), verdict, timeout);
    let (passed, host_issue, detail) =
        host_bug(test, options.backend, passed, verdict).map_or((passed, false, detail), |bug| (true, true, bug));
    finished((passed, host_issue), detail, traces.recent_exits())
}

/// Whether a test passed, and why (one line).
fn judge(
    test: &Test,
    exit: Result<ExitReason, crate::Error>,
    console: &str,
    verdict: Verdict,
    timeout: Duration,
) -> (bool, String) {
    let value = verdict.value.map_or(String::new(), |v| format!(" (value {v:#x})"));
    let ok = || match (test.name, verdict.value) {
        ("mmio-sign", Some(mask)) if mask != 0 => (false, format!("loads came back zero-extended (mask {mask:#x})")),
        _ => (true, test.what.to_string()),
    };
    match exit {
        Err(e) => (false, format!("the VMM failed: {e}")),
        Ok(ExitReason::Stopped) => (false, format!("no verdict within {} s: the guest hung", timeout.as_secs())),
        Ok(ExitReason::PowerOff) => match (console.contains(test.marker), verdict.result) {
            (true, Some(0)) => ok(),
            (true, None) if !test.uses_probe => ok(),
            (_, Some(check)) if check != 0 => (false, format!("check {check} failed{value}")),
            _ => (false, format!("powered off without `{}`{value}", test.marker)),
        },
        Ok(other) => (false, format!("the guest ended with {other:?}{value}")),
    }
}

/// A failure that is exactly a known bug of the host's hypervisor, which hvrun cannot
/// work around, described; `None` for anything else (hvrun's to answer for).
fn host_bug(test: &Test, backend: Backend, passed: bool, verdict: Verdict) -> Option<String> {
    // Every sign-extending load came back zero-extended, and nothing else went wrong:
    // Linux's KVM extends the value, then masks it to the access size again
    // (vcpu_data_host_to_guest in arch/arm64/include/asm/kvm_emulate.h), so no userspace
    // VMM on KVM can deliver a sign-extended MMIO load. Linux's drivers use unsigned
    // loads for MMIO. Under Hypervisor.framework hvrun extends the value itself.
    const ALL_NEGATIVE: u64 = 0b1_1111;
    (test.name == "mmio-sign"
        && !passed
        && backend == Backend::Kvm
        && verdict == Verdict { result: Some(0), value: Some(ALL_NEGATIVE) })
    .then(|| "KVM drops the sign extension of MMIO loads (a Linux bug; hvrun cannot correct it)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report path of this test process's own, not there yet.
    fn report_path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("hvrun-test-{}-selftest-{name}.txt", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn outcome(test: &Test, passed: bool, detail: &str) -> Outcome {
        Outcome {
            name: test.name,
            passed,
            host_issue: false,
            detail: detail.into(),
            console: format!("console of {}\n", test.name),
            exits: vec![(0, vec![format!("exception ESR 0x92000046 of {}", test.name)])],
            elapsed: Duration::from_millis(5),
        }
    }

    #[test]
    fn a_run_that_passes_writes_no_report() {
        let options = Options { report: report_path("pass"), broken: None, ..Options::new() };
        let mut out = Vec::new();
        let summary = run_with(&options, &mut out, |t| outcome(t, true, t.what)).unwrap();
        assert!(summary.passed());
        assert!(summary.report.is_none() && !options.report.exists());
        let table = String::from_utf8(out).unwrap();
        for test in TESTS {
            assert!(table.contains(&format!("{:<9} ok", test.name)), "{table}");
        }
    }

    /// The report file appears when a test fails, and says what a bug report needs.
    #[test]
    fn a_failed_test_writes_a_report_naming_it() {
        let options = Options { report: report_path("fail"), broken: None, ..Options::new() };
        let mut out = Vec::new();
        let summary =
            run_with(&options, &mut out, |t| outcome(t, t.name != "timer", "check 2 failed (value 0x1e)")).unwrap();
        assert!(!summary.passed());
        assert_eq!(summary.report.as_deref(), Some(options.report.as_path()));
        let report = std::fs::read_to_string(&options.report).unwrap();
        assert!(report.contains("host:") && report.contains("hvrun "), "{report}");
        assert!(report.contains("timer: FAIL: check 2 failed (value 0x1e)"), "{report}");
        assert!(report.contains("console of timer"), "{report}");
        assert!(report.contains("vcpu0: exception ESR 0x92000046 of timer"), "{report}");
        assert!(String::from_utf8(out).unwrap().contains("attach"));
        let _ = std::fs::remove_file(&options.report);
    }

    #[test]
    fn a_test_can_be_failed_on_purpose() {
        let options = Options { report: report_path("broken"), broken: Some("psci".into()), ..Options::new() };
        let summary = run_with(&options, &mut Vec::new(), |t| outcome(t, true, "fine")).unwrap();
        let failed: Vec<_> = summary.outcomes.iter().filter(|o| !o.passed).map(|o| o.name).collect();
        assert_eq!(failed, ["psci"]);
        assert!(options.report.exists());
        let _ = std::fs::remove_file(&options.report);
    }

    /// KVM's own sign-extension bug is recognised exactly, and only on KVM.
    #[test]
    fn a_known_host_bug_is_told_apart_from_hvruns() {
        let sign = &TESTS[1];
        let t = Duration::from_secs(30);
        let dropped = Verdict { result: Some(0), value: Some(0b1_1111) };
        let (passed, _) = judge(sign, Ok(ExitReason::PowerOff), "selftest: mmio-sign done", dropped, t);
        assert!(!passed);
        assert!(host_bug(sign, Backend::Kvm, passed, dropped).is_some());
        assert!(host_bug(sign, Backend::Hvf, passed, dropped).is_none(), "under HVF it is hvrun's bug");
        let partly = Verdict { result: Some(0), value: Some(0b0_0001) };
        assert!(host_bug(sign, Backend::Kvm, false, partly).is_none(), "not exactly the known pattern");
        let broken = Verdict { result: Some(3), value: Some(0x1234) };
        assert!(host_bug(sign, Backend::Kvm, false, broken).is_none());
        let clean = Verdict { result: Some(0), value: Some(0) };
        assert!(judge(sign, Ok(ExitReason::PowerOff), "selftest: mmio-sign done", clean, t).0);
    }

    #[test]
    fn verdicts() {
        let mmio = &TESTS[0];
        let t = Duration::from_secs(30);
        let ok = |exit, console: &str, result| judge(mmio, exit, console, Verdict { result, value: None }, t).0;
        assert!(ok(Ok(ExitReason::PowerOff), "selftest: mmio ok\n", Some(0)));
        assert!(!ok(Ok(ExitReason::PowerOff), "selftest: mmio ok\n", None), "the probe heard nothing");
        assert!(!ok(Ok(ExitReason::PowerOff), "", Some(0)), "no marker");
        assert!(!ok(Ok(ExitReason::Stopped), "selftest: mmio ok\n", Some(0)), "timed out");
        assert!(!ok(Ok(ExitReason::Reset), "selftest: mmio ok\n", Some(0)));
        let (_, why) = judge(mmio, Ok(ExitReason::PowerOff), "", Verdict { result: Some(7), value: Some(30) }, t);
        assert_eq!(why, "check 7 failed (value 0x1e)");
        let aborts = &TESTS[2];
        assert!(judge(aborts, Ok(ExitReason::PowerOff), "... the VMM kept running\n", Verdict::default(), t).0);
    }

    /// The embedded guests are what `cargo xtask guest` assembles (it checks the bytes);
    /// here, that each is a Linux Image an hvrun machine loads.
    #[test]
    fn every_guest_is_an_arm64_image() {
        for test in TESTS {
            assert_eq!(&test.guest[56..60], b"ARM\x64", "{}", test.name);
        }
    }
}
