//! The scenarios themselves: data, one entry each. Later work adds entries here, not
//! code in the harness.

/// The script of a scenario that runs example `$name` (`vmm/examples/`) on hvrun's kernel
/// and test initramfs, then echoes `$name exit N`. An example whose guest never reached
/// its init exits 3 (`examples/common`'s `NO_BOOT`), having printed what the machine did;
/// that boot is tried once more, saying so. Rarely, and only in this nested rig, a guest
/// fails before its init (a hang with nothing on hvc0, or init killed by SIGSEGV; seen in
/// about 1 of 400 boots, with and without the example's own device, and never traced to
/// hvrun): the example's own checks are not what failed then. A second failure fails the
/// scenario. Scenarios using it allow for two waits of the examples' 120 s `INIT_LIMIT`.
macro_rules! example_script {
    ($name:literal) => {
        concat!(
            "for try in 1 2; do /bin/",
            $name,
            " /guest/Image /guest/initramfs.cpio 2>&1; r=$?; [ $r = 3 ] && [ $try = 1 ] || break; echo \"",
            $name,
            ": the guest did not reach its init; booting it once more\"; done; echo \"",
            $name,
            " exit $r\""
        )
    };
}

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

    /// The example's script, with `/bin/fake` a program that exits with the statuses
    /// `codes`, one a run; returns what the script printed.
    fn run_example_script(codes: &[u8]) -> String {
        let dir = std::env::temp_dir().join(format!("hvrun-example-script-{}-{}", std::process::id(), codes.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let count = dir.join("count");
        let codes: Vec<String> = codes.iter().map(u8::to_string).collect();
        let fake = dir.join("fake");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0); echo $((n + 1)) > {c}\necho \"run $n\"\nset -- {}\nshift $n\nexit $1\n",
                codes.join(" "),
                c = count.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let script = example_script!("fake").replace("/bin/fake", &fake.display().to_string());
        let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn an_example_whose_guest_did_not_boot_is_run_once_more_and_only_once() {
        assert_eq!(run_example_script(&[0]), "run 0\nfake exit 0\n");
        assert_eq!(run_example_script(&[1, 0]), "run 0\nfake exit 1\n", "a failure is not retried");
        let again = "run 0\nfake: the guest did not reach its init; booting it once more\nrun 1\n";
        assert_eq!(run_example_script(&[3, 0, 0]), format!("{again}fake exit 0\n"));
        assert_eq!(run_example_script(&[3, 3, 0]), format!("{again}fake exit 3\n"), "a second no-boot fails");
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
