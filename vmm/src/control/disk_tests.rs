//! [`Control::replace_disk`]: a drive's new image, found by the drive's id, opened as at
//! boot, swapped into the running device and recorded for snapshots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arch_aarch64::layout::RAM_BASE;
use devices::output::Output;
use devices::pl011::{self, Pl011};
use devices::pl031::Pl031;
use devices::virtio::block::disk::FileDisk;
use devices::virtio::block::Block;
use guest_memory::GuestRam;
use vm_memory::GuestAddress;

use super::*;
use crate::config::DiskConfig;
use crate::irqchip::{EmulatedGic, Irqchip};
use crate::snapshot::machine::Parts;
use crate::snapshot::{Hypervisor, IrqChip, Requirements};
use crate::VmConfig;

/// A file of its own for one test, `len` bytes of `byte`.
fn image(name: &str, byte: u8, len: usize) -> PathBuf {
    crate::testing::temp_file(&format!("replace-{name}.img"), &vec![byte; len])
}

/// A machine's parts for snapshots, with `disks` in its configuration (nothing runs).
fn parts(disks: Vec<DiskConfig>) -> Parts {
    let irqchip: Arc<dyn Irqchip> = Arc::new(EmulatedGic::new(1));
    let memory = GuestRam::new(&[(GuestAddress(RAM_BASE), 2 << 20)]).unwrap();
    let out = Output::new("test-serial", Box::new(std::io::sink()), pl011::OUTPUT_BUFFER);
    let uart = Arc::new(Mutex::new(Pl011::new(out, irqchip.spi_line(1))));
    let config = VmConfig { disks, ..VmConfig::new("/nonexistent/Image") };
    let requirements = Requirements {
        hypervisor: Hypervisor::Kvm,
        irqchip: IrqChip::GicV2,
        vcpus: 1,
        memory: vec![(RAM_BASE, 2 << 20)],
        cpu_features: Vec::new(),
    };
    let rtc = Arc::new(Mutex::new(Pl031::new()));
    Parts { config, requirements, memory, irqchip, uart, rtc, transports: Vec::new() }
}

/// A running machine's control with one disk per `(id, path, read_only)`; the devices
/// come back too (a handle does not keep its device).
fn machine(disks: &[(&str, &Path, bool)]) -> (Arc<Control>, Vec<Block>) {
    let control = Control::new();
    let mut slots = Vec::new();
    let mut devices = Vec::new();
    for (index, &(id, path, read_only)) in disks.iter().enumerate() {
        let image = FileDisk::open(path, read_only).unwrap();
        let block = Block::new(Box::new(image.clone()), id);
        slots.push(DiskSlot { index, id: id.into(), read_only, handle: block.handle(), image });
        devices.push(block);
    }
    let configs = disks
        .iter()
        .map(|&(id, path, read_only)| DiskConfig { path: path.into(), read_only, id: Some(id.into()) })
        .collect();
    control.set_snapshot_parts(Some(parts(configs)));
    control.set_disks(Some(slots));
    (control, devices)
}

/// The disk paths a snapshot taken now would record.
fn recorded(control: &Control) -> Vec<PathBuf> {
    let parts = lock(&control.snapshot).clone().unwrap();
    parts.config.disks.iter().map(|d| d.path.clone()).collect()
}

fn refusal(result: Result<(), Error>) -> String {
    match result {
        Err(e @ Error::DiskUpdate { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_drive_gets_its_new_image_and_a_snapshot_would_name_it() {
    let (root, scratch, new) = (image("root", 1, 4096), image("scratch", 2, 4096), image("new", 3, 8192));
    let (control, devices) = machine(&[("rootfs", &root, false), ("scratch", &scratch, true)]);
    control.replace_disk("rootfs", &new).unwrap();
    assert_eq!(devices[0].handle().capacity(), Some(8192), "the device has the new image");
    assert_eq!(recorded(&control), [new.clone(), scratch.clone()]);
    assert!(FileDisk::open(&new, true).is_err(), "locked as a disk opened at boot");
    FileDisk::open(&root, false).expect("the old image let go");

    // The drive's own file again, grown since: the guest sees the new size.
    std::fs::OpenOptions::new().write(true).open(&new).unwrap().set_len(16384).unwrap();
    control.replace_disk("rootfs", &new).unwrap();
    assert_eq!(devices[0].handle().capacity(), Some(16384));

    // A read-only drive opens its new image read-only.
    control.replace_disk("scratch", &root).unwrap();
    assert_eq!(recorded(&control), [new.clone(), root.clone()]);
    FileDisk::open(&root, true).expect("a reader shares a read-only image");
    for path in [root, scratch, new] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn unknown_drives_missing_files_and_stopped_machines_are_refused_in_one_line() {
    let (root, other) = (image("refused-root", 1, 4096), image("refused-other", 2, 4096));
    let (control, devices) = machine(&[("rootfs", &root, false)]);
    assert_eq!(
        refusal(control.replace_disk("nope", &other)),
        "disk nope: the VM has no disk with this id (its disks: rootfs)"
    );
    assert_eq!(
        refusal(control.replace_disk("rootfs", Path::new("/nonexistent/disk2.img"))),
        "disk rootfs: cannot open /nonexistent/disk2.img: No such file or directory (os error 2)"
    );
    let dir = std::env::temp_dir();
    let e = refusal(control.replace_disk("rootfs", &dir));
    assert!(e.starts_with("disk rootfs: cannot open ") && e.contains("not a regular file"), "{e}");
    assert_eq!(recorded(&control), std::slice::from_ref(&root), "nothing changed");
    assert_eq!(devices[0].handle().capacity(), Some(4096));

    // The device gone (the machine stopping) and the disks taken back (stopped).
    drop(devices);
    assert_eq!(refusal(control.replace_disk("rootfs", &other)), "disk rootfs: the device is gone");
    control.set_disks(None);
    let e = refusal(control.replace_disk("rootfs", &other));
    assert_eq!(e, "disk rootfs: the VM is not running on KVM or Hypervisor.framework (or has stopped)");
    let (none, _) = machine(&[]);
    let e = refusal(none.replace_disk("rootfs", &other));
    assert_eq!(e, "disk rootfs: the VM has no disk with this id (its disks: it has none)");
    std::fs::remove_file(root).unwrap();
    std::fs::remove_file(other).unwrap();
}
