//! The scenarios themselves: data, one entry each. Later work adds entries here, not
//! code in the harness.

mod api;
mod balloon;
mod disk;
mod embed;
mod hostile;
mod machine;
mod net;
mod vsock;

pub use api::{CURL_ARCHIVE, CURL_DIR, CURL_IN_RIG};
pub use disk::{IO_INITRAMFS, IO_IN_RIG};

use crate::scenario::Scenario;

/// Every scenario, in the order the rig runs them.
pub const ALL: &[Scenario] = &[
    machine::HELLO,
    machine::UNMAPPED,
    machine::MMIO_ABORTS,
    machine::MISSING_KERNEL,
    machine::LINUX_SMP,
    machine::CPU_HOTPLUG,
    machine::SELFTEST,
    machine::SELFTEST_V3,
    machine::LINUX_REBOOT,
    machine::VIRTIO_RNG,
    machine::OWN_KERNEL,
    machine::KERNEL_OPTIONS,
    machine::COMPRESSED_KERNEL,
    machine::GICV3_SMP,
    machine::GICV3_MANY,
    machine::GICV2_ON_GICV3,
    embed::EMBED,
    embed::EMBED_MEMDISK,
    embed::EMBED_DEVICE,
    disk::DISK_BOOT,
    machine::CONSOLE_FILE,
    machine::CONTROL_SOCKET,
    machine::SNAPSHOT,
    machine::SNAPSHOT_GICV3,
    machine::SNAPSHOT_TIMING,
    net::NET_TAP,
    net::NET_UNIXGRAM,
    net::NET_UNIXSTREAM,
    disk::DISK_INTEGRITY,
    disk::KILL_DURABILITY,
    disk::DISK_IO,
    disk::FIO_VERIFY,
    hostile::MMIO_GARBAGE,
    hostile::HOSTILE_DRIVER,
    machine::POWER_BUTTON,
    machine::BAD_INPUT,
    balloon::BALLOON_REPORTING,
    balloon::BALLOON_INFLATE,
    balloon::BALLOON_TARGET,
    vsock::VSOCK,
    api::CURL_RUNS,
    api::FC_API,
    api::FC_CONFIG_FILE,
];

/// Scenarios written but not yet seen passing in the rig: run by name only
/// (`cargo xtask e2e balloon-reporting`), not in the full run, until they have.
pub const BY_NAME_ONLY: &[Scenario] = &[];

/// Artifacts the rig unpacks into its own root rather than carrying as `/guest/NAME`:
/// newc archives of programs the rig runs (the kernel unpacks archives that follow the
/// rig's own initramfs).
pub const RIG_ARCHIVES: &[&str] = &[CURL_ARCHIVE];

/// The scenarios named in `names`, or all of them when `names` is empty. Unknown names
/// are an error that lists the known ones.
pub fn select(names: &[String]) -> Result<Vec<Scenario>, String> {
    if names.is_empty() {
        return Ok(ALL.to_vec());
    }
    let mut unique: Vec<&String> = Vec::new();
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
        .into_iter()
        .map(|name| {
            let mut known_ones = ALL.iter().chain(BY_NAME_ONLY);
            known_ones.find(|s| s.name == name).cloned().ok_or_else(|| {
                let known: Vec<_> = ALL.iter().chain(BY_NAME_ONLY).map(|s| s.name).collect();
                format!("no scenario named `{name}`; known: {}", known.join(", "))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shell_safe() {
        let mut names: Vec<_> = ALL.iter().chain(BY_NAME_ONLY).map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len() + BY_NAME_ONLY.len());
        for s in ALL.iter().chain(BY_NAME_ONLY) {
            assert!(s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{}", s.name);
            assert!(!s.markers.is_empty(), "{} checks nothing", s.name);
        }
    }

    #[test]
    fn selection() {
        assert_eq!(select(&[]).unwrap().len(), ALL.len());
        assert_eq!(select(&["hello".into()]).unwrap()[0].name, "hello");
        assert_eq!(select(&["balloon-reporting".into()]).unwrap()[0].name, "balloon-reporting");
        assert_eq!(select(&["hello".into(), "hello".into()]).unwrap().len(), 1);
        let err = select(&["nope".into()]).unwrap_err();
        assert!(err.contains("no scenario named `nope`") && err.contains("hello"), "{err}");
    }
}
