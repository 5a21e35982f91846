//! `hvrun macos install` and `hvrun macos run`: macOS guests on Virtualization.framework.

use std::path::PathBuf;

use hvrun::config::{self, NetConfig, ShareConfig};
use hvrun::vz::mac::{self, Install, Ipsw, Run};
use hvrun::{Error, ExitReason};

/// macOS guests (Apple Silicon Macs, Virtualization.framework).
#[derive(Debug, clap::Subcommand)]
pub enum Macos {
    /// Create a VM bundle and install macOS into it from a restore image.
    Install {
        /// The restore image: a downloaded .ipsw, or `latest` to fetch the newest one
        /// this Mac supports.
        #[arg(long, value_name = "FILE|latest")]
        ipsw: String,
        /// The bundle directory to create (it must not exist or be empty).
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// Size of the VM's disk (a sparse file).
        #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
        disk_size: u64,
        /// vCPUs [default: 4, or what the image requires].
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Memory [default: 8G, or what the image requires].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        memory: Option<u64>,
    },
    /// Run the macOS VM in a bundle. Ctrl-C asks macOS to shut down and stops the VM
    /// 30 s later if it has not; a second Ctrl-C stops it at once.
    Run {
        /// The bundle directory.
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// Show the VM's display in a window.
        #[arg(long, conflicts_with = "headless")]
        gui: bool,
        /// Run without a display window (the default; reach the guest by screen sharing
        /// or ssh).
        #[arg(long)]
        headless: bool,
        /// A network interface: nat or unixgram=PATH[,vfkit] (repeatable)
        /// [default: nat].
        #[arg(long = "net", value_name = "BACKEND[,mac=MAC]", value_parser = parse_net)]
        nets: Vec<NetConfig>,
        /// Share a host directory with the guest over virtio-fs (repeatable).
        #[arg(long = "share", value_name = "HOST_DIR:TAG[,ro]", value_parser = parse_share)]
        shares: Vec<ShareConfig>,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    config::parse_size(text).map_err(|e| e.to_string())
}

fn parse_net(text: &str) -> Result<NetConfig, String> {
    crate::parse_net(text)
}

fn parse_share(text: &str) -> Result<ShareConfig, String> {
    ShareConfig::parse(text).map_err(|e| e.to_string())
}

/// Runs the subcommand; `None` for a finished install, else the VM's exit.
pub fn run(command: Macos) -> Result<Option<ExitReason>, Error> {
    match command {
        Macos::Install { ipsw, bundle, disk_size, cpus, memory } => {
            // `--ipsw latest` downloads into the user's cache, where the next install finds it.
            let downloads = std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join("Library/Caches/hvrun"))
                .unwrap_or_else(|| bundle.parent().map(PathBuf::from).unwrap_or_default());
            let install = Install { ipsw: Ipsw::parse(&ipsw), bundle, disk_size, cpus, memory, downloads };
            // Ctrl-C cancels the install (and removes the unfinished bundle).
            let blocked = crate::signals::block();
            hvrun::vz::install_macos(&install, |vm| crate::signals::cancel(blocked, vm))?;
            eprintln!(
                "hvrun: macOS installed in {0}; the first boot needs a window for Setup Assistant: \
                 hvrun macos run --gui --bundle {0}",
                install.bundle.display()
            );
            Ok(None)
        }
        Macos::Run { bundle, gui, headless: _, nets, shares } => {
            let nets = if nets.is_empty() { vec![NetConfig::parse("nat").map_err(config_error)?] } else { nets };
            hvrun::vz::plan::check_shares(&shares)?;
            let run = Run { bundle, gui, nets: mac::nets(&nets)?, shares };
            let blocked = crate::signals::block();
            hvrun::vz::run_macos(&run, |vm| crate::signals::press_then_stop(blocked, vm)).map(Some)
        }
    }
}

fn config_error(e: hvrun::ConfigError) -> Error {
    Error::Config(e)
}
