//! Scenarios of the library embedded in other programs (`examples/`).

use crate::scenario::{OuterGic, Scenario};

pub const EMBED: Scenario = Scenario {
        name: "embed",
        about: "examples/embed.rs: the library boots a kernel and initramfs given as bytes, with hvc0 and the serial port on in-memory pipes, pauses and resumes it from another thread, reports events",
        artifacts: &["Image", "initramfs.cpio"],
        script: example_script!("embed"),
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
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const EMBED_MEMDISK: Scenario = Scenario {
        name: "embed-memdisk",
        about: "examples/memdisk.rs: an embedder's own disk (a Vec<u8>) is the guest's /dev/vda; the guest reads the host's signature, writes with fsync, and the bytes and the flush reach the embedder",
        artifacts: &["Image", "initramfs.cpio"],
        script: example_script!("memdisk"),
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
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
};

pub const EMBED_DEVICE: Scenario = Scenario {
        name: "embed-device",
        about: "examples/own_device.rs: an embedder's own virtio device (an entropy source) gets a slot, an interrupt and a device-tree node from hvrun's allocator; the guest reads its bytes",
        artifacts: &["Image", "initramfs.cpio"],
        script: example_script!("own_device"),
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
        timeout_secs: 300,
        exchange: None,
        outer_gic: OuterGic::V2,
};
