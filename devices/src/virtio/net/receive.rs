//! Frames from the backend into the guest's receive buffers.
//!
//! A frame is read straight into the buffers of the chains the driver made available, in
//! one vectored call ([`NetBackend::recv_guest`]): enough chains for the frame when the
//! backend can say how long it is ([`NetBackend::peek_len`]: a datagram socket, a
//! stream's length prefix), else enough for a frame as long as the recent ones (a tap),
//! with a host buffer after them for what overflows. A frame that overflows them, a
//! backend that cannot receive in place, or chains that cannot be expressed as `iovec`s
//! take the copying path: the frame goes into a buffer of the device's, then across as
//! many chains as it needs.

use std::io::ErrorKind;
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;

use super::backend::{NetBackend, VNET_HDR_LEN};
use super::frames::{capacity, MAX_FRAME};
use super::QUEUE_SIZE;
use crate::virtio::counters::DeviceCounters;
use crate::virtio::iovec::{GuestIovecs, IovecBuf};
use crate::virtio::{write_chain, write_chain_at, Chain, Chains};
use crate::warn_ratelimited;

const NAME: &str = "virtio-net";
/// The most receives in a row that bring no frame before the device waits for the
/// backend's next readiness.
const MAX_FRUITLESS_RECEIVES: u32 = 64;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS: usize = 10;
/// The room gathered at first for a frame whose length the backend cannot tell: a
/// full-size ethernet frame with a VLAN tag, and the header.
const FIRST_EXPECT: usize = VNET_HDR_LEN + 1518;
/// The most chains one frame takes (with MRG_RXBUF; one without).
const MOST_CHAINS: usize = QUEUE_SIZE as usize;

/// The receive side's state: a frame in hand, and what the in-place path reuses.
pub(super) struct Receiver {
    /// A frame waiting for buffers on the copying path: `buf[..len]`, its header first.
    buf: Vec<u8>,
    len: usize,
    /// The host buffer after the guest's, for what overflows them.
    overflow: Vec<u8>,
    /// The pieces of the guest's buffers.
    iov: IovecBuf,
    /// The chains taken for a frame read in place: head and room.
    taken: Vec<(u16, usize)>,
    /// How much room to gather for a frame whose length the backend cannot tell: as much
    /// as the recent frames took (up at once, down slowly).
    expect: usize,
    /// The backend receives in place (false once it said it cannot).
    in_place: bool,
    /// Frames delivered and dropped, for metrics.
    counters: Arc<DeviceCounters>,
}

/// What one attempt at a frame came to.
enum Step {
    /// A frame was delivered, dropped, or is in hand for the copying path.
    Done,
    /// Nothing came of it; try again, up to [`MAX_FRUITLESS_RECEIVES`] times.
    Fruitless,
    /// Nothing to do until the backend or the driver has more.
    Wait,
    /// Take the copying path for this frame.
    Copy,
}

/// What became of a frame on the copying path.
enum Delivery {
    Delivered,
    /// Not enough guest buffers: the frame waits.
    NoBuffers,
    Dropped,
}

impl Receiver {
    pub(super) fn new(counters: Arc<DeviceCounters>) -> Self {
        Receiver {
            buf: vec![0; MAX_FRAME],
            len: 0,
            overflow: vec![0; MAX_FRAME],
            iov: IovecBuf::new(),
            taken: Vec::with_capacity(MOST_CHAINS),
            expect: FIRST_EXPECT,
            in_place: true,
            counters,
        }
    }

    /// Forgets the frame in hand (the driver that would have taken it reset the device).
    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    /// Moves frames from the backend into the guest's buffers until either runs out.
    pub(super) fn receive(
        &mut self,
        backend: &mut dyn NetBackend,
        memory: &GuestMemoryMmap,
        rx: &mut Chains<'_, '_>,
        mergeable: bool,
    ) {
        // Receives that bring no frame (a short one, an interruption): a backend that does
        // only that (an embedder's, say) must not keep the device's thread here for ever.
        let mut fruitless = 0u32;
        loop {
            if self.len > 0 {
                match self.deliver(memory, rx, mergeable) {
                    Delivery::NoBuffers => return,
                    Delivery::Delivered | Delivery::Dropped => self.len = 0,
                }
                continue;
            }
            if fruitless == MAX_FRUITLESS_RECEIVES {
                warn_ratelimited!("{NAME}: the backend keeps returning no frame; receiving waits for its next wake");
                return;
            }
            let mut step =
                if self.in_place { self.receive_in_place(backend, memory, rx, mergeable) } else { Step::Copy };
            if matches!(step, Step::Copy) {
                step = self.receive_copy(backend);
            }
            match step {
                Step::Done | Step::Copy => {}
                Step::Fruitless => fruitless += 1,
                Step::Wait => return,
            }
        }
    }

    /// Reads the next frame straight into the guest's buffers.
    fn receive_in_place(
        &mut self,
        backend: &mut dyn NetBackend,
        memory: &GuestMemoryMmap,
        rx: &mut Chains<'_, '_>,
        mergeable: bool,
    ) -> Step {
        let vnet = backend.vnet_hdr();
        // What the backend gives comes after the header the device writes, if any.
        let hdr = if vnet { 0 } else { VNET_HDR_LEN };
        let Receiver { iov: spill, overflow, taken, expect, .. } = self;
        let mut iov = GuestIovecs::with_spill(spill);
        taken.clear();
        let (mut room, mut first, mut ran_dry) = (0usize, None::<Chain<'_>>, false);
        // The frame's length, once the first chain is taken and cannot hold any frame:
        // so as to take the chains it needs, no more, no fewer.
        let mut exact = None;
        let mut want = *expect;
        while taken.is_empty() || (mergeable && room < want && taken.len() < MOST_CHAINS) {
            let Some(chain) = rx.next() else {
                ran_dry = true;
                break;
            };
            let head = chain.head_index();
            // The first chain holds the header whole (the device writes its last field).
            let skip = if taken.is_empty() { hdr } else { 0 };
            match iov.push_uniform_chain(memory, chain.clone(), true, skip, usize::MAX) {
                Some(bytes) if !taken.is_empty() || bytes + skip >= VNET_HDR_LEN => {
                    taken.push((head, bytes + skip));
                    room += bytes + skip;
                    first.get_or_insert(chain);
                }
                // For the copying path, which says what is wrong with it, if anything.
                _ => {
                    rx.put_back(1);
                    break;
                }
            }
            if mergeable && taken.len() == 1 && room < MAX_FRAME {
                match backend.peek_len() {
                    // Not trusted: a length past the largest frame is read as not known.
                    Some(Ok(n)) => exact = n.checked_add(hdr).filter(|&n| n <= MAX_FRAME),
                    Some(Err(e)) => {
                        rx.put_back(1);
                        return failed(&e, &self.counters);
                    }
                    None => {}
                }
                want = exact.unwrap_or(want);
            }
        }
        let count = taken.len();
        let Some(first) = first else { return if ran_dry { Step::Wait } else { Step::Copy } };
        if exact.is_some_and(|need| room < need) {
            rx.put_back(count);
            // Too few buffers: the frame waits in the backend for more.
            return if ran_dry { Step::Wait } else { Step::Copy };
        }
        // The guest's buffers take `guest` bytes of what the backend gives; a host buffer
        // after them takes the rest of the largest frame.
        let guest = room.min(MAX_FRAME) - hdr;
        iov.truncate(guest);
        let spare = MAX_FRAME - hdr - guest;
        if spare > 0 && !iov.push_overflow(&mut overflow[..spare]) {
            drop(iov);
            rx.put_back(count);
            return Step::Copy;
        }
        let n = match backend.recv_guest(&iov) {
            Some(Ok(n)) if n > iov.len() => {
                warn_ratelimited!("{NAME}: the backend says it received {n} bytes into {}; dropped", iov.len());
                self.counters.error();
                rx.put_back(count);
                return Step::Fruitless;
            }
            Some(Ok(n)) if vnet && n < VNET_HDR_LEN => {
                rx.put_back(count);
                return Step::Fruitless;
            }
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                rx.put_back(count);
                return failed(&e, &self.counters);
            }
            None => {
                drop(iov);
                rx.put_back(count);
                self.in_place = false;
                return Step::Copy;
            }
        };
        let total = n + hdr;
        *expect = if total >= *expect { total } else { *expect - (*expect - total) / 8 };
        *expect = (*expect).max(FIRST_EXPECT);

        if n <= guest {
            // In the guest's buffers: give back as many as it took, then the rest go back.
            let mut used = 0;
            let mut buffers = 0;
            while used < total {
                used += self.taken[buffers].1;
                buffers += 1;
            }
            rx.put_back(count - buffers);
            let mut header = [0u8; VNET_HDR_LEN];
            header[NUM_BUFFERS..].copy_from_slice(&(buffers as u16).to_le_bytes());
            let from = if vnet { NUM_BUFFERS } else { 0 };
            write_chain_at(NAME, memory, first, from, &header[from..]);
            self.counters.request((total - VNET_HDR_LEN) as u64, 0);
            let mut left = total;
            for &(head, room) in &self.taken[..buffers] {
                let n = room.min(left);
                left -= n;
                if !rx.give_back(head, n as u32) {
                    break;
                }
            }
        } else if mergeable {
            // More than the buffers taken (its length could not be told): the frame goes
            // the copying path, which takes as many buffers as it needs, when there are.
            self.buf[..hdr].fill(0);
            iov.read_bytes(0, &mut self.buf[hdr..hdr + guest]);
            drop(iov);
            self.buf[hdr + guest..total].copy_from_slice(&self.overflow[..n - guest]);
            self.len = total;
            rx.put_back(count);
        } else {
            warn_ratelimited!("{NAME}: receive buffers too small or malformed; a {total}-byte frame is dropped");
            self.counters.request(0, 0);
            self.counters.error();
            rx.give_back(self.taken[0].0, 0);
        }
        Step::Done
    }

    /// Reads the next frame into the device's own buffer.
    fn receive_copy(&mut self, backend: &mut dyn NetBackend) -> Step {
        let vnet = backend.vnet_hdr();
        let buf = if vnet { &mut self.buf[..] } else { &mut self.buf[VNET_HDR_LEN..] };
        let room = buf.len();
        match backend.recv(buf) {
            Ok(n) if n > room => {
                warn_ratelimited!("{NAME}: the backend says it received {n} bytes into {room}; dropped");
                self.counters.error();
                Step::Fruitless
            }
            Ok(n) if vnet && n < VNET_HDR_LEN => Step::Fruitless,
            Ok(n) => {
                self.len = if vnet { n } else { n + VNET_HDR_LEN };
                if !vnet {
                    self.buf[..VNET_HDR_LEN].fill(0);
                }
                Step::Done
            }
            Err(e) => failed(&e, &self.counters),
        }
    }

    /// Copies the frame in hand into as many receive buffers as it needs (one without
    /// MRG_RXBUF), setting the header's `num_buffers`.
    fn deliver(&mut self, memory: &GuestMemoryMmap, rx: &mut Chains<'_, '_>, mergeable: bool) -> Delivery {
        let len = self.len;
        let most = if mergeable { MOST_CHAINS } else { 1 };
        let mut picked: [Option<(Chain<'_>, usize)>; MOST_CHAINS] = [const { None }; MOST_CHAINS];
        let (mut count, mut room) = (0usize, 0usize);
        while room < len {
            let Some(chain) = rx.next() else {
                // Back to the ring for when the driver has added more.
                rx.put_back(count);
                return Delivery::NoBuffers;
            };
            let capacity = capacity(memory, &chain);
            picked[count] = Some((chain, capacity));
            count += 1;
            room += capacity;
            // The first chain holds the header whole (spec 5.1.6.3.1: with MRG_RXBUF
            // every buffer is at least a header; the in-place path asks the same).
            let headless = count == 1 && capacity < VNET_HDR_LEN;
            if capacity == 0 || headless || (count == most && room < len) {
                // Malformed or too small: the frame is dropped and the buffers go back empty.
                warn_ratelimited!("{NAME}: receive buffers too small or malformed; a {len}-byte frame is dropped");
                self.counters.request(0, 0);
                self.counters.error();
                for (chain, _) in picked[..count].iter().flatten() {
                    rx.give_back(chain.head_index(), 0);
                }
                return Delivery::Dropped;
            }
        }
        self.buf[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&(count as u16).to_le_bytes());
        let mut at = 0usize;
        for (chain, capacity) in picked[..count].iter_mut().filter_map(Option::take) {
            let head = chain.head_index();
            let n = capacity.min(len - at);
            // Within the capacity checked above, so it all fits.
            write_chain(NAME, memory, chain, &self.buf[at..at + n]);
            at += n;
            rx.give_back(head, n as u32);
        }
        self.counters.request(len.saturating_sub(VNET_HDR_LEN) as u64, 0);
        Delivery::Delivered
    }
}

/// What a failed receive means for the loop.
/// A frame dropped or a receive that failed counts an error.
fn failed(e: &std::io::Error, counters: &DeviceCounters) -> Step {
    match e.kind() {
        ErrorKind::WouldBlock => Step::Wait,
        ErrorKind::Interrupted => Step::Fruitless,
        // A frame too long for any buffers: it is gone, the next may do.
        ErrorKind::InvalidData => {
            warn_ratelimited!("{NAME}: frame dropped: {e}");
            counters.error();
            Step::Fruitless
        }
        _ => {
            warn_ratelimited!("{NAME}: receive failed: {e}");
            counters.error();
            Step::Wait
        }
    }
}

#[cfg(test)]
mod tests;
