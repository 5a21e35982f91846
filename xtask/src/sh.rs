//! Running commands: print each one, fail with a clear message.

use std::ffi::OsStr;
use std::process::Command;

/// A command for `program`.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    Command::new(program)
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for arg in c.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Prints and runs `c`, failing unless it exits 0.
pub fn run(c: &mut Command) -> Result<(), String> {
    let line = describe(c);
    println!("$ {line}");
    let status = c.status().map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
}

/// Runs `c` quietly and returns its standard output, failing unless it exits 0.
pub fn output(c: &mut Command) -> Result<String, String> {
    let line = describe(c);
    let out = c.output().map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The cargo that runs this xtask (rustup's, for host work).
pub fn host_cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}
