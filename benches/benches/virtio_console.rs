//! virtio-console's transmit path (guest output) driven through guest memory: 32 buffers
//! per iteration, posted together with one notify, written to a file. The `hvrun` rows
//! are `--console file=PATH` (`Backend::File`: the device writes a pass's buffers with
//! one `writev` straight from guest memory); the `hvrun-stream` rows are the terminal's
//! path (`Backend::Stream`: the device copies the bytes into an output buffer of
//! [`OUTPUT_BUFFER`] bytes that a thread of its own writes to the file, so iteration after
//! iteration it goes no faster than that thread's writes). The `host` twin writes the same
//! 32 buffers to the same kind of file itself, with one `writev`, so `cargo xtask bench`
//! can print hvrun/host.
//!
//! All write into a file in the system's temporary directory, in place (each write
//! where the last one ended, back at the start after 1 MiB), so the kernel copies the
//! bytes into pages the file already has. An iteration ends when the device has given
//! back the buffers.

use std::fs::File;
use std::hint::black_box;
use std::io::{IoSlice, Seek, SeekFrom, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::console::{stream_output, Backend, Console, OUTPUT_BUFFER, TX_QUEUE};
use hvrun_benches::{Driver, DATA};
use vm_memory::{Bytes, GuestAddress};

/// Buffers per iteration.
const BATCH: u16 = 32;
/// Where a file's writes start again from its beginning.
const WRAP: u64 = 1 << 20;

/// A file written in place: each write where the last ended, from the start again past
/// [`WRAP`].
struct FileSink {
    file: File,
    at: u64,
}

impl FileSink {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("hvrun-bench-{}-{name}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("bench file");
        let _ = std::fs::remove_file(&path);
        // The pages exist before the timing starts.
        file.set_len(WRAP + (1 << 20)).expect("bench file size");
        FileSink { file, at: 0 }
    }

    fn wrap(&mut self) -> std::io::Result<()> {
        if self.at >= WRAP {
            self.at = self.file.seek(SeekFrom::Start(0))?;
        }
        Ok(())
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.wrap()?;
        let n = self.file.write(buf)?;
        self.at += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.wrap()?;
        let n = self.file.write_vectored(bufs)?;
        self.at += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn virtio_console(c: &mut Criterion) {
    for (name, size) in [("4KiB", 4096u32), ("64KiB", 65_536)] {
        let mut group = c.benchmark_group(format!("virtio-console/{name}x{BATCH}"));
        group.throughput(Throughput::Bytes(u64::from(size) * u64::from(BATCH)));
        // The device writes through its own handle to the file; this one (the same open
        // file, so the same position) rewinds it between iterations, as the host twin's
        // sink does.
        let mut rewind = FileSink::new(&format!("{name}-hvrun"));
        let device_file = rewind.file.try_clone().expect("bench file handle");
        let mut driver = Driver::start(Box::new(Console::new(Backend::File(device_file))), 2, 256, 4 << 20);
        // The guest's 32 buffers hold bytes (memory never written would read as the
        // shared zero page, always in the cache).
        let guest_bytes = vec![0x61u8; size as usize * usize::from(BATCH)];
        driver.mem.write_slice(&guest_bytes, GuestAddress(DATA)).expect("guest buffers");
        let q = usize::from(TX_QUEUE);
        group.bench_function(BenchmarkId::new("hvrun", "output"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    driver.post(q, i, &[(DATA + u64::from(i) * u64::from(size), size, 0)]);
                }
                driver.notify(q);
                driver.wait_used(q, BATCH);
                rewind.at += u64::from(size) * u64::from(BATCH);
                rewind.wrap().expect("rewind");
            })
        });
        // The terminal's path (`Backend::Stream`): a copy into the output buffer, which a
        // thread of its own writes to the file.
        let output = Box::new(FileSink::new(&format!("{name}-stream")));
        let console = Console::new(Backend::Stream { output: stream_output(output), input: None });
        let mut driver = Driver::start(Box::new(console), 2, 256, 4 << 20);
        driver.mem.write_slice(&guest_bytes, GuestAddress(DATA)).expect("guest buffers");
        group.bench_function(BenchmarkId::new("hvrun-stream", "output"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    driver.post(q, i, &[(DATA + u64::from(i) * u64::from(size), size, 0)]);
                }
                driver.notify(q);
                driver.wait_used(q, BATCH);
            })
        });
        let mut sink = FileSink::new(&format!("{name}-host"));
        let buffers: Vec<Vec<u8>> = (0..BATCH).map(|i| vec![0x61 + (i % 2) as u8; size as usize]).collect();
        group.bench_function(BenchmarkId::new("host", "output"), |b| {
            b.iter(|| {
                let mut slices: Vec<IoSlice<'_>> = buffers.iter().map(|b| IoSlice::new(b)).collect();
                let mut left = &mut slices[..];
                while !left.is_empty() {
                    let n = sink.write_vectored(left).expect("host write");
                    IoSlice::advance_slices(&mut left, n);
                }
                black_box(&sink);
            })
        });
        group.finish();
    }
    black_box(OUTPUT_BUFFER);
}

criterion_group!(benches, virtio_console);
criterion_main!(benches);
