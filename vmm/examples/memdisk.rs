//! An embedder's own disk: the guest's `/dev/vda` is a `Vec<u8>` in this program, not a
//! file. The example writes a signature into it, boots the guest, has the guest read the
//! signature and write a line of its own with `conv=fsync`, and checks after the guest has
//! powered off that the line is in memory and that the flush reached the disk.
//!
//! ```text
//! cargo run --example memdisk -- Image initramfs.cpio
//! ```
//! The guest is hvrun's test initramfs (`cargo xtask guest`). The rig runs it as the
//! `embed-memdisk` scenario.

#[path = "common/mod.rs"]
mod common;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{keyboard, powered_off, test_guest, wait_for_init, Captured, Failure};
use hvrun::extend::Disk;
use hvrun::Vm;

/// What the host puts at the start of the disk.
const SIGNATURE: &[u8] = b"hvrun-memdisk-v1";
/// What the guest writes at byte 512.
const GUEST_LINE: &[u8] = b"guest-wrote-this";

/// A disk in this program's memory, which the program can look at while and after the
/// guest uses it.
#[derive(Clone)]
struct SharedDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    flushes: Arc<AtomicU64>,
}

impl SharedDisk {
    /// The byte range `offset..offset + len`, or the error a disk gives past its end.
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.bytes.lock().map_err(|_| io::Error::other("poisoned"))?.len();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(len).filter(|&end| end <= size).ok_or(io::ErrorKind::UnexpectedEof)?;
        Ok(start..end)
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Vec<u8>>> {
        self.bytes.lock().map_err(|_| io::Error::other("poisoned"))
    }
}

impl Disk for SharedDisk {
    fn capacity(&self) -> u64 {
        self.bytes.lock().map(|b| b.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()?[range]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        self.lock()?[range].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        // Memory is as durable as it gets here; count the flush so the example sees it.
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let range = self.range(offset, len)?;
        self.lock()?[range].fill(0);
        Ok(())
    }
}

fn run(kernel: &str, initrd: &str) -> Result<(), Failure> {
    let mut contents = vec![0u8; 1 << 20];
    contents[..SIGNATURE.len()].copy_from_slice(SIGNATURE);
    let disk = SharedDisk { bytes: Arc::new(Mutex::new(contents)), flushes: Arc::default() };

    let config = test_guest(kernel, initrd);
    let output = Captured::default();
    let (keyboard, typed) = keyboard();
    let vm = Vm::builder(config)
        .console(typed, output.clone())
        .disk(disk.clone(), "memdisk")
        .start()
        .map_err(|e| format!("start: {e}"))?;
    wait_for_init(&vm, &output)?;
    keyboard.line("echo serial=$(cat /sys/block/vda/serial) size=$(cat /sys/block/vda/size)")?;
    keyboard.line("echo read=$(head -c 16 /dev/vda)")?;
    keyboard.line("printf guest-wrote-this | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && echo written")?;
    keyboard.line("poweroff -f")?;
    let text = powered_off("memdisk", vm, &output)?;
    for expected in ["serial=memdisk size=2048", "read=hvrun-memdisk-v1", "written"] {
        if !text.contains(expected) {
            return Err(format!("the guest did not say `{expected}`; console:\n{text}").into());
        }
        println!("memdisk: the guest said {expected}");
    }
    let bytes = disk.bytes.lock().map_err(|_| "poisoned")?;
    if &bytes[512..512 + GUEST_LINE.len()] != GUEST_LINE {
        return Err("the guest's line is not at byte 512 of the disk".into());
    }
    let flushes = disk.flushes.load(Ordering::SeqCst);
    println!("memdisk: the guest's line is in memory at byte 512; {flushes} flush(es) reached the disk");
    if flushes == 0 {
        return Err("conv=fsync sent no flush to the disk".into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::main("memdisk", "KERNEL INITRD", |args| run(&args[0], &args[1]))
}
