use std::sync::Arc;
use std::time::Duration;

use guest_memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::stats::{MEMFREE, MEMTOT};
use super::{
    Balloon, BalloonHandle, BalloonOptions, QueueMap, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_REPORTING, F_STATS_VQ,
};
use crate::virtio::counters::{DeviceStats, Named};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{
    a_runaway_index_needs_reset, chained, desc, mem, read_reg, start, wait_for, write_reg, Line, Mem, W,
};
use crate::virtio::Interrupt;

/// Guest RAM of the tests: 4 MiB from 0; the rings sit at 0x8_0000 and up.
const RAM: usize = 4 << 20;

struct Guest {
    m: Arc<Mem>,
    line: Arc<Line>,
    t: MmioTransport,
    handle: BalloonHandle,
}

impl Guest {
    fn new(options: BalloonOptions) -> Self {
        let m = Arc::new(Mem(mem(RAM)));
        let line = Arc::new(Line::default());
        let (balloon, handle) = Balloon::new(options);
        let t = MmioTransport::new(Box::new(balloon), m.clone(), Interrupt::new(line.clone())).unwrap();
        Guest { m, line, t, handle }
    }

    /// Fills `start..start + len` with `byte`.
    fn fill(&self, start: u64, len: usize, byte: u8) {
        self.m.write_slice(&vec![byte; len], GuestAddress(start)).unwrap();
    }

    /// How many bytes of `start..start + len` read as zero.
    fn zeros(&self, start: u64, len: usize) -> usize {
        let mut buf = vec![0xffu8; len];
        self.m.read_slice(&mut buf, GuestAddress(start)).unwrap();
        buf.iter().filter(|&&b| b == 0).count()
    }

    /// Whether `start..start + len` reads as released: zeros on Linux, which drops the
    /// pages at once (macOS keeps the bytes of reusable pages until it needs the memory,
    /// so there only the counters tell).
    fn released(&self, start: u64, len: usize) -> bool {
        !cfg!(target_os = "linux") || self.zeros(start, len) == len
    }

    /// The device's common counters, as the VMM reads them for metrics.
    fn counted(&self) -> DeviceStats {
        let stats = self.t.stats().device.expect("the balloon keeps counters");
        DeviceStats { named: Named::default(), ..stats }
    }

    /// The buffers served on each queue: inflates, deflates, statistics and reports.
    fn served(&self) -> [Option<u64>; 4] {
        let named = self.t.stats().device.expect("the balloon keeps counters").named;
        ["inflate_count", "deflate_count", "stats_updates_count", "free_page_report_count"].map(|name| named.get(name))
    }

    fn config(&mut self, offset: u64) -> u32 {
        read_reg(&mut self.t, 0x100 + offset)
    }
}

fn queues(m: &Mem, n: u64) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..n).map(|i| MockSplitQueue::create(&m.0, GuestAddress(0x8_0000 + i * 0x1_0000), 16)).collect()
}

/// Starts the device with all four queues.
fn started<'a>(g: &mut Guest, m: &'a Mem) -> Vec<MockSplitQueue<'a, GuestMemoryMmap>> {
    let vqs = queues(m, 4);
    start(&mut g.t, &vqs.iter().collect::<Vec<_>>());
    vqs
}

fn all_on() -> BalloonOptions {
    BalloonOptions { stats_interval: Some(Duration::from_millis(50)), ..BalloonOptions::default() }
}

fn pfn_array(g: &Guest, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    g.m.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

#[test]
fn the_queue_map_follows_the_negotiated_features() {
    let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | 1 << b);
    let map = |bits: &[u32]| {
        let m = QueueMap::for_features(f(bits));
        (m.stats, m.reporting, m.count)
    };
    assert_eq!(map(&[]), (None, None, 2));
    assert_eq!(map(&[F_DEFLATE_ON_OOM]), (None, None, 2));
    assert_eq!(map(&[F_STATS_VQ]), (Some(2), None, 3));
    assert_eq!(map(&[F_REPORTING]), (None, Some(2), 3));
    assert_eq!(map(&[F_STATS_VQ, F_REPORTING]), (Some(2), Some(3), 4));
    assert_eq!(map(&[F_STATS_VQ, F_FREE_PAGE_HINT, F_REPORTING]), (Some(2), Some(4), 5));
    assert_eq!(map(&[F_FREE_PAGE_HINT, F_REPORTING]), (None, Some(3), 4));
}

#[test]
fn only_the_chosen_features_are_offered() {
    let mut g = Guest::new(BalloonOptions {
        free_page_reporting: false,
        deflate_on_oom: true,
        stats_interval: None,
        initial_target: 0,
    });
    write_reg(&mut g.t, 0x14, 0);
    let offered = read_reg(&mut g.t, 0x10);
    assert_eq!(offered & 0x3f, 1 << F_DEFLATE_ON_OOM);
    assert_eq!(read_reg(&mut g.t, 0x08), 5, "device ID: balloon");
    let m = g.m.clone();
    let vqs = queues(&m, 2);
    start(&mut g.t, &vqs.iter().collect::<Vec<_>>());
}

#[test]
fn inflate_releases_valid_frames_and_ignores_hostile_ones() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    let vqs = started(&mut g, &m);
    g.fill(0x20_0000, 0x2_0000, 0xa5);
    // 64 KiB of frames (in any order, some twice), and frames past RAM and at u32::MAX.
    let mut pfns: Vec<u32> = (0x200..0x210).rev().collect();
    pfns.extend([0x205, 0x205, u32::MAX, (RAM >> 12) as u32, 0x4_0000]);
    let len = pfn_array(&g, 0x1000, &pfns);
    vqs[0].add_desc_chains(&[desc(0x1000, len, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 0);
    // The worker publishes the used index before it raises the line: wait for both.
    wait_for("the inflate buffer back and its interrupt", || vqs[0].used().idx().load() == 1 && g.line.high());
    assert!(g.released(0x20_0000, 0x1_0000), "the inflated pages were released");
    assert_eq!(g.zeros(0x21_0000, 0x1_0000), 0, "the others were not");
    assert_eq!(g.handle.released(), 0x1_0000);
    // A deflate of the same frames returns the buffer and changes nothing.
    vqs[1].add_desc_chains(&[desc(0x1000, len, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 1);
    wait_for("the deflate buffer back", || vqs[1].used().idx().load() == 1);
    assert_eq!(g.handle.released(), 0x1_0000);
}

#[test]
fn counters_follow_the_buffers_of_every_queue() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    assert_eq!(g.counted(), DeviceStats::default(), "nothing before the driver starts");
    assert_eq!(g.served(), [Some(0); 4]);
    let vqs = started(&mut g, &m);
    let page = super::release::host_page_size();
    let pages = 0x1_0000 / page;
    // A clean inflate of 64 KiB.
    let len = pfn_array(&g, 0x1000, &(0x200..0x210).collect::<Vec<u32>>());
    vqs[0].add_desc_chains(&[desc(0x1000, len, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 0);
    wait_for("the inflate buffer back", || vqs[0].used().idx().load() == 1);
    let mut counted =
        DeviceStats { requests: 1, rx_bytes: 0, tx_bytes: pages * page, errors: 0, ..DeviceStats::default() };
    assert_eq!(g.counted(), counted);
    // An inflate with one frame inside RAM and two outside: the frame is released, the
    // request counts as an error once.
    let len = pfn_array(&g, 0x2000, &[0x300, (RAM >> 12) as u32, u32::MAX]);
    vqs[0].add_desc_chains(&[desc(0x2000, len, 0)], 1).unwrap();
    write_reg(&mut g.t, 0x50, 0);
    wait_for("the second inflate buffer back", || vqs[0].used().idx().load() == 2);
    let one = if page == 0x1000 { 0x1000 } else { 0 };
    counted.requests += 1;
    counted.tx_bytes += one;
    counted.errors += 1;
    assert_eq!(g.counted(), counted, "the frames past RAM are an error");
    // A deflate of 8 pages: the guest takes 32 KiB back.
    let len = pfn_array(&g, 0x3000, &(0x200..0x208).collect::<Vec<u32>>());
    vqs[1].add_desc_chains(&[desc(0x3000, len, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 1);
    wait_for("the deflate buffer back", || vqs[1].used().idx().load() == 1);
    counted.requests += 1;
    counted.rx_bytes += 0x8000;
    assert_eq!(g.counted(), counted);
    // A statistics buffer, then a free page report of 1 MiB.
    g.m.write_slice(&[MEMFREE.to_le_bytes().as_slice(), &1u64.to_le_bytes()].concat(), GuestAddress(0x4000)).unwrap();
    vqs[2].add_desc_chains(&[desc(0x4000, 10, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 2);
    wait_for("the statistics", || g.handle.stats().is_some());
    vqs[3].add_desc_chains(&[desc(0x20_0000, 0x10_0000, W)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 3);
    wait_for("the report back", || vqs[3].used().idx().load() == 1);
    counted.requests += 2;
    counted.tx_bytes += 0x10_0000;
    assert_eq!(g.counted(), counted);
    assert_eq!(g.handle.released(), counted.tx_bytes, "the handle and the counters agree");
    assert_eq!(g.served(), [Some(2), Some(1), Some(1), Some(1)], "the buffers of each queue, by name");
}

#[test]
fn malformed_page_arrays_are_dropped_without_harm() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    let vqs = started(&mut g, &m);
    g.fill(0x20_0000, 0x1_0000, 0xa5);
    let len = pfn_array(&g, 0x1000, &[0x200, 0x201]);
    vqs[0].add_desc_chains(&[desc(0x1000, len - 1, 0)], 0).unwrap(); // a partial entry
    vqs[0].add_desc_chains(&[desc(0x1000, len, W)], 1).unwrap(); // device-writable
    vqs[0].add_desc_chains(&[desc(RAM as u64 - 4, 16, 0)], 2).unwrap(); // past RAM
    vqs[0].add_desc_chains(&[desc(0x1000, u32::MAX, 0)], 3).unwrap(); // huge
    write_reg(&mut g.t, 0x50, 0);
    wait_for("four buffers back", || vqs[0].used().idx().load() == 4);
    let page = super::release::host_page_size();
    if page == 0x1000 {
        assert!(g.released(0x20_0000, 0x1000), "the first whole entry of the partial array counts");
    }
    assert_eq!(g.zeros(0x20_1000, 0x1000), 0, "the partial entry does not");
    let released = if page == 0x1000 { 0x1000 } else { 0 };
    let counted = DeviceStats { requests: 4, rx_bytes: 0, tx_bytes: released, errors: 4, ..DeviceStats::default() };
    assert_eq!(g.counted(), counted, "each buffer served, and each an error");
}

#[test]
fn reported_ranges_are_released_when_inside_ram() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    let vqs = started(&mut g, &m);
    g.fill(0x20_0000, 0x20_0000, 0xa5);
    let page = super::release::host_page_size() as usize;
    vqs[3]
        .add_desc_chains(
            &[
                chained(0x20_0000, 0x10_0000, W, 1),                   // 1 MiB: released
                chained(0x3f_f000, 0x2000, W, 2),                      // straddles RAM's end: ignored
                chained(0x30_0000, 0, W, 3),                           // empty
                desc(0x30_0000 + page as u64 / 2, 2 * page as u32, W), // unaligned: one whole page
            ],
            0,
        )
        .unwrap();
    // Huge: past RAM, ignored. (A chain past 4 GiB in all ends there: virtio-queue stops it.)
    vqs[3].add_desc_chains(&[desc(0x10_0000, u32::MAX, W)], 4).unwrap();
    write_reg(&mut g.t, 0x50, 3);
    wait_for("the reports back", || vqs[3].used().idx().load() == 2);
    assert!(g.released(0x20_0000, 0x10_0000));
    assert_eq!(g.zeros(0x30_0000, page), 0, "the ragged head of the unaligned range stays");
    assert!(g.released(0x30_0000 + page as u64, page), "its one whole page goes");
    assert_eq!(g.zeros(0x3f_f000, 0x1000), 0, "the straddling range is untouched");
    assert_eq!(g.handle.released(), 0x10_0000 + page as u64);
    let counted = DeviceStats {
        requests: 2,
        rx_bytes: 0,
        tx_bytes: 0x10_0000 + page as u64,
        errors: 2,
        ..DeviceStats::default()
    };
    assert_eq!(g.counted(), counted, "two reports, each with a range outside RAM");
}

#[test]
fn statistics_are_read_kept_and_asked_for_again() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    let vqs = started(&mut g, &m);
    let entry = |tag: u16, value: u64| [tag.to_le_bytes().as_slice(), &value.to_le_bytes()].concat();
    let buf = [entry(MEMFREE, 300 << 20), entry(MEMTOT, 512 << 20)].concat();
    g.m.write_slice(&buf, GuestAddress(0x1000)).unwrap();
    vqs[2].add_desc_chains(&[desc(0x1000, buf.len() as u32, 0)], 0).unwrap();
    write_reg(&mut g.t, 0x50, 2);
    wait_for("the statistics", || g.handle.stats().is_some());
    let stats = g.handle.stats().unwrap();
    assert_eq!((stats.free_memory(), stats.total_memory()), (Some(300 << 20), Some(512 << 20)));
    wait_for("the buffer handed back after the interval", || vqs[2].used().idx().load() == 1);
    // A malformed refill: a partial entry, then a device-writable buffer.
    g.m.write_slice(&entry(MEMFREE, 7)[..9], GuestAddress(0x2000)).unwrap();
    vqs[2].add_desc_chains(&[chained(0x1000, 10, 0, 2), desc(0x2000, 9, 0)], 1).unwrap();
    write_reg(&mut g.t, 0x50, 2);
    wait_for("the second buffer back", || vqs[2].used().idx().load() == 2);
    assert_eq!(g.handle.stats().unwrap().free_memory(), Some(300 << 20), "the whole entry only");
    vqs[2].add_desc_chains(&[desc(0x1000, 10, W)], 3).unwrap();
    write_reg(&mut g.t, 0x50, 2);
    wait_for("the writable buffer back", || vqs[2].used().idx().load() == 3);
    assert_eq!(g.handle.stats().unwrap(), super::Stats::default(), "nothing read from it");
    let counted = g.counted();
    assert_eq!((counted.requests, counted.errors), (3, 2), "the partial entry and the writable buffer are errors");
}

#[test]
fn the_host_target_reaches_the_driver_and_actual_comes_back() {
    let mut g = Guest::new(BalloonOptions { initial_target: 8 << 20, ..all_on() });
    assert_eq!(g.config(0), 2048, "the initial target");
    assert_eq!(g.handle.set_target(64 << 20), 16384);
    assert_eq!(g.config(0), 16384, "num_pages, before the driver starts");
    assert!(!g.line.high(), "no driver, no interrupt");
    let m = g.m.clone();
    let vqs = queues(&m, 4);
    start(&mut g.t, &vqs.iter().collect::<Vec<_>>());
    g.handle.set_target((128 << 20) + 100);
    assert_eq!(g.config(0), 32768);
    assert_eq!(read_reg(&mut g.t, 0x60) & 2, 2, "a configuration-change interrupt");
    assert!(g.line.high());
    write_reg(&mut g.t, 0x104, 1000);
    assert_eq!(g.handle.actual(), 1000 * 4096);
    assert_eq!(g.config(4), 1000);
    // The driver cannot write num_pages, nor past the config.
    write_reg(&mut g.t, 0x100, 5);
    write_reg(&mut g.t, 0x108, 5);
    assert_eq!((g.config(0), g.config(4), g.config(8)), (32768, 1000, 0));
    assert_eq!(g.handle.set_target(u64::MAX), u32::MAX);
    // A reset empties the balloon.
    write_reg(&mut g.t, 0x70, 0);
    assert_eq!(g.handle.actual(), 0);
}

#[test]
fn too_few_queues_fail_the_start() {
    let mut g = Guest::new(all_on());
    let m = g.m.clone();
    let vqs = queues(&m, 3);
    write_reg(&mut g.t, 0x70, 0);
    // Statistics and reporting negotiated, but the reporting queue was never set up.
    write_reg(&mut g.t, 0x70, 1);
    write_reg(&mut g.t, 0x70, 3);
    for sel in 0..2 {
        write_reg(&mut g.t, 0x14, sel);
        let offered = read_reg(&mut g.t, 0x10);
        write_reg(&mut g.t, 0x24, sel);
        write_reg(&mut g.t, 0x20, offered);
    }
    write_reg(&mut g.t, 0x70, 11);
    for (index, vq) in vqs.iter().enumerate() {
        write_reg(&mut g.t, 0x30, index as u32);
        write_reg(&mut g.t, 0x38, 16);
        for (low, addr) in [(0x80, vq.desc_table_addr()), (0x90, vq.avail_addr()), (0xa0, vq.used_addr())] {
            write_reg(&mut g.t, low, addr.0 as u32);
            write_reg(&mut g.t, low + 4, (addr.0 >> 32) as u32);
        }
        write_reg(&mut g.t, 0x44, 1);
    }
    write_reg(&mut g.t, 0x70, 15);
    assert_eq!(read_reg(&mut g.t, 0x70) & 0x40, 0x40, "DEVICE_NEEDS_RESET");
}

#[test]
fn a_runaway_available_index_needs_a_reset_and_the_device_works_again() {
    let g = Guest::new(all_on());
    let (m, handle) = (g.m.clone(), g.handle.clone());
    let mut t = a_runaway_index_needs_reset(g.t, &m, 4, 3, 40);
    let vqs = queues(&m, 4);
    start(&mut t, &vqs.iter().collect::<Vec<_>>());
    m.write_slice(&[0xa5; 0x1000], GuestAddress(0x20_0000)).unwrap();
    vqs[3].add_desc_chains(&[desc(0x20_0000, 0x1000, W)], 0).unwrap();
    write_reg(&mut t, 0x50, 3);
    wait_for("the report back", || vqs[3].used().idx().load() == 1);
    assert_eq!(handle.released(), 0x1000);
}

#[test]
fn the_target_and_the_guests_balloon_carry_over_a_restore() {
    let mut g = Guest::new(BalloonOptions::default());
    let m = g.m.clone();
    let _vqs = started(&mut g, &m);
    g.handle.set_target(8 << 20);
    write_reg(&mut g.t, 0x104, 1000);
    let saved = g.t.save().unwrap();
    assert_eq!(g.handle.actual(), 0, "a stopped device holds nothing until it is restored");

    let mut again = Guest::new(BalloonOptions::default());
    again.m = g.m.clone();
    again.t = MmioTransport::new(
        Box::new(Balloon::new(BalloonOptions::default()).0),
        g.m.clone(),
        Interrupt::new(again.line.clone()),
    )
    .unwrap();
    again.t.restore(&saved).unwrap();
    assert_eq!(again.config(0), 2048, "the target, in 4 KiB pages");
    assert_eq!(again.config(4), 1000, "what the guest's balloon holds");

    let mut bad = saved;
    bad.device.pop();
    let e = again.t.restore(&bad).unwrap_err().to_string();
    assert!(e.contains("7 bytes of state, virtio-balloon's is 8"), "{e}");
}

/// From the review of issue 18: the queues a driver leaves off (no statistics, no
/// reporting) were saved with size 0, which no restore takes.
#[test]
fn a_balloon_whose_driver_left_queues_off_restores() {
    let options = BalloonOptions { free_page_reporting: false, stats_interval: None, ..BalloonOptions::default() };
    let mut g = Guest::new(options);
    let m = g.m.clone();
    let vqs = queues(&m, 2);
    start(&mut g.t, &vqs.iter().collect::<Vec<_>>());
    let saved = g.t.save().unwrap();
    assert!(!saved.queues[3].ready && saved.queues[3].size > 0);
    let line = Arc::new(Line::default());
    let mut again = MmioTransport::new(Box::new(Balloon::new(options).0), m.clone(), Interrupt::new(line)).unwrap();
    again.restore(&saved).unwrap();
    assert_eq!(read_reg(&mut again, 0x70), 15, "started again");
}
