//! The balloon's queue work, run by a [`Worker`](crate::virtio::worker::Worker) while the
//! driver has the device started: inflate and deflate arrays of page frame numbers, free
//! page reports, and the statistics buffer the device keeps until it wants fresh numbers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::Registry;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::release::{self, Advice, Range};
use super::stats::{self, ENTRY_SIZE, MAX_ENTRIES};
use super::{bump, lock, QueueMap, Shared, DEFLATE, INFLATE, NAME};
use crate::virtio::worker::Handler;
use crate::virtio::{check_notified, drain_queue, give_back, next_chain, notify_driver, Chain, GuestMemory, Interrupt};
use crate::warn_ratelimited;

/// The most page frame numbers read from one inflate or deflate chain (Linux sends at
/// most 256); the rest of a longer chain is ignored.
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// The most ranges taken from one reporting chain (Linux reports at most 32 at a time).
pub const MAX_REPORTED_RANGES: usize = 256;
/// When an interval too long for the clock is due instead.
const FAR: Duration = Duration::from_secs(24 * 3600);

struct Running {
    memory: GuestMemory,
    /// The driver's queues, by index (see [`QueueMap`]).
    queues: Vec<Queue>,
    map: QueueMap,
    interrupt: Interrupt,
    /// The statistics buffer the device holds, and when to hand it back for fresh ones.
    stats_held: Option<(u16, Instant)>,
}

/// What the balloon's worker runs.
pub(super) struct Engine {
    shared: Arc<Shared>,
    stats_interval: Option<Duration>,
    page: u64,
    running: Option<Running>,
    /// Reused buffers: a chain's bytes, its page frame numbers, their ranges.
    bytes: Vec<u8>,
    pfns: Vec<u32>,
    ranges: Vec<Range>,
}

impl Engine {
    pub(super) fn new(shared: Arc<Shared>, stats_interval: Option<Duration>) -> Self {
        Engine {
            shared,
            stats_interval,
            page: release::host_page_size(),
            running: None,
            bytes: Vec::new(),
            pfns: Vec::new(),
            ranges: Vec::new(),
        }
    }

    pub(super) fn attach(&mut self, memory: GuestMemory, queues: Vec<Queue>, map: QueueMap, interrupt: Interrupt) {
        self.running = Some(Running { memory, queues, map, interrupt, stats_held: None });
    }

    /// Serves the queues whose bits are set in `notified`.
    fn serve(&mut self, notified: u32) {
        let Some(mut run) = self.running.take() else { return };
        let held = Arc::clone(&run.memory);
        let memory = held.memory();
        {
            let queues: Vec<&Queue> = run.queues.iter().collect();
            check_notified(NAME, notified, &queues, memory, &run.interrupt);
        }
        let bit = |index: u16| notified & (1u32 << index) != 0;
        if bit(INFLATE) {
            self.pages(memory, &mut run, INFLATE, Advice::Release);
        }
        if bit(DEFLATE) {
            self.pages(memory, &mut run, DEFLATE, Advice::Reuse);
        }
        if let Some(index) = run.map.reporting.filter(|&i| bit(i)) {
            self.reports(memory, &mut run, index);
        }
        if let Some(index) = run.map.stats.filter(|&i| bit(i)) {
            self.take_stats(memory, &mut run, index);
        }
        self.running = Some(run);
    }

    /// Inflate or deflate: each chain an array of 4 KiB page frame numbers.
    fn pages(&mut self, memory: &GuestMemoryMmap, run: &mut Running, index: u16, advice: Advice) {
        let Some(queue) = run.queues.get_mut(usize::from(index)) else { return };
        let (bytes, pfns, ranges, page) = (&mut self.bytes, &mut self.pfns, &mut self.ranges, self.page);
        let counters = &self.shared.counters;
        let served = match advice {
            Advice::Release => &self.shared.inflates,
            Advice::Reuse => &self.shared.deflates,
        };
        drain_queue(NAME, queue, memory, &run.interrupt, |chain| {
            let mut whole = read_readable(memory, chain, MAX_PFNS_PER_CHAIN * 4, bytes);
            if bytes.len() % 4 != 0 {
                warn_ratelimited!("{NAME}: a page array of {} bytes; the partial entry is ignored", bytes.len());
                whole = false;
            }
            pfns.clear();
            pfns.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            release::coalesce(pfns, ranges);
            let done = apply_all(memory, ranges, advice, page);
            match advice {
                Advice::Release => counters.request(0, done.advised),
                Advice::Reuse => counters.request(done.accepted, 0),
            }
            bump(served);
            if !whole || done.refused > 0 {
                counters.error();
            }
            0
        });
    }

    /// Free page reporting: each descriptor of a chain a guest-physical range of free
    /// memory (Linux posts them device-writable; the device writes nothing).
    fn reports(&mut self, memory: &GuestMemoryMmap, run: &mut Running, index: u16) {
        let Some(queue) = run.queues.get_mut(usize::from(index)) else { return };
        let (ranges, page, shared) = (&mut self.ranges, self.page, &self.shared);
        drain_queue(NAME, queue, memory, &run.interrupt, |chain| {
            ranges.clear();
            let mut whole = true;
            for desc in chain {
                if ranges.len() == MAX_REPORTED_RANGES {
                    warn_ratelimited!(
                        "{NAME}: a report of more than {MAX_REPORTED_RANGES} ranges; the rest is ignored"
                    );
                    whole = false;
                    break;
                }
                ranges.push(Range { start: desc.addr().0, len: u64::from(desc.len()) });
            }
            let done = apply_all(memory, ranges, Advice::Release, page);
            shared.counters.request(0, done.advised);
            bump(&shared.free_page_reports);
            if !whole || done.refused > 0 {
                shared.counters.error();
            }
            0
        });
    }

    /// Takes the statistics buffer the driver posted, reads it, and keeps it until the
    /// next interval. A driver that posts another while the device holds one gets the
    /// older back at once (Linux keeps one in flight).
    fn take_stats(&mut self, memory: &GuestMemoryMmap, run: &mut Running, index: u16) {
        let Some(queue) = run.queues.get_mut(usize::from(index)) else { return };
        let used_from = queue.next_used();
        while let Some(chain) = next_chain(NAME, queue, memory, &run.interrupt) {
            let head = chain.head_index();
            let whole = read_readable(memory, chain, MAX_ENTRIES * ENTRY_SIZE + 1, &mut self.bytes);
            let (stats, malformed) = stats::parse(&self.bytes);
            if malformed {
                warn_ratelimited!("{NAME}: a malformed statistics buffer of {} bytes", self.bytes.len());
            }
            self.shared.counters.request(0, 0);
            bump(&self.shared.stats_updates);
            if malformed || !whole {
                self.shared.counters.error();
            }
            *lock(&self.shared.stats) = Some(stats);
            let interval = self.stats_interval.unwrap_or(super::DEFAULT_STATS_INTERVAL);
            let now = Instant::now();
            let due = now.checked_add(interval).or_else(|| now.checked_add(FAR)).unwrap_or(now);
            if let Some((older, _)) = run.stats_held.replace((head, due)) {
                if !give_back(NAME, queue, memory, older, 0) {
                    break;
                }
            }
        }
        notify_driver(NAME, queue, memory, &run.interrupt, used_from);
    }

    /// Hands the held statistics buffer back if its time has come: the driver refills it.
    fn return_stats(&mut self) {
        let Some(run) = self.running.as_mut() else { return };
        let (Some(index), Some((head, due))) = (run.map.stats, run.stats_held) else { return };
        if Instant::now() < due {
            return;
        }
        run.stats_held = None;
        let memory = run.memory.memory();
        let Some(queue) = run.queues.get_mut(usize::from(index)) else { return };
        let used_from = queue.next_used();
        if give_back(NAME, queue, memory, head, 0) {
            notify_driver(NAME, queue, memory, &run.interrupt, used_from);
        }
    }
}

/// Replaces `out` with the bytes of the chain's device-readable descriptors, at most
/// `limit` of them; device-writable descriptors and buffers not wholly inside guest memory
/// end the chain (logged). Returns false when the chain ended that way (bytes past
/// `limit` are not an error: the caller decides).
fn read_readable(memory: &GuestMemoryMmap, chain: Chain<'_>, limit: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    for desc in chain {
        if desc.is_write_only() {
            warn_ratelimited!("{NAME}: device-writable descriptor where the device reads; chain ends");
            return false;
        }
        if !memory.check_range(desc.addr(), desc.len() as usize) {
            warn_ratelimited!(
                "{NAME}: buffer at {:#x} (+{:#x}) is outside guest memory; chain ends",
                desc.addr().0,
                desc.len()
            );
            return false;
        }
        let n = (desc.len() as usize).min(limit - out.len());
        let at = out.len();
        out.resize(at + n, 0);
        if memory.read_slice(&mut out[at..], desc.addr()).is_err() {
            warn_ratelimited!("{NAME}: buffer at {:#x} cannot be read; chain ends", desc.addr().0);
            out.truncate(at);
            return false;
        }
        if out.len() == limit {
            break;
        }
    }
    true
}

/// What [`apply_all`] did with a request's ranges.
#[derive(Debug, Default)]
struct Applied {
    /// Bytes of host memory advised (released, or taken back on macOS).
    advised: u64,
    /// Bytes of the ranges inside RAM that the host took the advice for.
    accepted: u64,
    /// Ranges ignored: outside RAM, or refused by the host.
    refused: usize,
}

/// Applies `advice` to every range; ranges outside guest RAM are skipped with one
/// rate-limited log for the lot.
fn apply_all(memory: &GuestMemoryMmap, ranges: &[Range], advice: Advice, page: u64) -> Applied {
    let mut done = Applied::default();
    for &range in ranges {
        match release::apply(memory, range, advice, page) {
            Ok(n) => {
                done.advised += n;
                done.accepted += range.len;
            }
            Err(e) => {
                done.refused += 1;
                if done.refused == 1 {
                    warn_ratelimited!("{NAME}: {e}; ignored");
                }
            }
        }
    }
    if done.refused > 1 {
        warn_ratelimited!("{NAME}: {} ranges of one request ignored", done.refused);
    }
    done
}

impl Handler for Engine {
    fn register(&mut self, _registry: &Registry) -> std::io::Result<()> {
        Ok(())
    }

    fn notified(&mut self, _registry: &Registry, queues: u32) {
        self.serve(queues);
        self.return_stats();
    }

    fn ready(&mut self, _registry: &Registry, _event: &Event) {}

    fn deregister(&mut self, _registry: &Registry) {}

    fn detach(&mut self) {
        self.running = None;
    }

    fn next_timeout(&self) -> Option<Duration> {
        let (_, due) = self.running.as_ref()?.stats_held?;
        Some(due.saturating_duration_since(Instant::now()))
    }

    fn timeout(&mut self, _registry: &Registry) {
        self.return_stats();
    }
}
