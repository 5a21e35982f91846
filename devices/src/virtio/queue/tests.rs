use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{mem, Line};

const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// A driver's side of one queue of [`SIZE`] entries, rings at fixed places.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        Driver { mem: mem(0x10_0000), avail_idx: 0 }
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Makes descriptor `head` (one 64-byte buffer) available.
    fn post(&mut self, head: u16) {
        if head < SIZE {
            let at = DESC + 16 * u64::from(head);
            self.mem.write_obj(0x1_0000 + 0x100 * u64::from(head), GuestAddress(at)).unwrap();
            self.mem.write_obj(64u32, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 12)).unwrap();
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % SIZE);
        (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }
}

fn interrupt() -> (Interrupt, Arc<Line>) {
    let line = Arc::new(Line::default());
    (Interrupt::new(line.clone()), line)
}

/// A driver, its queue (with or without EVENT_IDX) and the device's interrupt.
fn rig(event_idx: bool) -> (Driver, Queue, Interrupt, Arc<Line>) {
    let d = Driver::new();
    let q = d.queue(event_idx);
    let (int, line) = interrupt();
    (d, q, int, line)
}

#[test]
fn chains_come_in_order_and_one_put_back_comes_again() {
    let (mut d, mut q, int, line) = rig(false);
    for head in [3, 1, 4, 0, 5, 9, 2] {
        d.post(head);
    }
    {
        let mut chains = Chains::new("test", &mut q, &d.mem, &int);
        let mut heads = Vec::new();
        for _ in 0..4 {
            let chain = chains.next().unwrap();
            heads.push(chain.head_index());
            assert!(chains.give_back(chain.head_index(), 7));
        }
        assert_eq!(heads, [3, 1, 4, 0]);
        // One more is taken, then handed back untouched.
        assert_eq!(chains.next().unwrap().head_index(), 5);
        chains.put_back(1);
        assert_eq!(chains.next().unwrap().head_index(), 5, "the same chain again");
        chains.put_back(1);
    }
    assert_eq!(q.next_avail(), 4, "the chain put back is the driver's again");
    assert_eq!((q.next_used(), d.used_idx()), (4, 4));
    assert_eq!(d.used(0), (3, 7));
    assert_eq!(d.used(3), (0, 7));
    assert!(line.high(), "the driver is interrupted once the pass ends");
    // The next pass starts where this one stopped.
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    let heads: Vec<_> = std::iter::from_fn(|| chains.next().map(|c| c.head_index())).collect();
    assert_eq!(heads, [5, 9, 2]);
}

#[test]
fn a_pass_that_uses_nothing_interrupts_no_one() {
    let (mut d, mut q, int, line) = rig(false);
    d.post(0);
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    chains.next().unwrap();
    chains.put_back(1);
    drop(chains);
    assert!(!line.high());
    assert_eq!(q.next_avail(), 0);
}

#[test]
fn a_runaway_available_index_fails_the_device_and_nothing_is_used() {
    let (mut d, mut q, int, _line) = rig(false);
    d.post(0);
    d.mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    assert!(chains.next().is_none());
    assert!(int.needs_reset());
    assert!(chains.next().is_none(), "a failed device takes nothing more");
    drop(chains);
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn chains_before_a_head_beyond_the_queue_are_served_then_the_device_fails() {
    let (mut d, mut q, int, _line) = rig(false);
    for head in [0, 1, SIZE, 2] {
        d.post(head);
    }
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    for want in [0, 1] {
        let chain = chains.next().unwrap();
        assert_eq!(chain.head_index(), want);
        assert!(chains.give_back(want, 0));
        assert!(!int.needs_reset());
    }
    assert!(chains.next().is_none());
    assert!(int.needs_reset());
    drop(chains);
    assert_eq!(d.used_idx(), 2);
}

#[test]
fn with_event_idx_the_driver_is_interrupted_only_past_its_used_event() {
    let (mut d, mut q, int, line) = rig(true);
    // used_event sits after the available ring's entries.
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
    d.mem.write_obj(5u16, used_event).unwrap();
    for head in 0..4 {
        d.post(head);
    }
    let serve = |q: &mut Queue, mem: &GuestMemoryMmap| {
        let mut chains = Chains::new("test", q, mem, &int);
        while let Some(chain) = chains.next() {
            assert!(chains.give_back(chain.head_index(), 1));
        }
    };
    serve(&mut q, &d.mem);
    assert!(!line.high(), "used 0..4 does not pass the event 5");
    // Re-enabling notifications moved the avail event to where the device stopped.
    assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * u64::from(SIZE))).unwrap(), 4);
    for head in 4..7 {
        d.post(head);
    }
    serve(&mut q, &d.mem);
    assert!(line.high(), "used 4..7 passes the event 5");
}

#[test]
fn a_used_ring_across_two_memory_regions_is_written_the_slow_way() {
    // The used ring of 16 entries (132 bytes) starts 64 bytes before the second region.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x10_0000)]).unwrap();
    let mut d = Driver { mem, avail_idx: 0 };
    let mut q = d.queue(false);
    q.set_used_ring_address(Some(0x4000 - 64), Some(0));
    assert!(q.is_valid(&d.mem));
    let (int, line) = interrupt();
    for head in 0..12 {
        d.post(head);
    }
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    while let Some(chain) = chains.next() {
        assert!(chains.give_back(chain.head_index(), 2));
    }
    drop(chains);
    assert!(line.high());
    assert_eq!(d.mem.read_obj::<u16>(GuestAddress(0x4000 - 64 + 2)).unwrap(), 12);
    let last = GuestAddress(0x4000 - 64 + 4 + 8 * 11);
    assert_eq!(d.mem.read_obj::<[u32; 2]>(last).unwrap(), [11, 2], "an entry past the boundary");
}

#[test]
fn write_chain_at_starts_at_an_offset_across_buffers() {
    use crate::virtio::testing::{chained, desc, W};
    use virtio_queue::mock::MockSplitQueue;
    let m = mem(0x10_0000);
    let vq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), 16);
    vq.add_desc_chains(&[chained(0x1000, 4, W, 1), chained(0x2000, 8, W, 2), desc(0x3000, 8, 0)], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&m).unwrap();
    // Offset 6: past the first buffer, two bytes into the second; the readable one ends it.
    assert_eq!(write_chain_at("test", &m, chain, 6, &[9; 20]), 6);
    assert_eq!(m.read_obj::<[u8; 8]>(GuestAddress(0x2000)).unwrap(), [0, 0, 9, 9, 9, 9, 9, 9]);
    assert_eq!(m.read_obj::<[u8; 4]>(GuestAddress(0x1000)).unwrap(), [0; 4]);
}

#[test]
fn a_batch_takes_what_one_look_at_the_index_shows_and_the_next_one_the_rest() {
    let (mut d, mut q, int, line) = rig(false);
    for head in 0..3 {
        d.post(head);
    }
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    let mut batch = chains.batch().unwrap();
    assert_eq!(batch.next().unwrap().head_index(), 0);
    assert!(batch.give_back(0, 1));
    // Handed out, then back to the ring: the same chain comes next.
    assert_eq!(batch.next().unwrap().head_index(), 1);
    batch.put_back(1);
    assert_eq!(batch.next().unwrap().head_index(), 1);
    assert!(batch.give_back(1, 1));
    // The driver adds one while the batch is out: this batch ends, the next has it.
    let mem = d.mem.clone();
    let mut late = Driver { mem, avail_idx: d.avail_idx };
    late.post(7);
    assert_eq!(batch.next().unwrap().head_index(), 2);
    assert!(batch.give_back(2, 1));
    assert!(batch.next().is_none(), "one look at the index");
    let mut batch = chains.batch().unwrap();
    assert_eq!(batch.next().unwrap().head_index(), 7);
    assert!(batch.give_back(7, 1));
    assert!(batch.next().is_none());
    assert!(chains.batch().is_none(), "nothing more, after a second look");
    drop(chains);
    assert_eq!((q.next_avail(), q.next_used(), d.used_idx()), (4, 4, 4));
    assert_eq!(d.used(3), (7, 1));
    assert!(line.high());
}

#[test]
fn a_batch_stops_at_a_head_beyond_the_queue_and_after_a_runaway_index_there_is_none() {
    let (mut d, mut q, int, _line) = rig(false);
    for head in [0, SIZE + 3, 1] {
        d.post(head);
    }
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    let mut batch = chains.batch().unwrap();
    assert_eq!(batch.next().unwrap().head_index(), 0);
    assert!(batch.next().is_none());
    assert!(int.needs_reset());
    assert!(chains.batch().is_none());
    drop(chains);

    let (mut d, mut q, int, _line) = rig(false);
    d.post(0);
    d.mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
    let mut chains = Chains::new("test", &mut q, &d.mem, &int);
    assert!(chains.batch().is_none());
    assert!(int.needs_reset());
}

#[test]
fn drain_queue_serves_every_chain_and_stops_when_asked() {
    let (mut d, mut q, int, line) = rig(false);
    for head in 0..5 {
        d.post(head);
    }
    let mut served = Vec::new();
    let mut go = 3;
    drain_queue_while(
        "test",
        &mut q,
        &d.mem,
        &int,
        || {
            go -= 1;
            go >= 0
        },
        |chain| {
            served.push(chain.head_index());
            9
        },
    );
    assert_eq!(served, [0, 1, 2]);
    assert_eq!((q.next_avail(), d.used_idx()), (3, 3));
    assert!(line.high());
    drain_queue("test", &mut q, &d.mem, &int, |chain| u32::from(chain.head_index()));
    assert_eq!(d.used_idx(), 5);
    assert_eq!(d.used(4), (4, 4));
}
