//! virtio-blk driven through guest memory and a virtqueue, request by request (post,
//! notify, wait for the used ring), against a RAM disk and a raw file in the page cache;
//! and, in the same run, the host doing the same I/O itself (`pread`/`pwrite` on the same
//! file, `memcpy` for the RAM disk) so `cargo xtask bench` can print hvrun/host.

use std::hint::black_box;
use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::block::disk::{FileDisk, MemDisk};
use devices::virtio::block::request::{header, T_IN, T_OUT};
use devices::virtio::block::Block;
use hvrun_benches::{Driver, DATA, WRITE};
use vm_memory::{Bytes, GuestAddress};

/// Disk size: big enough that random 4 KiB requests spread out.
const DISK: u64 = 256 << 20;
const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x1000;
const BUF: u64 = DATA + 0x2000;

/// (name, bytes per request, random?)
const SHAPES: [(&str, usize, bool); 3] =
    [("4k-random", 4096, true), ("64k-seq", 64 << 10, false), ("1m-seq", 1 << 20, false)];

/// The offset of request `n`: random 4 KiB-aligned, or the next in sequence.
fn offset(n: u64, size: usize, random: bool) -> u64 {
    let slots = DISK / size as u64;
    let slot = if random { n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40 } else { n };
    (slot % slots) * size as u64
}

fn file_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hvrun-bench-{}.img", std::process::id()))
}

fn run(c: &mut Criterion, backend: &str, make: &dyn Fn() -> Block, host: &mut dyn FnMut(bool, u64, &mut [u8])) {
    for (shape, size, random) in SHAPES {
        let mut group = c.benchmark_group(format!("virtio-blk/{backend}/{shape}"));
        group.throughput(Throughput::Bytes(size as u64));
        for write in [false, true] {
            let op = if write { "write" } else { "read" };
            let mut driver = Driver::start(Box::new(make()), 1, 256, 8 << 20);
            driver.mem.write_slice(&vec![0x5a; size], GuestAddress(BUF)).unwrap();
            let mut n = 0u64;
            group.bench_function(BenchmarkId::new("hvrun", op), |b| {
                b.iter(|| {
                    let at = offset(n, size, random);
                    n += 1;
                    let kind = if write { T_OUT } else { T_IN };
                    driver.mem.write_slice(&header(kind, at / 512), GuestAddress(HDR)).unwrap();
                    let data_flags = if write { 0 } else { WRITE };
                    driver.post(0, 0, &[(HDR, 16, 0), (BUF, size as u32, data_flags), (STATUS, 1, WRITE)]);
                    driver.notify(0);
                    black_box(driver.wait_used(0, 1));
                })
            });
            let mut buf = vec![0x5a; size];
            let mut n = 0u64;
            group.bench_function(BenchmarkId::new("host", op), |b| {
                b.iter(|| {
                    let at = offset(n, size, random);
                    n += 1;
                    host(write, at, &mut buf);
                    black_box(&buf);
                })
            });
        }
        group.finish();
    }
}

fn virtio_blk(c: &mut Criterion) {
    // A RAM disk; the host does the same copies with memcpy.
    let mut ram = vec![0x11u8; DISK as usize]; // non-zero: touched now, not on first write
    run(
        c,
        "ram",
        &|| Block::new(Box::new(MemDisk { bytes: vec![0x11; DISK as usize], ..Default::default() }), "bench"),
        &mut |write, at, buf| {
            let range = at as usize..at as usize + buf.len();
            if write {
                ram[range].copy_from_slice(buf);
            } else {
                buf.copy_from_slice(&ram[range]);
            }
        },
    );
    // A raw file in the page cache; the host does pread/pwrite on the same file.
    let path = file_path();
    std::fs::write(&path, vec![0u8; DISK as usize]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    run(
        c,
        "file",
        &|| {
            // Each benchmark opens the image afresh (the lock is the image's, per open file).
            Block::new(Box::new(FileDisk::open(&path, false).unwrap()), "bench")
        },
        &mut |write, at, buf| {
            if write {
                file.write_all_at(buf, at).unwrap();
            } else {
                file.read_exact_at(buf, at).unwrap();
            }
        },
    );
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, virtio_blk);
criterion_main!(benches);
