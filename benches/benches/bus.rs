//! The cost of one guest MMIO access dispatched through the bus to a device register.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, Criterion};
use devices::bus::MmioBus;
use devices::irq::NoIrq;
use devices::output::Output;
use devices::pl011::{Pl011, OUTPUT_BUFFER};

/// A bus with 16 devices, like a machine with a few virtio slots, the UART in the middle.
fn bus() -> MmioBus {
    let mut bus = MmioBus::new();
    for i in 0..16u64 {
        let uart = Pl011::new(Output::new("serial-out", Box::new(std::io::sink()), OUTPUT_BUFFER), Arc::new(NoIrq));
        bus.insert(0x0900_0000 + i * 0x1000, 0x1000, Arc::new(Mutex::new(uart))).unwrap();
    }
    bus
}

fn mmio(c: &mut Criterion) {
    let bus = bus();
    c.bench_function("bus read (PL011 FR)", |b| {
        let mut data = [0u8; 4];
        b.iter(|| bus.read(0, black_box(0x0900_8018), &mut data).unwrap());
    });
    c.bench_function("bus write (PL011 IMSC)", |b| {
        b.iter(|| bus.write(0, black_box(0x0900_8038), &[0x10, 0, 0, 0]).unwrap());
    });
}

criterion_group!(benches, mmio);
criterion_main!(benches);
