//! macOS guests: what `hvrun macos install` and `hvrun macos run` ask for, checked and
//! sized before the framework is touched.

use std::path::PathBuf;

use super::plan::{Limits, Net, NetSpec, PlanError};
use crate::config::{format_size, NetBackendConfig, NetConfig, ShareConfig};

/// The disk a new macOS VM gets unless asked otherwise.
pub const DEFAULT_DISK: u64 = 64 << 30;
/// The smallest disk macOS installs on with room to spare.
pub const MIN_DISK: u64 = 32 << 30;
/// vCPUs a new macOS VM gets unless asked otherwise (at least what the image requires).
pub const DEFAULT_CPUS: u32 = 4;
/// Memory a new macOS VM gets unless asked otherwise (at least what the image requires).
pub const DEFAULT_MEMORY: u64 = 8 << 30;

/// Where the restore image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipsw {
    /// A downloaded `.ipsw` file.
    File(PathBuf),
    /// The newest image this Mac supports, fetched through the framework.
    Latest,
}

impl Ipsw {
    /// Parses `--ipsw FILE|latest`.
    pub fn parse(text: &str) -> Self {
        if text == "latest" {
            Ipsw::Latest
        } else {
            Ipsw::File(text.into())
        }
    }
}

/// `hvrun macos install`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// The restore image.
    pub ipsw: Ipsw,
    /// The bundle directory to create.
    pub bundle: PathBuf,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// vCPUs, when asked for.
    pub cpus: Option<u32>,
    /// Memory, when asked for.
    pub memory: Option<u64>,
}

/// `hvrun macos run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Show the VM's display in a window (else headless).
    pub gui: bool,
    /// Network interfaces.
    pub nets: Vec<NetSpec>,
    /// Shared directories (the guest mounts them by tag, or automatically with the
    /// framework's macOS automount tag).
    pub shares: Vec<ShareConfig>,
}

/// Checks an install request before anything is created.
pub fn check_install(install: &Install) -> Result<(), PlanError> {
    if install.disk_size < MIN_DISK {
        return Err(PlanError::Unsupported {
            flag: format!("--disk-size {}", format_size(install.disk_size)),
            instead: "too small: macOS needs at least 32G",
        });
    }
    if let Ipsw::File(path) = &install.ipsw {
        if path.extension().is_none_or(|e| e != "ipsw") {
            return Err(PlanError::Unsupported {
                flag: format!("--ipsw {}", path.display()),
                instead: "not a restore image: give a macOS .ipsw, or `latest`",
            });
        }
    }
    Ok(())
}

/// The vCPUs and memory an install gets: what was asked, or the defaults raised to
/// what the image requires; either way inside what this Mac allows.
pub fn sizes(
    cpus: Option<u32>,
    memory: Option<u64>,
    required: (u32, u64),
    limits: &Limits,
) -> Result<(u32, u64), PlanError> {
    let (min_cpus, min_memory) = required;
    let cpus = cpus.unwrap_or(DEFAULT_CPUS.max(min_cpus).min(limits.max_cpus));
    let memory = memory.unwrap_or(DEFAULT_MEMORY.max(min_memory).min(limits.max_memory));
    let low = |what, value: u64, min: u64, max: u64| PlanError::OutOfRange { what, value, min, max };
    if cpus < min_cpus.max(limits.min_cpus) || cpus > limits.max_cpus {
        return Err(low("--cpus", cpus.into(), min_cpus.max(limits.min_cpus).into(), limits.max_cpus.into()));
    }
    if memory < min_memory.max(limits.min_memory) || memory > limits.max_memory || memory % (1 << 20) != 0 {
        return Err(low("--memory", memory, min_memory.max(limits.min_memory), limits.max_memory));
    }
    Ok((cpus, memory))
}

/// The network interfaces `hvrun macos run --net` asks for: `nat` or `unixgram=PATH`.
pub fn nets(nets: &[NetConfig]) -> Result<Vec<NetSpec>, PlanError> {
    nets.iter()
        .map(|n| match &n.backend {
            NetBackendConfig::Nat => Ok((Net::Nat, n.mac)),
            NetBackendConfig::Unixgram { path, vfkit } => {
                Ok((Net::Unixgram { path: path.clone(), vfkit: *vfkit }, n.mac))
            }
            NetBackendConfig::Fd(fd) => Ok((Net::Fd(fd.clone()), n.mac)),
            _ => Err(PlanError::Unsupported {
                flag: format!("--net {}", n.mac_seed()),
                instead: "not for a macOS guest: use nat or unixgram=PATH",
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits =
        Limits { min_cpus: 1, max_cpus: 8, min_memory: 128 << 20, max_memory: 32 << 30, nested: false };

    #[test]
    fn install_defaults_rise_to_the_images_requirements_and_stay_within_the_host() {
        assert_eq!(sizes(None, None, (2, 4 << 30), &LIMITS).unwrap(), (4, 8 << 30));
        assert_eq!(sizes(None, None, (6, 16 << 30), &LIMITS).unwrap(), (6, 16 << 30));
        let small = Limits { max_cpus: 2, max_memory: 4 << 30, ..LIMITS };
        assert_eq!(sizes(None, None, (2, 4 << 30), &small).unwrap(), (2, 4 << 30));
        assert_eq!(sizes(Some(3), Some(6 << 30), (2, 4 << 30), &LIMITS).unwrap(), (3, 6 << 30));
    }

    #[test]
    fn install_sizes_below_the_image_or_above_the_host_are_refused() {
        let err = sizes(Some(1), None, (2, 4 << 30), &LIMITS).unwrap_err().to_string();
        assert_eq!(err, "--cpus 1: Virtualization.framework on this Mac allows 2 to 8");
        assert!(sizes(None, Some(2 << 30), (2, 4 << 30), &LIMITS).is_err());
        assert!(sizes(Some(9), None, (2, 4 << 30), &LIMITS).is_err());
        assert!(sizes(None, Some((8 << 30) + 1), (2, 4 << 30), &LIMITS).is_err(), "whole MiB");
    }

    #[test]
    fn install_requests_are_checked_before_anything_is_created() {
        let ok = Install {
            ipsw: Ipsw::parse("UniversalMac_15.1_Restore.ipsw"),
            bundle: "vm".into(),
            disk_size: DEFAULT_DISK,
            cpus: None,
            memory: None,
        };
        assert_eq!(check_install(&ok), Ok(()));
        assert_eq!(Ipsw::parse("latest"), Ipsw::Latest);
        let small = Install { disk_size: 16 << 30, ..ok.clone() };
        assert!(check_install(&small).unwrap_err().to_string().contains("--disk-size 16G"));
        let wrong = Install { ipsw: Ipsw::parse("Image"), ..ok };
        assert!(check_install(&wrong).unwrap_err().to_string().contains(".ipsw"));
    }

    #[test]
    fn a_macos_guest_takes_nat_or_a_datagram_socket() {
        let asked = [NetConfig::parse("nat").unwrap(), NetConfig::parse("unixgram=/tmp/gv.sock").unwrap()];
        let got = nets(&asked).unwrap();
        assert_eq!(got[0].0, Net::Nat);
        assert!(nets(&[NetConfig::parse("tap=tap0").unwrap()]).unwrap_err().to_string().contains("--net tap=tap0"));
    }
}
