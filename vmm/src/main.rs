//! The `hvrun` command: a thin CLI over the `hvrun` library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use hvrun::control_socket::ControlSocket;
use hvrun::{config, ExitReason, Vm, VmConfig};

mod api_cli;
mod macos_cli;
mod signals;

/// Exit codes, as documented in `--help`.
const EXIT_POWEROFF: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_RESET: u8 = 3;
const EXIT_CRASH: u8 = 4;
pub(crate) const EXIT_STOPPED: u8 = 5;

/// Boot an arm64 Linux guest on KVM (arm64 Linux) or Hypervisor.framework (Apple Silicon).
#[derive(Debug, Parser)]
#[command(
    name = "hvrun",
    version,
    after_help = "Console: this terminal is the guest's console: hvc0 (virtio) when the kernel command \
                  line makes hvc0 the console, as the default one with --disk does, else ttyAMA0 \
                  (serial); --console changes that. When standard input is a terminal it is put in raw mode while the guest runs; press Ctrl-A X to quit hvrun, \
                  Ctrl-A Ctrl-A to send a Ctrl-A.\n\n\
                  Exit status: 0 when the guest powers off, 1 when hvrun fails, 2 for a bad command \
                  line, 3 when the guest asks for a reboot (hvrun does not restart it), 4 when the \
                  guest reports a crash, 5 when stopped with Ctrl-A X or a second signal.\n\n\
                  Signals: SIGTERM (and Ctrl-C when standard input is not a terminal) press the \
                  guest's power button, so it shuts down cleanly; a second one stops it at once.\n\n\
                  Set RUST_LOG=info (or debug) for more detail on standard error, including the \
                  guest's boot time when its init writes the boot-timer device."
)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Cli {
    /// `hvrun selftest` (run it first on a new host), and macOS guests: `hvrun macos
    /// install`, `hvrun macos run` (see `hvrun macos --help`).
    #[command(subcommand)]
    command: Option<Command>,
    /// The arm64 Linux kernel `Image` to boot (a gzip'd one is unpacked first).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "api_sock", "config_file"])]
    kernel: Option<PathBuf>,
    /// An initramfs for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// The kernel command line [default: console=ttyAMA0; with --disk,
    /// console=hvc0 earlycon root=/dev/vda rw].
    #[arg(long, value_name = "TEXT")]
    cmdline: Option<String>,
    /// A raw disk image as a virtio-blk device (repeatable: vda, vdb, ...), e.g.
    /// rootfs.img or data.img,readonly,id=data.
    #[arg(long = "disk", value_name = "PATH[,readonly][,id=NAME]", value_parser = parse_disk)]
    disks: Vec<config::DiskConfig>,
    /// A network interface as a virtio-net device (repeatable: eth0, eth1, ...):
    /// tap=NAME (Linux), unixgram=PATH[,vfkit] (a unix datagram socket, one ethernet
    /// frame per datagram: gvproxy, vfkit's protocol with ,vfkit), unixstream=PATH
    /// (length-prefixed frames: socket_vmnet, passt), fd=N (an inherited datagram
    /// socket, e.g. from vmnet-helper) or nat (Virtualization.framework's NAT, with
    /// --backend vz); each takes ,mac=XX:XX:XX:XX:XX:XX [default MAC:
    /// stable, derived from the backend].
    #[arg(long = "net", value_name = "BACKEND[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<config::NetConfig>,
    /// Where the guest's virtio console hvc0 goes: `hvc` (this terminal), `file=PATH`,
    /// `socket=PATH` (a unix socket hvrun listens on), or `serial` (no hvc0; the
    /// terminal is ttyAMA0's) [default: hvc when the command line says console=hvc0,
    /// else serial]. The serial port's output always comes to this terminal.
    #[arg(long, value_name = "WHERE", value_parser = parse_console)]
    console: Option<config::ConsoleConfig>,
    /// The hypervisor: kvm (Linux), hvf (macOS) or vz (Apple's Virtualization.framework,
    /// macOS: Rosetta, virtio-fs shares, NAT) [default: this host's].
    #[arg(long, value_name = "NAME", value_parser = parse_backend)]
    backend: Option<config::Backend>,
    /// Give the guest Rosetta for x86_64 Linux binaries (with --backend vz, where Rosetta
    /// is installed); the guest mounts it with `mount -t virtiofs rosetta /mnt`.
    #[arg(long)]
    rosetta: bool,
    /// Nested virtualization: the guest boots at EL2 and can run VMs of its own (KVM
    /// with KVM_CAP_ARM_EL2, Linux 6.16+; macOS 15+ on Apple M3 or later). Needs the
    /// hypervisor's GICv3.
    #[arg(long)]
    nested: bool,
    /// Share a host directory with the guest over virtio-fs (with --backend vz;
    /// repeatable); the guest mounts it with `mount -t virtiofs TAG /mnt`.
    #[arg(long = "share", value_name = "HOST_DIR:TAG[,ro]", value_parser = parse_share)]
    shares: Vec<config::ShareConfig>,
    /// Number of vCPUs (1 to 127; more than 8 need the hypervisor's GICv3).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// The interrupt controller: v3 (the hypervisor's own GICv3: KVM's vGICv3 on a
    /// GICv3 host, the in-kernel GIC of macOS 15+), v2 (hvrun's emulated GICv2, up to 8
    /// vCPUs) or auto (v3 where the hypervisor has one, else v2).
    #[arg(long, value_name = "VERSION", default_value = "auto", value_parser = parse_gic)]
    gic: config::GicChoice,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// A virtio-balloon: `--balloon` alone offers free page reporting (memory the guest
    /// frees goes back to the host), deflate-on-OOM and statistics every 5 s;
    /// `--balloon=reporting=off,deflate-on-oom=off,stats=SECONDS` (0: none) changes that,
    /// and `target=SIZE` has the guest give SIZE back as it boots.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, require_equals = true, default_missing_value = "", value_parser = parse_balloon)]
    balloon: Option<config::BalloonOptions>,
    /// A virtio-vsock device, `cid=N,socket=PATH` (N from 3 to 4294967294): host programs
    /// connect to PATH and write `CONNECT <port>\n` (Firecracker's protocol); the guest's
    /// connections to host port P go to the unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = parse_vsock)]
    vsock: Option<config::VsockConfig>,
    /// A unix socket hvrun listens on for control commands from other programs, one
    /// JSON object per line: {"command":"pause"}, "resume", "status", "stop" or
    /// {"command":"snapshot","dir":"DIR"} (saves the VM, left paused: see --restore); each
    /// gets one JSON line back ({"ok":true} or {"ok":false,"error":"..."}).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Continue the guest saved in snapshot directory DIR (`{"command":"snapshot",
    /// "dir":"DIR"}` on the control socket) instead of booting one: the same machine,
    /// with the disks at the paths it had (or those --disk gives, in the same order)
    /// and the network, console and vsock backends it had (or those the flags give).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "gic", "nested", "balloon", "backend"])]
    restore: Option<PathBuf>,
    /// With --restore: take the disks as they are even if they are not the images the
    /// snapshot was taken with (by size and fingerprint).
    #[arg(long, requires = "restore")]
    restore_trust_disks: bool,
    /// Serve Firecracker's REST API on this unix socket (HTTP/1.1, its paths and JSON
    /// objects: see the README): the VM is configured by API calls and starts at
    /// `PUT /actions {"action_type":"InstanceStart"}`, or continues a snapshot at
    /// `PUT /snapshot/load`. The machine's flags (--kernel, --disk, ...) are not taken.
    #[arg(long, value_name = "PATH", conflicts_with_all = MACHINE_FLAGS)]
    api_sock: Option<PathBuf>,
    /// Start the VM a Firecracker JSON configuration file describes (the objects of
    /// `GET /vm/config`: "boot-source", "machine-config", "drives", ...), with or
    /// without --api-sock.
    #[arg(long, value_name = "FILE", conflicts_with_all = MACHINE_FLAGS)]
    config_file: Option<PathBuf>,
    /// No API socket (Firecracker's flag; hvrun serves none without --api-sock anyway).
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    no_api: bool,
    /// The instance's id, as `GET /` shows it (Firecracker's flag).
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    /// The largest API request body taken, in bytes (Firecracker's flag and default).
    #[arg(long, value_name = "BYTES", default_value_t = hvrun::api::http::DEFAULT_MAX_BODY)]
    http_api_max_payload_size: usize,
}

/// The flags that describe a machine, which --api-sock and --config-file describe instead.
const MACHINE_FLAGS: [&str; 17] = [
    "kernel", "initrd", "cmdline", "disks", "nets", "console", "backend", "rosetta", "nested", "shares", "cpus", "gic",
    "memory", "balloon", "vsock", "control", "restore",
];

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// macOS guests on Apple's Virtualization.framework (Apple Silicon Macs).
    #[command(subcommand)]
    Macos(macos_cli::Macos),
    /// Check that this host runs guests right: small guests, one class of exit each
    /// (MMIO, aborts, PSCI and a second vCPU, system registers, the timer through the
    /// GIC). Run it first on a new Mac; when a test fails it writes a report to attach
    /// to a bug report. Exit status 0 when every test passes, 1 otherwise.
    /// HVRUN_SELFTEST_BREAK=NAME fails test NAME on purpose, to show the report.
    Selftest(SelftestArgs),
}

#[derive(Debug, clap::Args)]
struct SelftestArgs {
    /// The interrupt controller of the test machines (v2, v3 or auto).
    #[arg(long, value_name = "VERSION", default_value = "auto", value_parser = parse_gic)]
    gic: config::GicChoice,
    /// Where the report goes when a test fails.
    #[arg(long, value_name = "PATH", default_value = "hvrun-selftest-report.txt")]
    report: PathBuf,
}

/// `hvrun selftest`: the table on standard output; 0 when every test passed.
fn selftest(args: SelftestArgs) -> ExitCode {
    let options = hvrun::selftest::Options {
        gic: args.gic,
        report: args.report,
        broken: std::env::var("HVRUN_SELFTEST_BREAK").ok(),
        log_filter: std::env::var("RUST_LOG").ok(),
        ..hvrun::selftest::Options::new()
    };
    match hvrun::selftest::run(&options, &mut std::io::stdout()) {
        Ok(summary) if summary.passed() => ExitCode::from(EXIT_POWEROFF),
        Ok(_) => ExitCode::from(EXIT_ERROR),
        Err(e) => {
            eprintln!("hvrun: error: selftest: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn parse_disk(text: &str) -> Result<config::DiskConfig, String> {
    config::parse_disk(text).map_err(|e| e.to_string())
}

fn parse_backend(text: &str) -> Result<config::Backend, String> {
    config::Backend::parse(text).ok_or_else(|| format!("`{text}`: use kvm, hvf or vz"))
}

fn parse_share(text: &str) -> Result<config::ShareConfig, String> {
    config::ShareConfig::parse(text).map_err(|e| e.to_string())
}

fn parse_balloon(text: &str) -> Result<config::BalloonOptions, String> {
    config::parse_balloon(text).map_err(|e| e.to_string())
}

fn parse_vsock(text: &str) -> Result<config::VsockConfig, String> {
    config::parse_vsock(text).map_err(|e| e.to_string())
}

fn parse_gic(text: &str) -> Result<config::GicChoice, String> {
    config::GicChoice::parse(text).map_err(|e| e.to_string())
}

/// `--net`, claiming the descriptor of `fd=N`.
fn parse_net(text: &str) -> Result<config::NetConfig, String> {
    // SAFETY: this is the process's entry point: the descriptors it inherited belong to
    // no other part of it, and `claim_inherited` refuses a number named twice.
    config::NetConfig::parse_with(text, |n| unsafe { config::NetFd::claim_inherited(n) }).map_err(|e| e.to_string())
}

fn parse_console(text: &str) -> Result<config::ConsoleConfig, String> {
    config::ConsoleConfig::parse(text).map_err(|e| e.to_string())
}

fn parse_size(text: &str) -> Result<u64, String> {
    config::parse_size(text).map_err(|e| e.to_string())
}

/// env_logger to standard error (a record a write: [`hvrun::log_lines`]), with the log lines a guest can provoke in other crates
/// rate-limited ([`hvrun::GuestLogLimiter`]). Without RUST_LOG, warnings and errors;
/// the level alone decides, so that Firecracker's `PUT /logger` can change it
/// ([`set_log_level`]).
fn init_logging() {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("trace"));
    // Each record in one write, whole or not at all, even to a FIFO (`PUT /logger`).
    builder.format(format_log_line).target(env_logger::Target::Pipe(Box::new(hvrun::log_lines::LogLines::stderr())));
    // What env_logger chooses for standard error (it cannot tell through a writer, and
    // takes `auto` for `never` there): RUST_LOG_STYLE's `always` and `never` as said;
    // otherwise colours on a terminal, unless NO_COLOR is set.
    let style = std::env::var("RUST_LOG_STYLE").unwrap_or_default();
    let colours = match style.as_str() {
        "always" => true,
        "never" => false,
        _ => {
            use std::io::IsTerminal;
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    builder.write_style(if colours { env_logger::WriteStyle::Always } else { env_logger::WriteStyle::Never });
    let logger = builder.build();
    let max_level = if from_env { logger.filter() } else { log::LevelFilter::Warn };
    if log::set_boxed_logger(Box::new(hvrun::GuestLogLimiter::new(logger))).is_ok() {
        log::set_max_level(max_level);
    }
}

/// Whether log lines show their level (`PUT /logger`'s `show_level`; hvrun's default:
/// yes) and their origin, the source file and line (`show_log_origin`; default: no).
static SHOW_LEVEL: AtomicBool = AtomicBool::new(true);
static SHOW_ORIGIN: AtomicBool = AtomicBool::new(false);

/// A log line: env_logger's own shape (`[time LEVEL] message`, the level padded to five
/// characters, which the rig's checks look for) unless `PUT /logger` changed it.
fn format_log_line(buf: &mut env_logger::fmt::Formatter, record: &log::Record<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    write!(buf, "[{}", buf.timestamp())?;
    if SHOW_LEVEL.load(Ordering::Relaxed) {
        let style = buf.default_level_style(record.level());
        write!(buf, " {style}{:<5}{style:#}", record.level())?;
    }
    write!(buf, "]")?;
    if SHOW_ORIGIN.load(Ordering::Relaxed) {
        write!(buf, " {}:{}", record.file().unwrap_or("?"), record.line().unwrap_or(0))?;
    }
    writeln!(buf, " {}", record.args())
}

/// Applies `PUT /logger`'s `show_level` and `show_log_origin` (each kept when absent).
pub(crate) fn set_log_format(show_level: Option<bool>, show_origin: Option<bool>) {
    if let Some(show) = show_level {
        SHOW_LEVEL.store(show, Ordering::Relaxed);
    }
    if let Some(show) = show_origin {
        SHOW_ORIGIN.store(show, Ordering::Relaxed);
    }
}

/// Changes the log level (`PUT /logger`), unless RUST_LOG chose the filter.
pub(crate) fn set_log_level(level: log::LevelFilter) {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("hvrun: {} (see hvrun --help)", first_paragraph(&e.to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Some(Command::Macos(command)) => {
            return exit_code(macos_cli::run(command).map(|r| r.unwrap_or(ExitReason::PowerOff)))
        }
        Some(Command::Selftest(args)) => return selftest(args),
        None => {}
    }
    if cli.api_sock.is_some() || cli.config_file.is_some() {
        let options = api_cli::ApiOptions {
            socket: cli.api_sock,
            config_file: cli.config_file,
            id: cli.id,
            max_body: cli.http_api_max_payload_size,
        };
        return match api_cli::run(options) {
            Ok(reason) => exit_code(Ok(reason)),
            Err(e) => {
                // Not eprintln!, which panics when standard error, a FIFO since
                // `PUT /logger`, takes nothing now.
                let _ = writeln!(std::io::stderr(), "hvrun: error: {e}");
                ExitCode::from(EXIT_ERROR)
            }
        };
    }
    let config = match (cli.kernel, &cli.restore) {
        (_, Some(dir)) => {
            match hvrun::snapshot::machine::saved_config(&hvrun::snapshot::machine::SnapshotFiles::in_dir(dir)) {
                Ok(mut config) => {
                    // The backends it had, unless given again.
                    if !cli.disks.is_empty() {
                        config.disks = cli.disks;
                    }
                    if !cli.nets.is_empty() {
                        config.nets = cli.nets;
                    }
                    config.console = cli.console.or(config.console);
                    config.vsock = cli.vsock.or(config.vsock);
                    config.console_stdin = true;
                    config
                }
                Err(e) => {
                    eprintln!("hvrun: error: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            }
        }
        (Some(kernel), None) => {
            let mut config = VmConfig::new(kernel);
            config.initrd = cli.initrd;
            config.cmdline = cli.cmdline;
            config.console = cli.console;
            config.disks = cli.disks;
            config.nets = cli.nets;
            config.backend = cli.backend;
            config.gic = cli.gic;
            config.rosetta = cli.rosetta;
            config.nested = cli.nested;
            config.shares = cli.shares;
            config.cpus = cli.cpus;
            config.memory = cli.memory;
            config.balloon = cli.balloon;
            config.vsock = cli.vsock;
            config.console_stdin = true;
            config
        }
        (None, None) => {
            eprintln!("hvrun: error: --kernel is required (see hvrun --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let restore = cli.restore.map(|dir| (dir, cli.restore_trust_disks));
    // Bound before anything runs, so that a bad path is an error before the guest starts.
    let control = match cli.control.as_deref().map(ControlSocket::bind).transpose() {
        Ok(control) => control,
        Err(e) => {
            eprintln!("hvrun: error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    exit_code(run(config, restore, control))
}

/// Raises the soft limit on open files to the hard limit (at most 65,536), as
/// Firecracker's jailer does: a guest may hold up to 1,023 vsock connections, each a file
/// descriptor here, beside the machine's own (vCPUs, event loops, disks, taps), which a
/// common soft limit of 1,024 would not leave room for. A refusal is harmless: the limit
/// stays as it was.
pub(crate) fn raise_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    // macOS refuses more than its per-process maximum (often 10,240 or more): step down.
    for wanted in [65_536, 10_240] {
        let target = limit.rlim_max.min(wanted);
        if target <= limit.rlim_cur {
            return;
        }
        let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return;
        }
    }
}

/// Runs the VM (or continues the snapshot `restore` names, with whether to trust its
/// disks) with the serial port on standard output; SIGTERM and SIGINT press its power
/// button, and a second one stops it. `control`, if any, is served once it runs.
fn run(
    config: VmConfig,
    restore: Option<(PathBuf, bool)>,
    control: Option<ControlSocket>,
) -> Result<ExitReason, hvrun::Error> {
    // Before any thread exists, so that every thread inherits the mask.
    let blocked = signals::block();
    raise_file_limit();
    let mut builder = Vm::builder(config).serial(std::io::stdout());
    if let Some((dir, trust_disks)) = restore {
        builder = builder.restore(dir, trust_disks);
    }
    if let Some(secs) = std::env::var("HVRUN_DUMP_AFTER").ok().and_then(|s| s.parse().ok()) {
        builder = builder.dump_state_after(std::time::Duration::from_secs(secs));
    }
    let vm = builder.start()?;
    signals::press_then_stop(blocked, vm.handle());
    let _control = control.map(|control| control.serve(vm.handle()));
    vm.wait()
}

/// The documented exit status for a run's outcome, with a one-line error (not through
/// eprintln!, which panics when standard error is a full FIFO: `PUT /logger`).
fn exit_code(outcome: Result<ExitReason, hvrun::Error>) -> ExitCode {
    let say = |text: std::fmt::Arguments<'_>| {
        let _ = writeln!(std::io::stderr(), "hvrun: {text}");
    };
    match outcome {
        Ok(ExitReason::PowerOff) => ExitCode::from(EXIT_POWEROFF),
        Ok(ExitReason::Reset) => ExitCode::from(EXIT_RESET),
        Ok(ExitReason::Crash) => ExitCode::from(EXIT_CRASH),
        Ok(ExitReason::Stopped) => ExitCode::from(EXIT_STOPPED),
        Ok(other) => {
            say(format_args!("the guest stopped ({other:?})"));
            ExitCode::from(EXIT_ERROR)
        }
        Err(e @ (hvrun::Error::Config(_) | hvrun::Error::VzPlan(_))) => {
            say(format_args!("error: {e}"));
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            say(format_args!("error: {e}"));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The first paragraph of clap's message, on one line: the part that says what is wrong.
fn first_paragraph(message: &str) -> String {
    let lines = message.lines().map(str::trim).skip_while(|l| l.is_empty());
    lines.take_while(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
