//! virtio-console's transmit path (guest output) driven through guest memory: 32 buffers
//! per iteration, posted together with one notify, into a writer that copies what it gets
//! (as a terminal or file write would). The `host` twin copies the same bytes into the
//! same kind of writer directly, so `cargo xtask bench` can print hvrun/host.

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::console::{stream_output, Backend, Console, TX_QUEUE};
use hvrun_benches::{Driver, DATA};

/// Buffers per iteration.
const BATCH: u16 = 32;

/// A writer that copies what it is given into a reused buffer, then forgets it.
struct Copying(Vec<u8>);

impl Write for Copying {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.clear();
        self.0.extend_from_slice(buf);
        black_box(&self.0);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn virtio_console(c: &mut Criterion) {
    for (name, size) in [("4KiB", 4096u32), ("64KiB", 65_536)] {
        let mut group = c.benchmark_group(format!("virtio-console/{name}x{BATCH}"));
        group.throughput(Throughput::Bytes(u64::from(size) * u64::from(BATCH)));
        let output = Box::new(Copying(Vec::with_capacity(1 << 17)));
        let console = Console::new(Backend::Stream { output: stream_output(output), input: None });
        let mut driver = Driver::start(Box::new(console), 2, 256, 4 << 20);
        let q = usize::from(TX_QUEUE);
        group.bench_function(BenchmarkId::new("hvrun", "output"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    driver.post(q, i, &[(DATA + u64::from(i % 2) * u64::from(size), size, 0)]);
                }
                driver.notify(q);
                driver.wait_used(q, BATCH);
            })
        });
        let mut sink = Copying(Vec::with_capacity(1 << 17));
        let bytes = vec![0x61u8; size as usize];
        group.bench_function(BenchmarkId::new("host", "output"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    sink.write_all(&bytes).unwrap();
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, virtio_console);
criterion_main!(benches);
