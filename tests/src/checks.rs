//! Host-side checks of what scenarios hand back through the exchange disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::exchange::pattern;

/// Size of the integrity scenario's data disk (`data.ext4`), in MiB.
pub const DATA_DISK_MB: u64 = 192;
/// Size of `/in.bin` on the integrity scenario's data disk.
pub const DATA_IN_LEN: usize = 64 << 20;
/// Seed of `/in.bin`'s pattern.
pub const DATA_IN_SEED: u64 = 0x6876_7275_6e00_0001;

/// Size of the kill-durability scenario's image (`durability.ext4`), in MiB.
pub const DURABILITY_IMAGE_MB: u64 = 8;
/// Rounds of the kill-durability scenario; round `r`'s image is stored at
/// `r * DURABILITY_IMAGE_MB` MiB of its exchange slot.
pub const DURABILITY_ROUNDS: u64 = 20;
// At least 20 kills (issue 12), and every round's image fits the scenario's slot.
const _: () = assert!(DURABILITY_ROUNDS >= 20 && DURABILITY_ROUNDS * DURABILITY_IMAGE_MB <= crate::exchange::SLOT_MB);

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

/// What the rig printed about one round of the kill-durability scenario.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// The files the guest reported durable, as (path, sha256), in the order printed.
    /// When the kill cut a marker short after its path, the checksum is the part printed.
    pub flushed: Vec<(String, String)>,
    /// Markers the kill cut short: checked against the part of the checksum printed, or
    /// not at all when not even the path was complete.
    pub cut_short: usize,
    /// Milliseconds the rig waited after the first marker before the kill.
    pub kill_ms: Option<u64>,
    /// hvrun's exit status as the rig's shell saw it ([`KILLED`] when the kill ended it).
    pub status: Option<i32>,
    /// Whether the rig stored the round's image in the slot.
    pub stored: bool,
}

/// The shell's status for a process killed by SIGKILL.
pub const KILLED: i32 = 128 + 9;

/// Whether `s` is a sha256 in hex as `sha256sum` prints it, or (`whole` false) its start.
fn is_sha256(s: &str, whole: bool) -> bool {
    let len_ok = if whole { s.len() == 64 } else { (1..=64).contains(&s.len()) };
    len_ok && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is an absolute path of plain names, safe to hand to `debugfs -R`.
fn is_plain_path(s: &str) -> bool {
    s.len() > 1
        && s.starts_with('/')
        && s[1..].split('/').all(|n| {
            !n.is_empty()
                && n != "."
                && n != ".."
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

/// Reads the kill-durability rounds from the scenario's output, by round number. The rig
/// prints `round R: ` before each line of the guest's console (among them the writer's
/// `durable: PATH SHA256` markers), then `round R: killed MS ms after the first marker
/// (seen T s after hvrun started); hvrun status S` and `round R: image stored`.
pub fn parse_rounds(output: &[String]) -> BTreeMap<u64, Round> {
    let mut rounds: BTreeMap<u64, Round> = BTreeMap::new();
    for line in output {
        let Some((n, what)) = line.trim_end().strip_prefix("round ").and_then(|rest| rest.split_once(": ")) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let round = rounds.entry(n).or_default();
        if let Some(marker) = what.strip_prefix("durable: ") {
            match marker.split_once(' ') {
                Some((path, sum)) if is_plain_path(path) && is_sha256(sum, false) => {
                    round.cut_short += usize::from(!is_sha256(sum, true));
                    round.flushed.push((path.to_string(), sum.to_string()));
                }
                _ => round.cut_short += 1,
            }
        } else if let Some(kill) = what.strip_prefix("killed ") {
            round.kill_ms = kill.split_whitespace().next().and_then(|v| v.parse().ok());
            round.status = kill.rsplit_once("hvrun status ").and_then(|(_, v)| v.trim().parse().ok());
        } else if what == "image stored" {
            round.stored = true;
        }
    }
    rounds
}

/// Runs `program args`, returning its status code and its standard output and error.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(i32, String), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

/// What the host found in one round's image.
struct RoundResult {
    /// Whether the journal held transactions to replay (the image was not cleanly unmounted).
    replayed: bool,
    /// Files the guest reported durable, all found intact (a mismatch is a failure).
    intact: usize,
    /// Regular files in the image the guest never reported durable (the kill caught them).
    unreported: usize,
}

/// Checks one round's image (a scratch copy it may change): replays the journal, requires
/// a clean filesystem, and every flushed file with the checksum the guest printed.
fn check_round(image: &Path, round: &Round) -> Result<RoundResult, String> {
    if !round.stored {
        return Err("the rig did not store its image".into());
    }
    if round.status != Some(KILLED) {
        return Err(format!("hvrun ended with status {:?} before the kill (expected {KILLED})", round.status));
    }
    if round.flushed.is_empty() {
        return Err("no file was reported durable before the kill".into());
    }
    let img = image.as_os_str();
    let (_, header) = run("dumpe2fs", &["-h".as_ref(), img])?;
    let replayed = header.lines().any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"));
    // Replay the journal and nothing else: what the kernel does when it mounts the image.
    let (code, text) = run("e2fsck", &["-p".as_ref(), "-E".as_ref(), "journal_only".as_ref(), img])?;
    if code != 0 {
        return Err(format!("e2fsck -p -E journal_only exited {code}:\n{text}"));
    }
    let (code, text) = run("e2fsck", &["-fn".as_ref(), img])?;
    if code != 0 {
        return Err(format!("after journal replay, e2fsck -fn exited {code}:\n{text}"));
    }
    let dumps = image.with_extension("files");
    let _ = std::fs::remove_dir_all(&dumps);
    std::fs::create_dir_all(&dumps).map_err(|e| format!("{}: {e}", dumps.display()))?;
    let mut mismatches = Vec::new();
    for (i, (path, sum)) in round.flushed.iter().enumerate() {
        let out = dumps.join(i.to_string());
        let (_, text) = run("debugfs", &["-R".as_ref(), format!("dump {path} {}", out.display()).as_ref(), img])?;
        if !out.exists() {
            // debugfs prints its banner, then e.g. "/f3: File not found by ext2_lookup".
            let why = text.lines().rfind(|l| !l.trim().is_empty() && !l.starts_with("debugfs ")).unwrap_or("");
            mismatches.push(format!("{path} is missing ({})", why.trim()));
            continue;
        }
        let found = sha256(&out)?;
        if !found.starts_with(sum.as_str()) {
            mismatches.push(format!("{path} has checksum {found}; the guest flushed {sum}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dumps);
    if !mismatches.is_empty() {
        return Err(format!(
            "{} of {} flushed files lost or changed: {}",
            mismatches.len(),
            round.flushed.len(),
            mismatches.join("; ")
        ));
    }
    // `ls -p` lines: /INODE/MODE/UID/GID/NAME/SIZE/; regular files have mode 100xxx.
    let (_, listing) = run("debugfs", &["-R".as_ref(), "ls -p /".as_ref(), img])?;
    let files = listing.lines().filter(|l| l.split('/').nth(2).is_some_and(|m| m.starts_with("100"))).count();
    Ok(RoundResult { replayed, intact: round.flushed.len(), unreported: files.saturating_sub(round.flushed.len()) })
}

/// The `kill-durability` scenario's check, on its slot (every round's image, one after
/// another) and its output. For each round, on a copy of its image: the rig killed hvrun
/// with SIGKILL and stored the image; the journal is replayed (`e2fsck -p -E
/// journal_only`, which replays the committed transactions as a mount would, and changes
/// nothing else); then `e2fsck -fn` must exit 0: "clean after journal replay" means a full
/// check finds nothing to fix. (It does report the superblock's free block and inode
/// counts as wrong: the kernel writes those only at unmount and recomputes them at mount,
/// so e2fsck does not count them as errors.) A file the kill caught before its marker may
/// be there or not, whole or partly written; but every file the guest reported durable
/// must dump (`debugfs`) with exactly the checksum the guest printed.
pub fn kill_durability(slot: &Path, output: &[String]) -> Result<Vec<String>, String> {
    let rounds = parse_rounds(output);
    let bytes = std::fs::read(slot).map_err(|e| format!("{}: {e}", slot.display()))?;
    let image_len = (DURABILITY_IMAGE_MB << 20) as usize;
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    let mut flushed = 0;
    for r in 0..DURABILITY_ROUNDS {
        let Some(round) = rounds.get(&r) else {
            failures.push(format!("round {r}: no output"));
            continue;
        };
        let start = r as usize * image_len;
        let image: PathBuf = slot.with_extension(format!("round{r}"));
        let checked = bytes
            .get(start..start + image_len)
            .ok_or_else(|| format!("the slot holds no image for round {r}"))
            .and_then(|b| std::fs::write(&image, b).map_err(|e| format!("{}: {e}", image.display())))
            .and_then(|()| check_round(&image, round));
        let _ = std::fs::remove_file(&image);
        match checked {
            Ok(result) => {
                flushed += result.intact;
                let mut notes = Vec::new();
                if round.cut_short > 0 {
                    notes.push(format!("{} cut short by the kill", count(round.cut_short, "marker")));
                }
                if result.unreported > 0 {
                    notes.push(format!("{} written but not reported durable", count(result.unreported, "more file")));
                }
                lines.push(format!(
                    "round {r}: killed {} ms after the first marker: {} flushed, {} intact{}; {}; e2fsck -fn clean",
                    round.kill_ms.map_or("?".into(), |ms| ms.to_string()),
                    count(round.flushed.len(), "file"),
                    result.intact,
                    if notes.is_empty() { String::new() } else { format!(" ({})", notes.join(", ")) },
                    if result.replayed { "journal replayed" } else { "journal had nothing to replay" },
                ));
            }
            Err(e) => failures.push(format!("round {r}: {e}")),
        }
    }
    if !failures.is_empty() {
        return Err(failures.join("\n    "));
    }
    lines.push(format!(
        "{DURABILITY_ROUNDS} rounds: {flushed} files flushed, all intact; every filesystem clean after journal replay"
    ));
    Ok(lines)
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
    fn the_durability_script_and_the_check_agree() {
        let sc = crate::scenarios::ALL.iter().find(|s| s.name == "kill-durability").unwrap();
        assert!(sc.script.contains(&format!("\nrounds={DURABILITY_ROUNDS}\n")));
        assert!(sc.script.contains(&format!("\nimage_mb={DURABILITY_IMAGE_MB}\n")));
        assert!(sc.markers.contains(&format!("kill-durability: {DURABILITY_ROUNDS} rounds done").as_str()));
    }

    #[test]
    fn rounds_are_read_from_the_output() {
        let sum = "0123456789abcdef".repeat(4);
        let out: Vec<String> = [
            "round 0: hvrun-guest: init started".to_string(),
            format!("round 0: durable: /f0001 {sum}"),
            format!("round 0: durable: /f0002 {sum}"),
            // The kill cut the last marker short.
            format!("round 0: durable: /f0003 {}", &sum[..20]),
            "round 0: killed 1234 ms after the first marker (seen 4.7 s after hvrun started); hvrun status 137"
                .to_string(),
            "round 0: image stored".to_string(),
            format!("round 1: durable: /f0001 {sum}"),
            "round 1: durable: /f00".to_string(),
            "round 1: killed 0 ms after the first marker (seen 9.1 s after hvrun started); hvrun status 0".to_string(),
            format!("round x: durable: /f0001 {sum}"),
            format!("durable: /f0009 {sum}"),
        ]
        .into();
        let rounds = parse_rounds(&out);
        assert_eq!(rounds.len(), 2);
        let r0 = &rounds[&0];
        let f = |path: &str, sum: &str| (path.to_string(), sum.to_string());
        assert_eq!(r0.flushed, [f("/f0001", &sum), f("/f0002", &sum), f("/f0003", &sum[..20])]);
        assert_eq!((r0.cut_short, r0.kill_ms, r0.status, r0.stored), (1, Some(1234), Some(KILLED), true));
        let r1 = &rounds[&1];
        assert_eq!((r1.flushed.len(), r1.cut_short, r1.kill_ms, r1.status, r1.stored), (1, 1, Some(0), Some(0), false));
        // Cut before the path's end, or just after it: nothing to check.
        let out = ["round 2: durable: /f00".to_string(), "round 2: durable: /f0001 ".to_string()];
        assert_eq!((rounds_flushed(&out), parse_rounds(&out)[&2].cut_short), (0, 2));
    }

    fn rounds_flushed(out: &[String]) -> usize {
        parse_rounds(out).values().map(|r| r.flushed.len()).sum()
    }

    #[test]
    fn only_plain_paths_and_whole_checksums_count() {
        assert!(is_plain_path("/f0001") && is_plain_path("/d/f-1.bin"));
        for bad in ["", "/", "f0001", "/a b", "/../x", "/a//b", "/a\nb", "/x;rm"] {
            assert!(!is_plain_path(bad), "{bad:?}");
        }
        assert!(is_sha256(&"a".repeat(64), true) && is_sha256("0a", false));
        assert!(!is_sha256(&"a".repeat(63), true) && !is_sha256(&"A".repeat(64), true));
        assert!(!is_sha256(&"g".repeat(64), true) && !is_sha256("", false) && !is_sha256(&"a".repeat(65), false));
    }

    #[test]
    fn fields_are_read_from_the_output() {
        let out = vec!["noise".to_string(), "  in.bin sha256: abc ".to_string()];
        assert_eq!(field(&out, "in.bin sha256:"), Some("abc"));
        assert_eq!(field(&out, "out.bin sha256:"), None);
    }
}
