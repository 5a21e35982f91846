//! The balloon's scenarios (`hvrun --balloon`).

use crate::scenario::{OuterGic, Scenario};

/// The rig's side of `balloon-reporting`: hvrun boots hvrun's kernel with `--balloon`;
/// the guest (`t/balloon-check`) fills 300 MiB and frees it, and the rig host reads
/// hvrun's RSS (`VmRSS` of `/proc/PID/status`) while the memory is in use and then once
/// a second for up to 10 s after the guest freed it.
const REPORTING_SCRIPT: &str = "\
now() { cut -d. -f1 /proc/uptime; }
rss() { awk '/^VmRSS/ { print int($2 / 1024) }' /proc/$(pidof hvrun | cut -d' ' -f1)/status 2>/dev/null; }
wait_for() { end=$(( $(now) + $2 )); until grep -q \"$1\" /tmp/out || [ $(now) -ge $end ]; do sleep 1; done; }
: >/tmp/out
(/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 512M --balloon \\
  --cmdline 'console=ttyAMA0 quiet -- /t/balloon-check'; echo \"hvrun exit $?\") 2>&1 | tr -d '\\r' | tee /tmp/out &
wait_for 'balloon-check: filled' 400
before=$(rss)
echo \"rig host: hvrun RSS with 300 MiB in use in the guest: $before MiB\"
wait_for 'balloon-check: freed' 120
after=$before; i=0
while [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); after=$(rss); [ $((before - after)) -ge 250 ] && break; done
echo \"rig host: hvrun RSS $i s after the guest freed 300 MiB: $after MiB (before: $before MiB)\"
[ $((before - after)) -ge 250 ] && echo \"rig host: RSS fell by $((before - after)) MiB within 10 s\"
wait
";

/// The rig's side of `balloon-inflate`: hvrun boots with a balloon target of 256 MiB and
/// no free page reporting; the guest (`t/balloon-inflate`) waits for the balloon to
/// inflate, then fills 300 MiB, which only fits once the balloon deflates. hvrun logs
/// the balloon's size as the driver reports it.
const INFLATE_SCRIPT: &str = "\
set -o pipefail
RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 512M \\
  --balloon=reporting=off,target=256M --cmdline 'console=ttyAMA0 quiet -- /t/balloon-inflate' 2>&1 | tr -d '\\r'
echo \"hvrun exit $?\"
";

/// Free page reporting returns the memory the guest frees.
pub const BALLOON_REPORTING: Scenario = Scenario {
    name: "balloon-reporting",
    about: "free page reporting: 300 MiB the guest frees leave hvrun's RSS within 10 s; refilled and kept data intact",
    artifacts: &["Image", "initramfs.cpio"],
    script: REPORTING_SCRIPT,
    exit_code: 0,
    markers: &[
        "balloon-check: the virtio_balloon driver has the device",
        "balloon-check: filled 300 MiB",
        "rig host: hvrun RSS with 300 MiB in use in the guest:",
        "balloon-check: freed 300 MiB",
        "rig host: RSS fell by",
        "balloon-check: 300 MiB filled again, intact",
        "balloon-check: the kept 16 MiB are intact",
        "hvrun exit 0",
    ],
    forbidden: &["hvrun: error", "panicked", "FAIL", "Out of memory", "Kernel panic"],
    timeout_secs: 900,
    exchange: None,
    outer_gic: OuterGic::V2,
};

/// An inflate to hvrun's target and a deflate on the guest's demand.
pub const BALLOON_INFLATE: Scenario = Scenario {
    name: "balloon-inflate",
    about: "the balloon inflates to hvrun's target and deflates on the guest's demand (deflate-on-OOM), data intact",
    artifacts: &["Image", "initramfs.cpio"],
    script: INFLATE_SCRIPT,
    exit_code: 0,
    markers: &[
        "virtio-balloon: the guest's balloon holds 256 MiB (target 256 MiB)",
        "balloon-inflate: inflated:",
        "balloon-inflate: 300 MiB filled past the balloon, intact",
        "hvrun exit 0",
    ],
    forbidden: &["hvrun: error", "panicked", "FAIL", "Out of memory", "Kernel panic"],
    timeout_secs: 600,
    exchange: None,
    outer_gic: OuterGic::V2,
};

/// The balloon's target set from the embedding API, up and down again.
pub const BALLOON_TARGET: Scenario = Scenario {
    name: "balloon-target",
    about: "examples/balloon.rs: VmHandle::set_balloon_target inflates the balloon to 256 MiB (the memory goes back to the host) and deflates it to 0; the guest then fills 350 MiB, intact",
    artifacts: &["Image", "initramfs.cpio"],
    script: example_script!("balloon"),
    exit_code: 0,
    markers: &[
        "balloon: the guest touched 300 MiB and freed it",
        "balloon: inflated to 256 MiB in",
        "balloon: deflated to 0 MiB in",
        "balloon: the guest filled 350 MiB after the deflate, intact",
        "balloon: exit PowerOff",
        "balloon: ok",
        "balloon exit 0",
    ],
    forbidden: &["FAILED", "panicked"],
    timeout_secs: 530,
    exchange: None,
    outer_gic: OuterGic::V2,
};
