//! virtio-blk scenarios: a root disk, data integrity, durability across `kill -9`,
//! read-only disks, and fio writing, flushing and verifying at queue depth 32.

use crate::scenario::{OuterGic, Scenario};

/// The I/O guest's initramfs (built by `cargo xtask`): the test init, busybox, Debian's
/// arm64 `fio` and `iperf3` with their libraries, and `guests/io/` in `/io`.
pub const IO_INITRAMFS: &str = "io-initramfs.cpio";

/// The rig's shell function `io PROGRAM ARGS…`, which runs `fio` or `iperf3` from
/// [`IO_INITRAMFS`] on the rig host; a script using it starts with it.
pub const IO_IN_RIG: &str = include_str!("../../scenarios/io-tools.sh");

pub const DISK_BOOT: Scenario = Scenario {
        name: "disk-boot",
        about: "`hvrun --kernel Image --disk rootfs.img` boots to a shell on hvc0 with an ext4 root; a session typed on the host runs there",
        artifacts: &["Image", "rootfs.ext4"],
        script: "cp /guest/rootfs.ext4 /tmp/rootfs.img\n\
                 set -o pipefail\n\
                 printf 'cat /proc/cmdline\\nmount\\necho console: $(cat /sys/class/tty/console/active)\\necho session-done\\npoweroff -f\\n' \\
                 | /bin/hvrun --kernel /guest/Image --disk /tmp/rootfs.img 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"",
        exit_code: 0,
        markers: &[
            "console=hvc0 earlycon root=/dev/vda rw",
            "/dev/root on / type ext4 (rw",
            "console: hvc0",
            "session-done",
            "hvrun exit 0",
        ],
        forbidden: &["hvrun: error", "panicked", "Kernel panic", "applet not found", "failed"],
        timeout_secs: 120,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const DISK_INTEGRITY: Scenario = Scenario {
        name: "disk-integrity",
        about: "a 64 MiB file the host wrote reads back intact; a 64 MiB file the guest wrote is intact in the image (debugfs on the host)",
        artifacts: &["Image", "initramfs.cpio", "virtio_mmio.ko", "virtio_blk.ko"],
        script: "set -o pipefail\n\
                 insmod /guest/virtio_mmio.ko; insmod /guest/virtio_blk.ko\n\
                 n=0; until [ -b /dev/vda ] || [ $n -ge 20 ]; do sleep 1; n=$((n+1)); done\n\
                 dd if=/dev/vda of=/tmp/data.img bs=1M skip=$E2E_SLOT_MB count=192 2>/dev/null\n\
                 t=$(cut -d' ' -f1 /proc/uptime); dd if=/tmp/data.img of=/dev/null bs=1M count=64 2>/dev/null\n\
                 echo \"rig host reads 64 MiB of the image file in $(awk -v s=$t '{ print $1 - s }' /proc/uptime) s\"\n\
                 /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 512M --disk /tmp/data.img,id=data \\
                 --cmdline 'console=ttyAMA0 quiet -- /t/integrity-check' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"\n\
                 dd if=/tmp/data.img of=/dev/vda bs=1M seek=$E2E_SLOT_MB conv=fsync 2>/dev/null && echo 'image handed back'",
        exit_code: 0,
        markers: &[
            "in.bin sha256:",
            "out.bin sha256:",
            "out.bin written and synced",
            "hvrun exit 0",
            "image handed back",
        ],
        // Then `checks::disk_integrity` runs on the image handed back; its failure is the
        // scenario's.
        forbidden: &["hvrun: error", "panicked", "I/O error"],
        timeout_secs: 300,
        // The script's `count=192` is `checks::DATA_DISK_MB` (a unit test holds them equal).
        exchange: Some(crate::exchange::Exchange {
            input: "data.ext4",
            output_len: None,
            check: crate::checks::disk_integrity,
        }),
        outer_gic: OuterGic::V2,
};

pub const KILL_DURABILITY: Scenario = Scenario {
        name: "kill-durability",
        about: "kill -9 of hvrun at random moments of a guest's write loop loses no byte the guest flushed; ext4 is clean after journal replay",
        artifacts: &["Image", "initramfs.cpio", "virtio_mmio.ko", "virtio_blk.ko"],
        // Rounds of boot, write, kill -9; each round's image goes into the exchange slot.
        script: include_str!("../../scenarios/kill-durability.sh"),
        exit_code: 0,
        markers: &["round 0: durable: /f1 ", "round 0: image stored", "kill-durability: 20 rounds done"],
        // Then `checks::kill_durability` runs on the stored images.
        forbidden: &["hvrun: error", "panicked", "I/O error", "EXT4-fs error", "FAILED"],
        // About 7 s a round in a quiet rig; three times that when the host's cores are
        // busy. A round that hangs is cut off after 60 s.
        timeout_secs: 600,
        exchange: Some(crate::exchange::Exchange {
            input: "durability.ext4",
            output_len: Some((crate::checks::DURABILITY_ROUNDS * crate::checks::DURABILITY_IMAGE_MB) << 20),
            check: crate::checks::kill_durability,
        }),
        outer_gic: OuterGic::V2,
};

pub const DISK_IO: Scenario = Scenario {
    name: "disk-io",
    about: "guest writes reach the image intact, a read-only disk refuses writes and keeps its bytes, GET_ID works",
    artifacts: &["Image", "initramfs.cpio"],
    script: "dd if=/dev/zero of=/tmp/data.img bs=1M count=16 2>/dev/null\n\
                 dd if=/dev/urandom of=/tmp/ro.img bs=1M count=4 2>/dev/null\n\
                 before=$(sha256sum /tmp/ro.img | cut -d' ' -f1)\n\
                 /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 256M \\
                 --disk /tmp/data.img,id=data --disk /tmp/ro.img,readonly,id=golden \\
                 --cmdline 'console=ttyAMA0 quiet -- /t/disk-check' 2>&1 | tr -d '\\r' | tee /tmp/out\n\
                 guest=$(sed -n 's/^pattern sha256: //p' /tmp/out)\n\
                 host=$(head -c 8388608 /tmp/data.img | sha256sum | cut -d' ' -f1)\n\
                 [ -n \"$guest\" ] && [ \"$guest\" = \"$host\" ] && echo \"image holds the guest's data ($host)\"\n\
                 [ \"$(sha256sum /tmp/ro.img | cut -d' ' -f1)\" = \"$before\" ] && echo 'read-only image unchanged'",
    exit_code: 0,
    markers: &[
        "vda serial: data ro=0 size=32768",
        "vdb serial: golden ro=1",
        "wrote vda",
        "vdb refused the write",
        "image holds the guest's data",
        "read-only image unchanged",
    ],
    forbidden: &["hvrun: error", "panicked", "ACCEPTED A WRITE"],
    timeout_secs: 180,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const FIO_VERIFY: Scenario = Scenario {
    name: "fio-verify",
    about: "fio writes random 4 KiB blocks at queue depth 32 through virtio-blk with an fsync every 16 and verifies each (crc32c); the image verifies again on the rig host and in a second boot, and a block changed on purpose fails the check",
    artifacts: &["vmlinuz", IO_INITRAMFS],
    script: concat!(include_str!("../../scenarios/io-tools.sh"), include_str!("../../scenarios/fio-verify.sh")),
    exit_code: 0,
    markers: &[
        "boot1: fio-verify: write ok: 4096 KiB written and 4096 KiB read back and verified",
        "boot1: hvrun exit 0",
        "rig host: the image verifies (4096 KiB read back)",
        "boot2: fio-verify: check ok: 4096 KiB read back and verified",
        "boot2: hvrun exit 0",
        "rig host: the changed image fails: verify failed at file /tmp/verify.img offset 4096000",
    ],
    forbidden: &["hvrun: error", "panicked", "I/O error", "does NOT verify", "PASSED", "boot1: fio-verify: write FAILED"],
    // About 60 s in a quiet rig (two boots of the 83 MiB initramfs, 1024 blocks written
    // and read back twice); three times that when the host's cores are busy.
    timeout_secs: 360,
    exchange: None,
    outer_gic: OuterGic::V2,
};
