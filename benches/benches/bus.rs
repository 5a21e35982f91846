//! The cost of one guest MMIO access dispatched through the bus to a device register,
//! and of a virtio queue notification that way: what a vCPU pays per notify where the
//! hypervisor cannot turn it into an eventfd (Hypervisor.framework; on KVM, ioeventfd
//! takes the write without an exit).

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, Criterion};
use devices::bus::MmioBus;
use devices::irq::NoIrq;
use devices::output::Output;
use devices::pl011::{Pl011, OUTPUT_BUFFER};
use devices::virtio::console::{stream_output, Backend, Console, TX_QUEUE};
use devices::virtio::mmio::QUEUE_NOTIFY;
use hvrun_benches::Driver;

/// Where the virtio console sits on the bench's bus.
const CONSOLE: u64 = 0x0a00_0000;

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
    // A running virtio console whose worker has nothing to do: the notify sets the
    // queue's bit, and wakes the worker's thread when it sleeps.
    let console = Console::new(Backend::Stream { output: stream_output(Box::new(std::io::sink())), input: None });
    let transport = Driver::start(Box::new(console), 2, 64, 1 << 20).into_transport();
    let mut bus = bus;
    bus.insert(CONSOLE, 0x200, Arc::new(Mutex::new(transport))).unwrap();
    let notify = u32::from(TX_QUEUE).to_le_bytes();
    c.bench_function("bus write (virtio QueueNotify, a device worker)", |b| {
        b.iter(|| bus.write(0, black_box(CONSOLE + QUEUE_NOTIFY), &notify).unwrap());
    });
}

criterion_group!(benches, mmio);
criterion_main!(benches);
