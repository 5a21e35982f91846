//! Scenarios of the machine itself: raw guests, Linux on the emulated and the
//! hypervisor's GIC, CPU hotplug, the selftest, reboots, kernels, the console, the power
//! button, and bad input on the command line.

use crate::scenario::{OuterGic, Scenario};

pub const HELLO: Scenario = Scenario {
    name: "hello",
    about: "a raw guest program prints through the PL011 and powers off with PSCI",
    artifacts: &["hello.bin"],
    script: "/bin/hvrun --kernel /guest/hello.bin --memory 64M",
    exit_code: 0,
    markers: &["hello from the hvrun guest"],
    forbidden: &["hvrun: error", "panicked"],
    timeout_secs: 60,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const UNMAPPED: Scenario = Scenario {
    name: "unmapped",
    about: "guest accesses nobody claims read as zero, are logged with a rate limit, and the VMM keeps running",
    artifacts: &["unmapped.bin"],
    script: "/bin/hvrun --kernel /guest/unmapped.bin --memory 64M 2>/tmp/unmapped.log; rc=$?\n\
                 cat /tmp/unmapped.log\n\
                 n=$(grep -c 'no device at' /tmp/unmapped.log)\n\
                 [ \"$n\" -ge 2 ] && [ \"$n\" -le 40 ] && echo \"rate limit held: $n warnings for 3000 accesses\"\n\
                 exit $rc",
    exit_code: 0,
    markers: &[
        "unmapped accesses read as zero",
        "no device at 0xc000000 for a 8-byte access: write ignored",
        "no device at 0xc000000 for a 8-byte access: read returns 0",
        "rate limit held",
    ],
    forbidden: &["FAIL", "hvrun: error", "panicked"],
    timeout_secs: 60,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const MMIO_ABORTS: Scenario = Scenario {
        name: "mmio-aborts",
        about: "load/store pairs, writeback loads and instruction fetches on MMIO are aborts for the guest, not the end of the VM",
        artifacts: &["mmio-aborts.bin"],
        script: "/bin/hvrun --kernel /guest/mmio-aborts.bin --memory 64M 2>&1; echo \"hvrun exit $?\"",
        exit_code: 0,
        markers: &["mmio-aborts: 3 data aborts and 1 prefetch abort taken", "hvrun exit 0"],
        forbidden: &["FAIL", "hvrun: error", "panicked"],
        timeout_secs: 60,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const MISSING_KERNEL: Scenario = Scenario {
    name: "missing-kernel",
    about: "a kernel path that does not exist gets one clear error line and a non-zero exit",
    artifacts: &[],
    script: "/bin/hvrun --kernel /guest/missing-file 2>&1; echo \"exit=$?\"",
    exit_code: 0,
    markers: &["hvrun: error: cannot read kernel /guest/missing-file: No such file or directory", "exit=1"],
    forbidden: &["panicked"],
    timeout_secs: 30,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const LINUX_SMP: Scenario = Scenario {
        name: "linux-smp",
        about: "Debian's stock kernel boots a busybox initramfs on 2 vCPUs with our GIC, PL011, PL031 and timer",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 echo 'typed into the host' | RUST_LOG=debug /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio \\
                 --cpus 2 --memory 256M --cmdline 'console=ttyAMA0 earlycon quiet -- /t/linux-check' 2>&1 \\
                 | tr -d '\\r' | tee /tmp/out; rc=$?\n\
                 guest=$(sed -n 's/^guest-date: //p' /tmp/out)\n\
                 off=$(( $(date +%s) - ${guest:-0} )); [ $off -lt 0 ] && off=$(( -off ))\n\
                 [ $off -le 60 ] && echo \"guest clock within a minute of the host's (off by ${off}s)\"\n\
                 echo \"hvrun exit $rc\"",
        exit_code: 0,
        markers: &[
            "guest boot-timer:",
            "hvrun-guest: init started",
            "cpus: 2",
            "guest read from console: typed into the host",
            "timer interrupts counting on GIC",
            "uart interrupts counting on GIC",
            "every cpu takes timer interrupts",
            "kernel log clean",
            "guest clock within a minute",
            "hvrun exit 0",
        ],
        forbidden: &["KERNEL LOG NOT CLEAN", "hvrun: error", "panicked", "WARN ]"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const CPU_HOTPLUG: Scenario = Scenario {
        name: "cpu-hotplug",
        about: "on 2 vCPUs, cpu1 goes offline and comes back ten times (PSCI CPU_OFF/CPU_ON from reset state), then runs a task",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --cpus 2 --memory 256M \\\n\
                 --cmdline 'console=ttyAMA0 quiet -- /t/cpu-hotplug' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"",
        exit_code: 0,
        markers: &[
            "cpu1 went offline and came back 10 times",
            "cpus online: 0-1",
            "a task on cpu1 ran on cpu 1",
            "kernel log clean",
            "hvrun exit 0",
        ],
        forbidden: &["FAIL", "KERNEL LOG NOT CLEAN", "hvrun: error", "panicked"],
        timeout_secs: 180,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const SELFTEST: Scenario = Scenario {
        name: "selftest",
        about: "hvrun selftest passes every row with hvrun's GICv2, and a test failed on purpose writes the report",
        artifacts: &[],
        script: "/bin/hvrun selftest --gic v2 --report /tmp/report.txt 2>&1\n\
                 echo \"hvrun exit $?\"\n\
                 HVRUN_SELFTEST_BREAK=timer /bin/hvrun selftest --gic v2 --report /tmp/broken.txt 2>&1\n\
                 echo \"broken exit $?\"\n\
                 test ! -e /tmp/report.txt && echo 'no report after a pass'\n\
                 grep -q '^timer: FAIL: failed on purpose' /tmp/broken.txt && grep -q '^host: Linux' /tmp/broken.txt \\\n\
                 && grep -q 'selftest: timer ok' /tmp/broken.txt && echo 'report written'",
        exit_code: 0,
        markers: &[
            "mmio      ok",
            "mmio-sign host",
            "aborts    ok",
            "psci      ok",
            "sysregs   ok",
            "timer     ok",
            "hvrun exit 0",
            "timer     FAIL",
            "attach /tmp/broken.txt",
            "broken exit 1",
            "no report after a pass",
            "report written",
        ],
        forbidden: &["hvrun: error", "panicked"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const SELFTEST_V3: Scenario = Scenario {
    name: "selftest-v3",
    about: "hvrun selftest passes every row with the hypervisor's GICv3 (KVM's vGICv3)",
    artifacts: &[],
    script: "/bin/hvrun selftest --gic v3 2>&1\n\
                 echo \"hvrun exit $?\"",
    exit_code: 0,
    markers: &[
        "mmio      ok",
        "mmio-sign host",
        "aborts    ok",
        "psci      ok",
        "sysregs   ok",
        "timer     ok",
        "hvrun exit 0",
    ],
    forbidden: &["hvrun: error", "panicked", "FAIL"],
    timeout_secs: 240,
    exchange: None,
    outer_gic: OuterGic::V3,
};

pub const LINUX_REBOOT: Scenario = Scenario {
    name: "linux-reboot",
    about: "a guest reboot ends hvrun with the documented exit status 3",
    artifacts: &["vmlinuz", "initramfs.cpio"],
    script: "set -o pipefail\n\
                 /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --memory 128M \\
                 --cmdline 'console=ttyAMA0 quiet -- echo rebooting now; reboot -f' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"",
    exit_code: 0,
    markers: &["rebooting now", "hvrun exit 3"],
    forbidden: &["hvrun: error", "panicked"],
    timeout_secs: 120,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const VIRTIO_RNG: Scenario = Scenario {
    name: "virtio-rng",
    about: "the stock kernel's virtio_mmio and virtio-rng drivers find our device and read host entropy",
    artifacts: &["vmlinuz", "initramfs.cpio"],
    script: "/bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --memory 128M \\
                 --cmdline 'console=ttyAMA0 quiet -- /t/virtio-rng-check' 2>&1 | tr -d '\\r'",
    exit_code: 0,
    markers: &["rng_current: virtio_rng.0", "hwrng bytes: 65536", "distinct bytes: 256", "virtio interrupts counting"],
    forbidden: &["hvrun: error", "panicked", "WARN ]"],
    timeout_secs: 120,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const OWN_KERNEL: Scenario = Scenario {
    name: "own-kernel",
    about: "hvrun's own kernel (virtio built in) boots on 2 vCPUs and binds virtio-rng without modules",
    artifacts: &["Image", "initramfs.cpio"],
    script: "RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --cpus 2 --memory 128M \\
                 --cmdline 'console=ttyAMA0 quiet -- /t/own-kernel-check' 2>&1 | tr -d '\\r'",
    exit_code: 0,
    markers: &["guest boot-timer:", "cpus: 2", "rng_current: virtio_rng.0"],
    forbidden: &["hvrun: error", "panicked", "WARN ]"],
    timeout_secs: 120,
    exchange: None,
    outer_gic: OuterGic::V2,
};

pub const KERNEL_OPTIONS: Scenario = Scenario {
        name: "kernel-options",
        about: "hvrun's own kernel has Virtualization.framework's needs built in (PCI, virtio-pci, virtio-fs, binfmt_misc) and still binds hvrun's virtio-mmio devices",
        artifacts: &["Image", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null\n\
                 RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M \\
                 --disk /tmp/disk.img --cmdline 'console=ttyAMA0 quiet -- /t/kernel-options' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"",
        exit_code: 0,
        // `guests/initramfs/t/kernel-options` prints `ok: ` lines for the checks that hold and
        // `MISSING: ` lines for those that fail.
        markers: &[
            "guest boot-timer:",
            "hvrun-guest: init started",
            "ok: filesystem [fuse] in /proc/filesystems",
            "ok: filesystem [virtiofs] in /proc/filesystems",
            "ok: filesystem [binfmt_misc] in /proc/filesystems",
            "ok: pci core: /sys/bus/pci",
            "ok: pci driver: pci-host-generic",
            "ok: pci driver: virtio-pci",
            "ok: virtio driver: virtiofs",
            "ok: binfmt_misc mounted: enabled",
            "binfmt_misc ran /tmp/binfmt-test through /tmp/interp",
            "rng_current: virtio_rng.0",
            "ok: disk vda: 8192 sectors",
            "kernel log clean",
            "hvrun exit 0",
        ],
        forbidden: &["MISSING", "KERNEL LOG NOT CLEAN", "hvrun: error", "panicked", "WARN ]"],
        timeout_secs: 120,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const COMPRESSED_KERNEL: Scenario = Scenario {
        name: "compressed-kernel",
        about: "a gzip'd kernel (vmlinuz as distributions ship it) is unpacked and boots; an xz one is one clear error",
        artifacts: &["vmlinuz.gz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 RUST_LOG=info /bin/hvrun --kernel /guest/vmlinuz.gz --initrd /guest/initramfs.cpio --memory 128M \\
                 --cmdline 'console=ttyAMA0 quiet -- /t/virtio-rng-check' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"\n\
                 printf '\\375\\067zXZ\\000' >/tmp/vmlinuz.xz; head -c 8192 /dev/zero >>/tmp/vmlinuz.xz\n\
                 /bin/hvrun --kernel /tmp/vmlinuz.xz 2>&1; echo \"xz exit $?\"",
        exit_code: 0,
        markers: &[
            "kernel /guest/vmlinuz.gz: Gzip, unpacked to",
            "rng_current: virtio_rng.0",
            "hvrun exit 0",
            "hvrun: error: kernel /tmp/vmlinuz.xz: is compressed with xz, which hvrun does not unpack: boot the uncompressed Image (`xz -dc FILE > Image`)",
            "xz exit 1",
        ],
        forbidden: &["panicked", "WARN ]", "is not an arm64 Image"],
        timeout_secs: 120,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const GICV3_SMP: Scenario = Scenario {
        name: "gicv3-smp",
        about: "in a GICv3 rig, Debian's stock kernel boots on 4 vCPUs with KVM's vGICv3 (--gic v3): IPIs, timers, UART input",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 echo 'typed into the host' | RUST_LOG=info /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio \\
                 --cpus 4 --gic v3 --memory 256M --cmdline 'console=ttyAMA0 quiet -- /t/linux-check' 2>&1 \\
                 | tr -d '\\r' | tee /tmp/out; rc=$?\n\
                 echo \"hvrun exit $rc\"",
        exit_code: 0,
        markers: &[
            "4 vCPU(s), 256 MiB and the hypervisor's GICv3",
            "hvrun-guest: init started",
            "cpus: 4",
            "guest read from console: typed into the host",
            "timer interrupts counting on GIC",
            "uart interrupts counting on GIC",
            "every cpu takes timer interrupts",
            "GICv3: CPU3: found redistributor 3 region 0:0x0000000008070000",
            "kernel log clean",
            "hvrun exit 0",
        ],
        forbidden: &["KERNEL LOG NOT CLEAN", "hvrun: error", "panicked", "WARN ]"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V3,
};

pub const GICV3_MANY: Scenario = Scenario {
        name: "gicv3-many",
        about: "in a GICv3 rig, 12 vCPUs (past the GICv2's 8) boot with --gic auto, and virtio-rng's SPI reaches the guest",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 RUST_LOG=info /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --cpus 12 --memory 512M \\
                 --cmdline 'console=ttyAMA0 quiet -- echo cpus: $(grep -c ^processor /proc/cpuinfo); /t/virtio-rng-check' \\
                 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"",
        exit_code: 0,
        markers: &[
            "12 vCPU(s), 512 MiB and the hypervisor's GICv3",
            "cpus: 12",
            "rng_current: virtio_rng.0",
            "virtio interrupts counting",
            "hvrun exit 0",
        ],
        forbidden: &["hvrun: error", "panicked", "WARN ]"],
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V3,
};

pub const GICV2_ON_GICV3: Scenario = Scenario {
        name: "gicv2-on-gicv3",
        about: "in a GICv3 rig, --gic v2 still gives the guest hvrun's emulated GICv2 (KVM's userspace irqchip on a GICv3 host)",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        script: "set -o pipefail\n\
                 echo 'typed into the host' | RUST_LOG=info /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio \\
                 --cpus 2 --gic v2 --memory 256M --cmdline 'console=ttyAMA0 quiet -- /t/linux-check' 2>&1 \\
                 | tr -d '\\r' | tee /tmp/out; rc=$?\n\
                 echo \"hvrun exit $rc\"",
        exit_code: 0,
        markers: &[
            "2 vCPU(s), 256 MiB and hvrun's GICv2",
            "cpus: 2",
            "guest read from console: typed into the host",
            "GIC-0  27 Level     arch_timer",
            "timer interrupts counting on GIC",
            "uart interrupts counting on GIC",
            "every cpu takes timer interrupts",
            // Known and harmless: Linux 6.1's KVM leaves the GICv3 CPU interface's system
            // registers visible to a guest without a vGIC, and the GICv2 driver warns once.
            // `--gic auto` takes the vGICv3 on such a host; this checks the rest still works.
            "GICv3 system registers enabled, broken firmware!",
            "hvrun exit 0",
        ],
        forbidden: &["hvrun: error", "panicked", "WARN ]", "BUG:", "Oops", "Kernel panic"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V3,
};

pub const CONSOLE_FILE: Scenario = Scenario {
        name: "console-file",
        about: "--console file=PATH sends hvc0 to a file while the serial port keeps the terminal",
        artifacts: &["Image", "initramfs.cpio"],
        script: "/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M --console file=/tmp/hvc.log \\
                 --cmdline 'console=ttyAMA0 quiet -- echo written-to-hvc0 >/dev/hvc0; echo on-the-serial-port' 2>&1 | tr -d '\\r'\n\
                 echo \"hvrun exit $?\"\n\
                 sed 's/^/hvc.log: /' /tmp/hvc.log",
        exit_code: 0,
        markers: &["on-the-serial-port", "hvrun exit 0", "hvc.log: written-to-hvc0"],
        forbidden: &["hvrun: error", "panicked"],
        timeout_secs: 60,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const CONTROL_SOCKET: Scenario = Scenario {
        name: "control-socket",
        about: "--control PATH: another program pauses (no guest progress while paused), resumes, asks the status of and stops the VM with JSON lines; a bad command is an error; a second hvrun given the control socket or the console's (--console socket=) is refused in one line and leaves them working, the console's reader keeping hvc0; the socket files go with hvrun",
        artifacts: &["Image", "initramfs.cpio"],
        script: include_str!("../../scenarios/control-socket.sh"),
        exit_code: 0,
        markers: &[
            "control: the console client gets hvc0",
            "control: a second hvrun with --control /tmp/ctl.sock: refused (exit 1, one line)",
            "control: a second hvrun with --console socket=/tmp/con.sock: refused (exit 1, one line)",
            "control: the console client still gets hvc0 after the second hvruns",
            "control: pause -> {\"ok\":true}",
            "control: status -> {\"ok\":true,\"paused\":true}",
            "control: no tick while paused",
            "control: resume -> {\"ok\":true}",
            "control: ticks again after the resume",
            "control: bogus -> {\"ok\":false,\"error\":\"bad command: unknown variant `reboot`",
            "control: stop -> {\"ok\":true}",
            "hvrun exit 5",
            "control: the socket file is gone",
            "control: the console's socket file is gone",
        ],
        forbidden: &["FAIL", "panicked", "hvrun: error"],
        timeout_secs: 180,
        exchange: None,
        outer_gic: OuterGic::V2,
};

/// What both snapshot scenarios must show (see `tests/scenarios/snapshot.sh`), with the
/// interrupt controller hvrun's log names.
macro_rules! snapshot_markers {
    ($gic:literal) => {
        &[
            concat!("snapshot: booting on kvm with 2 vCPU(s), 256 MiB and ", $gic),
            "snapshot: {\"ok\":true}",
            "snapshot: left paused at count",
            "snapshot: files:",
            "/tmp/out1: continues at count",
            "/tmp/out1: dmesg checked after the restore",
            "clone 1: the guest's TCP connection carries count",
            "clone 1: stop -> {\"ok\":true}",
            "clone 1: its disk holds count",
            "snapshot: the disk copy holds count",
            "/tmp/out2: continues at count",
            "/tmp/out2: dmesg checked after the restore",
            "clone 2: stop -> {\"ok\":true}",
            "wrong disk: hvrun: error: cannot restore: disk /tmp/disk2.img is not the image the snapshot was taken with",
        ]
    };
}

pub const SNAPSHOT: Scenario = Scenario {
        name: "snapshot",
        about: "snapshot and restore with hvrun's GICv2: a 2-vCPU guest counting to its serial port, its disk and a TCP connection is saved through the control socket, hvrun is killed, and two clones continue it from the next count (no reset, no gap) with the disk consistent, the TCP connection carrying on and no RCU stall or clocksource complaint; a disk that is not the snapshot's is refused",
        artifacts: &["Image", "initramfs.cpio", "tun.ko"],
        script: include_str!("../../scenarios/snapshot.sh"),
        exit_code: 0,
        markers: snapshot_markers!("hvrun's GICv2"),
        forbidden: &["FAIL", "DMESG-BAD", "stall", "panicked", "Kernel panic"],
        timeout_secs: 900,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const SNAPSHOT_GICV3: Scenario = Scenario {
        name: "snapshot-gicv3",
        about: "the snapshot scenario with KVM's vGICv3 (a GICv3 rig, --gic auto): its distributor, redistributors and CPU interfaces saved through their device attributes and restored in the new process",
        markers: snapshot_markers!("the hypervisor's GICv3"),
        outer_gic: OuterGic::V3,
        ..SNAPSHOT
};

/// Restore times against cold boots, for docs/BENCHMARKS.md and issue 18's goals (it
/// checks that every restore runs; the numbers are read from its output).
pub const SNAPSHOT_TIMING: Scenario = Scenario {
        name: "snapshot-timing",
        about: "how long a restore takes from hvrun's start to a running guest (10 runs) against a cold boot of the same guest to its init (3 runs), for 256 MiB and 2 GiB guests with 2 vCPUs and hvrun's GICv2, caches dropped before each",
        artifacts: &["Image", "initramfs.cpio"],
        script: include_str!("../../scenarios/snapshot-timing.sh"),
        exit_code: 0,
        markers: &[
            "timing: 256M snapshot:",
            "timing: 256M cold boot to init (ms, 3 runs): min",
            "timing: 256M restore to the guest running (ms, 10 runs): min",
            "timing: 2G snapshot:",
            "timing: 2G cold boot to init (ms, 3 runs): min",
            "timing: 2G restore to the guest running (ms, 10 runs): min",
            "timing: restore/cold boot (medians): 256M",
            "timing: 2G restore / 256M restore (medians):",
        ],
        forbidden: &["FAIL", "panicked", "hvrun: error"],
        timeout_secs: 2400,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const POWER_BUTTON: Scenario = Scenario {
        name: "power-button",
        about: "SIGTERM or SIGINT to hvrun presses the guest's power button (virtio-input, KEY_POWER): Debian's stock kernel and hvrun's own take their shutdown path and hvrun exits 0; a second signal stops a guest that ignores it",
        artifacts: &["vmlinuz", "Image", "initramfs.cpio"],
        script: include_str!("../../scenarios/power-button.sh"),
        exit_code: 0,
        markers: &[
            "debian: power-button: /dev/input/event0 is hvrun's power button",
            "debian: power-button: waiting for the power button",
            "debian: power-button: pressed; the guest runs its shutdown path",
            "debian: hvrun: asked the guest to shut down (its power button)",
            "debian: hvrun exit 0",
            "own: power-button: /dev/input/event0 is hvrun's power button",
            "own: power-button: pressed; the guest runs its shutdown path",
            "own: hvrun: asked the guest to shut down (its power button)",
            "own: hvrun exit 0",
            "deaf: deaf-guest-up",
            "deaf: hvrun: asked the guest to shut down (its power button)",
            "deaf: hvrun exit 5",
        ],
        forbidden: &["FAIL", "panicked", "hvrun: error"],
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const BAD_INPUT: Scenario = Scenario {
        name: "bad-input",
        about: "bad kernels and bad numbers get one clear error line and a non-zero exit before any vCPU runs",
        artifacts: &["vmlinuz"],
        script: "check() { out=$(/bin/hvrun \"$@\" 2>&1 </dev/null); rc=$?; echo \"[rc=$rc lines=$(echo \"$out\" | wc -l)] $out\"; }\n\
                 head -c 100000 /guest/vmlinuz >/tmp/truncated\n\
                 head -c 40 /guest/vmlinuz >/tmp/stub\n\
                 check --kernel /tmp/truncated\n\
                 check --kernel /tmp/stub\n\
                 check --kernel /guest/vmlinuz --memory 20M\n\
                 check --kernel /guest/vmlinuz --memory 0\n\
                 check --kernel /guest/vmlinuz --cpus 0\n\
                 check --kernel /guest/vmlinuz --cpus 9\n\
                 check --kernel /guest/vmlinuz --cpus 128\n\
                 check --kernel /guest/vmlinuz --cpus 9 --gic v2\n\
                 check --kernel /guest/vmlinuz --gic v3\n\
                 check --kernel /guest/vmlinuz --initrd /guest/vmlinuz --memory 48M\n\
                 check --kernel /guest/vmlinuz --disk /guest/no-such.img\n\
                 check --kernel /guest/vmlinuz --disk /guest/vmlinuz,bogus\n\
                 check --kernel /guest/vmlinuz --backend hvf\n\
                 check --kernel /guest/vmlinuz --net unixgram=/tmp/nobody-listens.sock\n\
                 check --kernel /guest/vmlinuz --console socket=/guest/vmlinuz\n\
                 check --kernel /guest/vmlinuz --control /guest/vmlinuz\n\
                 check --kernel /guest/vmlinuz --backend vz\n\
                 check --kernel /guest/vmlinuz --rosetta\n\
                 check --kernel /guest/vmlinuz --share /tmp:tmp\n\
                 check --kernel /guest/vmlinuz --nested\n\
                 check --kernel /guest/vmlinuz --nested --gic v2\n\
                 check macos run --bundle /tmp/no-bundle\n\
                 check macos install --ipsw /guest/vmlinuz --bundle /tmp/vm\n\
                 mkfifo /tmp/fifo\n\
                 check --kernel /tmp/fifo\n\
                 check --kernel /guest/vmlinuz --initrd /tmp/fifo\n\
                 check --kernel /guest/vmlinuz --disk /tmp/fifo,readonly\n\
                 check --kernel /guest/vmlinuz --console file=/tmp/fifo",
        exit_code: 0,
        markers: &[
            "[rc=1 lines=1] hvrun: error: kernel /tmp/truncated: is truncated: 100000 bytes, but its PE/COFF header says",
            "[rc=1 lines=1] hvrun: error: kernel /tmp/stub: is too short to be an arm64 Image (40 bytes)",
            "[rc=1 lines=1] hvrun: error: kernel /guest/vmlinuz: does not fit in guest RAM",
            "[rc=2 lines=1] hvrun: error: --memory 0: must be between",
            "[rc=2 lines=1] hvrun: error: --cpus 0: must be between 1 and 127",
            "[rc=1 lines=1] hvrun: error: --cpus 9 needs the hypervisor's GICv3, which this host does not have",
            "[rc=2 lines=1] hvrun: error: --cpus 128: must be between 1 and 127",
            "[rc=2 lines=1] hvrun: error: --cpus 9 with --gic v2: the GICv2 serves at most 8 vCPUs",
            "[rc=1 lines=1] hvrun: error: --gic v3: this hypervisor has no GICv3 of its own",
            "[rc=1 lines=1] hvrun: error: kernel /guest/vmlinuz: does not fit in guest RAM with its initrd",
            "[rc=1 lines=1] hvrun: error: cannot read disk /guest/no-such.img: No such file or directory",
            "[rc=2 lines=1] hvrun: error: invalid value '/guest/vmlinuz,bogus' for '--disk",
            "[rc=2 lines=1] hvrun: error: --backend hvf: Hypervisor.framework exists on macOS only",
            "[rc=1 lines=1] hvrun: error: --net unixgram=/tmp/nobody-listens.sock: No such file or directory",
            "[rc=1 lines=1] hvrun: error: console: --console socket=/guest/vmlinuz: exists and is not a socket",
            "[rc=1 lines=1] hvrun: error: --control /guest/vmlinuz: exists and is not a socket",
            "[rc=2 lines=1] hvrun: error: --backend vz: Virtualization.framework exists on macOS only",
            "[rc=2 lines=1] hvrun: error: --rosetta needs --backend vz (Apple's Virtualization.framework, on macOS)",
            "[rc=2 lines=1] hvrun: error: --share needs --backend vz",
            // The rig's Linux 6.1 has no nested virtualization for arm64 (KVM_CAP_ARM_EL2).
            "[rc=1 lines=1] hvrun: error: --nested: KVM on this host cannot give a guest EL2 (KVM_CAP_ARM_EL2",
            "[rc=2 lines=1] hvrun: error: --nested with --gic v2: a guest hypervisor needs the hypervisor's GICv3",
            "[rc=1 lines=1] hvrun: error: vz: macOS guests need Apple's Virtualization.framework: run this on a Mac",
            "[rc=2 lines=1] hvrun: error: --ipsw /guest/vmlinuz: not a restore image",
            // A FIFO where a file belongs: refused at once, never a hang (issue 12, hole 8).
            "[rc=1 lines=1] hvrun: error: cannot read kernel /tmp/fifo: a FIFO, not a regular file",
            "[rc=1 lines=1] hvrun: error: cannot read initrd /tmp/fifo: a FIFO, not a regular file",
            "[rc=1 lines=1] hvrun: error: cannot read disk /tmp/fifo: a FIFO, not a regular file",
            "[rc=1 lines=1] hvrun: error: console: --console file=/tmp/fifo: a FIFO that nobody reads",
        ],
        forbidden: &["panicked"],
        timeout_secs: 60,
        exchange: None,
        outer_gic: OuterGic::V2,
};
