//! The self-test's report file, for a bug report: what the host is, what each test saw.

use std::io::Write;
use std::path::Path;

use super::{Options, Outcome};

/// The host in one line: the OS, its release, the machine and, on a Mac, the chip.
pub fn host_description() -> String {
    // SAFETY: a zeroed utsname is a valid buffer for uname to fill.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    let text = if unsafe { libc::uname(&mut name) } == 0 {
        let field = |f: &[libc::c_char]| {
            // SAFETY: uname NUL-terminates every field within its array.
            unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }.to_string_lossy().into_owned()
        };
        format!("{} {} {}", field(&name.sysname), field(&name.release), field(&name.machine))
    } else {
        format!("{} {}", std::env::consts::OS, std::env::consts::ARCH)
    };
    match chip() {
        Some(chip) => format!("{text}, {chip}"),
        None => text,
    }
}

/// The chip and macOS version, from sysctl (macOS only).
#[cfg(target_os = "macos")]
fn chip() -> Option<String> {
    fn sysctl(name: &std::ffi::CStr) -> Option<String> {
        let mut buf = [0u8; 256];
        let mut len = buf.len();
        // SAFETY: `buf` has `len` writable bytes; sysctlbyname writes at most that many
        // and stores the length it wrote.
        let rc =
            unsafe { libc::sysctlbyname(name.as_ptr(), buf.as_mut_ptr().cast(), &mut len, std::ptr::null_mut(), 0) };
        (rc == 0).then(|| String::from_utf8_lossy(&buf[..len.min(buf.len())]).trim_end_matches('\0').to_string())
    }
    let chip = sysctl(c"machdep.cpu.brand_string")?;
    let version = sysctl(c"kern.osproductversion").unwrap_or_default();
    Some(format!("{chip}, macOS {version}"))
}

#[cfg(not(target_os = "macos"))]
fn chip() -> Option<String> {
    None
}

/// Writes the report of a run with `outcomes` to `path`.
pub fn write(path: &Path, options: &Options, outcomes: &[Outcome]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "hvrun {} selftest report", env!("CARGO_PKG_VERSION"))?;
    writeln!(f, "host: {}", host_description())?;
    writeln!(
        f,
        "interrupt controller asked for: {:?}; time limit per test: {} s",
        options.gic,
        options.timeout.as_secs()
    )?;
    if let Some(log) = &options.log_filter {
        writeln!(f, "RUST_LOG={log}")?;
    }
    writeln!(f)?;
    for o in outcomes {
        let result = if o.passed { "ok" } else { "FAIL" };
        writeln!(f, "{}: {result}: {} ({:.2} s)", o.name, o.detail, o.elapsed.as_secs_f64())?;
    }
    for o in outcomes.iter().filter(|o| !o.passed) {
        writeln!(f, "\n--- {}: the guest's console ---", o.name)?;
        writeln!(f, "{}", o.console.trim_end())?;
        for (vcpu, exits) in &o.exits {
            writeln!(f, "--- {}: vcpu{vcpu}'s last exits, oldest first ---", o.name)?;
            for exit in exits {
                writeln!(f, "vcpu{vcpu}: {exit}")?;
            }
        }
    }
    writeln!(
        f,
        "\nFor the VMM's own account, run again with RUST_LOG=debug hvrun selftest 2> log.txt \
         and attach log.txt too."
    )?;
    f.sync_all()
}
