//! The scenarios themselves: data, one entry each. Later work adds entries here, not
//! code in the harness.

use crate::scenario::{OuterGic, Scenario};

/// The rig's side of a network scenario: `$setup` gives the host end an address in
/// `$net.0/24` as `$net.1`; then hvrun boots hvrun's kernel with `$flag`, and the guest
/// (`t/net-check`) pings the host and moves 64 MiB each way, checksummed at both ends.
macro_rules! net_scenario_script {
    ($setup:literal, $flag:literal, $net:literal) => {
        concat!(
            "now() { cut -d' ' -f1 /proc/uptime; }\n",
            "secs() { awk -v s=\"$1\" '{ print $1 - s }' /proc/uptime; }\n",
            "ip link set lo up; insmod /guest/tun.ko 2>/dev/null\n",
            $setup,
            "\ndd if=/dev/urandom of=/tmp/to-guest bs=1M count=64 2>/dev/null\n",
            "rm -f /tmp/hold; mkfifo /tmp/hold\n",
            "nc -l -p 5003 <>/tmp/hold >/dev/null & sleep 1; t=$(now)\n",
            "nc 127.0.0.1 5003 </tmp/to-guest && echo \"rig host loopback TCP: 64 MiB in $(secs $t) s\"\n",
            "nc -l -p 5001 <>/tmp/hold >/tmp/from-guest & receiver=$!\n",
            "(/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 512M ",
            $flag,
            " --cmdline 'console=ttyAMA0 quiet -- /t/net-check ",
            $net,
            "'; echo \"hvrun exit $?\") 2>&1 | tr -d '\\r' | tee /tmp/out &\n",
            "vm=$!\n",
            "end=$(( $(now | cut -d. -f1) + 240 ))\n",
            "until grep -q 'guest: listening' /tmp/out || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done; sleep 1\n",
            "t=$(now); nc ",
            $net,
            ".15 5002 </tmp/to-guest && echo \"host sent 64 MiB to the guest in $(secs $t) s\"\n",
            "wait $vm; kill $receiver 2>/dev/null\n",
            "sent=$(sed -n 's/^guest-out sha256: //p' /tmp/out)\n",
            "[ -n \"$sent\" ] && [ \"$sent\" = \"$(sha256sum /tmp/from-guest | cut -d' ' -f1)\" ] ",
            "&& echo 'guest-to-host 64 MiB intact'\n",
            "got=$(sed -n 's/^guest-in sha256: //p' /tmp/out)\n",
            "[ -n \"$got\" ] && [ \"$got\" = \"$(sha256sum /tmp/to-guest | cut -d' ' -f1)\" ] ",
            "&& echo 'host-to-guest 64 MiB intact'\n",
            "true"
        )
    };
}

/// A network scenario: `name`, `about`, then [`net_scenario_script!`]'s arguments and
/// the timeout. Tap-backed ones need `tun.ko` in the rig; all share [`NET_MARKERS`].
macro_rules! net_scenario {
    ($name:literal, $about:literal, $setup:literal, $flag:literal, $net:literal, $timeout:literal) => {
        Scenario {
            name: $name,
            about: $about,
            artifacts: &["Image", "initramfs.cpio", "tun.ko"],
            script: net_scenario_script!($setup, $flag, $net),
            exit_code: 0,
            markers: NET_MARKERS,
            forbidden: &["hvrun: error", "panicked"],
            timeout_secs: $timeout,
            exchange: None,
            outer_gic: OuterGic::V2,
        }
    };
}

/// What every network scenario must show (see `guests/initramfs/t/net-check`).
const NET_MARKERS: &[&str] = &[
    "ping host ok: 3 packets received",
    "guest: listening",
    "host sent 64 MiB to the guest in",
    "guest received 67108864 bytes",
    "guest sent 64 MiB",
    "hvrun exit 0",
    "guest-to-host 64 MiB intact",
    "host-to-guest 64 MiB intact",
];

/// One device's line after the garbage-register attack (`guests/tools/virtio-attack.c`):
/// a driver without VERSION_1 is refused, no invalid queue becomes ready, and DRIVER_OK
/// with no usable queue fails the device (DEVICE_NEEDS_RESET, configuration interrupt).
macro_rules! garbage_registers {
    ($dev:literal) => {
        concat!(
            "virtio-attack: ",
            $dev,
            " garbage registers: 981 reads, 5004 writes; FEATURES_OK without VERSION_1: status 0x3; ",
            "15 bad queues: not ready; DRIVER_OK without queues: status 0x4f, isr 0x2; ok"
        )
    };
}

/// What `hostile-driver` must show, in order (see `guests/tools/virtio-attack.c`, which
/// prints `FAIL` for any attack whose outcome is not what hvrun must do, and checks after
/// every attack that the device answers a well-formed request once reset). Runaway
/// available indexes and chain heads beyond the queue fail the device (status 0x4f);
/// buffers outside RAM or on MMIO end their chain with nothing written; chains are
/// bounded (64 KiB a virtio-rng request). Then the rig's memory figures and hvrun's exit.
const HOSTILE_DRIVER_MARKERS: &[&str] = &[
    "virtio-attack: devices: blk@0 net@1 rng@2 console@3 input@4",
    "virtio-attack: blk works: GET_ID \"hostile-disk\"",
    "virtio-attack: net works: frame out, ARP reply in",
    "virtio-attack: rng works: 64 random bytes",
    "virtio-attack: console works: console line 1 out",
    "virtio-attack: input works: status event taken, name \"hvrun power button\"",
    "virtio-attack: attack starts",
    garbage_registers!("blk"),
    garbage_registers!("net"),
    garbage_registers!("rng"),
    garbage_registers!("console"),
    garbage_registers!("input"),
    "virtio-attack: blk q0 avail idx 257: needs reset (status 0x4f",
    "virtio-attack: blk q0 avail idx 0xffff: needs reset (status 0x4f",
    "virtio-attack: blk q0 chain head 256: needs reset (status 0x4f",
    "virtio-attack: blk q0 chain looping on itself: returned, 21 bytes written; ok",
    "virtio-attack: blk q0 buffer on the UART: returned, 0 bytes written; ok",
    "virtio-attack: blk q0 length 0xffffffff: returned, 0 bytes written; ok",
    "virtio-attack: blk q0 indirect table of 65535 buffers: returned",
    "virtio-attack: net q0 avail idx 257: needs reset (status 0x4f",
    "virtio-attack: net q0 chain head 256: needs reset (status 0x4f",
    "virtio-attack: net q0 buffer at the end of RAM: returned, 0 bytes written; ok",
    "virtio-attack: net q1 avail idx 0x8000: needs reset (status 0x4f",
    "virtio-attack: net q1 chain head 0xffff: needs reset (status 0x4f",
    "virtio-attack: net q1 buffer across the end of RAM: returned, 0 bytes written; ok",
    "virtio-attack: rng q0 avail idx 257: needs reset (status 0x4f, isr 0x2); ok",
    "virtio-attack: rng q0 avail idx 0x8000: needs reset (status 0x4f, isr 0x2); ok",
    "virtio-attack: rng q0 avail idx 0xffff: needs reset (status 0x4f, isr 0x2); ok",
    "virtio-attack: rng q0 chain head 256: needs reset (status 0x4f, isr 0x2); ok",
    "virtio-attack: rng q0 chain looping on itself: returned, 16384 bytes written; ok",
    "virtio-attack: rng q0 buffer at 0: returned, 0 bytes written; ok",
    "virtio-attack: rng q0 buffer on the UART: returned, 0 bytes written; ok",
    "virtio-attack: rng q0 buffer on its own registers: returned, 0 bytes written; ok",
    "virtio-attack: rng q0 length 0xffffffff: returned, 65536 bytes written; ok",
    "virtio-attack: console q0 avail idx 257: needs reset (status 0x4f",
    "virtio-attack: console q1 avail idx 257: needs reset (status 0x4f",
    "virtio-attack: console q1 chain head 256: needs reset (status 0x4f",
    "virtio-attack: blk q0 reset with 80 requests in flight:",
    "virtio-attack: net q1 reset with 255 requests in flight:",
    "virtio-attack: console q1 reset with 255 requests in flight:",
    "virtio-attack: input q1 reset with 63 requests in flight:",
    "virtio-attack: blk notify storm:",
    "virtio-attack: net notify storm:",
    "virtio-attack: rng notify storm:",
    "virtio-attack: console notify storm:",
    "virtio-attack: input notify storm:",
    "virtio-attack: final rng request answered: 64 random bytes",
    "attacks on 5 devices",
    "memory bound held",
    "hvrun exit 0",
];

/// Every scenario, in the order the rig runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
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
    },
    Scenario {
        name: "embed",
        about: "examples/embed.rs: the library boots a kernel and initramfs given as bytes, with hvc0 and the serial port on in-memory pipes, pauses and resumes it from another thread, reports events",
        artifacts: &["Image", "initramfs.cpio"],
        script: "/bin/embed /guest/Image /guest/initramfs.cpio 2>&1; echo \"embed exit $?\"",
        exit_code: 0,
        markers: &[
            "embed: first event BootTimer",
            "embed: the guest read typed-on-the-serial-port from ttyAMA0",
            "while paused for 2 s",
            "embed: ticking again after resume",
            "embed: later events [Paused, Resumed, Exited(PowerOff)]",
            "embed: the guest answered embed-says-42 on hvc0",
            "embed: ok",
            "embed exit 0",
        ],
        forbidden: &["FAILED", "panicked"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
        name: "embed-memdisk",
        about: "examples/memdisk.rs: an embedder's own disk (a Vec<u8>) is the guest's /dev/vda; the guest reads the host's signature, writes with fsync, and the bytes and the flush reach the embedder",
        artifacts: &["Image", "initramfs.cpio"],
        script: "/bin/memdisk /guest/Image /guest/initramfs.cpio 2>&1; echo \"memdisk exit $?\"",
        exit_code: 0,
        markers: &[
            "memdisk: exit PowerOff",
            "memdisk: the guest said serial=memdisk size=2048",
            "memdisk: the guest said read=hvrun-memdisk-v1",
            "memdisk: the guest said written",
            "memdisk: the guest's line is in memory at byte 512",
            "memdisk: ok",
            "memdisk exit 0",
        ],
        forbidden: &["FAILED", "panicked"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
        name: "embed-device",
        about: "examples/own_device.rs: an embedder's own virtio device (an entropy source) gets a slot, an interrupt and a device-tree node from hvrun's allocator; the guest reads its bytes",
        artifacts: &["Image", "initramfs.cpio"],
        script: "/bin/own_device /guest/Image /guest/initramfs.cpio 2>&1; echo \"own_device exit $?\"",
        exit_code: 0,
        markers: &[
            "own_device: exit PowerOff",
            "own_device: the guest's entropy sources=virtio_rng.0 virtio_rng.1",
            "own_device: from virtio_rng.1: hvrun-own-device-hvrun-own-device",
            "own_device: the device served",
            "own_device: ok",
            "own_device exit 0",
        ],
        forbidden: &["FAILED", "panicked"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
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
    },
    Scenario {
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
    },
    net_scenario!(
        "net-tap",
        "virtio-net on a tap device with offloads: ping, and 64 MiB each way over TCP, checksummed",
        "tunctl -t tap0 >/dev/null && ip link set tap0 up && ip addr add 10.0.2.1/24 dev tap0",
        "--net tap=tap0",
        "10.0.2",
        300
    ),
    net_scenario!(
        "net-unixgram",
        "virtio-net over a unix datagram socket with vfkit's handshake, through a frame forwarder to a tap",
        "net-forwarder /tmp/fwd.sock tap1 >/tmp/fwd.log 2>&1 &\n\
         end=$(( $(now | cut -d. -f1) + 20 )); until [ -S /tmp/fwd.sock ] || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done\n\
         ip link set tap1 up && ip addr add 10.0.3.1/24 dev tap1",
        "--net unixgram=/tmp/fwd.sock,vfkit",
        "10.0.3",
        480
    ),
    net_scenario!(
        "net-unixstream",
        "virtio-net over a unix stream socket with length-prefixed frames (socket_vmnet's protocol), through a forwarder to a tap",
        "net-forwarder --stream /tmp/fwd-stream.sock tap2 >/tmp/fwd.log 2>&1 &\n\
         end=$(( $(now | cut -d. -f1) + 20 )); until [ -S /tmp/fwd-stream.sock ] || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done\n\
         ip link set tap2 up && ip addr add 10.0.4.1/24 dev tap2",
        "--net unixstream=/tmp/fwd-stream.sock",
        "10.0.4",
        480
    ),
    Scenario {
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
    },
    Scenario {
        name: "kill-durability",
        about: "kill -9 of hvrun at random moments of a guest's write loop loses no byte the guest flushed; ext4 is clean after journal replay",
        artifacts: &["Image", "initramfs.cpio", "virtio_mmio.ko", "virtio_blk.ko"],
        // Rounds of boot, write, kill -9; each round's image goes into the exchange slot.
        script: include_str!("../scenarios/kill-durability.sh"),
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
    },
    Scenario {
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
    },
    Scenario {
        name: "mmio-garbage",
        about: "a guest writing garbage to every GIC and UART register at every width does not crash hvrun",
        artifacts: &["vmlinuz", "initramfs.cpio"],
        // After trashing its own GIC the guest may or may not manage to power off; either
        // way hvrun must not crash: it exits 0 or 3 by itself, or it is still alive and is
        // stopped by the second SIGTERM we send (the first presses the guest's power button,
        // which a hung guest does not answer: exit 5). Two vCPUs, so garbage SGIR writes
        // reach another CPU.
        script: "/bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --cpus 2 --memory 256M \\
                 --cmdline 'console=ttyAMA0 quiet iomem=relaxed panic=-1 -- /bin/mmio-garbage' >/tmp/out 2>&1 &\n\
                 pid=$!\n\
                 now() { cut -d. -f1 /proc/uptime; }\n\
                 end=$(( $(now) + 120 ))\n\
                 while [ $(now) -lt $end ] && ! grep -q 'accesses done' /tmp/out && kill -0 $pid 2>/dev/null; do sleep 2; done\n\
                 end=$(( $(now) + 20 )); while [ $(now) -lt $end ] && kill -0 $pid 2>/dev/null; do sleep 1; done\n\
                 if kill -0 $pid 2>/dev/null; then echo 'hvrun alive; the guest hung after the garbage'; kill $pid; sleep 1; kill $pid; fi\n\
                 end=$(( $(now) + 10 )); while [ $(now) -lt $end ] && kill -0 $pid 2>/dev/null; do sleep 1; done\n\
                 if kill -0 $pid 2>/dev/null; then echo 'HVRUN IGNORED SIGTERM'; kill -9 $pid; fi\n\
                 wait $pid; rc=$?\n\
                 tr -d '\\r' </tmp/out | awk '/ WARN / { if (++w <= 20) print; next } { print } END { print \"hvrun warnings: \" w+0 }'\n\
                 echo \"hvrun exit $rc\"\n\
                 [ $rc -eq 0 ] || [ $rc -eq 3 ] || [ $rc -eq 5 ]",
        exit_code: 0,
        // The guest may hang itself anywhere after its first garbage write, so only the start
        // is certain; the exit status check above is the point.
        markers: &["mmio-garbage: gic-distributor", "hvrun warnings:", "hvrun exit"],
        forbidden: &["hvrun: error", "panicked", "HVRUN IGNORED SIGTERM"],
        timeout_secs: 240,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
        name: "hostile-driver",
        about: "a hostile virtio driver in the guest attacks every queue of a disk, a tap, virtio-rng and a console; hvrun stays up, every device works after a reset, memory stays flat",
        artifacts: &["vmlinuz", "initramfs.cpio", "tun.ko"],
        script: include_str!("../scenarios/hostile-driver.sh"),
        exit_code: 0,
        markers: HOSTILE_DRIVER_MARKERS,
        forbidden: &["FAIL", "hvrun: error", "panicked", "HVRUN STILL RUNNING", "HVRUN OUTPUT FLOODED", "NOT SAMPLED"],
        // The script gives up waiting 210 s after hvrun starts, then reports a hung hvrun
        // (its threads, its last lines) and kills it, all within this.
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
        name: "power-button",
        about: "SIGTERM or SIGINT to hvrun presses the guest's power button (virtio-input, KEY_POWER): Debian's stock kernel and hvrun's own take their shutdown path and hvrun exits 0; a second signal stops a guest that ignores it",
        artifacts: &["vmlinuz", "Image", "initramfs.cpio"],
        script: include_str!("../scenarios/power-button.sh"),
        exit_code: 0,
        markers: &[
            "debian: power-button: /dev/input/event0 is hvrun's power button",
            "debian: power-button: waiting for the power button",
            "debian: hvrun: asked the guest to shut down (its power button)",
            "debian: power-button: pressed; the guest runs its shutdown path",
            "debian: hvrun exit 0",
            "own: power-button: /dev/input/event0 is hvrun's power button",
            "own: hvrun: asked the guest to shut down (its power button)",
            "own: power-button: pressed; the guest runs its shutdown path",
            "own: hvrun exit 0",
            "deaf: deaf-guest-up",
            "deaf: hvrun: asked the guest to shut down (its power button)",
            "deaf: hvrun exit 5",
        ],
        forbidden: &["FAIL", "panicked", "hvrun: error"],
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
    },
    Scenario {
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
    },
];

/// The scenarios named in `names`, or all of them when `names` is empty. Unknown names
/// are an error that lists the known ones.
pub fn select(names: &[String]) -> Result<Vec<Scenario>, String> {
    let mut all = ALL.to_vec();
    all.extend(crate::balloon::scenarios());
    if names.is_empty() {
        return Ok(all);
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
            all.iter().find(|s| s.name == name).cloned().ok_or_else(|| {
                let known: Vec<_> = all.iter().map(|s| s.name).collect();
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
        let mut names: Vec<_> = ALL.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for s in ALL {
            assert!(s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{}", s.name);
            assert!(!s.markers.is_empty(), "{} checks nothing", s.name);
        }
    }

    #[test]
    fn selection() {
        assert_eq!(select(&[]).unwrap().len(), ALL.len() + crate::balloon::scenarios().len());
        assert_eq!(select(&["hello".into()]).unwrap()[0].name, "hello");
        assert_eq!(select(&["hello".into(), "hello".into()]).unwrap().len(), 1);
        let err = select(&["nope".into()]).unwrap_err();
        assert!(err.contains("no scenario named `nope`") && err.contains("hello"), "{err}");
    }
}
