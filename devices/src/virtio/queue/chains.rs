//! [`Chains`]: a device's pass over one queue, cheaper per chain than [`next_chain`] and
//! [`give_back`](super::give_back), with the same checks.

use std::sync::atomic::Ordering;

use guest_memory::GuestMemoryMmap;
use virtio_queue::{AvailIter, Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

#[cfg(doc)]
use super::next_chain;
use super::{available, notify_driver, Chain};
use crate::virtio::Interrupt;
use crate::warn_ratelimited;

/// A device's pass over one queue: the chains the driver made available, taken in order,
/// given back or returned to the ring untouched. Dropping it interrupts the driver if it
/// asked to be.
///
/// Two ways to take chains: [`Chains::next`], one at a time, and [`Chains::batch`], all
/// those available at one look at the available index, which is cheaper per chain:
/// `virtio-queue` reads that index each time it is asked for one chain, and each read
/// goes through guest memory's region lookup.
///
/// The checks are those of [`next_chain`]: an available index more than a queue ahead,
/// or a head that is not a descriptor of the queue, fails the device (the chains before
/// such a head are still served, in order); an empty ring is looked at once more after
/// notifications are re-enabled, never more. The used ring is written through one view of
/// it checked when the pass starts (a ring that straddles two memory regions is written
/// the slow way), its index published after every chain.
pub struct Chains<'q, 'm> {
    device: &'q str,
    queue: &'q mut Queue,
    memory: &'m GuestMemoryMmap,
    interrupt: &'q Interrupt,
    used: UsedRing<'m>,
    used_from: u16,
    /// The device failed, or the used ring cannot be written: nothing more is taken.
    stopped: bool,
}

/// The chains available at one look at the available index (see [`Chains::batch`]).
pub struct Batch<'p, 'm> {
    device: &'p str,
    interrupt: &'p Interrupt,
    entries: AvailIter<'p, &'m GuestMemoryMmap>,
    size: u16,
    used: &'p mut UsedRing<'m>,
    stopped: &'p mut bool,
}

/// The used ring, written by the device.
struct UsedRing<'m> {
    memory: &'m GuestMemoryMmap,
    addr: GuestAddress,
    size: u16,
    /// The ring (flags, index, entries), when it lies in one memory region.
    view: Option<VolatileSlice<'m>>,
    /// The device's next used index.
    next: u16,
}

impl std::fmt::Debug for Chains<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chains").field("device", &self.device).field("stopped", &self.stopped).finish()
    }
}

impl std::fmt::Debug for Batch<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("device", &self.device).finish_non_exhaustive()
    }
}

impl<'q, 'm> Chains<'q, 'm> {
    /// Starts a pass over `queue`; `device` names the device in logs.
    pub fn new(device: &'q str, queue: &'q mut Queue, memory: &'m GuestMemoryMmap, interrupt: &'q Interrupt) -> Self {
        let (addr, size) = (GuestAddress(queue.used_ring()), queue.size());
        // The ring's place was checked against guest memory when the driver made the
        // queue ready.
        let view = memory.get_slice(addr, 4 + 8 * usize::from(size)).ok();
        let used_from = queue.next_used();
        let used = UsedRing { memory, addr, size, view, next: used_from };
        Chains { device, queue, memory, interrupt, used, used_from, stopped: false }
    }

    /// The next chain the driver made available, or `None` when there is none (or the
    /// device failed). See [`next_chain`] for what fails the device.
    #[allow(clippy::should_implement_trait)] // not an iterator: `put_back` and `give_back` interleave
    pub fn next(&mut self) -> Option<Chain<'m>> {
        if self.stopped || self.interrupt.needs_reset() {
            return None;
        }
        for second_look in [false, true] {
            // `iter` reads and checks the available index (and, unlike
            // `pop_descriptor_chain`, logs nothing of its own when it is broken).
            let next = match self.queue.iter(self.memory) {
                Ok(mut entries) => entries.next(),
                Err(e) => {
                    self.broken(e);
                    return None;
                }
            };
            match &next {
                Some(chain) if head_ok(chain, self.queue.size(), self.device, self.interrupt, &mut self.stopped) => {
                    return next
                }
                Some(_) => return None,
                None if second_look || !self.look_again() => return None,
                None => {}
            }
        }
        None
    }

    /// The chains the driver has made available now, or `None` when there are none (after
    /// a second look) or the device failed. Call it again when the batch runs out: the
    /// driver may have added more meanwhile.
    pub fn batch(&mut self) -> Option<Batch<'_, 'm>> {
        if self.stopped || self.interrupt.needs_reset() {
            return None;
        }
        for second_look in [false, true] {
            match available(self.queue, self.memory) {
                Ok(0) if second_look => return None,
                Ok(0) => {
                    if !self.look_again() {
                        return None;
                    }
                }
                Ok(_) => {
                    if !self.queue.ready() || self.queue.avail_ring() == 0 {
                        self.broken(QueueError::QueueNotReady);
                        return None;
                    }
                    let (device, interrupt, size) = (self.device, self.interrupt, self.used.size);
                    // The index was just read and checked: this cannot fail but by a
                    // queue made unready under us, which `virtio-queue` reports.
                    return match self.queue.iter(self.memory) {
                        Ok(entries) => Some(Batch {
                            device,
                            interrupt,
                            size,
                            entries,

                            used: &mut self.used,
                            stopped: &mut self.stopped,
                        }),
                        Err(e) => {
                            warn_ratelimited!("{device}: queue error: {e}");
                            None
                        }
                    };
                }
                Err(why) => {
                    self.stopped = true;
                    self.interrupt.fail(self.device, format_args!("{why}"));
                    return None;
                }
            }
        }
        None
    }

    /// Re-enables notifications (with EVENT_IDX: the avail event moves up to where the
    /// device stopped); true if the driver added chains meanwhile.
    fn look_again(&mut self) -> bool {
        match self.queue.enable_notification(self.memory) {
            Ok(more) => more,
            Err(e) => {
                warn_ratelimited!("{}: queue error: {e}", self.device);
                false
            }
        }
    }

    /// Returns the last `n` chains taken to the ring untouched, to be taken again later
    /// (a frame the backend would not take, buffers too few for a frame).
    pub fn put_back(&mut self, n: usize) {
        // At most a queue's worth was taken (the available index was checked).
        let back = self.queue.next_avail().wrapping_sub(n as u16);
        self.queue.set_next_avail(back);
    }

    /// Returns chain `head` to the driver with `len` bytes written into it. False (with a
    /// rate-limited warning) when the used ring cannot take it; nothing more is taken
    /// then.
    pub fn give_back(&mut self, head: u16, len: u32) -> bool {
        let given = self.used.add(self.device, head, len);
        self.stopped |= !given;
        self.queue.set_next_used(self.used.next);
        given
    }

    /// The ring cannot be read from: the device fails, saying why.
    fn broken(&mut self, e: QueueError) {
        self.stopped = true;
        let why = match available(self.queue, self.memory) {
            Err(why) => why,
            Ok(_) => format!("the available ring cannot be read: {e}"),
        };
        self.interrupt.fail(self.device, format_args!("{why}"));
    }
}

impl Drop for Chains<'_, '_> {
    fn drop(&mut self) {
        self.queue.set_next_used(self.used.next);
        notify_driver(self.device, self.queue, self.memory, self.interrupt, self.used_from);
    }
}

impl<'m> Batch<'_, 'm> {
    /// The batch's next chain; `None` at its end, or when the device failed.
    #[inline]
    #[allow(clippy::should_implement_trait)] // not an iterator: `put_back` and `give_back` interleave
    pub fn next(&mut self) -> Option<Chain<'m>> {
        if *self.stopped {
            return None;
        }
        // Checked in place and returned as it came: a chain `virtio-queue` has just
        // written field by field, copied, is loaded in wider pieces than it was stored,
        // and the copy waits for the stores.
        let next = self.entries.next();
        if let Some(chain) = &next {
            if !head_ok(chain, self.size, self.device, self.interrupt, self.stopped) {
                return None;
            }
        }
        next
    }

    /// Returns the last `n` chains this batch handed out to the ring untouched.
    pub fn put_back(&mut self, n: usize) {
        for _ in 0..n {
            self.entries.go_to_previous_position();
        }
    }

    /// [`Chains::give_back`], within the batch.
    pub fn give_back(&mut self, head: u16, len: u32) -> bool {
        let given = self.used.add(self.device, head, len);
        *self.stopped |= !given;
        given
    }
}

/// Whether `chain`'s head is a descriptor of the queue; if not, the device fails.
#[inline]
fn head_ok(chain: &Chain<'_>, size: u16, device: &str, interrupt: &Interrupt, stopped: &mut bool) -> bool {
    let head = chain.head_index();
    if head >= size {
        interrupt.fail(device, format_args!("the driver offered descriptor {head} in a queue of {size}"));
        *stopped = true;
        return false;
    }
    true
}

impl UsedRing<'_> {
    /// Writes the entry for `head`, then (release) the index that gives it to the driver.
    fn add(&mut self, device: &str, head: u16, len: u32) -> bool {
        // A power of two (`virtio-queue` takes no other size): a mask, not a division.
        let slot = usize::from(self.next & self.size.wrapping_sub(1));
        let next = self.next.wrapping_add(1);
        let written = match &self.view {
            Some(ring) => ring
                .store(u32::from(head).to_le(), 4 + 8 * slot, Ordering::Relaxed)
                .and_then(|()| ring.store(len.to_le(), 8 + 8 * slot, Ordering::Relaxed))
                .and_then(|()| ring.store(next.to_le(), 2, Ordering::Release))
                .map_err(|e| e.to_string()),
            None => {
                let entry = ((u64::from(len) << 32) | u64::from(head)).to_le();
                let at = |offset: usize| GuestAddress(self.addr.0.wrapping_add(offset as u64));
                self.memory
                    .write_obj(entry, at(4 + 8 * slot))
                    .and_then(|()| self.memory.store(next.to_le(), at(2), Ordering::Release))
                    .map_err(|e| e.to_string())
            }
        };
        match written {
            Ok(()) => {
                self.next = next;
                true
            }
            Err(e) => {
                warn_ratelimited!("{device}: cannot return a buffer: {e}");
                false
            }
        }
    }
}
