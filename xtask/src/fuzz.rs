//! `cargo xtask fuzz [TARGET...] [--time SECONDS] [--runs N]`: the libFuzzer targets under `fuzz/`,
//! built and run by cargo-fuzz (installed by `cargo xtask setup`) with rustup's compiler
//! in nightly mode (`RUSTC_BOOTSTRAP=1`: its address sanitizer runtime ships with the
//! stable toolchain).
//!
//! Each target runs for the time given with the oracles on: a panic is a crash, an
//! input that takes longer than [`TIMEOUT_SECS`] is a hang, and the process may not grow
//! past [`RSS_LIMIT_MB`]. The corpus grows in `target/fuzz/corpus/TARGET`, seeded from the
//! checked-in `fuzz/seeds/TARGET`; a failing input lands in `target/fuzz/artifacts/TARGET`
//! with the command that reproduces it. `cargo xtask test` runs every target for
//! [`SMOKE_SECS`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{paths, sh};

/// Every target, one per surface a guest (or the host's input) reaches.
pub const TARGETS: &[&str] = &[
    "virtio_ring",
    "mmio_transport",
    "gic",
    "net_frames",
    "vsock",
    "balloon",
    "exits",
    "host_parsers",
    "snapshot",
    "api",
];
/// How long `cargo xtask test` runs each target.
pub const SMOKE_SECS: u64 = 30;
/// An input that runs longer than this is a hang.
pub const TIMEOUT_SECS: u64 = 10;
/// The most memory the fuzzing process may use.
pub const RSS_LIMIT_MB: u64 = 2048;
/// The largest single allocation an input may cause.
pub const MALLOC_LIMIT_MB: u64 = 512;

/// What one run of one target did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The target.
    pub target: String,
    /// Seconds it ran.
    pub secs: u64,
    /// Inputs executed.
    pub executions: u64,
    /// Code edges covered (libFuzzer's `cov`).
    pub coverage: u64,
    /// Inputs in the corpus at the end.
    pub corpus: u64,
    /// `None` when it found nothing; else what it found and how to reproduce it.
    pub failure: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    paths::root().join("fuzz")
}

fn work_dir() -> PathBuf {
    paths::root().join("target/fuzz")
}

/// cargo-fuzz with the environment it needs.
fn cargo_fuzz() -> Command {
    let mut c = sh::cmd(sh::host_cargo());
    c.current_dir(fuzz_dir()).env("RUSTC_BOOTSTRAP", "1").arg("fuzz");
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR"] {
        c.env_remove(var);
    }
    c
}

/// `cargo xtask fuzz`: the named targets (all when none is named) for `--time` seconds
/// each (default 60); a table of what each did; an error if any found something.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut secs = 60;
    let mut runs = None;
    let mut names = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--time" => {
                let value = rest.next().ok_or("--time needs a number of seconds")?;
                secs = value.parse().map_err(|_| format!("--time {value}: not a number of seconds"))?;
            }
            "--runs" => {
                let value = rest.next().ok_or("--runs needs a number of executions")?;
                runs = Some(value.parse().map_err(|_| format!("--runs {value}: not a number of executions"))?);
            }
            name if TARGETS.contains(&name) => names.push(name.to_string()),
            other => return Err(format!("fuzz: no target `{other}`; targets: {}", TARGETS.join(", "))),
        }
    }
    if names.is_empty() {
        names = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    crate::setup::run()?;
    let stats = run_targets(&names, secs, runs)?;
    report(&stats)
}

/// Runs every target for [`SMOKE_SECS`] (the `cargo xtask test` step).
pub fn smoke() -> Result<(), String> {
    let names: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    report(&run_targets(&names, SMOKE_SECS, None)?)
}

/// Runs each target for `secs` seconds, or until it has executed `runs` inputs.
fn run_targets(names: &[String], secs: u64, runs: Option<u64>) -> Result<Vec<Stats>, String> {
    sh::run(cargo_fuzz().args(["build", "--target-dir"]).arg(work_dir().join("build")))?;
    names.iter().map(|name| run_one(name, secs, runs)).collect()
}

fn run_one(target: &str, secs: u64, runs: Option<u64>) -> Result<Stats, String> {
    let corpus = work_dir().join("corpus").join(target);
    let artifacts = work_dir().join("artifacts").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    for dir in [&corpus, &artifacts, &seeds] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut c = cargo_fuzz();
    c.args(["run", "--target-dir"])
        .arg(work_dir().join("build"))
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .args(runs.map(|n| format!("-runs={n}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("fuzz: {target} for {secs} s{}", runs.map_or(String::new(), |n| format!(" or {n} executions")));
    let out = c.output().map_err(|e| format!("cannot run cargo fuzz (run `cargo xtask setup`): {e}"))?;
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let log_path = work_dir().join(format!("{target}.log"));
    std::fs::write(&log_path, &log).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut stats = parse_stats(target, secs, &log);
    stats.corpus = count_files(&corpus);
    if !out.status.success() {
        stats.failure = Some(describe_failure(target, &log, &log_path));
    }
    Ok(stats)
}

fn count_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count() as u64)
}

/// Reads libFuzzer's output: the final stats and the last coverage figure.
pub fn parse_stats(target: &str, secs: u64, log: &str) -> Stats {
    let mut stats = Stats { target: target.into(), secs, ..Stats::default() };
    for line in log.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = n.trim().parse().unwrap_or(0);
        }
        if let Some(cov) = line.split(" cov: ").nth(1).and_then(|r| r.split_whitespace().next()) {
            stats.coverage = cov.parse().unwrap_or(stats.coverage);
        }
        // "Done 9000 runs in 3 second(s)": how long it really ran.
        if let Some(done) = line.strip_prefix("Done ").and_then(|r| r.split(" runs in ").nth(1)) {
            stats.secs = done.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(stats.secs);
        }
    }
    stats
}

fn describe_failure(target: &str, log: &str, log_path: &Path) -> String {
    let kind = if log.contains("ERROR: libFuzzer: timeout") {
        "a hang (an input ran past the timeout)"
    } else if log.contains("out-of-memory") {
        "unbounded memory (out of memory)"
    } else if log.contains("panicked at") || log.contains("deadly signal") {
        "a crash (a panic or a fatal signal)"
    } else {
        "a failure"
    };
    let artifact =
        log.lines().find_map(|l| l.split("Test unit written to ").nth(1)).map(str::trim).unwrap_or("(no input saved)");
    format!(
        "{kind}: {artifact}; reproduce with `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {artifact}`; log: {}",
        log_path.display()
    )
}

fn report(stats: &[Stats]) -> Result<(), String> {
    println!(
        "\n{:<16} {:>6} {:>12} {:>9} {:>7} {:>7}  result",
        "target", "secs", "executions", "exec/s", "cov", "corpus"
    );
    for s in stats {
        let rate = s.executions / s.secs.max(1);
        let result = s.failure.as_deref().unwrap_or("ok");
        println!(
            "{:<16} {:>6} {:>12} {:>9} {:>7} {:>7}  {result}",
            s.target, s.secs, s.executions, rate, s.coverage, s.corpus
        );
    }
    let failed = stats.iter().filter(|s| s.failure.is_some()).count();
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("fuzz: {failed} of {} target(s) found something", stats.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_come_from_libfuzzers_output() {
        let log = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 812 ft: 1900 corp: 90/2Kb exec/s: 2048 rss: 40Mb\n\
                   #9000\tDONE   cov: 815 ft: 1950 corp: 95/2Kb lim: 4 exec/s: 3000 rss: 41Mb\n\
                   Done 9000 runs in 2 second(s)\n\
                   stat::number_of_executed_units: 9000\n\
                   stat::average_exec_per_sec:     3000\n";
        let stats = parse_stats("gic", 3, log);
        assert_eq!((stats.executions, stats.coverage, stats.secs), (9000, 815, 2));
        let failure = describe_failure(
            "gic",
            "==1== ERROR: libFuzzer: timeout after 10 seconds\nTest unit written to target/fuzz/artifacts/gic/timeout-ab\n",
            Path::new("/x.log"),
        );
        assert!(
            failure.starts_with("a hang")
                && failure.contains("cargo fuzz run gic target/fuzz/artifacts/gic/timeout-ab")
        );
    }
}
