//! The cost of one chain through `virtio-queue` as hvrun's devices use it: pop it from the
//! available ring, then add it to the used ring. 256 single-buffer chains are posted
//! outside the timed part, then popped and used inside it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use guest_memory::GuestMemoryMmap;
use hvrun_benches::{Ring, DATA};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

const SIZE: u16 = 256;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = DESC + 16 * SIZE as u64;
const USED: u64 = 0x2_0000;

fn queue_ops(c: &mut Criterion) {
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
    c.bench_function("virtqueue pop + add_used (per chain)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = left.min(u64::from(SIZE)) as u16;
                for i in 0..batch {
                    ring.post(&mem, &mut avail_idx, i, &[(DATA, 4096, 0)]);
                }
                let start = Instant::now();
                for _ in 0..batch {
                    let chain = queue.pop_descriptor_chain(&mem).expect("a posted chain");
                    queue.add_used(&mem, chain.head_index(), 0).expect("used ring");
                    black_box(&chain);
                }
                total += start.elapsed();
                left -= u64::from(batch);
            }
            total
        })
    });
}

criterion_group!(benches, queue_ops);
criterion_main!(benches);
