//! hvrun's developer commands, run as `cargo xtask COMMAND`.
//!
//! Every command is idempotent and prints what it runs. `demo` and `test` install and
//! build whatever is missing themselves, so on a fresh Debian machine they are all a
//! person types.

mod bench;
mod compare;
mod cross;
mod e2e;
mod fresh;
mod fuzz;
mod guest;
mod io_guest;
mod kernel;
mod paths;
mod peers;
mod prove;
mod setup;
mod sh;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask COMMAND [ARGS]

commands:
  setup          install the Debian packages the toolchains and the rig need, then prove
                 each tool works by using it (names the package to install if one fails)
  guest          build guest artifacts (kernel, busybox, test programs) into the cache
  cross          static aarch64-unknown-linux-gnu build of hvrun (build-std)
  cross-test     run the workspace's unit tests compiled for arm64 Linux, under qemu-user
  check-macos    cargo check + clippy -D warnings of the workspace for aarch64-apple-darwin
  e2e [-v] [NAME...]
                 run end-to-end scenarios in the arm64 KVM rig (all when none named)
  demo [--shell] hvrun --kernel Image --disk rootfs.img in the rig: a scripted session and a
                 summary; with --shell (a terminal) the guest's shell is yours, Ctrl-A X quits
  demo-pty       demo --shell driven through a pseudo-terminal (a step of test)
  fresh [--force] [--full]
                 in a fresh Debian 12 root (mmdebstrap) with only rustup's Rust: setup, then demo
                 (--full: and test); remembered per package list and rig command line
  test           everything CI checks: setup's proofs, fmt, clippy, tests, doc, fuzz smoke, cross-test,
                 check-macos, cross, e2e, demo (and demo --shell through a pty)
  fuzz [TARGET...] [--time S]
                 run the libFuzzer targets under fuzz/ (all when none named) for S seconds each
                 (default 60); a crash, a hang or runaway memory is a failure
  boottime [N]   boot hvrun's kernel N times in the rig: boot-time min/median/max, VMM memory
  compare [ROUNDS] [--start-only|--io-only]
                 hvrun and Debian's arm64 QEMU boot the same guest in the rig, interleaved over
                 ROUNDS rounds (default 3): start → init and start → exit; and the same fio and
                 iperf3 runs in an I/O guest; all into docs/BENCHMARKS.md (only when both parts ran)
  peers          fetch Debian's arm64 QEMU, fio, iperf3 and curl with the libraries they load into
                 the cache, and build the I/O guest's initramfs (for compare and fio-verify) and
                 the rig's curl archive (for the API scenarios)
  bench [ARGS]   run the criterion benchmarks (ARGS go to criterion) and write docs/BENCHMARKS.md

environment:
  HVRUN_CACHE    where guest artifacts are cached (default: ~/.cache/hvrun)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "setup" => setup::run().and_then(|()| prove::all()),
        "guest" => guest::run(),
        "cross" => cross::build_hvrun().map(|_| ()),
        "cross-test" => cross::test(),
        "check-macos" => cross::check_macos(),
        "e2e" => e2e::run(rest),
        "demo" => e2e::demo(rest),
        "demo-pty" => e2e::demo_shell_through_a_pty(),
        "fresh" => fresh::run(rest),
        "test" => test(),
        "bench" => bench::run(rest),
        "fuzz" => fuzz::run(rest),
        "boottime" => e2e::boottime(rest),
        "compare" => compare::run(rest),
        "peers" => peers::qemu()
            .and_then(|(files, version)| {
                println!("peers: QEMU {version}: {} files", files.len());
                guest::run().and_then(|()| io_guest::build()).map(|tools| println!("peers: the I/O guest has {tools}"))
            })
            .and_then(|()| peers::curl().map(|curl| println!("peers: the rig's curl is {curl}"))),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything CI checks, in order, stopping at the first failure.
fn test() -> Result<(), String> {
    setup::run()?;
    prove::all()?;
    // A fresh machine when setup's package list or the rig's machine changed (else the
    // package list against the archive).
    fresh::check()?;
    guest::run()?;
    let root = paths::root();
    let cargo = sh::host_cargo();
    sh::run(sh::cmd(&cargo).current_dir(&root).args(["fmt", "--all", "--check"]))?;
    sh::run(sh::cmd(&cargo).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh::run(sh::cmd(&cargo).current_dir(&root).args(["test", "--workspace"]))?;
    sh::run(sh::cmd(&cargo).current_dir(&root).env("RUSTDOCFLAGS", "-D warnings").args([
        "doc",
        "--workspace",
        "--no-deps",
    ]))?;
    fuzz::smoke()?;
    cross::test()?;
    cross::check_macos()?;
    e2e::run(&[])?;
    // The README's other command, as a newcomer runs it, and its interactive form.
    e2e::demo(&[])?;
    e2e::demo_shell_through_a_pty()?;
    println!("xtask test: all checks passed");
    Ok(())
}
