//! Swapping a device's disk while it runs ([`super::BlockHandle`]): requests in flight
//! finish on the old disk, later ones go to the new, the capacity and its generation
//! change, the driver is interrupted, and a flush asked for before the swap holds.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, MemDisk};
use super::parallel_tests::{post, post_all, queue, status, used, Opener, Recorder, Rig, Seen, BUFS};
use super::request::*;
use super::{Block, BlockHandle, ReplaceError};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{read_reg, start, wait_for, write_reg, Line, Mem};
use crate::virtio::{Interrupt, VirtioDevice, INT_CONFIG};

/// The transport's registers: the capacity's two halves and InterruptStatus.
const CAPACITY_LOW: u64 = 0x100;
const CAPACITY_HIGH: u64 = 0x104;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;

/// The capacity in sectors, as the driver reads it (two 32-bit reads, as Linux does).
fn capacity(t: &mut MmioTransport) -> u64 {
    u64::from(read_reg(t, CAPACITY_LOW)) | (u64::from(read_reg(t, CAPACITY_HIGH)) << 32)
}

/// Request `k`'s 4 KiB buffer.
fn buffer(mem: &Mem, k: u16) -> Vec<u8> {
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(BUFS + 4096 * u64::from(k))).unwrap();
    got
}

/// A disk of `size` bytes whose byte i is `(i + seed) % 251`, serving requests in parallel.
fn recorder(size: usize, seed: usize) -> Recorder {
    let disk = Recorder::new(size);
    for (i, b) in disk.state().bytes.iter_mut().enumerate() {
        *b = ((i + seed) % 251) as u8;
    }
    disk
}

/// Runs `handle.replace(disk)` on a thread of its own (it waits for the requests in hand).
fn replace_in_background(
    handle: &BlockHandle,
    disk: impl Disk + 'static,
) -> std::thread::JoinHandle<Result<Box<dyn Disk>, ReplaceError>> {
    let handle = handle.clone();
    std::thread::spawn(move || handle.replace(Box::new(disk)))
}

/// Reads and writes in the I/O threads when the swap comes: the swap waits for them,
/// each is answered once from the old disk, and what comes after goes to the new one.
#[test]
fn a_swap_mid_io_loses_no_request_and_later_requests_go_to_the_new_disk() {
    let old = recorder(1 << 20, 0);
    let new = recorder(2 << 20, 7);
    // Requests 0..4 read blocks 0..4 and 4..8 write blocks 100.. of the old disk, held.
    let held = (0..4u64).map(|k| k * 4096).chain((4..8).map(|k| (100 + k) * 4096));
    let mut rig = Rig::started(&old, held, "swap");
    let _open = Opener(&old);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    // Made available at once (`post_all`): posted one by one, the worker's first round
    // (from the start) may take request 0 alone, call no helper and wait in the held
    // read, leaving the others in the ring (seen on a loaded host).
    let mut requests = Vec::new();
    for k in 0..8u16 {
        if k < 4 {
            requests.push((T_IN, u64::from(k) * 8));
        } else {
            mem.write_slice(&[k as u8; 4096], GuestAddress(BUFS + 4096 * u64::from(k))).unwrap();
            requests.push((T_OUT, (100 + u64::from(k)) * 8));
        }
    }
    post_all(&mem, &vq, 0, &requests);
    rig.notify(0);
    wait_for("eight requests in hand", || old.waiting() == 8);
    let swap = replace_in_background(&rig.handle, new.clone());
    std::thread::sleep(Duration::from_millis(30));
    assert!(!swap.is_finished(), "the swap waits for the requests in hand");
    assert_eq!(capacity(&mut rig.transport), 2048, "the old capacity until then");
    for k in 0..8u64 {
        old.release(if k < 4 { k * 4096 } else { (100 + k) * 4096 });
    }
    swap.join().unwrap().expect("the swap");
    wait_for("eight answers", || vq.used().idx().load() == 8);
    let mut heads = used(&vq);
    heads.sort_unstable();
    assert_eq!(heads, (0..8).map(|k| 3 * k).collect::<Vec<_>>(), "each request answered once");
    assert!((0..8).all(|k| status(&mem, k) == S_OK));
    for k in 0..4u16 {
        let at = usize::from(k) * 4096;
        assert_eq!(buffer(&mem, k), old.state().bytes[at..at + 4096], "read {k} came from the old disk");
    }
    for k in 4..8usize {
        let at = (100 + k) * 4096;
        assert!(old.state().bytes[at..at + 4096].iter().all(|&b| b == k as u8), "write {k} on the old disk");
    }
    assert!(new.seen().iter().all(|s| !matches!(s, Seen::Wrote(_) | Seen::Read(_))), "nothing on the new disk yet");

    // After it: the new capacity, a configuration-change interrupt, the new disk's data.
    assert_eq!(capacity(&mut rig.transport), 4096);
    assert_eq!(read_reg(&mut rig.transport, INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    post(&mem, &vq, 8, T_IN, 300 * 8);
    mem.write_slice(&[0x77; 4096], GuestAddress(BUFS + 4096 * 9)).unwrap();
    post(&mem, &vq, 9, T_OUT, 8);
    rig.notify(0);
    wait_for("two more answers", || vq.used().idx().load() == 10);
    assert_eq!((status(&mem, 8), status(&mem, 9)), (S_OK, S_OK), "a read past the old disk's end is fine");
    assert_eq!(buffer(&mem, 8), new.state().bytes[300 * 4096..301 * 4096], "read from the new disk");
    assert!(new.state().bytes[4096..8192].iter().all(|&b| b == 0x77), "written to the new disk");
    assert_eq!(old.state().bytes[4096..8192], recorder(8192, 0).state().bytes[4096..], "not to the old");
}

/// A flush the driver asked for before the swap is durable on the old disk, whether it
/// runs before the swap or after it (the swap flushes the old disk).
#[test]
fn a_flush_before_the_swap_is_durable_on_the_old_disk() {
    let old = recorder(1 << 20, 0);
    let new = recorder(1 << 20, 3);
    let mut rig = Rig::started(&old, [0], "flush-swap");
    let _open = Opener(&old);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    mem.write_slice(&[0x42; 4096], GuestAddress(BUFS)).unwrap();
    post(&mem, &vq, 0, T_OUT, 0);
    post(&mem, &vq, 1, T_FLUSH, 0);
    rig.notify(0);
    wait_for("the write held", || old.waiting() == 1);
    // The flush waits for the write; the swap comes meanwhile and waits for it too.
    std::thread::sleep(Duration::from_millis(20));
    let swap = replace_in_background(&rig.handle, new.clone());
    std::thread::sleep(Duration::from_millis(20));
    old.release(0);
    swap.join().unwrap().expect("the swap");
    wait_for("both answered", || vq.used().idx().load() == 2);
    assert_eq!((status(&mem, 0), status(&mem, 1)), (S_OK, S_OK));
    let seen = old.seen();
    let wrote = seen.iter().position(|&s| s == Seen::Wrote(0)).unwrap();
    assert!(seen[wrote..].contains(&Seen::Flushed), "the old disk flushed after the write: {seen:?}");
    assert!(old.state().bytes[..4096].iter().all(|&b| b == 0x42));
}

/// A disk served one request at a time: the swap between requests, with the
/// configuration interrupt on the line and the generation moved on.
#[test]
fn a_serial_disk_is_swapped_between_requests() {
    let mem = Arc::new(Mem(crate::virtio::testing::mem(4 << 20)));
    let line = Arc::new(Line::default());
    let block = Block::new(Box::new(MemDisk { bytes: vec![1; 64 << 10], ..Default::default() }), "serial");
    let handle = block.handle();
    assert_eq!(block.config_generation(), 0);
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), Interrupt::new(line.clone())).unwrap();
    let vq = queue(&mem, 0);
    start(&mut t, &[&vq]);
    assert_eq!(capacity(&mut t), 128);
    let old = handle.replace(Box::new(MemDisk { bytes: vec![2; 1 << 20], ..Default::default() })).unwrap();
    assert_eq!(old.capacity(), 64 << 10, "the old disk back");
    assert_eq!(handle.capacity(), Some(1 << 20));
    assert_eq!(capacity(&mut t), 2048);
    assert!(line.high(), "a configuration-change interrupt");
    assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), INT_CONFIG);
    write_reg(&mut t, INTERRUPT_ACK, INT_CONFIG);
    post(&mem, &vq, 0, T_IN, 2000);
    write_reg(&mut t, 0x50, 0);
    wait_for("the read", || vq.used().idx().load() == 1);
    assert_eq!(status(&mem, 0), S_OK);
    assert_eq!(buffer(&mem, 0), vec![2; 4096]);
}

/// Before the driver starts the device a swap just swaps: the driver reads the new
/// capacity when it starts, and hears of the change then (it may have read the old one).
#[test]
fn a_swap_before_the_driver_starts_just_swaps() {
    let block = Block::new(Box::new(recorder(1 << 20, 0)), "early");
    let handle = block.handle();
    let new = recorder(3 << 20, 5);
    handle.replace(Box::new(new.clone())).unwrap();
    assert_eq!(block.config_generation(), 1, "the generation moved on");
    let mut sectors = [0u8; 8];
    block.read_config(0, &mut sectors);
    assert_eq!(u64::from_le_bytes(sectors), 6144);
    let mut rig = Rig::new(block);
    assert_eq!(read_reg(&mut rig.transport, INTERRUPT_STATUS), 0, "no interrupt while stopped");
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    start(&mut rig.transport, &[&vq]);
    assert_eq!(read_reg(&mut rig.transport, INTERRUPT_STATUS), INT_CONFIG, "announced as the driver starts");
    post(&mem, &vq, 0, T_IN, 8);
    rig.notify(0);
    wait_for("the read", || vq.used().idx().load() == 1);
    assert_eq!(buffer(&mem, 0), new.state().bytes[4096..8192]);
}

/// The error of a swap that must be refused.
fn refusal(swap: Result<Box<dyn Disk>, ReplaceError>) -> ReplaceError {
    match swap {
        Err(e) => e,
        Ok(_) => panic!("the swap was taken"),
    }
}

/// What a driver negotiated stays: a swap to a disk of the other read-only setting, or
/// to a disk that cannot serve a parallel device's requests in parallel, is refused and
/// the old disk serves on.
#[test]
fn swaps_the_driver_cannot_take_are_refused() {
    let old = recorder(1 << 20, 0);
    let mut rig = Rig::started(&old, [], "refused");
    let handle = rig.handle.clone();
    let read_only = MemDisk { bytes: vec![0; 4096], read_only: true, ..Default::default() };
    let e = refusal(handle.replace(Box::new(read_only)));
    assert!(matches!(e, ReplaceError::ReadOnly { device: false }), "{e}");
    assert_eq!(e.to_string(), "the drive is read-write; the new disk must be too");
    let e = refusal(handle.replace(Box::new(MemDisk { bytes: vec![0; 4096], ..Default::default() })));
    assert!(matches!(e, ReplaceError::NotParallel), "{e}");
    assert_eq!(capacity(&mut rig.transport), 2048);
    assert_eq!(read_reg(&mut rig.transport, INTERRUPT_STATUS), 0);
    let mem = rig.mem.clone();
    let vq = queue(&mem, 0);
    post(&mem, &vq, 0, T_IN, 0);
    rig.notify(0);
    wait_for("the read", || vq.used().idx().load() == 1);
    assert_eq!(buffer(&mem, 0), old.state().bytes[..4096]);

    // A read-only device takes read-only disks only.
    let block = Block::new(Box::new(MemDisk { bytes: vec![0; 4096], read_only: true, ..Default::default() }), "ro");
    let e = refusal(block.handle().replace(Box::new(MemDisk { bytes: vec![0; 4096], ..Default::default() })));
    assert_eq!(e.to_string(), "the drive is read-only; the new disk must be too");
    let ro = MemDisk { bytes: vec![0; 8192], read_only: true, ..Default::default() };
    block.handle().replace(Box::new(ro)).unwrap();
}

/// A handle does not keep its device: once the device is gone, a swap says so.
#[test]
fn a_handle_outlives_its_device() {
    let block = Block::new(Box::new(recorder(4096, 0)), "gone");
    let handle = block.handle();
    assert_eq!(handle.capacity(), Some(4096));
    drop(block);
    assert!(matches!(handle.replace(Box::new(recorder(4096, 0))), Err(ReplaceError::Gone)));
    assert_eq!(handle.capacity(), None);
}
