//! macOS guests: what `hvrun macos install` and `hvrun macos run` ask for, checked and
//! sized before the framework is touched.

use std::path::{Path, PathBuf};

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
    /// Where `--ipsw latest` keeps its download (kept for the next install, and resumed
    /// when cut short): never the bundle, which must be empty.
    pub downloads: PathBuf,
}

/// A network interface of a macOS guest and the MAC address asked for (`None`: the
/// bundle's own, see [`with_macs`]).
pub type MacNet = (Net, Option<[u8; 6]>);

/// `hvrun macos run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Show the VM's display in a window (else headless).
    pub gui: bool,
    /// Network interfaces.
    pub nets: Vec<MacNet>,
    /// Shared directories (the guest mounts them by tag, or automatically with the
    /// framework's macOS automount tag).
    pub shares: Vec<ShareConfig>,
}

/// Checks an install request before anything is created or downloaded: the size, the
/// image's name, and that the bundle can be made where asked.
pub fn check_install(install: &Install) -> Result<(), PlanError> {
    if let Err(e) = super::bundle::check_new(&install.bundle) {
        return Err(PlanError::Unsupported {
            flag: format!("--bundle {}", install.bundle.display()),
            instead: match e {
                super::bundle::BundleError::NotEmpty(_) => "exists and is not empty; pick a new directory",
                _ => "cannot be read; pick a directory you may write",
            },
        });
    }
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

/// Where the newest restore image, at `url`, is downloaded into `dir`: the finished file
/// (named as the server names it, so a newer macOS gets a new file) and the partial one
/// a cut-short download resumes from.
pub fn download_paths(dir: &Path, url: &str) -> (PathBuf, PathBuf) {
    let name = url.split(['?', '#']).next().unwrap_or_default().rsplit('/').next().unwrap_or_default();
    let safe = !name.starts_with('.')
        && name.ends_with(".ipsw")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
    let name = if safe { name.to_string() } else { "latest.ipsw".to_string() };
    (dir.join(&name), dir.join(format!("{name}.part")))
}

/// The network interfaces with their MAC addresses: the one asked for, else the bundle's
/// (`first`) for the first interface and one derived from it for the others.
pub fn with_macs(nets: &[MacNet], first: [u8; 6]) -> Vec<NetSpec> {
    nets.iter()
        .enumerate()
        .map(|(i, (net, mac))| {
            let derived = || {
                let seed = first.iter().map(|b| format!("{b:02x}")).collect::<String>();
                devices::virtio::net::mac_from_seed(&format!("{seed}#{i}"))
            };
            (net.clone(), mac.unwrap_or_else(|| if i == 0 { first } else { derived() }))
        })
        .collect()
}

/// The network interfaces `hvrun macos run --net` asks for: `nat` or `unixgram=PATH`.
pub fn nets(nets: &[NetConfig]) -> Result<Vec<MacNet>, PlanError> {
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
        Limits { max_cpus: 8, max_memory: 32 << 30, nested: false, ..crate::vz::plan::tests::LIMITS };

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
            downloads: "/tmp".into(),
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

    /// Issue 15, item 1: `--ipsw latest` downloaded into the bundle, which `create` then
    /// refused as not empty, after a 15 GB download.
    #[test]
    fn the_latest_image_is_downloaded_outside_the_bundle_and_can_resume() {
        let url =
            "https://updates.cdn-apple.com/2024FallFCS/fullrestores/062-01897/UniversalMac_15.1_24B83_Restore.ipsw";
        let (done, part) = download_paths(Path::new("/cache"), url);
        assert_eq!(done, Path::new("/cache/UniversalMac_15.1_24B83_Restore.ipsw"));
        assert_eq!(part, Path::new("/cache/UniversalMac_15.1_24B83_Restore.ipsw.part"));
        for odd in
            ["https://x/", "https://x/../../etc/passwd", "https://x/.ipsw", "https://x/a b.ipsw", "https://x/y.zip"]
        {
            assert_eq!(download_paths(Path::new("/cache"), odd).0, Path::new("/cache/latest.ipsw"), "{odd}");
        }
        assert_eq!(download_paths(Path::new("/c"), "https://x/R.ipsw?token=1#f").0, Path::new("/c/R.ipsw"));
        // The bundle is checked before any download.
        let dir = std::env::temp_dir().join(format!("hvrun-mac-{}-full", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("restore.ipsw"), b"x").unwrap();
        let install = Install {
            ipsw: Ipsw::Latest,
            bundle: dir.clone(),
            disk_size: DEFAULT_DISK,
            cpus: None,
            memory: None,
            downloads: std::env::temp_dir(),
        };
        let err = check_install(&install).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_macos_guests_interfaces_keep_their_addresses() {
        let first = [0x02, 1, 2, 3, 4, 5];
        let asked = nets(&[
            NetConfig::parse("nat").unwrap(),
            NetConfig::parse("nat").unwrap(),
            NetConfig::parse("unixgram=/s,mac=02:00:00:00:00:09").unwrap(),
        ])
        .unwrap();
        let got = with_macs(&asked, first);
        assert_eq!(got[0].1, first);
        assert_ne!(got[1].1, first);
        assert_eq!(got[1].1, with_macs(&asked, first)[1].1, "stable");
        assert_eq!(got[2].1, [2, 0, 0, 0, 0, 9]);
    }
}
