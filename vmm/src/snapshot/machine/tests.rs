use std::sync::{Arc, Mutex};

use arch_aarch64::layout::RAM_BASE;
use devices::output::Output;
use devices::pl011::{self, Pl011};
use devices::pl031::Pl031;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::Rng;
use devices::virtio::Interrupt;
use guest_memory::GuestRam;
use hypervisor::state::{Power, RegValue, VcpuState};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::irqchip::{EmulatedGic, Irqchip};
use crate::snapshot::{Hypervisor, IrqChip};

const RAM: u64 = 4 << 20;

/// A directory of its own for one test.
fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvrun-snap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A small machine's parts, with a disk at `disk`: hvrun's GICv2 for 2 vCPUs, the UART,
/// the RTC and one virtio-rng transport; guest RAM has bytes at its start and end.
fn parts(disk: &Path) -> Parts {
    let irqchip: Arc<dyn Irqchip> = Arc::new(EmulatedGic::new(2));
    let memory = GuestRam::new(&[(GuestAddress(RAM_BASE), RAM as usize)]).unwrap();
    memory.write_slice(b"first", GuestAddress(RAM_BASE)).unwrap();
    memory.write_slice(b"last", GuestAddress(RAM_BASE + RAM - 4)).unwrap();
    let out = Output::new("test-serial", Box::new(std::io::sink()), pl011::OUTPUT_BUFFER);
    let uart = Arc::new(Mutex::new(Pl011::new(out, irqchip.spi_line(1))));
    let rng = Rng::new(Box::new(std::io::repeat(7)));
    let transport = MmioTransport::new(Box::new(rng), memory.clone(), Interrupt::new(irqchip.virtio_line(16))).unwrap();
    let mut config = VmConfig::new("/nonexistent/Image");
    config.cpus = 2;
    config.memory = RAM;
    config.disks = vec![crate::config::DiskConfig::new(disk)];
    Parts {
        config,
        requirements: Requirements {
            hypervisor: Hypervisor::Kvm,
            irqchip: IrqChip::GicV2,
            vcpus: 2,
            memory: vec![(RAM_BASE, RAM)],
            cpu_features: Vec::new(),
        },
        memory,
        irqchip,
        uart,
        rtc: Arc::new(Mutex::new(Pl031::new())),
        transports: vec![Arc::new(Mutex::new(transport))],
    }
}

/// vCPU `index`'s state: a program counter, and ID_AA64ISAR0_EL1 (KVM's id) for vCPU 0.
fn vcpu(index: u8) -> VcpuState {
    let mut regs = vec![RegValue { id: 0x6030_0000_0010_0040, value: vec![index; 8] }];
    if index == 0 {
        regs.push(RegValue { id: 0x6030_0000_0013_c030, value: 0x1021_u64.to_le_bytes().to_vec() });
    }
    VcpuState { regs, power: if index == 0 { Power::On } else { Power::Off }, serror: None }
}

fn disk(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0x5a; 3 << 20]).unwrap();
    path
}

#[test]
fn a_saved_machine_reads_back_whole_with_its_memory_and_cpu_features() {
    let dir = dir("whole");
    let parts = parts(&disk(&dir.join("disks")));
    let snap = dir.join("snap");
    parts.save(&SnapshotFiles::in_dir(&snap), vec![vcpu(0), vcpu(1)]).unwrap();

    let loaded = Loaded::read(&SnapshotFiles::in_dir(&snap)).unwrap();
    assert_eq!(loaded.vcpus, [vcpu(0), vcpu(1)]);
    assert_eq!(loaded.requirements.cpu_features, [("ID_AA64ISAR0_EL1".to_string(), 0x1021)]);
    assert_eq!(loaded.config, parts.config);
    assert_eq!(loaded.virtio.len(), 1);
    assert_eq!(loaded.irqchip, parts.irqchip.save().unwrap());
    let memory = loaded.memory().unwrap();
    let mut first = [0u8; 5];
    memory.read_slice(&mut first, GuestAddress(RAM_BASE)).unwrap();
    assert_eq!(&first, b"first");
    let mut last = [0u8; 4];
    memory.read_slice(&mut last, GuestAddress(RAM_BASE + RAM - 4)).unwrap();
    assert_eq!(&last, b"last");
    loaded.check_disks(&parts.config.disks, false).unwrap();
    loaded.fits(&parts.config, &parts.requirements).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_a_restore_cannot_honour_is_refused_in_one_line() {
    let dir = dir("refused");
    let disk = disk(&dir.join("disks"));
    let parts = parts(&disk);
    let snap = dir.join("snap");
    parts.save(&SnapshotFiles::in_dir(&snap), vec![vcpu(0), vcpu(1)]).unwrap();
    let loaded = Loaded::read(&SnapshotFiles::in_dir(&snap)).unwrap();
    let one_line = |e: SnapshotError, expect: &str| {
        let e = e.to_string();
        assert!(e.contains(expect) && !e.contains('\n'), "{e} (expected {expect})");
    };

    let bigger = VmConfig { memory: 2 * RAM, ..parts.config.clone() };
    one_line(loaded.fits(&bigger, &parts.requirements).unwrap_err(), "the snapshot's guest has 2 vCPU(s), 4 MiB");
    let v3 = Requirements { irqchip: IrqChip::GicV3, ..parts.requirements.clone() };
    one_line(loaded.fits(&parts.config, &v3).unwrap_err(), "cannot restore on this host");

    // A disk written since, or another image.
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(b"x", 2 << 20).unwrap();
    one_line(
        loaded.check_disks(&parts.config.disks, false).unwrap_err(),
        "is not the image the snapshot was taken with",
    );
    loaded.check_disks(&parts.config.disks, true).unwrap();
    one_line(loaded.check_disks(&[], false).unwrap_err(), "had 1 disk(s), 0 given");

    // A memory file cut short.
    let memory = snap.join(MEMORY);
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(RAM - 4096).unwrap();
    one_line(loaded.memory().unwrap_err(), "the memory file is");
    one_line(Loaded::read(&SnapshotFiles::in_dir(&dir)).unwrap_err(), "there is no state file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_devices_run_again_after_a_snapshot_and_a_failed_one_leaves_no_state_file() {
    let dir = dir("again");
    let parts = parts(&disk(&dir.join("disks")));
    // A snapshot into a path that cannot be a directory fails; the machine is unharmed.
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    assert!(parts.save(&SnapshotFiles::in_dir(&file.join("snap")), vec![vcpu(0), vcpu(1)]).is_err());
    let snap = dir.join("snap");
    parts.save(&SnapshotFiles::in_dir(&snap), vec![vcpu(0), vcpu(1)]).unwrap();
    // A second snapshot into the same directory replaces the first.
    parts.save(&SnapshotFiles::in_dir(&snap), vec![vcpu(1), vcpu(0)]).unwrap();
    assert_eq!(Loaded::read(&SnapshotFiles::in_dir(&snap)).unwrap().vcpus, [vcpu(1), vcpu(0)]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// From the review of issue 18: a few blocks written where no sample falls passed the
/// print; the same file changed since the snapshot is refused now, and a copy of it
/// taken at the snapshot is still taken.
#[test]
fn the_same_disk_written_since_is_refused_and_a_copy_is_taken() {
    let dir = dir("written");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("big.img");
    std::fs::write(&disk, vec![0x11; 16 << 20]).unwrap();
    let saved = DiskPrint::of(&disk).unwrap();
    let copy = dir.join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    assert_eq!(DiskPrint::of(&copy).unwrap().differs(&saved), None, "a copy of the same bytes");
    std::thread::sleep(std::time::Duration::from_millis(20));
    // 5 MiB + 8 KiB: between the samples (4 KiB every 256 KiB).
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(b"x", (5 << 20) + 8192).unwrap();
    let now = DiskPrint::of(&disk).unwrap();
    assert_eq!(now.fingerprint, saved.fingerprint, "the samples miss the write");
    assert_eq!(now.differs(&saved).as_deref(), Some("was written since the snapshot was taken"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_state_and_memory_files_may_be_anywhere_but_not_one_file() {
    let dir = dir("apart");
    let parts = parts(&disk(&dir.join("disks")));
    let files = SnapshotFiles { state: dir.join("a/vm.state"), memory: dir.join("b/c/vm.mem") };
    parts.save(&files, vec![vcpu(0), vcpu(1)]).unwrap();
    assert!(files.memory.is_file() && !dir.join("b/c/vm.mem.partial").exists());
    let loaded = Loaded::read(&files).unwrap();
    let mut first = [0u8; 5];
    loaded.memory().unwrap().read_slice(&mut first, GuestAddress(RAM_BASE)).unwrap();
    assert_eq!(&first, b"first");
    let same = SnapshotFiles { state: dir.join("x"), memory: dir.join("x") };
    assert!(parts.save(&same, vec![vcpu(0), vcpu(1)]).unwrap_err().to_string().contains("both"));
    std::fs::remove_dir_all(&dir).unwrap();
}
