//! Host-side checks of what scenarios hand back through the exchange disk.

use std::path::Path;
use std::process::Command;

use crate::exchange::pattern;

/// Size of the integrity scenario's data disk (`data.ext4`), in MiB.
pub const DATA_DISK_MB: u64 = 192;
/// Size of `/in.bin` on the integrity scenario's data disk.
pub const DATA_IN_LEN: usize = 64 << 20;
/// Seed of `/in.bin`'s pattern.
pub const DATA_IN_SEED: u64 = 0x6876_7275_6e00_0001;

/// The value after `key` on the first output line that has it.
fn field<'a>(output: &'a [String], key: &str) -> Option<&'a str> {
    output.iter().find_map(|l| l.trim().strip_prefix(key)).map(str::trim)
}

/// `sha256sum` of a file, as hex.
fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum").arg(path).output().map_err(|e| format!("sha256sum: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().filter(|_| out.status.success()).map(str::to_string).ok_or("sha256sum failed".into())
}

/// The `disk-integrity` scenario's check: the guest read `/in.bin` as the host wrote it,
/// the filesystem it handed back is clean, and `/out.bin` in it, dumped with `debugfs`,
/// has the checksum the guest computed before writing it.
pub fn disk_integrity(image: &Path, output: &[String]) -> Result<Vec<String>, String> {
    let scratch = image.with_extension("scratch");
    std::fs::write(&scratch, pattern(DATA_IN_LEN, DATA_IN_SEED)).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let expected_in = sha256(&scratch)?;
    let guest_in = field(output, "in.bin sha256:").ok_or("the guest printed no in.bin checksum")?;
    if guest_in != expected_in {
        return Err(format!("the guest read in.bin as {guest_in}; the host wrote {expected_in}"));
    }
    let fsck = Command::new("e2fsck").arg("-fn").arg(image).output().map_err(|e| format!("e2fsck: {e}"))?;
    if !fsck.status.success() {
        return Err(format!("e2fsck -fn found problems:\n{}", String::from_utf8_lossy(&fsck.stdout)));
    }
    let _ = std::fs::remove_file(&scratch);
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /out.bin {}", scratch.display()))
        .arg(image)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    if !dump.status.success() || !scratch.exists() {
        return Err(format!("debugfs could not dump /out.bin: {}", String::from_utf8_lossy(&dump.stderr)));
    }
    let host_out = sha256(&scratch)?;
    let _ = std::fs::remove_file(&scratch);
    let guest_out = field(output, "out.bin sha256:").ok_or("the guest printed no out.bin checksum")?;
    if guest_out != host_out {
        return Err(format!("out.bin in the image has checksum {host_out}; the guest wrote {guest_out}"));
    }
    Ok(vec![
        format!("in.bin as the guest read it matches the host's pattern ({expected_in})"),
        "e2fsck -fn: the filesystem is clean".into(),
        format!("out.bin dumped with debugfs matches the guest's checksum ({host_out})"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_copies_the_whole_data_disk() {
        let sc = crate::scenarios::ALL.iter().find(|s| s.name == "disk-integrity").unwrap();
        assert_eq!(sc.script.matches(&format!("count={DATA_DISK_MB}")).count(), 1);
    }

    #[test]
    fn fields_are_read_from_the_output() {
        let out = vec!["noise".to_string(), "  in.bin sha256: abc ".to_string()];
        assert_eq!(field(&out, "in.bin sha256:"), Some("abc"));
        assert_eq!(field(&out, "out.bin sha256:"), None);
    }
}
