//! The cost of one chain through a virtqueue as hvrun's devices take it: popped from the
//! available ring, then added to the used ring. 256 single-buffer chains are posted
//! outside the timed part, then taken and used inside it:
//! - `virtqueue pop + add_used (per chain)`: hvrun's own path, `devices::virtio::drain_queue`
//!   (as virtio-blk, virtio-rng, virtio-input and an embedder's device take their chains:
//!   `Chains::batch`, then each chain given back), one pass per 256 chains with its start
//!   and end, and every check a device makes (the available index, each head,
//!   DEVICE_NEEDS_RESET, the interrupt the driver asked for);
//! - `virtio-queue pop + add_used (per chain)`: the crate's `pop_descriptor_chain` and
//!   `add_used` alone, which hvrun's devices called per chain until issue 16, for
//!   comparison.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use devices::irq::NoIrq;
use devices::virtio::{drain_queue, Interrupt};
use guest_memory::GuestMemoryMmap;
use hvrun_benches::{Ring, DATA};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

const SIZE: u16 = 256;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = DESC + 16 * SIZE as u64;
const USED: u64 = 0x2_0000;

/// Times `take` taking `batch` posted chains from the queue, per chain.
fn per_chain(c: &mut Criterion, name: &str, mut take: impl FnMut(&GuestMemoryMmap, &mut Queue, u16)) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("guest memory");
    let mut queue = Queue::new(SIZE).expect("queue");
    queue.set_size(SIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(&mem), "queue layout");
    let ring = Ring { desc: DESC, avail: AVAIL, size: SIZE };
    let mut avail_idx = 0u16;
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = left.min(u64::from(SIZE)) as u16;
                for i in 0..batch {
                    ring.post(&mem, &mut avail_idx, i, &[(DATA, 4096, 0)]);
                }
                let start = Instant::now();
                take(&mem, &mut queue, batch);
                total += start.elapsed();
                assert_eq!(queue.next_used(), avail_idx, "every chain was used");
                left -= u64::from(batch);
            }
            total
        })
    });
}

fn queue_ops(c: &mut Criterion) {
    let interrupt = Interrupt::new(Arc::new(NoIrq));
    per_chain(c, "virtqueue pop + add_used (per chain)", |mem, queue, _| {
        drain_queue("bench", queue, mem, &interrupt, |chain| {
            black_box(&chain);
            0
        });
    });
    per_chain(c, "virtio-queue pop + add_used (per chain)", |mem, queue, batch| {
        for _ in 0..batch {
            let chain = queue.pop_descriptor_chain(mem).expect("a posted chain");
            queue.add_used(mem, chain.head_index(), 0).expect("used ring");
            black_box(&chain);
        }
    });
}

criterion_group!(benches, queue_ops);
criterion_main!(benches);
