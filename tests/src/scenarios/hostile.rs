//! A hostile guest: garbage in every register of the GIC and the UART, and a hostile
//! virtio driver attacking every queue.

use crate::scenario::{OuterGic, Scenario};

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

pub const MMIO_GARBAGE: Scenario = Scenario {
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
};

pub const HOSTILE_DRIVER: Scenario = Scenario {
        name: "hostile-driver",
        about: "a hostile virtio driver in the guest attacks every queue of a disk, a tap, virtio-rng and a console; hvrun stays up, every device works after a reset, memory stays flat",
        artifacts: &["vmlinuz", "initramfs.cpio", "tun.ko"],
        script: include_str!("../../scenarios/hostile-driver.sh"),
        exit_code: 0,
        markers: HOSTILE_DRIVER_MARKERS,
        forbidden: &["FAIL", "hvrun: error", "panicked", "HVRUN STILL RUNNING", "HVRUN OUTPUT FLOODED", "NOT SAMPLED"],
        // The script gives up waiting 210 s after hvrun starts, then reports a hung hvrun
        // (its threads, its last lines) and kills it, all within this.
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
};
