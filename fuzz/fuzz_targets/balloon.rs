//! virtio-balloon's guest-facing arithmetic: the statistics buffer parser
//! (`balloon::stats::parse`), the page frame numbers of an inflate or deflate turned into
//! ranges (`release::coalesce`), and a range (from PFNs or a free page report) checked
//! against guest RAM and rounded to host pages (`release::plan`), on a machine of two RAM
//! regions with a hole between them and host pages of 4, 16 and 64 KiB.
//!
//! Oracles: no panic; the ranges cover exactly the distinct frames given, sorted, apart
//! and page-sized; a planned range is accepted only when it lies wholly in one region,
//! and what is released lies inside it and is whole host pages, what is taken back lies
//! inside the region's mapping, is whole host pages and covers the range.

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use devices::virtio::balloon::release::{coalesce, host_range, plan, Advice, Range, PFN_SHIFT};
use devices::virtio::balloon::stats;
use vm_memory::GuestAddress;

/// Two RAM regions, a 64 KiB hole between them.
const REGIONS: [(u64, usize); 2] = [(0x4000_0000, 1 << 20), (0x4011_0000, 2 << 20)];

#[derive(Arbitrary, Debug)]
enum Input {
    Stats(Vec<u8>),
    Pfns(Vec<u32>),
    Plan { start: u64, len: u64, reuse: bool, page: u8 },
}

fuzz_target!(|input: Input| match input {
    Input::Stats(bytes) => {
        let _ = stats::parse(&bytes);
    }
    Input::Pfns(mut pfns) => {
        pfns.truncate(4096);
        let distinct: BTreeSet<u64> = pfns.iter().map(|&p| u64::from(p)).collect();
        let mut ranges = Vec::new();
        coalesce(&mut pfns, &mut ranges);
        let mut covered = 0;
        let mut previous_end = None;
        for r in &ranges {
            assert!(r.len > 0 && r.len % (1 << PFN_SHIFT) == 0 && r.start % (1 << PFN_SHIFT) == 0, "{r:?}");
            if let Some(end) = previous_end {
                assert!(r.start > end, "ranges sorted and apart: {ranges:?}");
            }
            previous_end = Some(r.start + r.len);
            let (first, count) = (r.start >> PFN_SHIFT, r.len >> PFN_SHIFT);
            assert!((first..first + count).all(|pfn| distinct.contains(&pfn)), "{r:?} covers a frame not given");
            covered += count;
        }
        assert_eq!(covered, distinct.len() as u64, "every frame given is covered once");
    }
    Input::Plan { start, len, reuse, page } => {
        let page = [4096u64, 16 << 10, 64 << 10][usize::from(page % 3)];
        let regions: Vec<_> = REGIONS.iter().map(|&(at, size)| (GuestAddress(at), size)).collect();
        let Ok(ram) = guest_memory::GuestRam::new(&regions) else { return };
        let range = Range { start, len };
        let advice = if reuse { Advice::Reuse } else { Advice::Release };
        let inside = len > 0
            && REGIONS
                .iter()
                .any(|&(at, size)| start >= at && start.checked_add(len).is_some_and(|e| e <= at + size as u64));
        match plan(&ram, range, advice, page) {
            Err(_) => assert!(!inside, "{range:?} is in RAM"),
            Ok(None) => assert!(len == 0 || inside),
            Ok(Some((host, host_len))) => {
                assert!(inside, "{range:?} is not in one region");
                let (first, (lo, hi)) = host_range(&ram, range).expect("inside");
                assert!(host % page == 0 && host_len % page == 0 && host_len > 0);
                if reuse {
                    assert!(host >= lo && host + host_len <= hi, "inside the region's mapping");
                    assert!(host <= first.max(lo) && host + host_len >= (first + len).min(hi), "covers the range");
                } else {
                    assert!(host >= first && host + host_len <= first + len, "inside the range");
                }
            }
        }
    }
});
