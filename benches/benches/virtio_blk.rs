//! virtio-blk driven through guest memory and a virtqueue, request by request (post,
//! notify, wait for the used ring), against a RAM disk and a raw file in the page cache;
//! and, in the same run, the host doing the same I/O itself (`pread`/`pwrite` on the same
//! file, `memcpy` for the RAM disk) so `cargo xtask bench` can print hvrun/host.
//!
//! The `4k-random-qdN` rows keep N random 4 KiB requests in flight on the file disk (the
//! driver posts a new one as soon as one is done, as `fio --iodepth=N` does) and time
//! each request; their host twin is the same number of 4 KiB `pread`s or `pwrite`s at
//! random offsets of the same file, spread over as many threads as hvrun does that I/O on
//! at that depth: `min(N, block::IO_THREADS)` (at depth 1 the queue's worker, beyond it
//! its I/O threads).

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::block::disk::{FileDisk, MemDisk};
use devices::virtio::block::request::{header, T_IN, T_OUT};
use devices::virtio::block::{Block, IO_THREADS};
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

/// Queue depths of the `4k-random-qdN` rows.
const DEPTHS: [u16; 3] = [1, 8, 32];
/// Where the in-flight requests' headers, status bytes and data buffers go (request `k`
/// at `k` times 16 bytes, 1 byte, 4 KiB).
const HDRS: u64 = DATA + 0x1_0000;
const STATUSES: u64 = DATA + 0x2_0000;
const BUFS: u64 = DATA + 0x4_0000;

/// Request `n`'s offset in the queue-depth rows: random, 4 KiB-aligned.
fn random_4k(n: u64) -> u64 {
    offset(n, 4096, true)
}

/// Posts request `slot` (descriptors `3 * slot..`) for the `n`th I/O.
fn post_slot(driver: &mut Driver, slot: u16, n: u64, write: bool) {
    let (hdr, status, buf) = (HDRS + 16 * u64::from(slot), STATUSES + u64::from(slot), BUFS + 4096 * u64::from(slot));
    let kind = if write { T_OUT } else { T_IN };
    driver.mem.write_slice(&header(kind, random_4k(n) / 512), GuestAddress(hdr)).unwrap();
    let data_flags = if write { 0 } else { WRITE };
    driver.post(0, 3 * slot, &[(hdr, 16, 0), (buf, 4096, data_flags), (status, 1, WRITE)]);
}

/// Runs `iters` requests with `depth` in flight; returns the time they took.
fn hvrun_at_depth(driver: &mut Driver, depth: u16, iters: u64, write: bool, next: &mut u64) -> Duration {
    let start = Instant::now();
    let (mut posted, mut done) = (0u64, 0u64);
    while posted < iters.min(u64::from(depth)) {
        post_slot(driver, posted as u16, *next, write);
        (posted, *next) = (posted + 1, *next + 1);
    }
    driver.notify(0);
    let mut freed = Vec::with_capacity(usize::from(depth));
    while done < iters {
        driver.take_used(0, |head, _| freed.push(head / 3));
        if freed.is_empty() {
            std::thread::yield_now();
            continue;
        }
        done += freed.len() as u64;
        let mut again = false;
        for slot in freed.drain(..) {
            if posted < iters {
                post_slot(driver, slot, *next, write);
                (posted, *next, again) = (posted + 1, *next + 1, true);
            }
        }
        if again {
            driver.notify(0);
        }
    }
    start.elapsed()
}

/// The host twin of [`hvrun_at_depth`]: `iters` 4 KiB `pread`s or `pwrite`s at random
/// offsets of `file`, on `threads` threads; returns the time they took.
fn host_at_depth(file: &std::fs::File, threads: u64, iters: u64, write: bool, next: &mut u64) -> Duration {
    let first = *next;
    *next += iters;
    let barrier = std::sync::Barrier::new(threads as usize + 1);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let barrier = &barrier;
            scope.spawn(move || {
                let mut buf = vec![0x5au8; 4096];
                barrier.wait();
                for n in (first + t..first + iters).step_by(threads as usize) {
                    if write {
                        file.write_all_at(&buf, random_4k(n)).unwrap();
                    } else {
                        file.read_exact_at(&mut buf, random_4k(n)).unwrap();
                    }
                }
                black_box(&buf);
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins the threads before it returns.
        start
    })
    .elapsed()
}

fn queue_depths(c: &mut Criterion) {
    let path = file_path();
    std::fs::write(&path, vec![0u8; DISK as usize]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    for depth in DEPTHS {
        let mut group = c.benchmark_group(format!("virtio-blk/file/4k-random-qd{depth}"));
        group.throughput(Throughput::Bytes(4096));
        for write in [false, true] {
            let op = if write { "write" } else { "read" };
            let disk = FileDisk::open(&path, false).unwrap();
            let mut driver = Driver::start(Box::new(Block::new(Box::new(disk), "bench")), 1, 256, 8 << 20);
            driver.mem.write_slice(&vec![0x5a; 4096 * usize::from(depth)], GuestAddress(BUFS)).unwrap();
            let mut next = 0u64;
            group.bench_function(BenchmarkId::new("hvrun", op), |b| {
                b.iter_custom(|iters| hvrun_at_depth(&mut driver, depth, iters, write, &mut next))
            });
            drop(driver);
            let threads = u64::from(depth).min(IO_THREADS as u64);
            let mut next = 0u64;
            group.bench_function(BenchmarkId::new("host", op), |b| {
                b.iter_custom(|iters| host_at_depth(&file, threads, iters, write, &mut next))
            });
        }
        group.finish();
    }
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, virtio_blk, queue_depths);
criterion_main!(benches);
